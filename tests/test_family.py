"""Family: batches, guidance dropout, per-image noise, and generate() against closed forms."""
import math

import ml_collections
import pytest
import torch

from libs.errors import ConfigError
from libs.family import (LATENTS_DISCRETE, PIXELS_CONTINUOUS, TEXT_LATENTS_DISCRETE, Family, per_index_noise,
                         to_unit_images)


def test_family_kinds_are_validated():
    with pytest.raises(ValueError):
        Family('voxels', 'continuous', 'none')


def test_uncond_mode_turns_label_family_unconditional():
    cfg = ml_collections.ConfigDict({'train': {'mode': 'uncond'}})
    assert PIXELS_CONTINUOUS.for_config(cfg).condition == 'none'
    cfg.train.mode = 'cond'
    assert PIXELS_CONTINUOUS.for_config(cfg).condition == 'label'


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
    class Data:
        num_classes = 10
    labels, contexts, n = PIXELS_CONTINUOUS.grid_conditions(Data(), n_rows=10, n_cols=3)
    assert n == 30 and contexts is None
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]
    labels, _, n = PIXELS_CONTINUOUS.grid_conditions(type('D', (), {'num_classes': 1000})(), n_rows=4, n_cols=2)
    assert labels.tolist() == [0, 0, 333, 333, 666, 666, 999, 999]


class ZeroEps(torch.nn.Module):
    """Predicts eps = 0: the probability-flow ODE is then dx/dt = f(t) x, so x_0 = (alpha_end / alpha_T) x_T."""

    def forward(self, x, t, y=None):
        return torch.zeros_like(x)


def test_generate_with_zero_noise_prediction_matches_closed_form():
    from sde import build_diffusion

    # Continuous VP: log alpha_t = -(b1 - b0) t^2 / 4 - b0 t / 2, b0 = 0.1, b1 = 20; DPM-Solver ends at t = 1e-4.
    def log_alpha(t):
        return -(20 - 0.1) * t ** 2 / 4 - 0.1 * t / 2
    ratio = math.exp(log_alpha(1e-4) - log_alpha(1.0))
    noise = per_index_noise(range(3), seed=0, shape=(1, 4, 4)) * 1e-3  # keep k * x inside [-1, 1]
    y = torch.tensor([0, 1, 2])
    images = PIXELS_CONTINUOUS.generate(ZeroEps(), build_diffusion('continuous'), noise, cond={'y': y},
                                        uncond={'y': torch.full_like(y, 9)}, algorithm='dpm_solver', steps=6,
                                        scale=1.0)
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
    with pytest.raises(ConfigError, match='use train.py'):
        LATENTS_DISCRETE.check(config, Data())
