"""scripts/extract_imagenet_feature.py on a tiny ImageNet-style folder with a tiny random autoencoder."""
import importlib.util
import os
import re

import numpy as np
import pytest
import torch

from libs import shards as F
from libs.autoencoder import get_model
from libs.errors import ConfigError, DataError, MissingFileError
from benchmarks.tiny_models import write_tiny_autoencoder
from tests.test_train_distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 64  # small crops keep the tiny autoencoder fast; the script is resolution-agnostic (multiples of 8)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_imagenet_folder(root, sizes_per_class, seed=0):
    """root/<class>/<i>.png random RGB images; returns {path: (class index, uint8 array)}."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = {}
    for c, (name, sizes) in enumerate(sorted(sizes_per_class.items())):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = os.path.join(root, name, f"{name}_{i}.png")
            Image.fromarray(arr).save(path)
            out[path] = (c, arr)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inet")
    # Class folders deliberately not in creation order; one image already RES x RES (crop = identity).
    images = write_imagenet_folder(str(tmp / "train"), {"n02": [(RES, RES), (90, 70)], "n01": [(70, 80)],
                                                        "n03": [(64, 100), (RES, RES)]})
    ae_path = write_tiny_autoencoder(str(tmp / "ae.pth"))
    return tmp, images, ae_path


def run(module, tmp, ae_path, out, *extra):
    module.main([f"--imagenet_train={tmp / 'train'}", f"--output={out}", f"--resolution={RES}",
                 f"--autoencoder={ae_path}", "--batch_size=2", "--num_workers=0", *extra])


def test_extracts_moments_of_images_and_flips_with_sorted_class_labels(setup):
    tmp, images, ae_path = setup
    script = load_script("extract_imagenet_feature")
    out = tmp / "features"
    run(script, tmp, ae_path, out, "--shard_size=2")
    reader = F.open_features(str(out))
    paths = sorted(images, key=lambda p: (os.path.basename(os.path.dirname(p)), p))
    assert len(reader) == 2 * len(paths) == 10
    assert reader.manifest["info"]["classes"] == ["n01", "n02", "n03"]
    # Labels: index of the class folder in sorted order, twice per image (image, flip).
    expected_labels = [images[p][0] for p in paths for _ in range(2)]
    assert reader.labels().tolist() == expected_labels == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    ae = get_model(ae_path)
    with torch.no_grad():
        for i, p in enumerate(paths):
            arr = images[p][1]
            if arr.shape[:2] != (RES, RES):
                continue
            # Exact-size images are not resampled: the moments are those of the raw pixels and their mirror.
            x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1
            np.testing.assert_allclose(reader.moments(2 * i), ae.encode_moments(x)[0].numpy(), atol=1e-5, rtol=1e-4)
            np.testing.assert_allclose(reader.moments(2 * i + 1), ae.encode_moments(x.flip(-1))[0].numpy(),
                                       atol=1e-5, rtol=1e-4)
    assert reader.moments_shape == (8, RES // 8, RES // 8)
    # The dataset class reads it (built directly: the registry names imply 256 or 512 pixels).
    from libs.datasets.features import ImageNetFeatures

    data = ImageNetFeatures(str(out), resolution=RES, num_classes=3)
    assert data.data_shape == (4, RES // 8, RES // 8) and int(data.train[9]["y"]) == 2


def test_resume_skips_finished_shards_and_refuses_other_settings(setup):
    tmp, _, ae_path = setup
    script = load_script("extract_imagenet_feature")
    out = tmp / "resume"
    run(script, tmp, ae_path, out, "--shard_size=2")
    first = F.open_features(str(out))
    before = [first.moments(i) for i in range(len(first))]
    # Simulate a run killed during shard 1: its record and the manifest are gone.
    os.remove(out / "shard_00001.json")
    os.remove(out / "manifest.json")
    stamp0 = os.stat(out / "shard_00000.moments.npy").st_mtime_ns
    run(script, tmp, ae_path, out, "--shard_size=2")
    assert os.stat(out / "shard_00000.moments.npy").st_mtime_ns == stamp0  # finished shard not redone
    again = F.open_features(str(out))
    for i, m in enumerate(before):
        np.testing.assert_array_equal(again.moments(i), m)
    with pytest.raises(ConfigError, match="other settings"):
        run(script, tmp, ae_path, out, "--shard_size=3")


def test_pending_shards_split_between_processes():
    plan = F.plan_shards(10, 2)
    parts = [F.pending_shards("/nonexistent", plan, rank, 3) for rank in range(3)]
    assert sorted(s for p in parts for s in p) == plan
    assert all(set(a).isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1:])


def test_missing_inputs(setup, tmp_path):
    tmp, _, ae_path = setup
    script = load_script("extract_imagenet_feature")
    with pytest.raises(ConfigError, match="--imagenet_train"):  # required
        script.main([f"--output={tmp_path / 'o'}"])
    with pytest.raises(ConfigError, match="imagenet-train"):  # flags are written with underscores
        script.main([f"--imagenet-train={tmp / 'train'}", f"--output={tmp_path / 'o'}"])
    with pytest.raises(MissingFileError, match="--imagenet_train"):
        script.main([f"--imagenet_train={tmp_path / 'nope'}", f"--output={tmp_path / 'o'}",
                     f"--autoencoder={ae_path}"])
    with pytest.raises(MissingFileError, match="assets/stable-diffusion"):
        script.main([f"--imagenet_train={tmp / 'train'}", f"--output={tmp_path / 'o'}",
                     f"--autoencoder={tmp_path / 'no_ae.pth'}"])
    bad = tmp_path / "bad" / "n00"
    os.makedirs(bad)
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        script.main([f"--imagenet_train={tmp_path / 'bad'}", f"--output={tmp_path / 'o2'}",
                     f"--autoencoder={ae_path}", "--resolution=64", "--num_workers=0"])


@pytest.mark.slow
def test_accelerate_launch_two_processes(setup):
    """Two CPU processes split the shards; the result equals the single-process extraction."""
    import subprocess
    import sys

    tmp, _, ae_path = setup
    out1, out2 = tmp / "one", tmp / "two"
    run(load_script("extract_imagenet_feature"), tmp, ae_path, out1, "--shard_size=1")
    # `--multi_gpu` with ACCELERATE_USE_CPU=true: two gloo processes (`--cpu --num_processes 2` starts one).
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()),
                           os.path.join(ROOT, "scripts", "extract_imagenet_feature.py"),
                           f"--imagenet_train={tmp / 'train'}", f"--output={out2}", f"--resolution={RES}",
                           f"--autoencoder={ae_path}", "--batch_size=2", "--num_workers=0", "--shard_size=1"],
                          cwd=ROOT, timeout=600, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"process 0/2 has \d+ left", done.stderr + done.stdout), done.stderr[-3000:]  # world size 2
    a, b = F.open_features(str(out1)), F.open_features(str(out2))
    assert len(a) == len(b)
    for i in range(len(a)):
        np.testing.assert_allclose(a.moments(i), b.moments(i), atol=1e-5, rtol=1e-4)


TRAIN_CONFIG = """
from configs.imagenet256_uvit_large import get_config as paper_config


def get_config():
    config = paper_config()
    config.autoencoder.pretrained_path = {ae!r}
    # 256-pixel features (the dataset name implies 256) -> (4, 32, 32) latents; a tiny network on them.
    config.nnet.update(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3, use_checkpoint=False)
    config.dataset.update(path={features!r}, num_classes=2)
    config.train.update(n_steps=2, batch_size=2, log_interval=1, eval_interval=2, save_interval=2)
    config.lr_scheduler.warmup_steps = 1
    config.grid.update(n_rows=1, n_cols=1, steps=2)
    config.fid.update(n_samples=2, steps=2)
    config.sample.update(sample_steps=2, n_samples=2, mini_batch_size=2)
    config.dataloader.update(num_workers=0, pin_memory=False, persistent_workers=False)
    return config
"""


def test_end_to_end_extract_256_and_train_ldm(tmp_path):
    """Tiny ImageNet-style folder -> extract_imagenet_feature.py at 256 -> 2 steps of train_ldm.py."""
    import subprocess
    import sys

    write_imagenet_folder(str(tmp_path / "train"), {"n01": [(300, 256)], "n02": [(256, 280)]})
    ae_path = write_tiny_autoencoder(str(tmp_path / "ae.pth"))
    features = tmp_path / "imagenet256_features"
    load_script("extract_imagenet_feature").main([
        f"--imagenet_train={tmp_path / 'train'}", f"--output={features}", "--resolution=256",
        f"--autoencoder={ae_path}", "--batch_size=2", "--num_workers=0"])
    assert F.open_features(str(features)).labels().tolist() == [0, 0, 1, 1]
    config = tmp_path / "config.py"
    config.write_text(TRAIN_CONFIG.format(ae=ae_path, features=str(features)))
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train_ldm.py", f"--config={config}", f"--workdir={workdir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (workdir / "train.log").read_text()
    assert "step 2/2" in log and "loss nan" not in log
    assert (workdir / "ckpts" / "2.ckpt").is_dir() and (workdir / "samples" / "2.png").is_file()
