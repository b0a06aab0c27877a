"""The latent class families end to end on tiny packed features and a tiny random autoencoder:
train_ldm.py's (continuous time) and train_ldm_discrete.py's (discrete time): moments -> latents, labels with
guidance dropout, each from its paper config."""
import os

import numpy as np
import pytest
from PIL import Image

from configs.imagenet256_uvit_huge import get_config as huge_config
from configs.imagenet256_uvit_large import get_config as large_config
from libs import shards as F
from libs.family import LATENTS_CONTINUOUS, LATENTS_DISCRETE
from libs.trainer import train
from benchmarks.tiny_models import write_tiny_autoencoder


def write_features(folder, n=8, num_classes=3):
    rng = np.random.default_rng(0)
    moments = rng.standard_normal((n, 8, 32, 32)).astype(np.float32)
    moments[:, 4:] = -4.0  # small logvar: latents close to the means
    labels = np.arange(n) % num_classes
    with F.ShardWriter(folder, 0, n, moments.shape[1:], dtype='float32', with_labels=True) as w:
        w.write(0, moments, labels)
        w.commit()
    F.write_manifest(folder, 1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize('get_config,family', [(large_config, LATENTS_CONTINUOUS), (huge_config, LATENTS_DISCRETE)])
def test_latent_training_runs_and_writes_decoded_grid(tmp_path, get_config, family):
    write_features(str(tmp_path / 'features'))
    config = get_config()
    config.autoencoder.pretrained_path = write_tiny_autoencoder(str(tmp_path / 'ae.pth'))
    config.dataset.update(path=str(tmp_path / 'features'), num_classes=3)
    config.nnet.update(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4, use_checkpoint=False)
    config.train.update(n_steps=3, batch_size=4, log_interval=1, eval_interval=1000, save_interval=1000)
    config.lr_scheduler.warmup_steps = 1
    config.grid.update(n_rows=2, n_cols=1, steps=2)
    out = train(config, str(tmp_path / 'run'), family)
    assert out['run'].family.time == config.diffusion
    assert out['step'] == 3 and all(np.isfinite(m['loss']) for m in out['run'].logged)
    assert os.path.isdir(tmp_path / 'run' / 'ckpts' / '3.ckpt')
    with Image.open(tmp_path / 'run' / 'samples' / '3.png') as grid:
        # One column, two classes; 32x32 latents decode to 256x256 pixels; 2-pixel padding.
        assert grid.size == (256 + 4, 2 * 256 + 6)
