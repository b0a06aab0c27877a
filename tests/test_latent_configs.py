"""The shipped configs of other latent spaces and of pixel-space x-prediction, end to end on a CPU: tiny random
diffusers autoencoders (tests/tiny_autoencoders.py) with the configs' own latent shapes, extraction into the packed
format through scripts/extract_imagenet_feature.py, a few training steps through the trainer, a decoded sample grid,
and sample_class_cond.py decoding with the same model. Widths and depths are overridden down; full scale is untested."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sample_class_cond
from configs.imagenet256_uvit_base_jit import get_config as jit_config
from configs.imagenet256_uvit_huge_dcae import get_config as dcae_config
from configs.imagenet256_uvit_large_kl16 import get_config as kl16_config
from libs import shards as F
from libs.autoencoder import get_model
from libs.datasets.features import ImageNetFeatures
from libs.family import LATENTS_CONTINUOUS, PIXELS_CONTINUOUS
from libs.latent_stats import FILE, LatentStats
from libs.trainer import train
from sde import Objective
from tests import tiny_autoencoders as tiny
from tests.test_extract_imagenet import load_script, write_imagenet_folder

RES = 256
pytestmark = pytest.mark.usefixtures("one_thread")
# Shipped latent configs: (config, tiny model builder, latent shape, stated shift).
LATENT = {"dcae": (dcae_config, tiny.tiny_dcae, (32, 8, 8), math.sqrt(32 * 8 * 8 / 4096)),
          "kl16": (kl16_config, tiny.tiny_kl16, (16, 32, 32), math.sqrt(16 * 32 * 32 / 4096))}
TINY_NET = dict(embed_dim=32, depth=2, num_heads=2, num_classes=3, use_checkpoint=False)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """{name: (autoencoder folder, features folder)} extracted from one tiny ImageNet folder (two classes, one image
    already 256 px, one to crop)."""
    tmp = tmp_path_factory.mktemp("latents")
    images = write_imagenet_folder(str(tmp / "train"), {"n01": [(RES, RES)], "n02": [(300, RES)]})
    script = load_script("extract_imagenet_feature")
    out = {}
    for name, (_, build, _, _) in LATENT.items():
        folder = tiny.save(build(), tmp / name)
        script.main([f"--imagenet_train={tmp / 'train'}", f"--output={tmp / (name + '_features')}",
                     f"--resolution={RES}", f"--autoencoder={folder}", "--batch_size=1", "--num_workers=0",
                     "--shard_size=1"])
        out[name] = (folder, str(tmp / (name + "_features")))
    out["images"] = images
    return out


def test_shipped_shifts_are_stated():
    for name, (get_config, _, shape, shift) in LATENT.items():
        config = get_config()
        assert tuple(config.z_shape) == shape and Objective.of(config).shift == pytest.approx(shift), name
    assert Objective.of(jit_config()).shift == 1.0 and Objective.of(jit_config()).prediction == "x0"


@pytest.mark.parametrize("name", list(LATENT))
def test_extraction_writes_and_reads_the_latents(extracted, name):
    folder, features = extracted[name]
    reader = F.open_features(features)
    shape = LATENT[name][2][1:]
    ae = get_model(folder)
    assert reader.manifest["info"]["latent_shape"] == [ae.embed_dim, *shape]
    assert reader.moments_shape == (ae.moment_channels, *shape) and len(reader) == 4
    data = ImageNetFeatures(features, resolution=RES, num_classes=2)
    assert data.data_shape == (ae.embed_dim, *shape)
    # Entry 0 is the first class's image, already 256 px (no resampling): the moments of its pixels, then of its mirror.
    (arr,) = [a for c, a in extracted["images"].values() if c == 0]
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        expected = ae.encode_moments(torch.cat([x, x.flip(-1)])).numpy()
    np.testing.assert_allclose(reader.moments_many([0, 1]), expected, rtol=1e-5, atol=1e-6)
    # The statistics beside the shards: per-channel mean / std of every entry's posterior mean (computed here by numpy).
    stats = LatentStats.load(os.path.join(features, FILE))
    means = reader.moments_many(range(len(reader)))[:, :ae.embed_dim].astype(np.float64)
    per_channel = means.transpose(1, 0, 2, 3).reshape(ae.embed_dim, -1)
    np.testing.assert_allclose(stats.mean.numpy(), per_channel.mean(1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.std.numpy(), per_channel.std(1), rtol=1e-9, atol=1e-12)


CLASS_CONFIG = """
from {module} import get_config as shipped
def get_config():
    config = shipped()
    config.autoencoder.pretrained_path = {ae!r}
    config.nnet.update(**{net!r})
    return config
"""


@pytest.mark.parametrize("name", list(LATENT))
def test_latent_config_trains_and_samples(extracted, tmp_path, name):
    """A few steps of the shipped config on the extracted features, a decoded grid, then sample_class_cond.py
    decoding with the same autoencoder."""
    folder, features = extracted[name]
    config = LATENT[name][0]()
    config.autoencoder.pretrained_path = folder
    config.dataset.update(path=features, num_classes=2)
    config.nnet.update(**TINY_NET)
    config.train.update(n_steps=2, batch_size=2, log_interval=1, eval_interval=1000, save_interval=1000)
    config.lr_scheduler.warmup_steps = 1
    config.grid.update(n_rows=2, n_cols=1, steps=2)
    out = train(config, str(tmp_path / "run"), LATENTS_CONTINUOUS)
    assert out["step"] == 2 and all(np.isfinite(m["loss"]) for m in out["run"].logged)
    with Image.open(tmp_path / "run" / "samples" / "2.png") as grid:
        assert grid.size == (RES + 4, 2 * RES + 6)  # two classes, one column, decoded to 256 px
    module = {"dcae": "configs.imagenet256_uvit_huge_dcae", "kl16": "configs.imagenet256_uvit_large_kl16"}[name]
    (tmp_path / "config.py").write_text(CLASS_CONFIG.format(module=module, ae=folder, net=TINY_NET))
    paths = sample_class_cond.main([f"--config={tmp_path / 'config.py'}", f"--nnet_path={tmp_path / 'run' / 'ckpts' / '2.ckpt'}",
                                    "--steps=2", "--device=cpu", f"--output_dir={tmp_path / 'samples'}",
                                    "--class_ids=0,1", "--n_per_class=1"])
    with Image.open(paths[0]) as image:
        assert image.size == (RES, RES)


def test_pixel_jit_config_trains_and_samples(tmp_path):
    """The JiT-style pixel config (x-prediction, 16 x 16 patches at 256 px): two steps and a sample grid."""
    write_imagenet_folder(str(tmp_path / "images"), {"a": [(RES, RES)], "b": [(RES, RES)]})
    config = jit_config()
    config.dataset.update(name="image_folder", path=str(tmp_path / "images"), resolution=RES, kind="pixels")
    config.nnet.update(**TINY_NET)
    config.train.update(n_steps=2, batch_size=2, log_interval=1, eval_interval=1000, save_interval=1000)
    config.lr_scheduler.warmup_steps = 1
    config.grid.update(n_rows=2, n_cols=1, steps=2)
    # The folder's offline score samples at each checkpoint and at the end: a few images, not 1,000 at 256 px.
    config.fid.n_samples = 0
    config.sample.update(n_samples=4, mini_batch_size=4, sample_steps=2)
    out = train(config, str(tmp_path / "run"), PIXELS_CONTINUOUS)
    assert out["run"].diffusion.objective.prediction == "x0"
    assert out["step"] == 2 and all(np.isfinite(m["loss"]) for m in out["run"].logged)
    with Image.open(tmp_path / "run" / "samples" / "2.png") as grid:
        assert grid.size == (RES + 4, 2 * RES + 6)
