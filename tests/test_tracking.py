"""Trackers: config.log_with -> accelerate trackers; TensorBoard event files hold the scalars and sample grids."""
import glob
import io
import os

import ml_collections
import numpy as np
import pytest
import torch

from libs import tracking
from libs.errors import ConfigError

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_events(folder):
    files = glob.glob(os.path.join(folder, '**', 'events.out.tfevents.*'), recursive=True)
    assert files, f"no event file under {folder}"
    acc = EventAccumulator(folder, size_guidance={'images': 0, 'scalars': 0})
    acc.Reload()
    return acc


def decode_png(encoded):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(encoded)).convert('RGB'))


def test_tensorboard_event_file_holds_scalars_and_the_grid(tmp_path):
    from accelerate.tracking import TensorBoardTracker

    tracker = TensorBoardTracker('uvit', str(tmp_path))
    tracker.start()
    tracker.store_init_configuration(tracking.flat_hparams(ml_collections.ConfigDict(
        dict(seed=1, train=dict(batch_size=8, mode='cond'), optimizer=dict(betas=(0.9, 0.99)), z_shape=None))))
    tracker.log({'train/loss': 0.25}, step=3)
    tracker.log({'train/loss': 0.125, 'eval/fid': 12.5}, step=6)
    grid = torch.rand(3, 10, 14)
    grid[0, 0, 0] = 1.7  # out of range: clamped to 1
    tracking.log_image([tracker], 'samples', grid, step=6)
    tracker.finish()

    acc = read_events(os.path.join(str(tmp_path), 'uvit'))
    assert [(e.step, e.value) for e in acc.Scalars('train/loss')] == [(3, 0.25), (6, 0.125)]
    assert [(e.step, e.value) for e in acc.Scalars('eval/fid')] == [(6, 12.5)]
    (image,) = acc.Images('samples')
    assert (image.step, image.width, image.height) == (6, 14, 10)
    expected = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(decode_png(image.encoded_image_string), expected)
    assert glob.glob(os.path.join(str(tmp_path), 'uvit', '*', 'hparams.yml'))


def test_accelerator_writes_tensorboard_under_the_workdir(tmp_path):
    from accelerate import Accelerator

    config = ml_collections.ConfigDict(dict(log_with='tensorboard', wandb=dict(project='proj', mode='offline'),
                                            train=dict(batch_size=4)))
    accelerator = Accelerator(cpu=True, **tracking.accelerator_kwargs(config, str(tmp_path)))
    tracking.start_trackers(accelerator, config, str(tmp_path))
    accelerator.log({'train/lr': 0.5}, step=1)
    tracking.log_image(accelerator.trackers, 'samples', torch.zeros(3, 4, 4), step=1)
    accelerator.end_training()
    acc = read_events(os.path.join(str(tmp_path), 'tensorboard', 'proj'))
    assert [(e.step, e.value) for e in acc.Scalars('train/lr')] == [(1, 0.5)]
    assert len(acc.Images('samples')) == 1


def test_no_tracker_by_choice():
    assert tracking.trackers_for('') == [] and tracking.trackers_for(None) == []
    config = ml_collections.ConfigDict(dict(log_with=''))
    assert tracking.accelerator_kwargs(config, '/tmp/x')['log_with'] is None


def test_log_with_values(monkeypatch):
    assert tracking.trackers_for('tensorboard') == ['tensorboard']
    with pytest.raises(AssertionError, match="config.log_with is 'mlflow'"):
        tracking.trackers_for('mlflow')
    installed = {'tensorboard'}
    monkeypatch.setattr(tracking.importlib.util, 'find_spec', lambda name: object() if name in installed else None)
    assert tracking.trackers_for('all') == ['tensorboard']  # a missing one is skipped with a warning
    with pytest.raises(ConfigError, match='pip install wandb'):
        tracking.trackers_for('wandb')


def test_wandb_is_offline_and_resumable_by_default(tmp_path):
    config = ml_collections.ConfigDict(dict(wandb=dict(project='uvit', mode='offline')))
    kwargs = tracking.tracker_init_kwargs(config, str(tmp_path))['wandb']
    assert kwargs['mode'] == 'offline' and kwargs['resume'] == 'allow'
    assert kwargs['id'] == tracking.tracker_init_kwargs(config, str(tmp_path))['wandb']['id']  # same run on resume
    assert tracking.tracker_init_kwargs(ml_collections.ConfigDict(), str(tmp_path))['wandb']['mode'] == 'offline'


def test_flat_hparams_are_scalars_or_strings():
    config = ml_collections.ConfigDict(dict(a=1, b=dict(c=(1, 2), d=None, e='x', f=dict(g=True)), h=[0.5]))
    assert tracking.flat_hparams(config) == {'a': 1, 'b.c': '(1, 2)', 'b.e': 'x', 'b.f.g': True, 'h': '(0.5,)'}
