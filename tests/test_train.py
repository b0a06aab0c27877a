"""The training engine in one process on the digits config: learning, exact resume, NaN handling."""
import json
import os
import subprocess
import sys

import pytest
import torch

from configs.digits_uvit_tiny import get_config
from libs.errors import ConfigError, TrainingDivergedError
from libs.family import PIXELS_CONTINUOUS
from libs.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: one thread avoids oversubscribing a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**train):
    config = get_config()
    config.nnet.update(embed_dim=32, depth=2, num_heads=2)
    config.train.update({'batch_size': 32, 'log_interval': 3, 'eval_interval': 1000, 'save_interval': 1000, **train})
    config.lr_scheduler.warmup_steps = 2
    config.grid.update(n_rows=2, n_cols=2, steps=2)
    config.fid.update(n_samples=8, steps=2)
    config.sample.update(n_samples=8, sample_steps=2, mini_batch_size=8)
    return config


def params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_digits_loss_falls(tmp_path):
    config = tiny_config(n_steps=80, log_interval=10)
    config.nnet.update(embed_dim=64, num_heads=4)
    config.optimizer.lr = 3e-3
    out = train(config, str(tmp_path), PIXELS_CONTINUOUS)
    losses = [m['loss'] for m in out['run'].logged]
    assert len(losses) == 8
    # An untrained network's output is unrelated to the noise, so E (eps - f)^2 = 1 + E f^2 >= 1 per element.
    assert losses[0] > 0.8
    assert losses[-1] < 0.5 * losses[0]
    assert os.path.exists(tmp_path / 'samples' / '80.png')
    score = json.loads((tmp_path / 'score.json').read_text())
    assert set(score['score']['80']) == {'digit_accuracy', 'pixel_fd'}
    final = json.loads((tmp_path / 'final_eval.json').read_text())
    assert 0.0 <= final['digit_accuracy'] <= 1.0 and final['sample']['scale'] == config.sample.scale


def test_resume_continues_exactly(tmp_path):
    straight = train(tiny_config(n_steps=6, save_interval=3), str(tmp_path / 'a'), PIXELS_CONTINUOUS)
    first = train(tiny_config(n_steps=3), str(tmp_path / 'b'), PIXELS_CONTINUOUS)
    assert first['step'] == 3 and os.path.isdir(tmp_path / 'b' / 'ckpts' / '3.ckpt')
    resumed = train(tiny_config(n_steps=6), str(tmp_path / 'b'), PIXELS_CONTINUOUS)
    a, b = straight['run'], resumed['run']
    assert resumed['step'] == 6 and b.lr_scheduler.last_epoch == a.lr_scheduler.last_epoch == 6
    assert b.lr_scheduler.get_last_lr() == a.lr_scheduler.get_last_lr()
    assert b.loader.state_dict() == a.loader.state_dict()
    # Same data order, timesteps, noise and dropout after the resume: identical weights, EMA and moments.
    assert torch.equal(params(b.nnet), params(a.nnet))
    assert torch.equal(params(b.nnet_ema), params(a.nnet_ema))
    assert not torch.equal(params(b.nnet_ema), params(b.nnet))
    sa, sb = a.optimizer.state_dict()['state'], b.optimizer.state_dict()['state']
    assert all(torch.equal(sa[k]['exp_avg_sq'], sb[k]['exp_avg_sq']) for k in sa)
    assert [m['loss'] for m in b.logged] == [m['loss'] for m in a.logged if m['step'] > 3]


def nan_after(monkeypatch, k, times=None):
    """Make the diffusion loss NaN from its k-th call on (`times` calls, or forever)."""
    import sde

    original, calls = sde.ContinuousVP.loss, {'n': 0}

    def loss(self, *args, **kwargs):
        calls['n'] += 1
        out = original(self, *args, **kwargs)
        if calls['n'] >= k and (times is None or calls['n'] < k + times):
            return out * float('nan')
        return out
    monkeypatch.setattr(sde.ContinuousVP, 'loss', loss)


def _state(path, name):
    return torch.load(os.path.join(path, name), map_location='cpu', weights_only=True)


def test_divergence_stops_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    nan_after(monkeypatch, 5)  # steps 5, 6, 7, ... diverge
    with pytest.raises(TrainingDivergedError) as err:
        train(tiny_config(n_steps=8, log_interval=4, save_interval=2), str(tmp_path), PIXELS_CONTINUOUS)
    # Checked at the save of step 6 (2 in a row: goes on) and the log of step 8 (3 in a row = the default limit).
    message = str(err.value)
    assert 'at step 7 (3 step(s) in a row' in message and 'max_nonfinite_in_a_row=3' in message
    assert f"The last good checkpoint is {tmp_path / 'ckpts' / '6.ckpt'}" in message
    assert sorted(os.listdir(tmp_path / 'ckpts')) == ['2.ckpt', '4.ckpt', '6.ckpt']
    # The skipped steps 5 and 6 left the weights, EMA and optimizer exactly as step 4 did.
    for name in ('nnet.pth', 'nnet_ema.pth'):
        a, b = _state(tmp_path / 'ckpts' / '4.ckpt', name), _state(tmp_path / 'ckpts' / '6.ckpt', name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = (_state(tmp_path / 'ckpts' / f'{s}.ckpt', 'optimizer.pth')['state'] for s in (4, 6))
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])


def test_one_transient_overflow_is_skipped_and_logged(tmp_path, monkeypatch):
    nan_after(monkeypatch, 3, times=2)  # steps 3 and 4 only
    out = train(tiny_config(n_steps=6), str(tmp_path), PIXELS_CONTINUOUS)
    run = out['run']
    assert out['step'] == 6 and torch.isfinite(params(run.nnet)).all()
    assert run.bad_steps == {3, 4}
    logged = [line for line in (tmp_path / 'train.log').read_text().splitlines() if 'was skipped' in line]
    assert [line.split('] ')[1].split(':')[0] for line in logged] == ['step 3', 'step 4']


def test_stop_at_the_first_nonfinite_step(tmp_path, monkeypatch):
    nan_after(monkeypatch, 2, times=1)
    config = tiny_config(n_steps=3, log_interval=1)
    config.train.max_nonfinite_in_a_row = 1
    with pytest.raises(TrainingDivergedError, match='at step 2 .*none \\(no checkpoint yet\\)'):
        train(config, str(tmp_path), PIXELS_CONTINUOUS)


def test_train_step_is_what_the_loop_runs(tmp_path, monkeypatch):
    """A bad config stops the run before its first step; a good one runs exactly n_steps train_steps."""
    import libs.trainer as trainer

    calls, real = [], trainer.train_step
    monkeypatch.setattr(trainer, 'train_step', lambda r, batch, step: calls.append(step) or real(r, batch, step))
    with pytest.raises(ConfigError, match='config.train.nonfinite_window'):
        train(tiny_config(n_steps=2, nonfinite_window=0), str(tmp_path / 'bad'), PIXELS_CONTINUOUS)
    assert calls == []
    train(tiny_config(n_steps=2), str(tmp_path / 'good'), PIXELS_CONTINUOUS)
    assert calls == [0, 1]


def test_dry_run_writes_the_resolved_config(tmp_path):
    cmd = [sys.executable, 'train.py', '--config=configs/digits_uvit_tiny.py', '--dry_run',
           f'--workdir={tmp_path}', '--config.train.batch_size=96']
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    written = json.loads((tmp_path / 'config.json').read_text())
    assert written['train']['batch_size'] == 96 and written['nnet']['num_classes'] == 11
    assert not os.path.exists(tmp_path / 'ckpts')  # nothing trained


def test_dry_run_stops_on_a_bad_value_with_one_line(tmp_path):
    cmd = [sys.executable, 'train.py', '--config=configs/digits_uvit_tiny.py', '--dry_run', f'--workdir={tmp_path}',
           '--config.nnet.num_heads=5']
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert done.returncode == 1 and 'Traceback' not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "ConfigError: config.nnet.num_heads = 5: does not divide nnet.embed_dim = 96 (each head gets "
        "embed_dim / num_heads channels)")
    assert not os.path.exists(tmp_path / 'config.json')
