"""Diffusion processes of U-ViT: the continuous VP-SDE and the discrete Stable-Diffusion schedule.

Each class owns ONE `dpm_solver_pp.NoiseScheduleVP` (`.schedule`) used by both its training loss and the
samplers, so the two cannot disagree, and maps solver time to the network's time input (`.network_time`).

- `ContinuousVP`: the VP-SDE of Song et al. 2021 ("Score-Based Generative Modeling through Stochastic
  Differential Equations", arXiv 2011.13456), dx = -beta(t) x/2 dt + sqrt(beta(t)) dw, t in [0, 1], with the
  linear schedule (beta 0.1 -> 20). Training loss LSimple (Ho et al. 2020, arXiv 2006.11239):
  t ~ U(0, 1), network fed 999 t. Reverse SDE, probability-flow ODE and the original's Euler-Maruyama
  sampler.
- `DiscreteVP`: the "scaled linear" betas of Stable Diffusion (Rombach et al. 2022), n uniform in 1..1000,
  network fed the integer n in training and N t when sampling.

Randomness goes through torch generators only (the original drew the discrete n with numpy's global RNG),
so the trainer's per-step reseeding makes a resumed run draw what the uninterrupted one drew.
"""
import logging

import torch

from dpm_solver_pp import CONTINUOUS_TIME_SCALE, NoiseScheduleVP, _expand_dims, _is_positive_int, solver_dtype
from libs.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

# Euler-Maruyama grid of the original: linspace(EM_T_MIN, 1, S) with a final step to t = 0.
EM_T_MIN = 1e-3


def stable_diffusion_beta_schedule(linear_start=0.00085, linear_end=0.0120, n_timestep=1000):
    """Stable Diffusion's "scaled linear" betas (n_timestep,) float64, betas[n-1] = beta_n: sqrt(beta) linear."""
    return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64) ** 2


def _noised_mse(nnet, x0, eps, log_alpha, t_input, cond):
    """LSimple per sample: (B,) float32 (whatever the autocast dtype) mean of (eps - nnet(x_t, t_input))^2,
    x_t = alpha x0 + sigma eps with alpha = exp(log_alpha) (B,), sigma = sqrt(1 - alpha^2)."""
    alpha = _expand_dims(torch.exp(log_alpha), x0.ndim).to(x0.dtype)
    sigma = _expand_dims(torch.sqrt(-torch.expm1(2.0 * log_alpha)), x0.ndim).to(x0.dtype)
    pred = nnet(alpha * x0 + sigma * eps, t_input, **cond)
    if pred.shape != eps.shape:
        raise InputError(f"the network returned shape {tuple(pred.shape)}, expected the input shape {tuple(eps.shape)}")
    return (eps.float() - pred.float()).pow(2).reshape(eps.shape[0], -1).mean(dim=1)


def _check_x0(x0):
    if not torch.is_tensor(x0) or not x0.is_floating_point() or x0.ndim < 2:
        raise InputError(f"x0 must be a floating tensor (B, ...), got {getattr(x0, 'shape', type(x0).__name__)}")


class ScoreModel:
    """Adapter from a noise-predicting network to eps and score at continuous time t.

    eps_net(x, t_input, **cond) -> eps with t_input = diffusion.network_time(t) (999 t for ContinuousVP).
    x: (B, ...); t: (B,) in [0, 1]. Outputs are in x's dtype (network outputs are upcast).
    """

    def __init__(self, eps_net, diffusion, **cond):
        self.eps_net, self.diffusion, self.cond = eps_net, diffusion, cond

    def noise_pred(self, x, t):
        """eps_hat(x, t)."""
        return self.eps_net(x, self.diffusion.network_time(t), **self.cond).to(x.dtype)

    def score(self, x, t):
        """grad_x log p_t(x) ~ -eps_hat / sigma_t."""
        t = t.to(x.dtype)
        return -self.noise_pred(x, t) / _expand_dims(self.diffusion.schedule.marginal_std(t), x.ndim)


class ContinuousVP:
    """The continuous-time VP-SDE with the linear schedule, NoiseScheduleVP('linear')."""

    time_kind = "continuous"

    def __init__(self):
        self.schedule = NoiseScheduleVP("linear")

    def __repr__(self):
        return "ContinuousVP()"

    def network_time(self, t):
        """Network time input for solver time t: 999 t."""
        return CONTINUOUS_TIME_SCALE * t

    def loss(self, nnet, x0, generator=None, **cond):
        """LSimple: (B,) float32, mean over non-batch dims of (eps - nnet(x_t, 999 t, **cond))^2.

        x0: (B, ...). t ~ U(0, 1) then eps ~ N(0, I) are drawn (in that order, as the original) from
        `generator` or torch's default generator on x0.device. x_t = alpha_t x0 + sigma_t eps.
        """
        _check_x0(x0)
        t = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=torch.float32)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return _noised_mse(nnet, x0, eps, self.schedule.marginal_log_mean_coeff(t), self.network_time(t), cond)

    def reverse_sde_drift(self, score_model, x, t):
        """Drift of the reverse SDE (Anderson 1982; Song et al. 2021 eq. 6): -beta x/2 - beta score. t: (B,)."""
        beta = _expand_dims(self.schedule.beta(t.to(x.dtype)), x.ndim)
        return -0.5 * beta * x - beta * score_model.score(x, t)

    def pf_ode_drift(self, score_model, x, t):
        """Drift of the probability-flow ODE (Song et al. 2021 eq. 13): -beta x/2 - beta score/2. t: (B,)."""
        beta = _expand_dims(self.schedule.beta(t.to(x.dtype)), x.ndim)
        return -0.5 * beta * x - 0.5 * beta * score_model.score(x, t)

    def euler_maruyama(self, score_model, x_T, steps, sde=True, generator=None):
        """Euler-Maruyama on the reverse SDE (sde=True) or Euler on the PF-ODE, with the original's grid.

        Grid: {0} + linspace(1e-3, 1, steps), walked down from t = 1: exactly `steps` network calls, each at
        the upper end t of its step [s, t]; x <- x + drift(x, t)(s - t) + sqrt(beta(t)) sqrt(t - s) z, no noise
        on the last step (to s = 0) nor for the ODE.
        x_T: (B, ...) at t = 1. generator: None (torch default on x_T's device), a torch.Generator, or a
        sequence of B generators (one per sample, so a sample's path does not depend on its batch).
        Returns x at t = 0 in x_T's dtype (at least float32).
        """
        if not _is_positive_int(steps):
            raise ConfigError(f"Euler-Maruyama needs steps >= 1, got {steps!r}")
        x = x_T.to(solver_dtype(x_T.dtype))
        grid = torch.cat([torch.zeros(1, dtype=torch.float64),
                          torch.linspace(EM_T_MIN, 1.0, steps, dtype=torch.float64)]).to(device=x.device, dtype=x.dtype)
        drift_fn = self.reverse_sde_drift if sde else self.pf_ode_drift
        for i in range(steps, 0, -1):
            t, s = grid[i], grid[i - 1]
            t_vec = t.expand(x.shape[0])
            x_new = x + drift_fn(score_model, x, t_vec) * (s - t)
            if sde and i > 1:
                z = _randn_like(x, generator)
                x_new = x_new + self.schedule.beta(t).sqrt() * (t - s).sqrt() * z
            x = x_new
        return x


def _randn_like(x, generator):
    """N(0, I) like x from None / one generator / one generator per sample."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise InputError(f"got {len(generator)} generators for a batch of {x.shape[0]}; give one per sample")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])


class DiscreteVP:
    """The discrete-time diffusion of the latent-discrete and text-to-image U-ViTs (N = 1000 steps).

    The schedule is NoiseScheduleVP('discrete') of the float32 `stable_diffusion_beta_schedule()`, as the
    original's sampling scripts build it; the training loss uses the same table at its knots (abar_n =
    alpha(n/N)^2), which differs from the original's float64 cumprod by ~1e-7 relative.
    """

    time_kind = "discrete"

    def __init__(self):
        # float32 betas: the original's sampler built its schedule from float32 betas.
        self.schedule = NoiseScheduleVP("discrete", betas=stable_diffusion_beta_schedule().float())
        self.N = self.schedule.total_N

    def __repr__(self):
        return f"DiscreteVP(N={self.N})"

    def network_time(self, t):
        """Network time input for solver time t: N t (fractional between the training integers)."""
        return self.N * t

    def loss(self, nnet, x0, generator=None, **cond):
        """LSimple: (B,) float32, mean over non-batch dims of (eps - nnet(x_n, n, **cond))^2.

        x0: (B, ...). n uniform in 1..N (int64, given to the network as is) then eps ~ N(0, I), drawn from
        `generator` or torch's default generator on x0.device (the original used numpy's global RNG for n).
        x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps.
        """
        _check_x0(x0)
        n = torch.randint(1, self.N + 1, (x0.shape[0],), generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return _noised_mse(nnet, x0, eps, self.schedule.tables(x0.device, torch.float64)[1][n - 1], n, cond)


DIFFUSIONS = ("continuous", "discrete")


def build_diffusion(kind):
    """'continuous' -> ContinuousVP(), 'discrete' -> DiscreteVP() (config.diffusion)."""
    if kind == "continuous":
        return ContinuousVP()
    if kind == "discrete":
        return DiscreteVP()
    raise ConfigError(f"unknown diffusion kind '{kind}'; known: {', '.join(DIFFUSIONS)}")
