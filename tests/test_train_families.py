"""Training-time evaluation per family: which numbers are guided, and config.fid.n_samples = 0 (off)."""
import json
import os

import numpy as np
import pytest
import torch

import libs.sampling
from configs.digits_uvit_tiny import get_config as digits_config
from configs.imagenet256_uvit_huge import get_config as huge_config
from configs.mscoco_uvit_small import get_config as mscoco_config
from libs.errors import ConfigError
from libs.family import LATENTS_CONTINUOUS, PIXELS_CONTINUOUS, TEXT_LATENTS_DISCRETE
from libs.trainer import train
from benchmarks.tiny_models import write_tiny_autoencoder
from libs.metrics import inception

FID_BATCH, GRID_BATCH, FINAL_BATCH = 5, 4, 3  # distinct batch sizes tell the sampling calls apart


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def spy(monkeypatch):
    """Records (batch size, guidance scale) of every sampler call."""
    calls, real = [], libs.sampling.sample

    def sample(nnet, diffusion, x_T, **kwargs):
        calls.append((x_T.shape[0], kwargs['scale']))
        return real(nnet, diffusion, x_T, **kwargs)
    monkeypatch.setattr(libs.sampling, 'sample', sample)
    return calls


def with_fid(config, root):
    torch.save(inception.random_state_dict(seed=2), root / 'inception.pth')
    rng = np.random.default_rng(0)
    np.savez(root / 'ref.npz', mu=rng.standard_normal(2048), sigma=np.diag(rng.uniform(0.5, 2, 2048)))
    config.fid.update(stat=str(root / 'ref.npz'), inception_weights=str(root / 'inception.pth'), n_samples=FID_BATCH,
                      steps=2)
    config.train.update(n_steps=2, batch_size=4, log_interval=1, eval_interval=1000, save_interval=2)
    config.grid.update(n_rows=2, n_cols=2, steps=2, scale=0.5)
    config.sample.update(n_samples=FINAL_BATCH, sample_steps=2, mini_batch_size=FID_BATCH, cfg=True, scale=1.0)
    config.lr_scheduler.warmup_steps = 1
    return config


def test_text_models_training_fid_is_guided(tmp_path, spy):
    rng = np.random.default_rng(1)
    coco = tmp_path / 'coco'
    for split, n in (('train', 4), ('val', 2)):
        (coco / split).mkdir(parents=True)
        for i in range(n):
            np.save(coco / split / f'{i}.npy', rng.standard_normal((8, 2, 2)).astype(np.float32))
            np.save(coco / split / f'{i}_0.npy', rng.standard_normal((77, 16)).astype(np.float32))
    np.save(coco / 'empty_context.npy', rng.standard_normal((77, 16)).astype(np.float32))
    np.save(coco / 'vis_contexts.npy', rng.standard_normal((2, 77, 16)).astype(np.float32))
    (coco / 'vis_prompts.json').write_text(json.dumps(['a', 'b']))
    config = with_fid(mscoco_config(), tmp_path)
    config.z_shape = (4, 2, 2)
    config.autoencoder.pretrained_path = write_tiny_autoencoder(str(tmp_path / 'ae.pth'))
    config.nnet.update(img_size=2, patch_size=1, embed_dim=32, depth=2, num_heads=2, clip_dim=16)
    config.dataset.path = str(coco)
    config.dataloader.update(num_workers=0, pin_memory=False)
    out = train(config, str(tmp_path / 'run'), TEXT_LATENTS_DISCRETE)
    assert out['fid'] is not None
    assert {scale for b, scale in spy if b == FID_BATCH} == {1.0}  # as the original's train_t2i_discrete.py
    assert {scale for b, scale in spy if b == GRID_BATCH} == {0.5}
    assert {scale for b, scale in spy if b == FINAL_BATCH} == {1.0}


def test_class_models_training_fid_is_unguided(tmp_path, spy):
    config = with_fid(digits_config(), tmp_path)
    config.nnet.update(embed_dim=32, depth=2, num_heads=2)
    out = train(config, str(tmp_path / 'run'), PIXELS_CONTINUOUS)
    assert out['fid'] is not None
    assert {scale for b, scale in spy if b == FID_BATCH} == {0.0}  # as the original's train.py / train_ldm*.py
    assert {scale for b, scale in spy if b == FINAL_BATCH} == {1.0}


def test_fid_n_samples_zero_means_no_training_time_evaluation(tmp_path, spy):
    config = digits_config()
    config.nnet.update(embed_dim=32, depth=2, num_heads=2)
    config.train.update(n_steps=2, batch_size=4, log_interval=1, eval_interval=1000, save_interval=1)
    config.grid.update(n_rows=2, n_cols=2, steps=2)
    config.sample.update(n_samples=FINAL_BATCH, sample_steps=2, mini_batch_size=FID_BATCH)
    config.fid.n_samples = 0
    out = train(config, str(tmp_path), PIXELS_CONTINUOUS)
    assert out['step'] == 2 and out['score'] is None and out['fid'] is None
    assert not os.path.exists(tmp_path / 'score.json')
    assert all(b != 0 for b, _ in spy)  # no empty evaluation was sampled
    assert os.path.exists(tmp_path / 'final_eval.json')  # the final evaluation uses config.sample


def test_another_family_script_stops_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"^this config is discrete-time .*: use train_ldm_discrete.py$"):
        train(huge_config(), str(tmp_path / 'run'), LATENTS_CONTINUOUS)
    with pytest.raises(ConfigError, match=r"^this config is .*: use train_t2i_discrete.py$"):
        train(mscoco_config(), str(tmp_path / 'run'), PIXELS_CONTINUOUS)
    assert not os.path.exists(tmp_path / 'run')  # nothing was written
