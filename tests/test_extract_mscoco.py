"""MS-COCO extraction scripts on a tiny COCO-style set with a tiny random autoencoder and CLIP."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from libs import shards as F
from libs.autoencoder import get_model
from libs.clip import FrozenCLIPEmbedder
from libs.datasets import get_dataset
from libs.errors import DataError, MissingFileError
from benchmarks.tiny_models import write_tiny_autoencoder, write_tiny_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 32


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_coco(root, split, images, seed=0):
    """images: list of (image id, (w, h), [captions]); writes <root>/<split>2014/*.png and the captions JSON
    in the COCO annotation format (annotations deliberately not grouped by image)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, f"{split}2014"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    ann = {"info": {}, "licenses": [], "images": [], "annotations": []}
    pixels = {}
    for image_id, (w, h), _ in images:
        name = f"COCO_{split}2014_{image_id:012d}.png"
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(root, f"{split}2014", name))
        ann["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
        pixels[image_id] = arr
    next_id = 1
    for round_ in range(max(len(c) for _, _, c in images)):
        for image_id, _, captions in images:
            if round_ < len(captions):
                ann["annotations"].append({"id": next_id, "image_id": image_id, "caption": captions[round_]})
                next_id += 1
    with open(os.path.join(root, "annotations", f"captions_{split}2014.json"), "w") as f:
        json.dump(ann, f)
    return pixels


TRAIN = [(42, (RES, RES), ["the cat", "a cat on a mat", "cat"]),
         (7, (40, 50), ["the dog", "a dog"]),
         (13, (48, 32), []),  # no caption: skipped
         (99, (RES, RES), ["the dog and the cat"])]
VAL = [(5, (RES, RES), ["a red dog"]), (3, (36, 36), ["the cat", "dog"])]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coco")
    pixels = {**write_coco(str(tmp / "coco"), "train", TRAIN), **write_coco(str(tmp / "coco"), "val", VAL, seed=1)}
    ae = write_tiny_autoencoder(str(tmp / "ae.pth"))
    clip = write_tiny_clip(str(tmp / "clip"), hidden_size=32)
    out = tmp / "features"
    common = [f"--output={out}", f"--clip={clip}"]
    load_script("extract_mscoco_feature").main([f"--coco_root={tmp / 'coco'}", f"--resolution={RES}",
                                                f"--autoencoder={ae}", "--batch_size=2", "--shard_size=2",
                                                "--num_workers=0", *common])
    load_script("extract_empty_feature").main(common + ["--device=cpu"])
    load_script("extract_test_prompt_feature").main(common + ["--device=cpu"])
    return tmp, out, pixels, ae, clip


def test_train_and_val_features(coco):
    tmp, out, pixels, ae_path, clip_dir = coco
    ae, clip = get_model(ae_path), FrozenCLIPEmbedder(clip_dir)
    for split, spec in (("train", TRAIN), ("val", VAL)):
        reader = F.open_features(str(out / split))
        kept = sorted((i, c) for i, _, c in spec if c)  # increasing image id, captionless images dropped
        assert len(reader) == len(kept)
        for n, (image_id, captions) in enumerate(kept):
            assert reader.num_contexts(n) == len(captions)
            expected = clip(captions).numpy()  # captions in annotation-file order
            for k in range(len(captions)):
                np.testing.assert_allclose(reader.context(n, k), expected[k], atol=1e-5, rtol=1e-5)
            arr = pixels[image_id]
            if arr.shape[:2] == (RES, RES):  # no resampling: moments of the raw pixels
                x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1
                with torch.no_grad():
                    np.testing.assert_allclose(reader.moments(n), ae.encode_moments(x)[0].numpy(), atol=1e-5, rtol=1e-4)
            assert reader.moments(n).shape == (8, RES // 8, RES // 8)


def test_center_square_lanczos_matches_pil():
    from PIL import Image

    script = load_script("extract_mscoco_feature")
    arr = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    got = script.center_square_lanczos(Image.fromarray(arr), 16)
    ref = np.asarray(Image.fromarray(arr[:, 15:55]).resize((16, 16), Image.LANCZOS))
    np.testing.assert_array_equal(got, ref)


def test_dataset_reads_extraction_with_empty_and_vis_contexts(coco):
    tmp, out, _, _, clip_dir = coco
    data = get_dataset("mscoco256_features", path=str(out))
    clip = FrozenCLIPEmbedder(clip_dir)
    assert data.data_shape == (4, RES // 8, RES // 8) and len(data.train) == 3 and len(data.test) == 2
    np.testing.assert_allclose(data.empty_context, clip([""])[0].numpy(), atol=1e-5, rtol=1e-5)
    prompts_module = load_script("extract_test_prompt_feature")
    assert data.vis_prompts == prompts_module.DEFAULT_PROMPTS
    np.testing.assert_allclose(data.vis_contexts, clip(prompts_module.DEFAULT_PROMPTS).numpy(), atol=1e-5, rtol=1e-5)
    item = data.train[0]
    assert item["moments"].shape == (8, RES // 8, RES // 8) and item["context"].shape == (77, 32)


def test_prompt_file_and_skip_when_up_to_date(coco, tmp_path):
    _, _, _, _, clip_dir = coco
    script = load_script("extract_test_prompt_feature")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n\n  a dog  \n")
    args = [f"--output={tmp_path / 'o'}", f"--clip={clip_dir}", f"--prompts_file={prompts}", "--device=cpu"]
    script.main(args)
    assert json.loads((tmp_path / "o" / "vis_prompts.json").read_text()) == ["the cat", "a dog"]
    stamp = os.stat(tmp_path / "o" / "vis_contexts.npy").st_mtime_ns
    script.main(args)
    assert os.stat(tmp_path / "o" / "vis_contexts.npy").st_mtime_ns == stamp
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="no prompts"):
        script.main(args[:-2] + [f"--prompts_file={tmp_path / 'empty.txt'}", "--device=cpu"])


def test_missing_inputs(coco, tmp_path):
    tmp, _, _, ae, clip = coco
    script = load_script("extract_mscoco_feature")
    with pytest.raises(MissingFileError, match="annotations"):
        script.main([f"--coco_root={tmp_path}", f"--output={tmp_path / 'o'}", f"--autoencoder={ae}",
                     f"--clip={clip}"])
    with pytest.raises(MissingFileError, match="clip-vit-large-patch14"):
        script.main([f"--coco_root={tmp / 'coco'}", f"--output={tmp_path / 'o'}", f"--autoencoder={ae}",
                     f"--clip={tmp_path / 'no_clip'}", "--split=val"])
    bad = tmp_path / "bad_coco" / "annotations"
    os.makedirs(bad)
    os.makedirs(tmp_path / "bad_coco" / "val2014")
    (bad / "captions_val2014.json").write_text(json.dumps({"images": [{"id": 1}]}))
    with pytest.raises(DataError, match="not a COCO captions annotation file"):
        script.main([f"--coco_root={tmp_path / 'bad_coco'}", f"--output={tmp_path / 'o'}", "--split=val",
                     f"--autoencoder={ae}", f"--clip={clip}"])


TRAIN_CONFIG = """
from configs.mscoco_uvit_small import get_config as paper_config


def get_config():
    config = paper_config()
    config.z_shape = (4, {r}, {r})
    config.autoencoder.pretrained_path = {ae!r}
    config.nnet.update(img_size={r}, patch_size=2, embed_dim=32, depth=2, num_heads=2, clip_dim=32)
    config.dataset.path = {features!r}
    config.train.update(n_steps=3, batch_size=2, log_interval=1, eval_interval=3, save_interval=3)
    config.lr_scheduler.warmup_steps = 1
    config.grid.update(n_rows=2, n_cols=1, steps=2)
    config.fid.update(n_samples=2, steps=2)
    config.sample.update(sample_steps=2, n_samples=2, mini_batch_size=2)
    config.dataloader.update(num_workers=0, pin_memory=False, persistent_workers=False)
    return config
"""


def test_end_to_end_extract_train_sample(coco):
    """Tiny COCO -> features (fixture) -> 3 steps of train_t2i_discrete.py -> sample_t2i_discrete.py, 2 prompts."""
    import subprocess
    import sys

    import sample_t2i_discrete
    from PIL import Image

    tmp, out, _, ae, clip = coco
    config = tmp / "train_config.py"
    config.write_text(TRAIN_CONFIG.format(r=RES // 8, ae=ae, features=str(out)))
    workdir = tmp / "run"
    proc = subprocess.run([sys.executable, "train_t2i_discrete.py", f"--config={config}", f"--workdir={workdir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (workdir / "train.log").read_text()
    assert "step 3/3" in log and "loss nan" not in log
    assert (workdir / "samples" / "3.png").is_file()  # grid of the vis prompts, decoded by the autoencoder
    paths = sample_t2i_discrete.main([f"--config={config}", f"--nnet_path={workdir / 'ckpts' / '3.ckpt'}",
                                      f"--clip={clip}", "--steps=2", "--device=cpu", f"--output_dir={tmp / 'samples'}",
                                      "the cat", "a dog"])
    assert len(paths) == 2
    for p in paths:
        assert np.asarray(Image.open(p)).shape == (RES, RES, 3)
