"""Family: the family of each config and the script that serves it, batches, guidance dropout, the
sampling protocols, per-image noise, and the Sampler against closed forms."""
import importlib
import math
import os

import pytest
import torch

import libs.sampling

from libs.errors import ConfigError
from libs.family import (LATENTS_CONTINUOUS, LATENTS_DISCRETE, PIXELS_CONTINUOUS, SCRIPTS, TEXT_LATENTS_DISCRETE,
                         Family, family_of)
from libs.sampling import Sampler, per_index_noise, to_unit_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The script the original release ran each paper config with (its README and configs).
PAPER_SCRIPTS = {
    'cifar10_uvit_small': 'train.py', 'celeba64_uvit_small': 'train.py', 'imagenet64_uvit_mid': 'train.py',
    'imagenet64_uvit_large': 'train.py', 'imagenet256_uvit_large': 'train_ldm.py',
    'imagenet512_uvit_large': 'train_ldm.py', 'imagenet256_uvit_huge': 'train_ldm_discrete.py',
    'imagenet512_uvit_huge': 'train_ldm_discrete.py', 'mscoco_uvit_small': 'train_t2i_discrete.py',
    'digits_uvit_tiny': 'train.py',
}
SCRIPT_FAMILIES = {'train.py': PIXELS_CONTINUOUS, 'train_ldm.py': LATENTS_CONTINUOUS,
                   'train_ldm_discrete.py': LATENTS_DISCRETE, 'train_t2i_discrete.py': TEXT_LATENTS_DISCRETE}


def paper_config(name):
    return importlib.import_module(f'configs.{name}').get_config()


@pytest.mark.parametrize('name', sorted(PAPER_SCRIPTS))
def test_each_paper_config_is_served_by_its_original_script_only(name):
    config = paper_config(name)
    family = family_of(config)
    assert SCRIPTS[family.key][0] == PAPER_SCRIPTS[name]
    for script, served in SCRIPT_FAMILIES.items():
        if script == PAPER_SCRIPTS[name]:
            assert served.for_config(config) == family
            continue
        for stage, index in (('train', 0), ('eval', 1)):
            with pytest.raises(ConfigError) as e:
                served.for_config(config, stage)
            message = str(e.value)
            assert message.startswith('this config is ') and '\n' not in message
            assert message.endswith(f"use {SCRIPTS[family.key][index]}")


def test_the_entry_scripts_name_the_family_they_serve():
    for script, served in SCRIPT_FAMILIES.items():
        for name in (script, 'eval' + script[len('train'):]):
            text = open(os.path.join(ROOT, name)).read()
            constant = [k for k, v in vars(importlib.import_module('libs.family')).items() if v is served][0]
            assert f"main_for({constant})" in text, name


def test_discrete_config_on_the_continuous_script_names_the_discrete_one():
    with pytest.raises(ConfigError, match=r"^this config is discrete-time \(config.diffusion='discrete'\): "
                                          r"use eval_ldm_discrete.py$"):
        LATENTS_CONTINUOUS.for_config(paper_config('imagenet256_uvit_huge'), 'eval')


def test_family_follows_the_config_keys():
    config = paper_config('digits_uvit_tiny')
    assert family_of(config) == Family('pixels', 'continuous', 'label')
    config.train.mode = 'uncond'
    assert family_of(config).condition == 'none'
    config.diffusion = 'discrete'  # no script trains pixel-space discrete-time models
    with pytest.raises(ConfigError, match="pixel-space models with config.diffusion='discrete'"):
        family_of(config)
    config.diffusion = 'continous'
    with pytest.raises(ConfigError, match="'continous'"):
        family_of(config)
    config = paper_config('imagenet256_uvit_large')
    config.diffusion = 'discrete'
    assert family_of(config) == LATENTS_DISCRETE


def test_which_numbers_are_guided():
    cls, text = paper_config('imagenet256_uvit_huge'), paper_config('mscoco_uvit_small')
    assert family_of(cls).protocol(cls, 'sample') == ('dpm_solver', 50, 0.4)
    assert family_of(cls).protocol(cls, 'fid') == ('dpm_solver', 50, 0.0)  # class models: unguided training FID
    assert family_of(text).protocol(text, 'fid') == ('dpm_solver', 50, 1.0)  # text models: guided, as the original
    assert family_of(cls).protocol(cls, 'grid') == ('dpm_solver', 50, 0.4)
    cls.sample.cfg = False
    assert family_of(cls).protocol(cls, 'sample')[2] == 0.0 and family_of(cls).protocol(cls, 'grid')[2] == 0.0
    pixels = paper_config('cifar10_uvit_small')
    assert family_of(pixels).protocol(pixels, 'grid') == ('euler_maruyama_ode', 50, 0.0)


def test_sample_labels_are_uniform_over_the_data_classes():
    config = paper_config('imagenet256_uvit_huge')  # 1000 classes + the null label 1000
    config.nnet.num_classes, n = 4, 40000  # 3 data classes + null
    labels = family_of(config).sample_labels(config, n)
    counts = torch.bincount(labels, minlength=4).double() / n
    assert counts[3] == 0  # never the null label
    torch.testing.assert_close(counts[:3], torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.012, rtol=0)
    assert torch.equal(labels, family_of(config).sample_labels(config, n))  # seeded by config.seed
    assert family_of(paper_config('mscoco_uvit_small')).sample_labels(config, 3) is None


def test_label_dropout_rate_and_values():
    torch.manual_seed(0)
    n, p, null = 20000, 0.15, 1000
    y = torch.randint(0, 1000, (n,))
    out = LATENTS_DISCRETE.drop_condition({'y': y}, p, null)['y']
    dropped = out != y
    assert torch.all(out[dropped] == null)
    # Binomial(n, p): 5 standard deviations.
    assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_no_dropout_draws_nothing():
    y = torch.arange(5)
    torch.manual_seed(1)
    out = PIXELS_CONTINUOUS.drop_condition({'y': y}, 0.0, 10)
    assert torch.equal(out['y'], y)
    after = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(1))


def test_context_dropout_uses_the_empty_context():
    torch.manual_seed(0)
    c = torch.randn(400, 77, 8)
    empty = torch.full((77, 8), 7.0)
    out = TEXT_LATENTS_DISCRETE.drop_condition({'context': c}, 0.5, empty)['context']
    dropped = (out == 7.0).all(dim=(1, 2))
    assert torch.equal(out[~dropped], c[~dropped])
    assert 100 < dropped.sum() < 300


class FakeAutoencoder:
    scale_factor = 0.5

    def sample(self, moments):
        mean, logvar = moments.chunk(2, dim=1)
        return self.scale_factor * mean  # deterministic stand-in


def test_prepare_batch_kinds():
    x = torch.randn(2, 3, 4, 4)
    x0, cond = PIXELS_CONTINUOUS.prepare_batch({'x': x, 'y': torch.tensor([1, 2])})
    assert x0 is x and torch.equal(cond['y'], torch.tensor([1, 2]))
    moments = torch.randn(2, 8, 4, 4)
    x0, cond = LATENTS_DISCRETE.prepare_batch({'moments': moments, 'y': torch.tensor([3, 4])}, FakeAutoencoder())
    assert torch.equal(x0, 0.5 * moments[:, :4])
    ctx = torch.randn(2, 77, 8)
    _, cond = TEXT_LATENTS_DISCRETE.prepare_batch({'moments': moments, 'context': ctx}, FakeAutoencoder())
    assert cond['context'] is ctx


def test_per_index_noise_depends_only_on_seed_and_index():
    batch = per_index_noise(torch.tensor([3, 7, 11]), seed=5, shape=(2, 4, 4))
    alone = per_index_noise([7], seed=5, shape=(2, 4, 4))
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[1])
    assert not torch.equal(per_index_noise([7], seed=6, shape=(2, 4, 4)), alone)


def test_to_unit_images():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).reshape(1, 1, 2, 3)
    out = to_unit_images(x)
    assert out.shape == (1, 3, 2, 3)
    assert torch.equal(out[0, 2].flatten(), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def test_grid_conditions_one_row_per_class():
    config = paper_config('digits_uvit_tiny')  # 10 digits + the null label
    labels, contexts, n = PIXELS_CONTINUOUS.grid_conditions(config, None, n_rows=10, n_cols=3)
    assert n == 30 and contexts is None
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]
    config = paper_config('imagenet256_uvit_huge')
    labels, _, n = LATENTS_DISCRETE.grid_conditions(config, None, n_rows=4, n_cols=2)
    assert labels.tolist() == [0, 0, 333, 333, 666, 666, 999, 999]


def test_sampler_images_depend_on_the_index_only():
    class Net(torch.nn.Module):
        def forward(self, x, t, y=None):
            return 0.1 * x + 0.01 * y.float()[:, None, None, None]
    sampler = Sampler(PIXELS_CONTINUOUS, Net(), (1, 4, 4), seed=3, device='cpu', null=9)
    gen = sampler.generate_fn('dpm_solver', 3, 1.0, labels=torch.tensor([0, 1, 2, 3]))
    whole = gen(torch.arange(4))
    torch.testing.assert_close(torch.cat([gen(torch.tensor([3, 1])), gen(torch.tensor([0, 2]))])[[2, 1, 3, 0]],
                               whole)
    assert not torch.equal(whole[0], whole[1])


class ZeroEps(torch.nn.Module):
    """Predicts eps = 0: the probability-flow ODE is then dx/dt = f(t) x, so x_0 = (alpha_end / alpha_T) x_T."""

    def forward(self, x, t, y=None):
        return torch.zeros_like(x)


def test_generate_with_zero_noise_prediction_matches_closed_form(monkeypatch):
    # Continuous VP: log alpha_t = -(b1 - b0) t^2 / 4 - b0 t / 2, b0 = 0.1, b1 = 20; DPM-Solver ends at t = 1e-4.
    def log_alpha(t):
        return -(20 - 0.1) * t ** 2 / 4 - 0.1 * t / 2
    ratio = math.exp(log_alpha(1e-4) - log_alpha(1.0))
    # Small starting noise keeps ratio * x inside [-1, 1].
    monkeypatch.setattr(libs.sampling, 'per_index_noise', lambda *args: per_index_noise(*args) * 1e-3)
    sampler = Sampler(PIXELS_CONTINUOUS, ZeroEps(), (1, 4, 4), seed=0, device='cpu', null=9)
    images = sampler.generate_fn('dpm_solver', 6, 1.0, labels=torch.tensor([0, 1, 2]))(torch.arange(3))
    noise = per_index_noise(range(3), 0, (1, 4, 4)) * 1e-3
    expected = ((ratio * noise.double() + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)
    torch.testing.assert_close(images.double(), expected, rtol=1e-4, atol=1e-5)


def test_check_rejects_mismatched_num_classes():
    from configs.digits_uvit_tiny import get_config

    class Data:
        kind, num_classes, data_shape = 'pixels', 10, (1, 8, 8)
    config = get_config()
    PIXELS_CONTINUOUS.check(config, Data())
    config.nnet.num_classes = 10  # forgot the null label of guidance training
    with pytest.raises(ConfigError, match='num_classes'):
        PIXELS_CONTINUOUS.check(config, Data())
    config.nnet.num_classes = 11
    with pytest.raises(ConfigError, match='z_shape=None'):
        LATENTS_DISCRETE.check(config, Data())
    config.nnet.img_size = 16  # the digits are 8x8
    with pytest.raises(ConfigError, match=r"takes \(1, 16, 16\) \(config.nnet.in_chans, img_size\).*\(1, 8, 8\)"):
        PIXELS_CONTINUOUS.check(config, Data())
