"""The trainer's seam for training aids (libs/training_aids.py): an aid written in this file alone trains,
resumes exactly and logs its metric; checkpoints of REPA and post-hoc EMA written before the seam resume."""
import os
import shutil

import ml_collections
import pytest
import torch

from configs.digits_uvit_tiny import get_config
from libs import training_aids
from libs.config_utils import parse_and_validate
from libs.errors import ConfigError
from libs.family import PIXELS_CONTINUOUS
from libs.trainer import train
from tests.test_repa import _save_encoder, repa_config

FIXTURE = os.path.join(os.path.dirname(__file__), 'data', 'repa_posthoc_3.ckpt')


class OutputPenalty:
    """A toy aid: weight * mean(output^2) of the network's output on the same forward, and a counter of the
    applied steps kept in the checkpoint."""
    section = state_key = 'output_penalty'
    fresh = 'the counter starts at 0'

    def __init__(self, section, nnet, data, device):
        self.weight, self.output = section.weight, None
        self.steps = torch.zeros((), dtype=torch.long, device=device)

    @staticmethod
    def problems(section):
        return [] if section.weight >= 0 else [('weight', 'must be >= 0 (0 = off)')]

    @staticmethod
    def enabled(section):
        return section.weight > 0

    def wrap(self, module):
        module.register_forward_hook(lambda m, args, out: setattr(self, 'output', out))
        return module

    def losses(self, batch):
        return {'output_l2': (self.weight, self.output.float().pow(2).mean())}

    def after_step(self, run, step, applied):
        self.steps += applied.long()  # on the device: no host sync in the hot loop

    def state_dict(self):
        return {'steps': self.steps.cpu()}

    def load_state_dict(self, state):
        self.steps.copy_(state['steps'])


def toy_config(weight=0.05, **train_keys):
    config = get_config()
    config.nnet.update(embed_dim=32, depth=2, num_heads=2)
    config.train.update({'batch_size': 16, 'log_interval': 3, 'eval_interval': 1000, 'save_interval': 1000,
                         **train_keys})
    config.lr_scheduler.warmup_steps = 2
    config.grid.update(n_rows=2, n_cols=2, steps=2)
    config.fid.n_samples = 0
    config.sample.update(n_samples=8, sample_steps=2, mini_batch_size=8)
    config.output_penalty = ml_collections.ConfigDict({'weight': weight})
    config.training_aids = (f'{__name__}:OutputPenalty',)  # the one line that adds the aid
    return config


def test_a_toy_aid_trains_resumes_exactly_and_logs_its_metric(tmp_path):
    straight = train(toy_config(n_steps=6, save_interval=3), str(tmp_path / 'a'), PIXELS_CONTINUOUS)
    train(toy_config(n_steps=3), str(tmp_path / 'b'), PIXELS_CONTINUOUS)
    resumed = train(toy_config(n_steps=6), str(tmp_path / 'b'), PIXELS_CONTINUOUS)
    a, b = straight['run'], resumed['run']
    assert all(torch.equal(p, q) for p, q in zip(a.nnet.parameters(), b.nnet.parameters()))
    assert int(a.steps) == int(b.steps) == 6  # its state came back from the step-3 checkpoint
    assert [m['output_l2'] for m in b.logged] == [m['output_l2'] for m in a.logged if m['step'] > 3]
    # The metric is the mean of the network's squared output over the logged steps: positive, finite.
    assert all(0 < m['output_l2'] < 1e3 for m in a.logged)
    with open(tmp_path / 'a' / 'train.log') as f:
        assert 'output_l2' in f.read()
    state = torch.load(tmp_path / 'a' / 'ckpts' / '3.ckpt' / 'train_state.pth', weights_only=False)
    assert int(state['output_penalty']['steps']) == 3
    # The penalty took part in the gradient: the same run without it ends elsewhere.
    plain = train(toy_config(weight=0.0, n_steps=3), str(tmp_path / 'c'), PIXELS_CONTINUOUS)['run']
    mid = train(toy_config(n_steps=3), str(tmp_path / 'd'), PIXELS_CONTINUOUS)['run']
    assert 'output_l2' not in plain.logged[0] and 'output_l2' in mid.logged[0]
    assert not all(torch.equal(p, q) for p, q in zip(plain.nnet.parameters(), mid.nnet.parameters()))


def test_an_aid_validates_its_own_section():
    with pytest.raises(ConfigError, match=r"^config.output_penalty.weight = -1.0: must be >= 0 \(0 = off\)$"):
        parse_and_validate(toy_config(weight=-1.0), world_size=1)


@pytest.mark.parametrize('name, message', [
    ('tests.no_such_module:OutputPenalty', r"cannot import 'tests.no_such_module:OutputPenalty' \(No module named "
                                            r"'tests.no_such_module'\): name each aid as 'package.module:ClassName'"),
    (f'{__name__}:NoSuchAid', rf"cannot import '{__name__}:NoSuchAid' \(.*NoSuchAid.*\): name each aid as"),
    ('OutputPenalty', r"'OutputPenalty' is not a class name: name each aid as 'package.module:ClassName'"),
    (f'{__name__}:toy_config', rf"'{__name__}:toy_config' lacks section, state_key, .* of the training-aid interface"),
])
def test_a_name_that_is_no_aid_is_one_line_before_any_work(name, message):
    config = toy_config()
    config.training_aids = (name,)
    with pytest.raises(ConfigError, match=rf"^config.training_aids = \('{name}',\): {message}") as e:
        parse_and_validate(config, world_size=1)
    assert '\n' not in str(e.value)


def test_the_aids_are_built_in_then_named_in_order():
    assert list(training_aids.classes(toy_config())) == ['posthoc_ema', 'repa', 'output_penalty']
    assert training_aids.classes(toy_config())['output_penalty'] is OutputPenalty


def test_a_checkpoint_written_before_the_seam_resumes(tmp_path, monkeypatch):
    """The step-3 checkpoint in tests/data was written by the trainer when it named REPA and post-hoc EMA
    itself (keys 'repa_projector' and 'posthoc_ema' of train_state.pth); resumed to step 6 it matches a run
    of the seam's trainer straight to 6 (a tolerance, not equality: the file was written on another CPU)."""
    monkeypatch.chdir(tmp_path)
    _save_encoder(tmp_path, 1)  # the seeded stand-in encoder the checkpoint was trained with

    def config(**keys):
        c = repa_config('encoder1.pt', n_steps=6, **keys)
        c.nnet.update(embed_dim=16, depth=1, num_heads=1)
        return c
    straight = train(config(save_interval=3), str(tmp_path / 'a'), PIXELS_CONTINUOUS)['run']
    shutil.copytree(FIXTURE, tmp_path / 'b' / 'ckpts' / '3.ckpt')
    resumed = train(config(), str(tmp_path / 'b'), PIXELS_CONTINUOUS)['run']
    assert [m['step'] for m in resumed.logged] == [6]  # it started at step 3
    for x, y in ((straight.nnet, resumed.nnet), (straight.aligner.projector, resumed.aligner.projector)):
        for p, q in zip(x.parameters(), y.parameters(), strict=True):
            torch.testing.assert_close(p, q)
    for pa, pb in zip(straight.posthoc.averages, resumed.posthoc.averages, strict=True):
        for p, q in zip(pa, pb, strict=True):
            torch.testing.assert_close(p, q)
    assert resumed.logged[-1]['align_loss'] == pytest.approx(straight.logged[-1]['align_loss'], rel=1e-4)
