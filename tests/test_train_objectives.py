"""The training engine's guarantees hold for the new objectives: exact resume with gradient accumulation, one big
batch = micro-batches, the non-finite policy, two processes, and a resume under another objective refused."""
import pytest
import torch

import sde
from libs.errors import ConfigError, TrainingDivergedError
from libs.family import PIXELS_CONTINUOUS
from libs.trainer import train
from tests.test_train import params, tiny_config
from tests.test_train_distributed import ROOT, WORKER, launch

pytestmark = pytest.mark.usefixtures("one_thread")

FLOW = {'path': 'linear', 'prediction': 'velocity', 'time_dist': 'logit_normal'}


def objective_config(objective=FLOW, **train_keys):
    config = tiny_config(**train_keys)
    config.objective.update(objective)
    if objective.get('path') == 'linear':
        config.sample.algorithm = 'heun'
    return config


def test_flow_resume_with_accumulation_is_exact(tmp_path):
    straight = train(objective_config(n_steps=4, save_interval=2, log_interval=2, grad_accum_steps=2), str(tmp_path / 'a'),
                     PIXELS_CONTINUOUS)
    train(objective_config(n_steps=2, log_interval=2, grad_accum_steps=2), str(tmp_path / 'b'), PIXELS_CONTINUOUS)
    resumed = train(objective_config(n_steps=4, log_interval=2, grad_accum_steps=2), str(tmp_path / 'b'), PIXELS_CONTINUOUS)
    a, b = straight['run'], resumed['run']
    assert isinstance(a.diffusion, sde.LinearFlow) and a.diffusion.objective.time_dist == 'logit_normal'
    assert torch.equal(params(b.nnet), params(a.nnet)) and torch.equal(params(b.nnet_ema), params(a.nnet_ema))
    assert [m['loss'] for m in b.logged] == [m['loss'] for m in a.logged if m['step'] > 2]
    # A resume under another objective would continue the weights with the wrong loss: refused in one line.
    with pytest.raises(ConfigError, match="objective.path: 'linear' -> 'vp'") as e:
        train(tiny_config(n_steps=6), str(tmp_path / 'b'), PIXELS_CONTINUOUS)
    assert '\n' not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize('objective', [FLOW, {'prediction': 'v'}], ids=['flow', 'v'])
def test_grad_accum_equals_one_big_batch(tmp_path, monkeypatch, objective):
    cls = sde.LinearFlow if objective.get('path') == 'linear' else sde.ContinuousVP
    original = cls.loss

    def chunked(self, nnet, x0, **cond):  # one batch of 16 draws what two micro-batches of 8 draw
        return torch.cat([original(self, nnet, x0[i:i + 8], **{n: c[i:i + 8] for n, c in cond.items()})
                          for i in range(0, len(x0), 8)])
    monkeypatch.setattr(cls, 'loss', chunked)
    runs = []
    for k in (1, 2):
        config = objective_config(objective, n_steps=3, batch_size=16, log_interval=1, grad_accum_steps=k)
        config.dataset.update(cfg=False, p_uncond=0.0)
        config.nnet.num_classes = 10
        config.sample.cfg = False
        runs.append(train(config, str(tmp_path / str(k)), PIXELS_CONTINUOUS)['run'])
    one, acc = runs
    for x, y in zip(one.logged, acc.logged, strict=True):
        assert y['loss'] == pytest.approx(x['loss'], rel=1e-5)
    torch.testing.assert_close(params(acc.nnet), params(one.nnet), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_flow_divergence_stops_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    original, calls = sde.LinearFlow.loss, {'n': 0}

    def loss(self, *args, **kwargs):
        calls['n'] += 1
        return original(self, *args, **kwargs) * (float('nan') if calls['n'] >= 5 else 1.0)
    monkeypatch.setattr(sde.LinearFlow, 'loss', loss)
    with pytest.raises(TrainingDivergedError, match='at step 7 .*The last good checkpoint is .*4.ckpt'):
        train(objective_config(n_steps=8, log_interval=4, save_interval=4), str(tmp_path), PIXELS_CONTINUOUS)


@pytest.mark.slow
def test_two_process_flow_training_stays_in_sync(tmp_path):
    worker = tmp_path / 'worker.py'
    worker.write_text(WORKER.format(root=ROOT))
    ranks = launch(worker, tmp_path / 'run', **{'train.n_steps': 2, 'train.save_interval': 2,
                                               'train.grad_accum_steps': 2, 'objective.path': 'linear',
                                               'objective.prediction': 'velocity', 'sample.algorithm': 'heun'})
    assert torch.equal(ranks[0]['params'], ranks[1]['params']) and torch.equal(ranks[0]['ema'], ranks[1]['ema'])


FEW_STEP = {'meanflow': {'path': 'meanflow', 'prediction': 'average_velocity', 'time_dist': 'logit_normal',
                         'cfg_omega': 2.0, 'two_time_fraction': 0.5},
            'shortcut': {'path': 'shortcut', 'prediction': 'velocity', 'two_time_fraction': 0.5}}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(FEW_STEP))
def test_few_step_resume_is_exact(tmp_path, name):
    """A run stopped at step 2 and resumed to 4 ends bit for bit as the straight run, with MeanFlow's JVP target
    (and its guidance) and the shortcut model's bootstrap target on."""
    def config(**keys):
        c = objective_config(FEW_STEP[name], log_interval=2, **keys)
        c.nnet.second_time = True
        c.sample.update(algorithm=name, sample_steps=1)
        c.fid.steps = c.grid.steps = 1
        return c
    straight = train(config(n_steps=4, save_interval=2), str(tmp_path / 'a'), PIXELS_CONTINUOUS)
    train(config(n_steps=2), str(tmp_path / 'b'), PIXELS_CONTINUOUS)
    resumed = train(config(n_steps=4), str(tmp_path / 'b'), PIXELS_CONTINUOUS)
    a, b = straight['run'], resumed['run']
    assert a.diffusion.path == name
    assert torch.equal(params(b.nnet), params(a.nnet)) and torch.equal(params(b.nnet_ema), params(a.nnet_ema))
    assert [m['loss'] for m in b.logged] == [m['loss'] for m in a.logged if m['step'] > 2]
