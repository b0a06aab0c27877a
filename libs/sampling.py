"""One entry point for every sampler: the paper protocols, multistep DPM-Solver++, Euler-Maruyama and the rest.

    x0 = sample(nnet, diffusion, x_T, algorithm='dpm_solver', steps=50, cond={'y': y}, uncond={'y': null}, scale=0.4)

Algorithms (`ALGORITHMS`), each `steps` network calls unless said:
- 'dpm_solver': the U-ViT paper protocol (the original's eval scripts), kept as published: continuous ->
  DPM-Solver, singlestep order 3, logSNR grid, t from 1 to 1e-4; discrete -> DPM-Solver++, singlestep order 3,
  time-uniform grid, t from 1 to 1/N.
- 'dpm_solver++_2m', 'dpm_solver++_3m': multistep DPM-Solver++ (Lu et al. 2022b) on a logSNR grid, same range.
- 'euler_maruyama_sde', 'euler_maruyama_ode': the original's Euler-Maruyama (reverse SDE) / Euler (PF-ODE),
  continuous VP only.
- 'euler', 'heun': Euler / Heun (Karras et al. 2022, Alg. 1) on dx/dt = a_t' x0 + s_t' eps of any Gaussian path,
  uniform in t (shifted by config.objective.shift on the linear path); Heun: 2 calls per step, Euler last.
- 'flow_sde': Euler-Maruyama on the linear path's reverse SDE with g_t^2 = t (SiT, Ma et al. 2024, arXiv
  2401.08740): dx = (u + eps/2) dt + sqrt(t) dw, t: 1 -> 0, no noise on the last step.
- 'meanflow', 'shortcut': the few-step models (sde.MeanFlow, sde.Shortcut), x_r = x_t - (t - r) net(x_t, t,
  second input) on a grid uniform in t; each samples only models of its own objective.

Guidance is implemented once, in `guided_noise_fn`, on the network's output whatever it predicts (every
prediction is affine in it with condition-free coefficients): out = out_c + scale (out_c - out_u), out_u the
unconditional branch (Ho & Salimans 2022, arXiv 2207.12598) or a weaker network (autoguidance, Karras et al. 2024,
arXiv 2406.02507); `interval=(lo, hi)` guides only where lo < sigma = s_t / a_t <= hi (Kynkaanniemi et al. 2024,
arXiv 2404.07724). `INTERVAL_RULES`: 'per_step' (the authors') takes the sigma at the start of the solver step for
all its evaluations, 'per_evaluation' each evaluation's own; they differ only for heun and dpm_solver.
"""
import dataclasses
import logging
import math
from typing import Any

import torch

from dpm_solver_pp import DPM_Solver, _expand_dims, check_start, model_wrapper, solver_dtype
from libs.data_loader import mix_seed
from libs.errors import InputError
from libs.export import load_guide
from sde import Objective, ScoreModel, _randn_like, build_diffusion, shift_time

logger = logging.getLogger(__name__)

INTERVAL_RULES = ("per_step", "per_evaluation")
ALGORITHMS = ("dpm_solver", "dpm_solver++_2m", "dpm_solver++_3m", "euler_maruyama_sde", "euler_maruyama_ode", "euler",
              "heun", "flow_sde", "meanflow", "shortcut")
STOCHASTIC = ("euler_maruyama_sde", "flow_sde")  # the algorithms that draw noise every step (index_generators)
# Which objective's path each algorithm integrates (absent: both Gaussian paths, 'vp' and 'linear').
_PATHS = {"dpm_solver": ("vp",), "euler_maruyama_sde": ("vp",), "euler_maruyama_ode": ("vp",), "flow_sde": ("linear",),
          "meanflow": ("meanflow",), "shortcut": ("shortcut",)}
_GAUSSIAN = ("vp", "linear")

# End times of the paper protocols: continuous models stop at t = 1e-4 (eval.py), discrete ones at t = 1/N,
# the smallest time seen in training (network input 1).
CONTINUOUS_T_END = 1e-4
# End time of DPM-Solver++ on the linear path (lambda = +inf at t = 0): x there is x0 + 1e-3 (eps - x0).
LINEAR_T_END = 1e-3


def per_index_noise(indices, seed: int, shape, device=None) -> torch.Tensor:
    """(len(indices), *shape) standard normal noise, row k a function of (seed, indices[k]) only: drawn on the
    CPU, so the same image comes out on any device and any number of processes."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(mix_seed(seed, int(i))))
                        for i in indices]).to(device)


def index_generators(seed, indices, device="cpu"):
    """One torch.Generator per image, seeded by (seed, i): for noise a sampler draws per step (SDE)."""
    return [torch.Generator(device=device).manual_seed(mix_seed(seed + 1, int(i))) for i in indices]


def to_unit_images(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, 3, H, W) float32 in [0, 1] (grey images repeated to RGB)."""
    x = ((x.float() + 1) / 2).clamp_(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def algorithm_problem(algorithm, path, time_kind):
    """'' when `algorithm` can sample a diffusion of `path` ('vp' / 'linear') and `time_kind`, else why not (one
    line naming the ones that can)."""
    if algorithm not in ALGORITHMS:
        return f"unknown sampling algorithm '{algorithm}'; known: {', '.join(ALGORITHMS)}"
    if path not in _PATHS.get(algorithm, _GAUSSIAN):
        fits = [a for a in ALGORITHMS if path in _PATHS.get(a, _GAUSSIAN)]
        return (f"'{algorithm}' samples {' or '.join(_PATHS.get(algorithm, _GAUSSIAN))}-path models, not this {path}-path one "
                f"(config.objective.path); use one of {', '.join(fits)}")
    if algorithm.startswith("euler_maruyama") and time_kind != "continuous":
        return (f"'{algorithm}' needs a continuous-time diffusion; use 'dpm_solver' or "
                "'dpm_solver++_2m' / '_3m' for discrete-time models")
    return ""


def guided_noise_fn(nnet, cond=None, uncond=None, scale=0.0, *, guide=None, interval=None, noise_level=None):
    """The network's prediction f(x, t_input) with guidance in U-ViT's convention, out = out_c + scale (out_c - out_u),
    i.e. out_u + w (out_c - out_u) with w = scale + 1 in DiT's / diffusers' (the original's configs: scale 0.4 / 0.7
    for ImageNet 256 / 512, 1.0 for MS-COCO). With scale > 0 both passes are ONE forward on [x; x], [t; t],
    [cond[k]; uncond[k]]; scale == 0 makes only the conditional call.
    guide: autoguidance, out_u = guide(x, t_input, **cond) (a weaker network; uncond unused).
    interval: (lo, hi): guide only the samples whose noise_level(t_input) (B,) is in (lo, hi] (hi = 0: no upper
    limit); a call with none of them makes only the conditional call.
    nnet(x, t_input, **cond) -> (B, ...). Outputs are float32 (or x's dtype if float64), also under autocast.
    """
    cond = dict(cond or {})
    uncond = dict(uncond or {})
    if scale != 0.0 and guide is None:
        if not uncond:
            raise InputError(f"guidance scale {scale} needs an unconditional condition (uncond=...), e.g. the null label")
        if set(cond) != set(uncond):
            raise InputError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    assert interval is None or noise_level is not None, "a guidance interval needs noise_level (sample() gives it)"

    def eps_fn(x, t_input):
        out_dtype = solver_dtype(x.dtype)
        if scale == 0.0:
            return nnet(x, t_input, **cond).to(out_dtype)
        weight = None
        if interval is not None:
            sigma = noise_level(t_input)
            weight = (sigma > interval[0]) & ((sigma <= interval[1]) if interval[1] > 0 else True)
            if not bool(weight.any()):
                return nnet(x, t_input, **cond).to(out_dtype)
            weight = _expand_dims(weight.to(out_dtype), x.ndim)
        B = x.shape[0]
        if guide is not None:
            eps_c = nnet(x, t_input, **cond).to(out_dtype)
            eps_u = guide(x, t_input, **cond).to(out_dtype)
        else:
            kwargs = {k: torch.cat([cond[k], uncond[k]], dim=0) for k in cond}
            out = nnet(torch.cat([x, x], dim=0), torch.cat([t_input, t_input], dim=0), **kwargs).to(out_dtype)
            eps_c, eps_u = out[:B], out[B:]
        if weight is None:
            return eps_c + scale * (eps_c - eps_u)
        return eps_c + (scale * weight) * (eps_c - eps_u)

    return eps_fn


def sample(nnet, diffusion, x_T, *, algorithm="dpm_solver", steps=50, cond=None, uncond=None, scale=0.0,
           t_end=None, generator=None, guide=None, interval=None, interval_rule="per_step"):
    """Draw samples x0 (B, ...) float32 from noise x_T (B, ...) with one of `ALGORITHMS` (the module docstring).

    nnet(x, diffusion.network_time(t), **cond) -> the prediction of diffusion.objective (sde.build_diffusion).
    cond / uncond: dicts of batched keyword arguments ({'y': y} or {'context': c}); scale, guide, interval
    (sigma_lo, sigma_hi; hi = 0: no upper limit), interval_rule: guidance (`guided_noise_fn`, the module docstring).
    t_end: end time of the DPM-Solver algorithms (default 1e-4 continuous VP, 1/N discrete VP, 1e-3 linear) and of
    Euler / Heun on VP paths (linear: 0). generator: the SDE noise, None, a torch.Generator or one per sample.
    """
    problem = algorithm_problem(algorithm, diffusion.path, diffusion.time_kind)
    assert not problem, problem  # config.sample.algorithm and --algorithm are checked where they enter
    check_start(x_T, steps, "x_T")
    scale = float(scale)
    assert math.isfinite(scale), f"guidance scale {scale}: checked finite where it enters (config, --scale)"
    for name, kwargs in (("cond", cond), ("uncond", uncond)):
        for k, v in (kwargs or {}).items():
            if torch.is_tensor(v) and (v.ndim == 0 or v.shape[0] != x_T.shape[0]):
                raise InputError(f"{name}['{k}'] has shape {tuple(v.shape)}; it must be batched like x_T "
                                 f"({x_T.shape[0]} samples along dim 0)")
    assert interval_rule in INTERVAL_RULES, interval_rule  # config.sample.guidance_interval_rule checked there
    if algorithm in ("meanflow", "shortcut"):  # one evaluation per step: both interval rules agree
        return _two_time_steps(nnet, diffusion, x_T, steps, cond, uncond, scale, guide, interval).float()
    noise_level = None
    # per_step: the network time of the current step's start, set by the solver as each step begins.
    step_start = {}
    if interval is not None:
        def noise_level(t_input):
            start = step_start.get("t_input")
            t = t_input if start is None else start.expand_as(t_input)
            a, s = diffusion.coefficients(t.to(torch.float64) / diffusion.time_scale)
            return s / a

    def on_step(t):
        if interval is not None and interval_rule == "per_step":
            step_start["t_input"] = diffusion.network_time(torch.as_tensor(t))
    eps_fn = guided_noise_fn(nnet, cond, uncond, scale, guide=guide, interval=interval, noise_level=noise_level)
    ns = diffusion.schedule
    linear = diffusion.path == "linear"
    continuous = diffusion.time_kind == "continuous"
    x = x_T.to(solver_dtype(x_T.dtype))

    if algorithm.startswith("euler_maruyama"):
        x0 = diffusion.euler_maruyama(ScoreModel(eps_fn, diffusion), x, steps,
                                      sde=algorithm == "euler_maruyama_sde", generator=generator)
        return x0.float()
    if t_end is None:
        t_end = LINEAR_T_END if linear else CONTINUOUS_T_END if continuous else 1.0 / ns.total_N
    if algorithm in ("euler", "heun", "flow_sde"):
        return _fixed_step(eps_fn, diffusion, x, algorithm, steps, 0.0 if linear else t_end, generator,
                           on_step).float()

    if linear:  # DPM-Solver++ through the data prediction x0 = x - t u, defined up to t = 1
        solver = DPM_Solver(_data_prediction(eps_fn, diffusion), ns, algorithm_type="dpmsolver++", model_output="data")
    else:
        model_type = {"noise": "noise", "v": "v", "x0": "x_start"}[diffusion.objective.prediction]
        model_fn = model_wrapper(eps_fn, ns, model_type=model_type, network_time=diffusion.network_time)
        noise_solver = algorithm == "dpm_solver" and continuous
        solver = DPM_Solver(model_fn, ns, algorithm_type="dpmsolver" if noise_solver else "dpmsolver++")
    if algorithm == "dpm_solver":  # the paper protocols (VP only: algorithm_problem)
        update = solver.singlestep_dpm_solver_update

        def step_update(x, s, t, order, *args, **kwargs):  # s: the step's start (its first evaluation)
            on_step(s)
            return update(x, s, t, order, *args, **kwargs)
        solver.singlestep_dpm_solver_update = step_update
        x0 = solver.sample(x, steps=steps, t_start=ns.T, t_end=t_end, order=3,
                           skip_type="logSNR" if continuous else "time_uniform", method="singlestep")
    else:
        x0 = solver.sample(x, steps=steps, t_start=ns.T, t_end=t_end, order=2 if algorithm == "dpm_solver++_2m" else 3,
                           skip_type="logSNR", method="multistep", lower_order_final=True)
    logger.debug("%s: %d network calls for %d steps", algorithm, solver.nfe, steps)
    return x0.float()


def _two_time_steps(nnet, diffusion, x_T, steps, cond, uncond, scale, guide, interval):
    """`steps` jumps x_r = x_t - (t - r) f(x_t, t, second(r, t)) on a grid uniform in t from 1 to 0 (sde.MeanFlow,
    sde.Shortcut); f is the network with guidance (`guided_noise_fn`). The guidance interval reads the noise
    level of the linear path, sigma = t / (1 - t). Returns x at t = 0 (B, ...) in the solver dtype."""
    def noise_level(t_input):
        t = t_input.to(torch.float64) / diffusion.time_scale
        return t / (1.0 - t)

    x = x_T.to(solver_dtype(x_T.dtype))
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
    for t, r in zip(grid[:-1], grid[1:]):
        second = diffusion.second_input(r, t)  # a scalar: the network broadcasts it over the (guided) batch

        def with_second(net):
            return None if net is None else lambda z, t_input, **c: net(z, t_input, timesteps2=second, **c)
        fn = guided_noise_fn(with_second(nnet), cond, uncond, scale, guide=with_second(guide),
                             interval=interval, noise_level=noise_level)
        x = x - (t - r) * fn(x, diffusion.network_time(t).expand(x.shape[0])).to(x.dtype)
    return x


def _data_prediction(net_fn, diffusion):
    """x0_hat(x, t) at solver time t (B,) from net_fn(x, t_input) -> the diffusion's prediction."""
    def x0_fn(x, t):
        return diffusion.x0_eps(net_fn(x, diffusion.network_time(t)).to(x.dtype), x, t)[0]
    return x0_fn


def _velocity(net_fn, diffusion, x, t):
    """(dx/dt = a_t' x0 + s_t' eps, eps_hat) of the path's ODE at x (B, ...), scalar solver time t."""
    t_vec = t.expand(x.shape[0])
    out = net_fn(x, diffusion.network_time(t_vec)).to(x.dtype)
    x0, eps = diffusion.x0_eps(out, x, t_vec)
    da, ds = (_expand_dims(c.to(x.dtype), x.ndim) for c in diffusion.derivatives(t_vec.to(x.dtype)))
    return da * x0 + ds * eps, eps


def _fixed_step(net_fn, diffusion, x, algorithm, steps, t_end, generator, on_step=None):
    """Euler / Heun on the path's ODE or Euler-Maruyama on the linear path's SDE (`flow_sde`), `steps` steps on a
    grid uniform in t from 1 to t_end (shifted by the objective's shift on the linear path); on_step(t) is
    called as each step from t begins."""
    grid = torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64)
    if diffusion.path == "linear":
        grid = shift_time(grid, float(diffusion.objective.shift))
    grid = grid.to(device=x.device, dtype=x.dtype)
    for i in range(steps):
        t, s = grid[i], grid[i + 1]
        if on_step is not None:
            on_step(t)
        d, eps = _velocity(net_fn, diffusion, x, t)
        if algorithm == "flow_sde":
            # Reverse SDE with g^2 = t: drift u - (g^2/2) score = u + eps/2 (score = -eps/t); no noise at the end.
            x = x + (d + 0.5 * eps) * (s - t)
            if i < steps - 1:
                x = x + (t * (t - s)).sqrt() * _randn_like(x, generator)
            continue
        x_next = x + d * (s - t)
        if algorithm == "heun" and s > 0:
            d_next, _ = _velocity(net_fn, diffusion, x_next, s)
            x_next = x + 0.5 * (d + d_next) * (s - t)
        x = x_next
    return x


@dataclasses.dataclass
class Sampler:
    """A network ready to sample: `generate_fn` turns image indices into images. Image i starts from noise seeded
    by (seed, i), conditioned on labels[i] / contexts[i]: any split of the indices gives the same images."""
    family: Any  # libs.family.Family: what the network makes (data, time, condition)
    nnet: Any
    shape: tuple  # (C, H, W) of x0
    seed: int
    device: Any
    autoencoder: Any = None  # latent families: decodes x0
    null: Any = None  # null label / empty context of guidance, or None
    diffusion: Any = None  # what nnet was trained with (sde.build_diffusion); None: the family's default objective
    guide: Any = None  # autoguidance network (config.sample.guide_path), or None
    interval: Any = None  # (sigma_lo, sigma_hi) of guidance (config.sample.guidance_sigma_*), or None
    interval_rule: str = 'per_step'  # whose sigma decides the interval (config.sample.guidance_interval_rule)

    @classmethod
    def for_config(cls, config, family, nnet, device, autoencoder=None, null=None, seed=None):
        """The Sampler of a network trained with `config`: its objective, and config.sample's guidance interval and
        autoguidance network."""
        s = config.sample
        lo, hi = float(s.get('guidance_sigma_min', 0.0)), float(s.get('guidance_sigma_max', 0.0))
        return cls(family, nnet, family.shape(config), int(config.seed if seed is None else seed), device,
                   autoencoder, null, build_diffusion(family.time, Objective.of(config)), load_guide(config, device),
                   (lo, hi) if lo > 0 or hi > 0 else None, s.get('guidance_interval_rule', 'per_step'))

    def generate_fn(self, algorithm, steps, scale, labels=None, contexts=None, decode_chunk=50):
        """generate_fn(indices: LongTensor (b,)) -> images (b, 3, H, W) float32 in [0, 1].

        scale: guidance scale s of eps_c + s (eps_c - eps_u) against `null` (the original's convention);
        0 = unguided. Latents are decoded `decode_chunk` at a time.
        """
        # The callers load both from the config (Family.check refuses guidance without an empty context).
        assert scale <= 0 or self.null is not None or self.guide is not None, "guided sampling needs the null condition"
        assert self.family.data != 'latents' or self.autoencoder is not None, "decoding latents needs the autoencoder"
        diffusion = self.diffusion or build_diffusion(self.family.time)
        guide = self.guide if scale > 0 else None

        def generate_fn(indices):
            indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
            key, table, dtype = (('y', labels, torch.int64) if labels is not None
                                 else ('context', contexts, torch.float32))
            cond = uncond = None
            if table is not None:  # uncond: the null label / empty context for every image
                c = torch.as_tensor(table[indices], dtype=dtype, device=self.device)
                cond = {key: c}
                uncond = {key: torch.as_tensor(self.null).to(c).expand_as(c)} if scale > 0 and guide is None else None
            with torch.no_grad():
                x0 = sample(self.nnet, diffusion, per_index_noise(indices, self.seed, self.shape, self.device),
                            algorithm=algorithm, steps=steps, cond=cond, uncond=uncond, scale=scale, guide=guide,
                            interval=self.interval if scale > 0 else None, interval_rule=self.interval_rule,
                            generator=index_generators(self.seed, indices, self.device)
                            if algorithm in STOCHASTIC else None)
                if self.family.data == 'latents':
                    ae = self.autoencoder
                    x0 = ae.decode_in_chunks(x0.to(next(ae.parameters()).dtype), decode_chunk)
            return to_unit_images(x0)
        return generate_fn
