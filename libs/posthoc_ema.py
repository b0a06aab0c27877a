"""Post-hoc EMA: power-function EMA profiles kept during training, any EMA width reconstructed afterwards.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2), Sec. 3:

- A power-function EMA of exponent gamma averages the weights theta_tau of steps tau <= t with the profile
  omega_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1). Updated every step with
  beta_t = (1 - 1 / t)^(gamma + 1): ema <- beta_t ema + (1 - beta_t) theta_t (beta_1 = 0: the first step
  copies). The discrete update gives step tau exactly the weight (tau^(gamma+1) - (tau-1)^(gamma+1)) /
  t^(gamma+1) = the integral of omega_t over [tau - 1, tau], so the continuous formulas below are exact
  for weights that are constant within a step.
- Its width is the relative standard deviation of omega: sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))
  (EDM2 eq. 3), which `gamma_from_sigma_rel` inverts (the largest real root of the cubic it gives).
- Snapshots of a few profiles (EDM2: two widths) every `snapshot_interval` steps span many profiles
  omega_{t_k, gamma_k}; the EMA of any other width at step T is approximated by the combination
  sum_k c_k snapshot_k whose profile is nearest to omega_{T, gamma*} in L2 over [0, T]: c solves the normal
  equations A c = b with A_jk = <omega_j, omega_k>, b_k = <omega_k, omega*>, in closed form for power
  functions (`profile_inner`), and is then divided by its sum (EDM2's Algorithm 3): the least-squares
  profile's total weight misses 1 by a little, and every weight of the reconstruction would carry that scale
  error; rescaled, the combination is a weighted average of the snapshots, as an EMA is.

Training keeps the profiles with `PowerEMA` (one fused torch._foreach_lerp_ per width per step, no host
sync) and writes snapshots atomically to <workdir>/posthoc_ema/<step>.pth; tools/posthoc_ema.py
reconstructs a width from them into a plain network state dict.
"""
import logging
import math
import numbers
import os
import re

import numpy as np
import torch

from libs.errors import ConfigError, MissingFileError
from libs.io_utils import atomic_path

logger = logging.getLogger(__name__)

SNAPSHOT_DIR = 'posthoc_ema'
_SNAPSHOT = re.compile(r'^(\d+)\.pth$')
SIGMA_REL_MAX = 12 ** -0.5  # gamma = 0 (a flat average); wider profiles need gamma < 0 (weights piling on step 0)
# A width is refused when the best combination of the stored profiles misses its profile by more than this
# (relative L2 norm): EDM2's reconstructions of widths between and a little beyond the stored ones stay well
# below it, while widths far narrower than a snapshot interval or far outside the stored ones do not.
MAX_PROFILE_ERROR = 0.01


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma > 0 of the power-function EMA of relative width sigma_rel in (0, 12^-0.5) (EDM2 eq. 3
    solved for gamma: gamma^3 + 7 gamma^2 + (16 - 1/s^2) gamma + 12 - 1/s^2 = 0, its largest real root)."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ConfigError(f"EMA width sigma_rel={sigma_rel!r} must lie in (0, {SIGMA_REL_MAX:.4f}) (a power-function "
                          f"profile; EDM2 uses 0.05 and 0.10)")
    inv = 1.0 / sigma_rel ** 2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def sigma_rel_from_gamma(gamma: float) -> float:
    """EDM2 eq. 3: the relative standard deviation of the profile tau^gamma on [0, t]."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def beta(step: int, gamma: float) -> float:
    """Decay of update number `step` (1-based) of a power-function EMA: (1 - 1/step)^(gamma + 1)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner(t1, g1, t2, g2):
    """<omega_{t1,g1}, omega_{t2,g2}> = integral over [0, min(t1, t2)] of the product of the two normalised
    profiles omega_{t,g}(tau) = (g + 1) tau^g / t^(g+1). Arrays broadcast; float64."""
    t1, g1, t2, g2 = (np.asarray(v, np.float64) for v in (t1, g1, t2, g2))
    lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
    g_hi = np.where(t1 <= t2, g2, g1)  # the exponent of the longer profile
    # integral_0^lo (g_lo+1) tau^g_lo / lo^(g_lo+1) (g_hi+1) tau^g_hi / hi^(g_hi+1) d tau
    return (g1 + 1) * (g2 + 1) / (g1 + g2 + 1) * (lo / hi) ** g_hi / hi


def solve_coefficients(snapshot_steps, snapshot_gammas, step, gamma):
    """(c (K,), relative L2 error of the fitted profile): the combination of the K stored profiles
    (snapshot_steps[k], snapshot_gammas[k]) nearest to the profile (step, gamma), rescaled to sum to 1 (EDM2,
    Algorithm 3); the error is that of the rescaled combination."""
    t, g = np.asarray(snapshot_steps, np.float64), np.asarray(snapshot_gammas, np.float64)
    A = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, step, gamma)
    c = np.linalg.lstsq(A, b, rcond=None)[0]
    c = c / c.sum()
    target = profile_inner(step, gamma, step, gamma)
    residual = max(float(c @ A @ c - 2 * c @ b + target), 0.0)
    return c, math.sqrt(residual / target)


class PowerEMA:
    """Power-function EMAs of `online`'s parameters, one per width of `sigma_rels`, kept on its device.

    update(step): after optimizer step number `step` (1-based), one fused lerp per width. A skipped optimizer
    step (non-finite gradients) left the online weights unchanged, so counting it keeps the profile exact.
    Buffers are not averaged: a snapshot takes the online network's.
    """

    def __init__(self, online: torch.nn.Module, sigma_rels):
        self.online = online
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(gamma_from_sigma_rel(s) for s in self.sigma_rels)
        self.names = [n for n, _ in online.named_parameters()]
        self.online_params = [p for _, p in online.named_parameters()]
        self.averages = [[p.detach().clone() for p in self.online_params] for _ in self.gammas]

    @torch.no_grad()
    def update(self, step: int, applied=None):
        """One step of every profile after optimizer step `step`; applied: as EMAUpdater.update's, False for a
        skipped (non-finite) step, which leaves the profiles as they are (no host sync)."""
        src = [p.detach() for p in self.online_params]
        for avg, gamma in zip(self.averages, self.gammas):
            weight = 1.0 - beta(step, gamma)
            torch._foreach_lerp_(avg, src, weight if applied is None else applied.to(src[0].dtype) * weight)

    def state_dict(self):
        """{'sigma_rels', 'averages': [{parameter name: tensor} per width], 'buffers': the online network's}
        on the CPU."""
        return {'sigma_rels': list(self.sigma_rels),
                'averages': [{n: p.cpu().clone() for n, p in zip(self.names, avg)} for avg in self.averages],
                'buffers': {n: b.detach().cpu().clone() for n, b in self.online.named_buffers()}}

    def load_state_dict(self, state):
        # libs.resume_policy refuses a resume whose config.posthoc_ema.sigma_rels differ, before anything is loaded
        assert [float(s) for s in state['sigma_rels']] == list(self.sigma_rels), (state['sigma_rels'], self.sigma_rels)
        with torch.no_grad():
            for avg, saved in zip(self.averages, state['averages']):
                for p, n in zip(avg, self.names):
                    p.copy_(saved[n])

    def save_snapshot(self, workdir: str, step: int) -> str:
        """Write <workdir>/posthoc_ema/<step>.pth atomically: {'step', 'sigma_rels', 'gammas', 'averages'}."""
        path = os.path.join(workdir, SNAPSHOT_DIR, f'{int(step)}.pth')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({'step': int(step), 'gammas': list(self.gammas), **self.state_dict()}, tmp)
        return path


def list_snapshots(workdir: str):
    """[(step, path)] of the snapshots under <workdir>/posthoc_ema, oldest first."""
    folder = os.path.join(workdir, SNAPSHOT_DIR)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted((int(m.group(1)), os.path.join(folder, n)) for n in names for m in [_SNAPSHOT.match(n)] if m)


def reconstruct(workdir: str, sigma_rel: float, step=None):
    """(network state dict of the EMA of width sigma_rel at `step` (default: the last snapshot), info dict)
    from the snapshots of <workdir>; ConfigError (one line) when the stored profiles cannot reconstruct it."""
    found = list_snapshots(workdir)
    if not found:
        raise MissingFileError(f"no post-hoc EMA snapshots in '{os.path.join(workdir, SNAPSHOT_DIR)}'; train with "
                               f"--config.posthoc_ema.snapshot_interval=<steps> (docs/training.md)")
    step = found[-1][0] if step is None else int(step)
    used = [(s, p) for s, p in found if s <= step]
    if not used or step not in {s for s, _ in found}:
        raise ConfigError(f"no snapshot at step {step} in '{workdir}'; snapshots exist at steps "
                          f"{[s for s, _ in found][:3]} ... {found[-1][0]}")
    gamma = gamma_from_sigma_rel(sigma_rel)
    # Memory-mapped: the coefficients need only each snapshot's step and exponents, and the sum below reads
    # one snapshot at a time (a large network's snapshots do not fit in memory together).
    headers = [torch.load(p, map_location='cpu', weights_only=True, mmap=True) for _, p in used]
    steps = [h['step'] for h in headers for _ in h['gammas']]
    gammas = [g for h in headers for g in h['gammas']]
    c, error = solve_coefficients(steps, gammas, step, gamma)
    if error > MAX_PROFILE_ERROR:
        stored = headers[-1]['sigma_rels']
        ok = [s for s in np.linspace(0.005, SIGMA_REL_MAX - 0.005, 57)
              if solve_coefficients(steps, gammas, step, gamma_from_sigma_rel(s))[1] <= MAX_PROFILE_ERROR]
        span = f"widths from {min(ok):.3f} to {max(ok):.3f} can" if ok else "no width can"
        raise ConfigError(f"sigma_rel={sigma_rel} cannot be reconstructed at step {step} from the stored profiles "
                          f"(sigma_rel {stored}, {len(headers)} snapshots): the best fit misses its profile by "
                          f"{100 * error:.0f}% (limit {100 * MAX_PROFILE_ERROR:.0f}%); {span}")
    out, k = {}, 0
    for h in headers:
        for avg in h['averages']:
            for name, value in avg.items():
                out[name] = out.get(name, 0.0) + float(c[k]) * value.double()
            k += 1
    assert k == len(c)
    reference = headers[-1]['averages'][-1]
    out = {name: v.to(reference[name].dtype) for name, v in out.items()}
    out.update(headers[-1]['buffers'])  # buffers are not averaged (the network's at that step)
    return out, {'sigma_rel': float(sigma_rel), 'gamma': gamma, 'step': step, 'profile_error': error,
                 'snapshots': len(headers)}


class PostHocEMA:
    """Post-hoc EMA as a training aid (libs/training_aids.py): config.posthoc_ema, the profiles in
    train_state.pth, a snapshot every snapshot_interval steps and at the last step (main process only)."""
    section, state_key = 'posthoc_ema', 'posthoc_ema'
    fresh = 'the post-hoc EMA profiles start at this step (reconstructions assume step 0)'

    def __init__(self, section, nnet, data, device):
        self.interval = section.snapshot_interval
        self.posthoc = PowerEMA(nnet, section.sigma_rels)

    @staticmethod
    def problems(section):
        """config.posthoc_ema.sigma_rels: each width in EDM2's range."""
        sigma_rels = section.get('sigma_rels')
        if isinstance(sigma_rels, (tuple, list)) and not all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < SIGMA_REL_MAX for v in sigma_rels):
            return [('sigma_rels', f"each width must lie in (0, {SIGMA_REL_MAX:.4f}) (EDM2 keeps 0.05 and 0.10)")]
        return []

    @staticmethod
    def enabled(section):
        return bool(section.snapshot_interval)

    def wrap(self, module):
        return module

    def losses(self, batch):
        return {}

    def after_step(self, run, step, applied):
        self.posthoc.update(step, applied)
        if run.accelerator.is_main_process and (step % self.interval == 0 or step == run.config.train.n_steps):
            self.posthoc.save_snapshot(run.workdir, step)  # the one host copy of the profiles per interval

    def state_dict(self):
        return self.posthoc.state_dict()

    def load_state_dict(self, state):
        self.posthoc.load_state_dict(state)
