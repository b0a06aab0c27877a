"""Every family evaluates from its config with only the published files (weights, autoencoder, FID
statistics, and for text-to-image the val caption features): the training-data path does not exist.
A config given to the eval script of another family stops before any work, naming the right script."""
import importlib
import math
import os

import numpy as np
import pytest
import torch

from libs.errors import ConfigError
from libs.evaluation import run_evaluation
from libs.family import LATENTS_CONTINUOUS, LATENTS_DISCRETE, PIXELS_CONTINUOUS, TEXT_LATENTS_DISCRETE, family_of
from libs.nnet import build_nnet
from benchmarks.tiny_models import write_tiny_autoencoder
from libs.metrics import inception

TINY_NET = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2)
CASES = {  # config -> (the eval script's family, the tiny network)
    'cifar10_uvit_small': (PIXELS_CONTINUOUS, dict(img_size=8, patch_size=4)),
    'imagenet256_uvit_large': (LATENTS_CONTINUOUS, dict(img_size=2, patch_size=1, num_classes=4)),
    'imagenet256_uvit_huge': (LATENTS_DISCRETE, dict(img_size=2, patch_size=1, num_classes=4)),
    'mscoco_uvit_small': (TEXT_LATENTS_DISCRETE, dict(img_size=2, patch_size=1, clip_dim=16)),
}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('published')
    torch.save(inception.random_state_dict(seed=1), root / 'inception.pth')
    rng = np.random.default_rng(0)
    np.savez(root / 'ref.npz', mu=rng.standard_normal(2048), sigma=np.diag(rng.uniform(0.5, 2, 2048)))
    write_tiny_autoencoder(str(root / 'ae.pth'))
    # MS-COCO: only the val2014 caption features (original per-file layout) and the empty context; no train/.
    (root / 'coco' / 'val').mkdir(parents=True)
    for i in range(2):
        np.save(root / 'coco' / 'val' / f'{i}.npy', rng.standard_normal((8, 2, 2)).astype(np.float32))
        np.save(root / 'coco' / 'val' / f'{i}_0.npy', rng.standard_normal((77, 16)).astype(np.float32))
    np.save(root / 'coco' / 'empty_context.npy', rng.standard_normal((77, 16)).astype(np.float32))
    return root


def tiny_config(name, root):
    config = importlib.import_module(f'configs.{name}').get_config()
    config.nnet.update(**TINY_NET, **CASES[name][1])
    if 'use_checkpoint' in config.nnet:
        config.nnet.use_checkpoint = False
    if config.z_shape is not None:
        config.z_shape = (4, 2, 2)
        config.autoencoder.pretrained_path = str(root / 'ae.pth')
    config.dataset.path = str(root / 'coco' if name.startswith('mscoco') else root / 'no_training_data')
    config.fid.update(stat=str(root / 'ref.npz'), inception_weights=str(root / 'inception.pth'))
    config.sample.update(n_samples=3, mini_batch_size=2, sample_steps=2)
    return config


@pytest.mark.parametrize('name', sorted(CASES))
def test_each_family_evaluates_without_its_training_data(name, files, tmp_path):
    config = tiny_config(name, files)
    assert not os.path.exists(os.path.join(config.dataset.path, 'train'))
    torch.manual_seed(0)
    nnet_path = str(tmp_path / 'nnet.pth')
    torch.save(build_nnet(config.nnet).state_dict(), nnet_path)
    result = run_evaluation(config, nnet_path, CASES[name][0])
    assert result['n'] == 3 and math.isfinite(result['fid']) and result['fid'] > 0


@pytest.mark.parametrize('name', sorted(CASES))
def test_another_family_script_stops_before_any_work(name, files):
    config = tiny_config(name, files)
    right = {PIXELS_CONTINUOUS: 'eval.py', LATENTS_CONTINUOUS: 'eval_ldm.py', LATENTS_DISCRETE: 'eval_ldm_discrete.py',
             TEXT_LATENTS_DISCRETE: 'eval_t2i_discrete.py'}
    assert family_of(config).key == CASES[name][0].key
    for script_family, script in right.items():
        if script_family is CASES[name][0]:
            continue
        # The weights do not exist: any work before the check would fail with another error.
        with pytest.raises(ConfigError, match=f"^this config is .*: use {right[CASES[name][0]]}$"):
            run_evaluation(config, '/nonexistent/nnet.pth', script_family)
