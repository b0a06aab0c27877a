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


pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.parametrize('k', [1, 2])
def test_resume_continues_exactly(tmp_path, k):
    straight = train(tiny_config(n_steps=6, save_interval=3, grad_accum_steps=k), str(tmp_path / 'a'), PIXELS_CONTINUOUS)
    first = train(tiny_config(n_steps=3, grad_accum_steps=k), str(tmp_path / 'b'), PIXELS_CONTINUOUS)
    assert first['step'] == 3 and os.path.isdir(tmp_path / 'b' / 'ckpts' / '3.ckpt')
    resumed = train(tiny_config(n_steps=6, grad_accum_steps=k), str(tmp_path / 'b'), PIXELS_CONTINUOUS)
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


def chunked_loss(monkeypatch, b):
    """The diffusion loss of a batch computed chunk by chunk (b samples each, in order): one batch of k * b then
    draws the same t and noise from the step's generator as k micro-batches of b."""
    import sde

    original = sde.ContinuousVP.loss

    def loss(self, nnet, x0, **cond):
        return torch.cat([original(self, nnet, x0[i:i + b], **{n: c[i:i + b] for n, c in cond.items()})
                          for i in range(0, len(x0), b)])
    monkeypatch.setattr(sde.ContinuousVP, 'loss', loss)


def test_grad_accum_equals_one_big_batch(tmp_path, monkeypatch):
    """Two micro-batches of 8 per step through the trainer's train_step = one batch of 16: the same loss,
    gradients (Adam's first moment is (1 - beta1) x the gradient sum), weights and data position."""
    chunked_loss(monkeypatch, 8)
    runs = []
    for k in (1, 2):
        config = tiny_config(n_steps=3, batch_size=16, log_interval=1, grad_accum_steps=k)
        config.dataset.update(cfg=False, p_uncond=0.0)  # no condition dropout: the generator draws only t, eps
        config.nnet.num_classes = 10
        config.sample.cfg = False
        runs.append(train(config, str(tmp_path / str(k)), PIXELS_CONTINUOUS)['run'])
    one, acc = runs
    assert acc.loader.batch_size == 8 and one.loader.batch_size == 16
    assert acc.loader.state_dict() == one.loader.state_dict()  # 3 steps x 16 samples each
    for a, b in zip(one.logged, acc.logged, strict=True):
        assert b['loss'] == pytest.approx(a['loss'], rel=1e-5) and b['grad_norm'] == pytest.approx(a['grad_norm'], rel=1e-4)
    sa, sb = one.optimizer.state_dict()['state'], acc.optimizer.state_dict()['state']
    for i in sa:
        torch.testing.assert_close(sb[i]['exp_avg'], sa[i]['exp_avg'], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(params(acc.nnet), params(one.nnet), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params(acc.nnet_ema), params(one.nnet_ema), rtol=1e-5, atol=1e-6)
    assert not torch.equal(params(one.nnet), params(one.nnet_ema))  # the weights did move


def test_init_from_starts_a_new_run_from_the_weights(tmp_path, monkeypatch):
    import libs.trainer as trainer
    from libs.export import load_weights

    source = train(tiny_config(n_steps=2), str(tmp_path / 'src'), PIXELS_CONTINUOUS)['checkpoint']
    seen, real = [], trainer.train_step
    monkeypatch.setattr(trainer, 'train_step', lambda r, batches, step: seen.append(
        (step, params(r.nnet).clone(), params(r.nnet_ema).clone(), len(r.optimizer.state_dict()['state'])))
        or real(r, batches, step))
    config = tiny_config(n_steps=2)
    config.init.path = source
    train(config, str(tmp_path / 'new'), PIXELS_CONTINUOUS)
    weights = load_weights(source)[0]  # the source run's EMA network
    loaded = torch.cat([weights[k].flatten() for k, _ in trainer.build_nnet(config.nnet).named_parameters()])
    step, online, ema, n_states = seen[0]
    assert step == 0 and n_states == 0  # step 0, a fresh optimizer
    assert torch.equal(online, loaded) and torch.equal(ema, loaded)
    # The workdir now has a checkpoint: a rerun resumes it and ignores --init_from (said in the log).
    seen.clear()
    train(config_with(config, n_steps=3), str(tmp_path / 'new'), PIXELS_CONTINUOUS)
    assert [s for s, *_ in seen] == [2]
    assert "--init_from '" in (tmp_path / 'new' / 'train.log').read_text().split('resuming at step 2')[1].splitlines()[0]


def config_with(config, **train):
    config = config.copy_and_resolve_references()
    config.train.update(train)
    return config


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
    assert calls == [] and not os.path.exists(tmp_path / 'bad')  # nothing written either
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


def test_tensorboard_gets_the_train_scalars_and_sample_grids(tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train(tiny_config(n_steps=4, log_interval=2, eval_interval=4), str(tmp_path), PIXELS_CONTINUOUS)
    folder = tmp_path / 'tensorboard' / 'uvit'
    assert any(name.startswith('events.out.tfevents.') for name in os.listdir(folder))
    events = EventAccumulator(str(folder), size_guidance={'images': 0, 'scalars': 0})
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars('train/loss')]
    assert losses == [(m['step'], pytest.approx(m['loss'])) for m in out['run'].logged] and len(losses) == 2
    assert [e.step for e in events.Images('samples')] == [4]
    assert {'eval/digit_accuracy', 'eval/pixel_fd'} <= set(events.Tags()['scalars'])


def test_init_from_with_resize_adapts_the_label_embedding(tmp_path, monkeypatch):
    """--init_from weights of a 5-class model (+ null) into the 10-class digits network with
    --config.init.resize=True: shared classes and the null class copied, new rows the network's own."""
    import libs.trainer as trainer

    config = tiny_config(n_steps=1)
    source = trainer.build_nnet({**config.nnet.to_dict(), 'num_classes': 6}).state_dict()
    torch.save(source, tmp_path / 'five_classes.pth')
    config.init.update(path=str(tmp_path / 'five_classes.pth'), resize=True)
    seen, real = [], trainer.train_step
    monkeypatch.setattr(trainer, 'train_step', lambda r, batches, step: seen.append(
        r.nnet.label_emb.weight.detach().clone()) or real(r, batches, step))
    train(config, str(tmp_path / 'run'), PIXELS_CONTINUOUS)
    rows, src = seen[0], source['label_emb.weight']
    assert rows.shape == (11, 32) and torch.equal(rows[:5], src[:5]) and torch.equal(rows[-1], src[-1])
    assert not torch.equal(rows[5], src[4])  # a new class starts from the network's initialisation
    log = (tmp_path / 'run' / 'train.log').read_text().splitlines()
    assert [line.split('] ', 1)[1] for line in log if '] init: ' in line] == [
        'init: label_emb.weight (6, 32) -> (11, 32): classes 0..4 copied, null class 5 -> 10, classes 5..9 new '
        "(the network's initialisation)"]
