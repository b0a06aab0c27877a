"""One entry point for every sampler: the paper protocols, multistep DPM-Solver++ and Euler-Maruyama.

    x0 = sample(nnet, diffusion, x_T, algorithm='dpm_solver', steps=50, cond={'y': y}, uncond={'y': null}, scale=0.4)

Algorithms (`ALGORITHMS`):
- 'dpm_solver': the U-ViT paper protocol of the diffusion's time kind (the original's eval scripts):
  continuous -> DPM-Solver (noise prediction), singlestep order 3, logSNR grid, t from 1 to 1e-4;
  discrete -> DPM-Solver++ (data prediction), singlestep order 3, time-uniform grid, t from 1 to 1/N.
  Both use exactly `steps` network calls. Kept as published so published checkpoints give published samples.
- 'dpm_solver++_2m', 'dpm_solver++_3m': multistep DPM-Solver++ (Lu et al. 2022b) on a logSNR grid over the
  same time range, `steps` network calls; lower error than the paper protocols at the same cost
  (benchmarks/solver_error_table.py).
- 'euler_maruyama_sde', 'euler_maruyama_ode': the original's Euler-Maruyama on the reverse SDE / Euler on the
  probability-flow ODE (its sde.py sampler), continuous diffusions only.

Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) is implemented once, in `guided_noise_fn`;
the solvers see only the guided noise prediction.
"""
import logging

import torch

from dpm_solver_pp import DPM_Solver, check_start, model_wrapper, solver_dtype
from libs.errors import ConfigError, InputError
from sde import ScoreModel

logger = logging.getLogger(__name__)

ALGORITHMS = ("dpm_solver", "dpm_solver++_2m", "dpm_solver++_3m", "euler_maruyama_sde", "euler_maruyama_ode")

# End times of the paper protocols: continuous models stop at t = 1e-4 (eval.py), discrete ones at t = 1/N,
# the smallest time seen in training (network input 1).
CONTINUOUS_T_END = 1e-4


def guided_noise_fn(nnet, cond=None, uncond=None, scale=0.0):
    """eps(x, t_input) of `nnet` with classifier-free guidance in U-ViT's convention.

    eps = eps_c + scale * (eps_c - eps_u), i.e. DiT / diffusers' / the official DPM-Solver's
    eps_u + w (eps_c - eps_u) with w = scale + 1
    (the original's configs: scale 0.4 / 0.7 for ImageNet 256 / 512, 1.0 for MS-COCO). With scale > 0 the
    conditional and unconditional passes are ONE forward on the concatenated batch [x; x], [t; t],
    [cond[k]; uncond[k]] for every keyword k. scale == 0 makes only the conditional call.
    nnet(x, t_input, **cond) -> (B, ...). Outputs are float32 (or x's dtype if float64), also under autocast.
    """
    cond = dict(cond or {})
    uncond = dict(uncond or {})
    if scale != 0.0:
        if not uncond:
            raise InputError(f"guidance scale {scale} needs an unconditional condition (uncond=...), e.g. the null label")
        if set(cond) != set(uncond):
            raise InputError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")

    def eps_fn(x, t_input):
        out_dtype = solver_dtype(x.dtype)
        if scale == 0.0:
            return nnet(x, t_input, **cond).to(out_dtype)
        B = x.shape[0]
        kwargs = {k: torch.cat([cond[k], uncond[k]], dim=0) for k in cond}
        out = nnet(torch.cat([x, x], dim=0), torch.cat([t_input, t_input], dim=0), **kwargs).to(out_dtype)
        eps_c, eps_u = out[:B], out[B:]
        return eps_c + scale * (eps_c - eps_u)

    return eps_fn


def _check_inputs(x_T, steps, scale):
    check_start(x_T, steps, "x_T")
    scale = float(scale)
    if scale != scale or abs(scale) == float("inf"):
        raise ConfigError(f"guidance scale must be finite, got {scale}")
    return scale


def sample(nnet, diffusion, x_T, *, algorithm="dpm_solver", steps=50, cond=None, uncond=None, scale=0.0,
           t_end=None, generator=None):
    """Draw samples x0 from noise x_T with one of `ALGORITHMS` (see the module docstring).

    nnet(x, timesteps, **cond) -> eps, the network time being diffusion.network_time(t).
    diffusion: sde.ContinuousVP or sde.DiscreteVP. x_T: (B, ...) standard normal noise.
    cond / uncond: dicts of batched keyword arguments ({'y': y} or {'context': c}); scale: U-ViT guidance
    scale, eps = eps_c + scale (eps_c - eps_u) = eps_u + w (eps_c - eps_u) with w = scale + 1 (DiT, diffusers).
    t_end: end time of the DPM-Solver algorithms (default 1e-4 continuous, 1/N discrete).
    generator: the Euler-Maruyama SDE noise source: None, a torch.Generator, or one generator per sample.
    Returns x0 (B, ...) float32.
    """
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown sampling algorithm '{algorithm}'; known: {', '.join(ALGORITHMS)}")
    scale = _check_inputs(x_T, steps, scale)
    for name, kwargs in (("cond", cond), ("uncond", uncond)):
        for k, v in (kwargs or {}).items():
            if torch.is_tensor(v) and (v.ndim == 0 or v.shape[0] != x_T.shape[0]):
                raise InputError(f"{name}['{k}'] has shape {tuple(v.shape)}; it must be batched like x_T "
                                 f"({x_T.shape[0]} samples along dim 0)")
    eps_fn = guided_noise_fn(nnet, cond, uncond, scale)
    ns = diffusion.schedule
    continuous = diffusion.time_kind == "continuous"
    x = x_T.to(solver_dtype(x_T.dtype))

    if algorithm.startswith("euler_maruyama"):
        if not continuous:
            raise ConfigError(f"'{algorithm}' needs a continuous-time diffusion; use 'dpm_solver' or "
                              "'dpm_solver++_2m' / '_3m' for discrete-time models")
        x0 = diffusion.euler_maruyama(ScoreModel(eps_fn, diffusion), x, steps,
                                      sde=algorithm == "euler_maruyama_sde", generator=generator)
        return x0.float()

    if t_end is None:
        t_end = CONTINUOUS_T_END if continuous else 1.0 / ns.total_N
    model_fn = model_wrapper(eps_fn, ns, model_type="noise", network_time=diffusion.network_time)
    if algorithm == "dpm_solver":
        if continuous:
            solver = DPM_Solver(model_fn, ns, algorithm_type="dpmsolver")
            x0 = solver.sample(x, steps=steps, t_start=ns.T, t_end=t_end, order=3, skip_type="logSNR",
                               method="singlestep")
        else:
            solver = DPM_Solver(model_fn, ns, algorithm_type="dpmsolver++")
            x0 = solver.sample(x, steps=steps, t_start=ns.T, t_end=t_end, order=3, skip_type="time_uniform",
                               method="singlestep")
    else:
        order = 2 if algorithm == "dpm_solver++_2m" else 3
        solver = DPM_Solver(model_fn, ns, algorithm_type="dpmsolver++")
        x0 = solver.sample(x, steps=steps, t_start=ns.T, t_end=t_end, order=order, skip_type="logSNR",
                           method="multistep", lower_order_final=True)
    logger.debug("%s: %d network calls for %d steps", algorithm, solver.nfe, steps)
    return x0.float()
