"""Diffusion processes of U-ViT and their training objectives (`Objective`: what the network predicts, how t is
drawn). Each owns ONE `dpm_solver_pp.NoiseScheduleVP`-like `.schedule`, read by its loss and by the samplers alike,
and maps solver time to the network's time input (`.network_time`).

- `ContinuousVP`: the VP-SDE of Song et al. 2021 (arXiv 2011.13456), linear schedule beta 0.1 -> 20, t in [0, 1],
  network fed 999 t; LSimple (Ho et al. 2020, arXiv 2006.11239); reverse SDE, PF-ODE, Euler-Maruyama.
- `DiscreteVP`: Stable Diffusion's "scaled linear" betas (Rombach et al. 2022), n uniform in 1..1000.
- `LinearFlow`: flow matching on x_t = (1 - t) x0 + t eps (Liu et al. 2022, arXiv 2209.03003; Lipman et al. 2022,
  arXiv 2210.02747; SiT, Ma et al. 2024, arXiv 2401.08740), predicting the velocity eps - x0.
- `MeanFlow` (Geng et al. 2025, arXiv 2505.13447), `Shortcut` (Frans et al. 2024, arXiv 2410.12557): few-step
  objectives on the linear path whose network takes a second time input.

Every path is Gaussian, x_t = a_t x0 + s_t eps, and every prediction is c1 x0 + c2 eps: `to_x0_eps` solves the 2x2
system, so the samplers need not know what the network predicts. Randomness goes through torch generators only,
so the trainer's per-step reseeding makes a resumed run draw what the uninterrupted one drew.
"""
import dataclasses
import logging
import math

import torch
import torch.autograd.forward_ad as fwAD

from dpm_solver_pp import CONTINUOUS_TIME_SCALE, NoiseScheduleVP, _expand_dims, _is_positive_int, solver_dtype
from libs.errors import ConfigError, InputError
from libs.nnet import unwrap_model

logger = logging.getLogger(__name__)

# Euler-Maruyama grid of the original: linspace(EM_T_MIN, 1, S) with a final step to t = 0.
EM_T_MIN = 1e-3


def stable_diffusion_beta_schedule(linear_start=0.00085, linear_end=0.0120, n_timestep=1000):
    """Stable Diffusion's "scaled linear" betas (n_timestep,) float64, betas[n-1] = beta_n: sqrt(beta) linear."""
    return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64) ** 2


def _noised_mse(nnet, x0, eps, log_alpha, t_input, cond, prediction="noise"):
    """LSimple per sample: (B,) float32 (whatever the autocast dtype) mean of (target - nnet(x_t, t_input))^2,
    x_t = alpha x0 + sigma eps with alpha = exp(log_alpha) (B,), sigma = sqrt(1 - alpha^2); target eps ('noise'),
    x0 ('x0') or v = alpha eps - sigma x0 ('v', Salimans & Ho 2022, arXiv 2202.00512)."""
    alpha = _expand_dims(torch.exp(log_alpha), x0.ndim).to(x0.dtype)
    sigma = _expand_dims(torch.sqrt(-torch.expm1(2.0 * log_alpha)), x0.ndim).to(x0.dtype)
    target = {"noise": lambda: eps, "x0": lambda: x0, "v": lambda: alpha * eps - sigma * x0}[prediction]()
    return _prediction_mse(nnet(alpha * x0 + sigma * eps, t_input, **cond), target)


def _prediction_mse(pred, target):
    """(B,) float32 mean over non-batch dims of (target - pred)^2."""
    if pred.shape != target.shape:
        raise InputError(f"the network returned shape {tuple(pred.shape)}, expected the input shape {tuple(target.shape)}")
    return (target.float() - pred.float()).pow(2).reshape(target.shape[0], -1).mean(dim=1)


def _check_x0(x0):
    if not torch.is_tensor(x0) or not x0.is_floating_point() or x0.ndim < 2:
        raise InputError(f"x0 must be a floating tensor (B, ...), got {getattr(x0, 'shape', type(x0).__name__)}")


def _time_and_noise(objective, x0, generator):
    """(t (B,) float32 from `Objective.draw_time`, eps ~ N(0, I) like x0 (B, ...)), drawn in that order from
    `generator` (None: torch's default on x0.device)."""
    _check_x0(x0)
    t = objective.draw_time(x0.shape[0], generator, x0.device)
    return t, torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)


PATHS = ("vp", "linear", "meanflow", "shortcut")
PREDICTIONS = {"vp": ("noise", "v", "x0"), "linear": ("velocity", "x0"), "meanflow": ("average_velocity",),
               "shortcut": ("velocity",)}
# x-prediction on the linear path divides by t (the noise level) to get the velocity; JiT clamps it from below
# by this (Li & He 2025, arXiv 2511.13720: t_eps = 0.05) so the loss weight stays finite near clean data.
X0_T_MIN = 0.05
TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
SECOND_TIMES = ("t_minus_r", "r")  # MeanFlow's second network time input
TWO_TIME_PATHS = ("meanflow", "shortcut")  # objectives whose network takes a second time (config.nnet.second_time)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a config trains: config.objective (configs/base.py). The default is the original's LSimple.

    path: 'vp' (config.diffusion's VP schedule) or 'linear' (flow matching, `LinearFlow`).
    prediction: the network's output: 'noise', 'v' or 'x0' on 'vp'; 'velocity' or 'x0' on 'linear' (x0: JiT's
        x-prediction trained with the velocity loss, `LinearFlow.loss`).
    time_dist: training t ~ 'uniform' U(0, 1) or 'logit_normal' sigmoid(N(logit_mean, logit_std^2)) (Esser et
        al. 2024, arXiv 2403.03206); continuous time only (a discrete VP draws n uniform).
    shift: training and sampling time t -> shift t / (1 + (shift - 1) t) of the linear path (Esser et al. 2024,
        sec. 5.3.2: more noise for high-resolution latents, e.g. 3); 1 = none.
    shift_base_dim: > 0 derives the shift from the dimension d = C H W of what is generated (`Objective.of`):
        shift = sqrt(d / shift_base_dim) (`dimension_shift`; Esser et al. 2024 eq. 23 with resolutions counted
        in values; RAE, Zheng et al. 2025, arXiv 2510.11690, base 4096); 0 = the given `shift`.

    The few-step objectives ('meanflow', 'shortcut'; their networks have config.nnet.second_time=True):
    two_time_fraction: the share of each batch trained on the two-time target: MeanFlow's r != t (the rest has
        r = t, flow matching), the shortcut model's self-consistency part (the rest: flow matching at d = 0).
    weight_power, weight_eps: MeanFlow's adaptive loss weight sg(1 / (||delta||^2 + eps)^p) (p = 0: plain MSE).
    cfg_omega, cfg_kappa, cfg_t_min, cfg_t_max: MeanFlow's guidance inside the target (its eq. 21): the velocity
        becomes omega v + kappa u(z_t, t, t | c) + (1 - omega - kappa) u(z_t, t, t | null) for conditioned samples
        with cfg_t_min <= t <= cfg_t_max (effective scale omega / (1 - kappa)); omega 1, kappa 0: none.
    second_time: MeanFlow's second network time input, 't_minus_r' (the paper's best) or 'r'.
    shortcut_steps: the shortcut model's finest grid M: step sizes d = 2^k / M, k = 0 .. log2(M) - 1.
    """
    path: str = "vp"
    prediction: str = "noise"
    time_dist: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    shift_base_dim: float = 0.0
    two_time_fraction: float = 0.25
    weight_power: float = 1.0
    weight_eps: float = 1e-3
    cfg_omega: float = 1.0
    cfg_kappa: float = 0.0
    cfg_t_min: float = 0.0
    cfg_t_max: float = 1.0
    second_time: str = "t_minus_r"
    shortcut_steps: int = 128

    @classmethod
    def of(cls, config):
        """The Objective of a config (a ConfigDict or dict, e.g. an exported config.json); no objective section
        (a config or an export made before objectives existed) is the default. With shift_base_dim > 0 the shift
        is derived from the dimension of config's x0 (z_shape, else nnet.in_chans x img_size^2)."""
        section = (config.get("objective") if config is not None else None) or {}
        fields = {f.name for f in dataclasses.fields(cls)}
        objective = cls(**{k: v for k, v in dict(section).items() if k in fields})
        if objective.shift_base_dim > 0:
            if objective.shift != 1.0:
                raise ConfigError(f"config.objective.shift = {objective.shift!r} and shift_base_dim = "
                                  f"{objective.shift_base_dim!r}: give the shift or derive it, not both (shift=1)")
            objective = dataclasses.replace(objective, shift=dimension_shift(generated_dim(config),
                                                                             objective.shift_base_dim))
        return objective

    def problems(self, time_kind):
        """The ConfigError messages of this objective under config.diffusion = time_kind (empty when fine)."""
        out = []
        if self.path not in PATHS:
            return [f"config.objective.path = {self.path!r}: not one of {', '.join(map(repr, PATHS))}"]
        if self.prediction not in PREDICTIONS[self.path]:
            out.append(f"config.objective.prediction = {self.prediction!r}: the {self.path!r} path takes "
                       f"{' or '.join(map(repr, PREDICTIONS[self.path]))}")
        if self.time_dist not in TIME_DISTRIBUTIONS:
            out.append(f"config.objective.time_dist = {self.time_dist!r}: not one of "
                       f"{', '.join(map(repr, TIME_DISTRIBUTIONS))}")
        elif self.time_dist != "uniform" and self.path == "vp" and time_kind == "discrete":
            out.append("config.objective.time_dist: a discrete VP diffusion draws n uniformly in 1..1000; use "
                       "'uniform' (or a continuous-time config)")
        if not self.logit_std > 0:
            out.append(f"config.objective.logit_std = {self.logit_std!r}: must be > 0")
        if not self.shift > 0:
            out.append(f"config.objective.shift = {self.shift!r}: must be > 0 (1 = no shift)")
        if not self.shift_base_dim >= 0:
            out.append(f"config.objective.shift_base_dim = {self.shift_base_dim!r}: must be >= 0 (0 = the given shift)")
        elif self.shift != 1.0 and self.path == "vp":
            out.append("config.objective.shift: the time shift is of the linear path; set "
                       "config.objective.path='linear' or shift=1")
        if not 0 <= self.two_time_fraction <= 1:
            out.append(f"config.objective.two_time_fraction = {self.two_time_fraction!r}: must lie in [0, 1]")
        if not self.weight_power >= 0:
            out.append(f"config.objective.weight_power = {self.weight_power!r}: must be >= 0 (the adaptive weight "
                       "1 / (||delta||^2 + weight_eps)^p; 0 = none)")
        if not self.weight_eps > 0:
            out.append(f"config.objective.weight_eps = {self.weight_eps!r}: must be > 0")
        if self.second_time not in SECOND_TIMES:
            out.append(f"config.objective.second_time = {self.second_time!r}: not one of "
                       f"{', '.join(map(repr, SECOND_TIMES))}")
        m = self.shortcut_steps
        if not (isinstance(m, int) and m >= 2 and m & (m - 1) == 0):
            out.append(f"config.objective.shortcut_steps = {m!r}: must be a power of 2 >= 2 (e.g. 128)")
        if self.guided and self.path != "meanflow":
            key, value = self.guidance_key()
            out.append(f"config.objective.{key} = {value!r}: guidance inside the target is MeanFlow's; set "
                       "config.objective.path='meanflow' or cfg_omega=1, cfg_kappa=0")
        if not self.cfg_kappa < 1:
            out.append(f"config.objective.cfg_kappa = {self.cfg_kappa!r}: must be < 1 (effective scale "
                       "omega / (1 - kappa))")
        if not 0 <= self.cfg_t_min <= 1:
            out.append(f"config.objective.cfg_t_min = {self.cfg_t_min!r}: must lie in [0, 1]")
        if not self.cfg_t_min <= self.cfg_t_max <= 1:
            out.append(f"config.objective.cfg_t_max = {self.cfg_t_max!r}: must lie in [cfg_t_min, 1]")
        return out

    @property
    def guided(self):
        """Whether MeanFlow's target carries guidance (cfg_omega != 1 or cfg_kappa != 0)."""
        return self.cfg_omega != 1.0 or self.cfg_kappa != 0.0

    def guidance_key(self):
        """(key, value) of the guidance setting a message about it names: cfg_omega when set, else cfg_kappa."""
        return ("cfg_omega", self.cfg_omega) if self.cfg_omega != 1.0 else ("cfg_kappa", self.cfg_kappa)

    def describe(self):
        """A short name for messages: 'vp/noise', 'linear/velocity (logit_normal, shift 3)'."""
        extra = [self.time_dist] if self.time_dist != "uniform" else []
        extra += [f"shift {self.shift:.4g}"] if self.shift != 1.0 else []
        if self.path in TWO_TIME_PATHS:
            extra += [f"{self.two_time_fraction:g} two-time"]
        return f"{self.path}/{self.prediction}" + (f" ({', '.join(extra)})" if extra else "")

    def draw_time(self, n, generator, device):
        """(n,) float32 training times in [0, 1): U(0, 1) (one torch.rand, as the original) or logit-normal,
        then the shift."""
        if self.time_dist == "uniform":
            t = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
        else:
            z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
            t = torch.sigmoid(self.logit_mean + self.logit_std * z)
        return shift_time(t, self.shift)


def generated_dim(config):
    """C H W of what a config generates: config.z_shape, else nnet (in_chans, img_size, img_size)."""
    z = config.get("z_shape")
    if z is not None:
        return math.prod(int(v) for v in z)
    nnet = config.get("nnet") or {}
    return int(nnet.get("in_chans", 3)) * int(nnet.get("img_size")) ** 2


def dimension_shift(dim, base_dim):
    """The resolution-dependent shift of flow time, sqrt(dim / base_dim): Esser et al. 2024 (eq. 23: a shift
    sqrt(m / n) keeps the noise-to-signal ratio of an n-value image at an m-value one); RAE (Zheng et al. 2025)
    with n = 4096. dim, base_dim: numbers of values (C H W) generated and of the base."""
    return math.sqrt(dim / base_dim)


def shift_time(t, shift):
    """The resolution shift of flow time, shift t / (1 + (shift - 1) t) (Esser et al. 2024, eq. 23); maps [0, 1]
    onto itself, 1 = identity."""
    return t if shift == 1.0 else shift * t / (1.0 + (shift - 1.0) * t)


def to_x0_eps(pred, x, a, s, c1, c2):
    """(x0, eps) from a prediction pred = c1 x0 + c2 eps at x = a x0 + s eps (all broadcastable to x).

    The 2x2 system [a s; c1 c2] [x0; eps] = [x; pred] has determinant a c2 - s c1, non-zero wherever the
    prediction determines x0 (noise prediction: a > 0; velocity on the linear path: always 1).
    """
    det = a * c2 - s * c1
    return (c2 * x - s * pred) / det, (a * pred - c1 * x) / det


class ScoreModel:
    """Adapter from a network to eps and score at continuous time t: eps_net(x, t_input, **cond) -> the diffusion's
    prediction, t_input = diffusion.network_time(t). x: (B, ...); t: (B,) in [0, 1]; outputs in x's dtype."""

    def __init__(self, eps_net, diffusion, **cond):
        self.eps_net, self.diffusion, self.cond = eps_net, diffusion, cond

    def noise_pred(self, x, t):
        """eps_hat(x, t) (converted from the network's prediction when it does not predict the noise)."""
        out = self.eps_net(x, self.diffusion.network_time(t), **self.cond).to(x.dtype)
        return out if self.diffusion.objective.prediction == "noise" else self.diffusion.x0_eps(out, x, t)[1]

    def score(self, x, t):
        """grad_x log p_t(x) ~ -eps_hat / sigma_t."""
        t = t.to(x.dtype)
        return -self.noise_pred(x, t) / _expand_dims(self.diffusion.schedule.marginal_std(t), x.ndim)


class _VPPath:
    """The Gaussian-path interface of the VP diffusions: x_t = alpha_t x0 + sigma_t eps (self.schedule)."""

    def coefficients(self, t):
        """(a_t, s_t) at solver time t."""
        return self.schedule.marginal_alpha(t), self.schedule.marginal_std(t)

    def derivatives(self, t):
        """(da/dt, ds/dt): a' = -beta a / 2 and s' = -a a' / s (a^2 + s^2 = 1)."""
        a, s = self.coefficients(t)
        da = -0.5 * self.schedule.beta(t) * a
        return da, -a * da / s

    def x0_eps(self, out, x, t):
        """(x0, eps) from the network output `out` at x (B, ...), solver time t (B,)."""
        a, s = (_expand_dims(c.to(x.dtype), x.ndim) for c in self.coefficients(t.to(x.dtype)))
        if self.objective.prediction == "noise":
            return (x - s * out) / a, out
        c1, c2 = (1.0, 0.0) if self.objective.prediction == "x0" else (-s, a)  # v = a eps - s x0
        return to_x0_eps(out, x, a, s, c1, c2)


class ContinuousVP(_VPPath):
    """The continuous-time VP-SDE with the linear schedule, NoiseScheduleVP('linear')."""

    time_kind = "continuous"
    path = "vp"
    time_scale = CONTINUOUS_TIME_SCALE

    def __init__(self, objective=None):
        self.schedule = NoiseScheduleVP("linear")
        self.objective = objective or Objective()

    def __repr__(self):
        return "ContinuousVP()" if self.objective == Objective() else f"ContinuousVP({self.objective.describe()})"

    def network_time(self, t):
        """Network time input for solver time t: 999 t."""
        return CONTINUOUS_TIME_SCALE * t

    def loss(self, nnet, x0, generator=None, **cond):
        """LSimple: (B,) float32, mean over non-batch dims of (target - nnet(x_t, 999 t, **cond))^2.

        x0: (B, ...). t (U(0, 1) by default, `Objective.draw_time`) then eps ~ N(0, I) are drawn (in that order,
        as the original) from `generator` or torch's default generator on x0.device. x_t = alpha_t x0 + sigma_t
        eps; target: eps (the default), x0 or v = alpha_t eps - sigma_t x0 (config.objective.prediction).
        """
        t, eps = _time_and_noise(self.objective, x0, generator)
        return _noised_mse(nnet, x0, eps, self.schedule.marginal_log_mean_coeff(t), self.network_time(t), cond,
                           self.objective.prediction)

    def reverse_sde_drift(self, score_model, x, t):
        """Drift of the reverse SDE (Anderson 1982; Song et al. 2021 eq. 6): -beta x/2 - beta score. t: (B,)."""
        beta = _expand_dims(self.schedule.beta(t.to(x.dtype)), x.ndim)
        return -0.5 * beta * x - beta * score_model.score(x, t)

    def pf_ode_drift(self, score_model, x, t):
        """Drift of the probability-flow ODE (Song et al. 2021 eq. 13): -beta x/2 - beta score/2. t: (B,)."""
        beta = _expand_dims(self.schedule.beta(t.to(x.dtype)), x.ndim)
        return -0.5 * beta * x - 0.5 * beta * score_model.score(x, t)

    def euler_maruyama(self, score_model, x_T, steps, sde=True, generator=None):
        """Euler-Maruyama on the reverse SDE (sde=True) or Euler on the PF-ODE, on the original's grid {0} +
        linspace(1e-3, 1, steps) walked down from t = 1: `steps` network calls, each at the upper end t of its step
        [s, t]; x <- x + drift(x, t)(s - t) + sqrt(beta(t)) sqrt(t - s) z, no noise on the last step nor for the ODE.
        x_T: (B, ...) at t = 1. generator: None, a torch.Generator, or B generators (one per sample, so a sample's
        path does not depend on its batch). Returns x at t = 0 (B, ...) in x_T's dtype (at least float32).
        """
        assert _is_positive_int(steps), f"steps = {steps!r}: checked >= 1 where it enters"
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


class DiscreteVP(_VPPath):
    """The discrete-time diffusion of the latent-discrete and text-to-image U-ViTs (N = 1000 steps).

    The schedule is NoiseScheduleVP('discrete') of the float32 `stable_diffusion_beta_schedule()`, as the
    original's sampling scripts build it; the training loss uses the same table at its knots (abar_n =
    alpha(n/N)^2), which differs from the original's float64 cumprod by ~1e-7 relative.
    """

    time_kind = "discrete"
    path = "vp"

    def __init__(self, objective=None):
        # float32 betas: the original's sampler built its schedule from float32 betas.
        self.schedule = NoiseScheduleVP("discrete", betas=stable_diffusion_beta_schedule().float())
        self.N = self.schedule.total_N
        self.time_scale = float(self.N)
        self.objective = objective or Objective()

    def __repr__(self):
        extra = "" if self.objective == Objective() else f", {self.objective.describe()}"
        return f"DiscreteVP(N={self.N}{extra})"

    def network_time(self, t):
        """Network time input for solver time t: N t (fractional between the training integers)."""
        return self.N * t

    def loss(self, nnet, x0, generator=None, **cond):
        """LSimple: (B,) float32, mean over non-batch dims of (target - nnet(x_n, n, **cond))^2 (target as
        ContinuousVP.loss).

        x0: (B, ...). n uniform in 1..N (int64, given to the network as is) then eps ~ N(0, I), drawn from
        `generator` or torch's default generator on x0.device (the original used numpy's global RNG for n).
        x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps.
        """
        _check_x0(x0)
        n = torch.randint(1, self.N + 1, (x0.shape[0],), generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return _noised_mse(nnet, x0, eps, self.schedule.tables(x0.device, torch.float64)[1][n - 1], n, cond,
                           self.objective.prediction)


class LinearPathSchedule:
    """The marginals of the linear path, a_t = 1 - t, s_t = t, t in [0, 1], with NoiseScheduleVP's interface (what
    DPM_Solver reads): lambda_t = log((1 - t) / t), -inf at t = 1 (pure noise) and +inf at t = 0."""

    schedule, T, total_N = "linear_path", 1.0, 1000

    def __repr__(self):
        return "LinearPathSchedule()"

    def marginal_log_mean_coeff(self, t):
        return torch.log1p(-torch.as_tensor(t))

    def marginal_alpha(self, t):
        return 1.0 - torch.as_tensor(t)

    def marginal_std(self, t):
        return torch.as_tensor(t)

    def marginal_log_std(self, t):
        return torch.log(torch.as_tensor(t))

    def marginal_lambda(self, t):
        t = torch.as_tensor(t)
        return torch.log1p(-t) - torch.log(t)

    def inverse_lambda(self, lamb):
        return torch.sigmoid(-torch.as_tensor(lamb))


class LinearFlow:
    """Flow matching on x_t = (1 - t) x0 + t eps, t in [0, 1] (t = 1: pure noise), the network predicting the
    velocity u = eps - x0 or, with prediction 'x0', x0 itself trained through the velocity it implies (JiT, Li & He
    2025, arXiv 2511.13720). The network sees time_scale t: 999 t ('continuous'), 1000 t ('discrete')."""

    path = "linear"

    def __init__(self, time_kind="continuous", objective=None):
        self.time_kind = time_kind
        self.objective = objective or Objective(path="linear", prediction="velocity")
        self.schedule = LinearPathSchedule()
        self.time_scale = CONTINUOUS_TIME_SCALE if time_kind == "continuous" else float(self.schedule.total_N)

    def __repr__(self):
        return f"LinearFlow({self.time_kind}, {self.objective.describe()})"

    def network_time(self, t):
        """Network time input for solver time t: time_scale t."""
        return self.time_scale * t

    def coefficients(self, t):
        """(a_t, s_t) = (1 - t, t)."""
        return 1.0 - t, t

    def derivatives(self, t):
        """(da/dt, ds/dt) = (-1, 1)."""
        return -torch.ones_like(t), torch.ones_like(t)

    def x0_eps(self, out, x, t):
        """(x0, eps) from the network output `out` at x (B, ...), t (B,): the velocity u gives (x - t u,
        x + (1 - t) u); an x0 prediction gives (out, (x - (1 - t) out) / t) (unclamped: the samplers never
        evaluate at t = 0)."""
        t = _expand_dims(t.to(x.dtype), x.ndim)
        if self.objective.prediction == "x0":
            return to_x0_eps(out, x, 1.0 - t, t, 1.0, 0.0)
        return x - t * out, x + (1.0 - t) * out

    def loss(self, nnet, x0, generator=None, **cond):
        """Conditional flow matching: (B,) float32 mean over non-batch dims of (eps - x0 - nnet(x_t, time_scale t))^2.

        x0: (B, ...). t (`Objective.draw_time`: uniform or logit-normal, then the shift) then eps ~ N(0, I) from
        `generator` or torch's default generator on x0.device; x_t = (1 - t) x0 + t eps.
        Prediction 'x0' (JiT, Li & He 2025, Alg. 1 in this path's time direction): the network outputs x0_hat and
        the loss is on the velocity each implies, ((x_t - x0_hat) / t' - (x_t - x0) / t')^2 with t' = max(t,
        X0_T_MIN), i.e. (x0 - x0_hat)^2 / t'^2, computed in that cancellation-free form.
        """
        t, eps = _time_and_noise(self.objective, x0, generator)
        tb = _expand_dims(t, x0.ndim).to(x0.dtype)
        pred = nnet((1.0 - tb) * x0 + tb * eps, self.network_time(t), **cond)
        if self.objective.prediction == "x0":
            return _prediction_mse(pred, x0) / t.clamp_min(X0_T_MIN).float().pow(2)  # t' per sample
        return _prediction_mse(pred, eps - x0)


class _TwoTimeFlow(LinearFlow):
    """The linear path with a network of two time inputs, net(x_t, time_scale t, timesteps2=second, **cond), and
    its sampler x_r = x_t - (t - r) net(x_t, t, second(r, t)) (`libs.sampling`'s 'meanflow' / 'shortcut')."""

    def second_input(self, r, t):
        """The network's second time input for a step from t down to r: time_scale (t - r) (MeanFlow's interval,
        the shortcut model's step size d) or, MeanFlow with second_time='r', time_scale r."""
        return self.time_scale * (r if self.path == "meanflow" and self.objective.second_time == "r" else t - r)

    def two_time_net(self, nnet, cond):
        """The network as a function of (z, r, t) (B, ...), (B,), (B,), for forward-mode derivatives."""
        return lambda z, r, t: nnet(z, self.network_time(t), timesteps2=self.second_input(r, t), **cond)

    def n_two_time(self, batch):
        """How many leading samples of a batch train on the two-time target."""
        return int(round(self.objective.two_time_fraction * batch))


def _slice(cond, n):
    return {k: v[:n] for k, v in cond.items()}


def _jvp(net, f, primals, tangents):
    """The derivative of f(net, *primals) along `tangents` (None: a zero tangent, that input stays a plain tensor):
    one forward pass on torch.autograd.forward_ad's dual tensors; zeros where the output does not depend on the
    inputs. net (a module) runs with its vector parameters (biases, norm scales) as dual tensors of zero tangent:
    an absent tangent becomes torch's ZeroTensor, whose every operation goes through Python (~0.1 ms each on the
    CPU). Its matrices stay plain, where a zero tangent would cost a matmul. Sharded (DTensor) parameters are left
    to FSDP's hooks."""
    with fwAD.dual_level():
        params = net.named_parameters() if isinstance(net, torch.nn.Module) else ()
        zero = {name: fwAD.make_dual(p, torch.zeros_like(p)) for name, p in params
                if p.ndim < 2 and type(p) is torch.nn.Parameter}
        if zero:
            module = net
            net = lambda *args, **kwargs: torch.func.functional_call(module, zero, args, kwargs)  # noqa: E731
        duals = (p if d is None else fwAD.make_dual(p, d) for p, d in zip(primals, tangents))
        out = fwAD.unpack_dual(f(net, *duals))
    return torch.zeros_like(out.primal) if out.tangent is None else out.tangent


class MeanFlow(_TwoTimeFlow):
    """MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", arXiv 2505.13447): the network
    predicts the average velocity u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds on z_t = (1 - t) x + t eps, trained
    on the MeanFlow identity u = v - (t - r) d/dt u with the total derivative d/dt u = v d_z u + d_t u, ONE
    forward-mode derivative (dual tensors, tangent (v, 0, 1) on (z, r, t)) under stop-gradient.

    Time: t = 1 is noise; one step from t to r is z_r = z_t - (t - r) u(z_t, r, t), so one network call maps noise
    to data: x = eps - u(eps, 0, 1). (r, t): two logit-normal draws, t the larger (paper sec. 4.3), for the first
    two_time_fraction of the batch; r = t elsewhere, where the target is v: r = t everywhere IS flow matching.
    """

    path = "meanflow"

    def __init__(self, time_kind="continuous", objective=None, null=None):
        super().__init__(time_kind, objective or Objective(path="meanflow", prediction="average_velocity"))
        self.null = null  # the null label / empty context: guidance inside the target needs it

    def loss(self, nnet, x0, generator=None, **cond):
        """(B,) float32: sg(w) mean over non-batch dims of (u_target - u(z_t, r, t))^2, w = 1 / (||delta||^2 +
        weight_eps)^weight_power (`loss_at`). x0: (B, ...). Draws t, eps, then the second times of the leading
        two_time_fraction of the batch, from `generator` or torch's default generator."""
        n_two = self.n_two_time(x0.shape[0])
        t, eps = _time_and_noise(self.objective, x0, generator)
        r = t.clone()
        if n_two:
            other = self.objective.draw_time(n_two, generator, x0.device)
            t = torch.cat([torch.maximum(t[:n_two], other), t[n_two:]])
            r = torch.cat([torch.minimum(r[:n_two], other), r[n_two:]])
        return self.loss_at(nnet, x0, eps, r, t, cond, n_two)

    def guided_velocity(self, nnet, z, t, v, cond):
        """The target's velocity with guidance (the paper's eq. 21): omega v + kappa u(z, t, t | c) + (1 - omega -
        kappa) u(z, t, t | null) for conditioned samples with cfg_t_min <= t <= cfg_t_max, v elsewhere (dropped
        conditions: the network learns the unguided field there). No gradient. z, v: (B, ...); t: (B,)."""
        o = self.objective
        if not o.guided:
            return v
        assert self.null is not None and len(cond) == 1, "checked where the config enters (needs a condition)"
        (key, c), = cond.items()
        null = torch.as_tensor(self.null).to(c).expand_as(c)
        if o.cfg_kappa == 0.0:  # the paper's eq. 19 form: the unconditional branch alone (half the cost)
            u_u = self.two_time_net(nnet, {key: null})(z, t, t).to(v.dtype)
            guided = o.cfg_omega * v + (1.0 - o.cfg_omega) * u_u
        else:
            both = self.two_time_net(nnet, {key: torch.cat([c, null])})
            tt = torch.cat([t, t])
            u_c, u_u = both(torch.cat([z, z]), tt, tt).to(v.dtype).chunk(2)
            guided = o.cfg_omega * v + o.cfg_kappa * u_c + (1.0 - o.cfg_omega - o.cfg_kappa) * u_u
        on = (c != null).reshape(c.shape[0], -1).any(dim=1) & (t >= o.cfg_t_min) & (t <= o.cfg_t_max)
        return torch.where(_expand_dims(on, v.ndim), guided, v)

    def loss_at(self, nnet, x0, eps, r, t, cond, n_two=None):
        """The MeanFlow loss (B,) float32 at given x0, eps (B, ...), r <= t (B,); `n_two` leading samples (default
        all) may have r != t, the others must have r = t (their target is the velocity itself, no derivative).

        The target v~ - (t - r) (v~ d_z u + d_t u) (v~: `guided_velocity`) comes from one forward-mode derivative
        (`_jvp`) of the BARE network under no_grad (stop-gradient); the prediction is a separate forward through
        `nnet` as given, so a DDP wrapper all-reduces the gradients (a jvp through model.module would bypass it).
        The per-sample squared error is averaged over the non-batch dims and weighted by sg((||delta||^2 +
        eps)^-p) with the sum ||delta||^2 (the paper's weight; the mean instead of the paper's sum scales the loss
        by a constant)."""
        n_two = x0.shape[0] if n_two is None else n_two
        tb = _expand_dims(t, x0.ndim).to(x0.dtype)
        z = (1.0 - tb) * x0 + tb * eps
        bare = unwrap_model(nnet)
        with torch.no_grad():
            v = self.guided_velocity(bare, z, t, eps - x0, cond)
            target = v
            if n_two:
                c = _slice(cond, n_two)
                dudt = _jvp(bare, lambda net, *zrt: self.two_time_net(net, c)(*zrt),
                            (z[:n_two], r[:n_two], t[:n_two]), (v[:n_two], None, torch.ones_like(t[:n_two])))
                jump = _expand_dims(t[:n_two] - r[:n_two], x0.ndim).to(v.dtype)
                target = torch.cat([v[:n_two] - jump * dudt.to(v.dtype), v[n_two:]])
        pred = self.two_time_net(nnet, cond)(z, r, t)
        mse = _prediction_mse(pred, target)
        if self.objective.weight_power == 0:
            return mse
        squared = mse.detach() * target[0].numel()  # ||delta||^2, summed over the non-batch dims
        return mse / (squared + self.objective.weight_eps) ** self.objective.weight_power


class Shortcut(_TwoTimeFlow):
    """Shortcut models (Frans et al. 2024, "One Step Diffusion via Shortcut Models", arXiv 2410.12557): the network
    s(z_t, t, d) is conditioned on the step size d; a step from t is z_{t-d} = z_t - d s(z_t, t, d). Trained on
    flow matching at d = 0 (target eps - x0) and, for the leading two_time_fraction of the batch (the paper's
    1/4), on self-consistency: s(z_t, t, 2d) = (s(z_t, t, d) + s(z_{t-d}, t - d, d)) / 2 with z_{t-d} = z_t - d
    s(z_t, t, d), the target under stop-gradient (two extra forwards, no derivative). d = 2^k / M, k uniform in
    0 .. log2(M) - 1 (M = shortcut_steps: d from 1/M, 2d up to 1), t uniform on the multiples of 2d in (0, 1].
    Time: t = 1 is noise (the paper's t = 0), the second input is time_scale d."""

    path = "shortcut"

    def __init__(self, time_kind="continuous", objective=None, null=None):
        super().__init__(time_kind, objective or Objective(path="shortcut", prediction="velocity"))

    def loss(self, nnet, x0, generator=None, **cond):
        """(B,) float32 mean over non-batch dims of (target - s(z_t, t, d_in))^2 (`loss_at`). Draws t (flow-matching
        times), eps, then the level k and grid index of the self-consistency samples, from `generator`."""
        n_two = self.n_two_time(x0.shape[0])
        t, eps = _time_and_noise(self.objective, x0, generator)
        d = torch.zeros_like(t)
        if n_two:
            levels = int(self.objective.shortcut_steps).bit_length() - 1  # log2 M
            k = torch.randint(0, levels, (n_two,), generator=generator, device=x0.device)
            d2 = torch.exp2(k.float() + 1) / self.objective.shortcut_steps  # 2d: 2/M .. 1
            slots = torch.rand(n_two, generator=generator, device=x0.device)  # uniform grid index below
            n_slots = torch.round(1.0 / d2)
            t = torch.cat([d2 * (torch.floor(slots * n_slots) + 1), t[n_two:]])
            d = torch.cat([d2 / 2, d[n_two:]])
        return self.loss_at(nnet, x0, eps, t, d, cond, n_two)

    def loss_at(self, nnet, x0, eps, t, d, cond, n_two=None):
        """The shortcut loss (B,) float32 at x0, eps (B, ...), t, d (B,): the leading `n_two` samples (default all)
        regress s(z_t, t, 2d) on the self-consistency target built from two steps of d (d > 0, t >= 2d), the others
        s(z_t, t, 0) on eps - x0. The bootstrap forwards use the bare network under no_grad; the prediction runs
        through `nnet` as given (DDP all-reduces)."""
        n_two = x0.shape[0] if n_two is None else n_two
        tb = _expand_dims(t, x0.ndim).to(x0.dtype)
        z = (1.0 - tb) * x0 + tb * eps
        target = eps - x0
        step = d.clone()
        if n_two:
            bare, c = unwrap_model(nnet), _slice(cond, n_two)
            tk, dk = t[:n_two], d[:n_two]
            with torch.no_grad():
                s = self.two_time_net(bare, c)
                first = s(z[:n_two], tk - dk, tk).to(x0.dtype)
                z_mid = z[:n_two] - _expand_dims(dk, x0.ndim).to(x0.dtype) * first
                second = s(z_mid, tk - 2 * dk, tk - dk).to(x0.dtype)
            target = torch.cat([(first + second) / 2, target[n_two:]])
            step = torch.cat([2 * dk, d[n_two:]])
        pred = self.two_time_net(nnet, cond)(z, t - step, t)
        return _prediction_mse(pred, target)


DIFFUSIONS = ("continuous", "discrete")


def build_diffusion(kind, objective=None, null=None):
    """The diffusion of config.diffusion = kind ('continuous' / 'discrete') trained with `objective` (an
    `Objective`, e.g. Objective.of(config); None = the default, ContinuousVP() / DiscreteVP() as before).
    A path 'linear' objective gives LinearFlow, whose network time follows `kind`; 'meanflow' / 'shortcut' give
    MeanFlow / Shortcut (same time); `null` (the null label / empty context) is MeanFlow's guidance target's."""
    # config.diffusion is checked where it enters: parse_and_validate, an export's config.json (libs.export)
    assert kind in DIFFUSIONS, f"unknown diffusion kind '{kind}'; known: {', '.join(DIFFUSIONS)}"
    objective = objective or Objective()
    problems = objective.problems(kind)
    if problems:
        raise ConfigError("; ".join(problems))
    if objective.path == "linear":
        return LinearFlow(kind, objective)
    if objective.path in TWO_TIME_PATHS:
        return {"meanflow": MeanFlow, "shortcut": Shortcut}[objective.path](kind, objective, null)
    return ContinuousVP(objective) if kind == "continuous" else DiscreteVP(objective)
