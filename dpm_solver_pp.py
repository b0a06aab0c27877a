"""DPM-Solver and DPM-Solver++ for Gaussian diffusion paths, with the public API of the official code.

- `NoiseScheduleVP`: alpha_t, sigma_t (x_t = alpha_t x0 + sigma_t eps), lambda_t = log(alpha_t / sigma_t), t(lambda).
- `model_wrapper(...)`: a network (noise / x0 / v / score prediction) -> `model_fn(x, t_continuous)` -> eps;
  guidance is applied before wrapping (`libs.sampling.guided_noise_fn`).
- `DPM_Solver`: the exponential-integrator solvers of the probability-flow ODE.

Written from Lu et al. 2022, "DPM-Solver", arXiv 2206.00927 (orders 1-3, eq. 3.7, Algorithms 1-2, DPM-Solver-fast
and adaptive step size, Appendix C); Lu et al. 2022, "DPM-Solver++", arXiv 2211.01095; Nichol & Dhariwal 2021,
arXiv 2102.09672 (cosine schedule); Saharia et al. 2022, arXiv 2205.11487 (dynamic thresholding).

The exact solutions x_t = (alpha_t/alpha_s) x_s - alpha_t int e^{-lambda} eps d lambda (DPM-Solver eq. 3.4) and
x_t = (sigma_t/sigma_s) x_s + sigma_t int e^{lambda} x0 d lambda (DPM-Solver++ eq. 8) differ by alpha <-> sigma,
lambda -> -lambda, so both are written in
    ratio = keep_t / keep_s, mu_t, H:  noise prediction keep = alpha, mu = sigma, H = +h;
                                       data prediction  keep = sigma, mu = alpha, H = -h   (h = lambda_t - lambda_s)
with psi_1(H) = e^H - 1, psi_2 = psi_1/H - 1, psi_3 = psi_2/H - 1/2.

Differences from the official code: network time defaults to U-ViT's (`default_network_time`); arithmetic in
float32 for half-precision inputs, float64 for float64; multistep warm-up for any number of steps; multistep order
3 weights the second divided difference by the exact 2 psi_3 (the official code and diffusers use psi_3, leaving
their 3M second order; U-ViT never used that path). Additions: `model_output='data'` and a logSNR grid for paths
whose lambda is -inf at t_start, so DPM-Solver++ runs on the linear flow path (sde.LinearPathSchedule).
"""
import logging
import math
import numbers

import torch

from libs.errors import InputError

logger = logging.getLogger(__name__)

SCHEDULES = ("discrete", "linear", "cosine")
MODEL_TYPES = ("noise", "x_start", "v", "score")
ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++")
SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
METHODS = ("singlestep", "multistep", "singlestep_fixed", "adaptive")

# Continuous-time U-ViT networks see 999 t (the original's ScoreModel), so t = 1 maps to the last of 1000
# steps. sde.ContinuousVP.network_time uses this constant too.
CONTINUOUS_TIME_SCALE = 999.0


def solver_dtype(dtype):
    """float64 stays float64; every other dtype (float32, float16, bfloat16) is solved in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_positive_int(n):
    """True for Python / numpy integers >= 1 (not bools, not floats)."""
    return isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1


def check_start(x, steps, name="x"):
    """InputError unless x is finite floating noise (B, ...). steps (None: unchecked) was checked >= 1 where it
    entered (config parsing, --steps): asserted."""
    if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim < 2:
        raise InputError(f"{name} must be a floating tensor (B, ...), got {getattr(x, 'shape', type(x).__name__)}")
    if not torch.isfinite(x).all():
        raise InputError(f"{name} contains NaN or Inf; the starting noise must be finite")
    assert steps is None or _is_positive_int(steps), f"steps = {steps!r}: checked >= 1 where it enters"


def _as_time(t):
    """t as a floating tensor (float64 if given as a Python number or an integer tensor)."""
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.double()


def _segment(x, xp):
    """Index k of the table segment [xp[k], xp[k+1]] holding each x; the first / last segment beyond the ends."""
    return (torch.searchsorted(xp, x.contiguous().reshape(-1)).reshape(x.shape) - 1).clamp(0, xp.shape[0] - 2)


def _interp(x, xp, fp):
    """Piecewise-linear interpolation of (xp (K,) increasing, fp (K,)) at x, extrapolated linearly at both ends."""
    k = _segment(x, xp)
    return fp[k] + (x - xp[k]) * (fp[k + 1] - fp[k]) / (xp[k + 1] - xp[k])


class NoiseScheduleVP:
    """The marginals of a variance-preserving diffusion, x_t = alpha_t x0 + sigma_t eps.

    'discrete' (`betas` or `alphas_cumprod`, length N): log alpha is (1/2) log abar_n at the knots t_n = n/N and
        piecewise linear in t between them (linear beyond), as the official code; usable range [1/N, 1].
    'linear': beta(t) = beta_0 + t (beta_1 - beta_0), log alpha_t = -(beta_1 - beta_0) t^2/4 - beta_0 t/2
        (Song et al. 2021, VP-SDE), t in [0, 1].
    'cosine': alpha_t = cos(pi/2 (t + s)/(1 + s)) / cos(pi/2 s / (1 + s)), s = 0.008 (Nichol & Dhariwal
        2021), t in [0, T] with T ~ 0.998 where beta(t) reaches 999.
    Methods take t of any shape (or a number) and compute in t's floating dtype (discrete tables: float64, cast).
    """

    def __init__(self, schedule="discrete", betas=None, alphas_cumprod=None, continuous_beta_0=0.1,
                 continuous_beta_1=20.0):
        # Options are a programmer's choice (sde.py's are fixed), asserted; a caller's tensors are InputErrors.
        assert schedule in SCHEDULES, f"unknown noise schedule '{schedule}'; known: {', '.join(SCHEDULES)}"
        self.schedule, self.total_N, self.T = schedule, 1000, 1.0
        if schedule == "discrete":
            assert (betas is None) != (alphas_cumprod is None), "give exactly one of betas= or alphas_cumprod="
            name, table = ("betas", betas) if betas is not None else ("alphas_cumprod", alphas_cumprod)
            table = torch.as_tensor(table).to(torch.float64)
            if table.ndim != 1 or table.shape[0] < 2:
                raise InputError(f"{name} must be a 1-D table with at least 2 entries, got shape {tuple(table.shape)}")
            if not torch.isfinite(table).all() or (table <= 0).any() or (table >= 1).any():
                raise InputError(f"{name} must be finite and strictly inside (0, 1)")
            log_alphas = 0.5 * (torch.cumsum(torch.log1p(-table), dim=0) if betas is not None else torch.log(table))
            self.total_N = log_alphas.shape[0]
            self.t_array = torch.arange(1, self.total_N + 1, dtype=torch.float64) / self.total_N  # (N,) t_n = n/N
            self.log_alpha_array = log_alphas  # (N,)
            self._table_cache = {}
        elif schedule == "linear":
            assert 0 <= continuous_beta_0 < continuous_beta_1, (continuous_beta_0, continuous_beta_1)
            self.beta_0, self.beta_1 = float(continuous_beta_0), float(continuous_beta_1)
        else:
            s = self.cosine_s = 0.008
            # Stop where beta(t) = pi tan(.)/(1+s) would exceed 999 (alpha -> 0 at t = 1).
            self.T = math.atan(999.0 * (1 + s) / math.pi) * 2 * (1 + s) / math.pi - s
            self.cosine_log_alpha_0 = math.log(math.cos(s / (1 + s) * math.pi / 2))

    def tables(self, device, dtype):
        """Discrete: the (N,) tables (t_n, log alpha_n) on `device` in `dtype`, copied once (a pageable
        host-to-device copy per training step or solver stage would serialise the host with the GPU)."""
        key = (torch.device(device), dtype)
        if key not in self._table_cache:
            self._table_cache[key] = (self.t_array.to(device=device, dtype=dtype),
                                      self.log_alpha_array.to(device=device, dtype=dtype))
        return self._table_cache[key]

    def __repr__(self):
        return f"NoiseScheduleVP('{self.schedule}', N={self.total_N})"

    def marginal_log_mean_coeff(self, t):
        """log alpha_t."""
        t = _as_time(t)
        if self.schedule == "discrete":
            return _interp(t, *self.tables(t.device, t.dtype))
        if self.schedule == "linear":
            return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        return torch.log(torch.cos((t + self.cosine_s) / (1.0 + self.cosine_s) * math.pi / 2.0)) - self.cosine_log_alpha_0

    def marginal_alpha(self, t):
        """alpha_t = sqrt(abar_t)."""
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        """sigma_t = sqrt(1 - alpha_t^2); expm1 keeps it accurate where alpha_t ~ 1."""
        return torch.sqrt(-torch.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_log_std(self, t):
        """log sigma_t."""
        return 0.5 * torch.log(-torch.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        """lambda_t = log alpha_t - log sigma_t (half the log-SNR)."""
        return self.marginal_log_mean_coeff(t) - self.marginal_log_std(t)

    def inverse_lambda(self, lamb):
        """t(lambda), the inverse of marginal_lambda: closed form (linear, cosine) or table interpolation (discrete)."""
        lamb = _as_time(lamb)
        # log alpha = -(1/2) log(1 + e^{-2 lambda}) for any VP schedule.
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lamb), -2.0 * lamb)
        if self.schedule == "linear":
            # Root of (b1-b0) t^2/4 + b0 t/2 = L/2, L = -2 log alpha, written without cancellation.
            L = -2.0 * log_alpha
            return 2.0 * L / (torch.sqrt(self.beta_0 ** 2 + 2.0 * (self.beta_1 - self.beta_0) * L) + self.beta_0)
        if self.schedule == "discrete":
            t_tab, la_tab = self.tables(log_alpha.device, log_alpha.dtype)
            return _interp(log_alpha, torch.flip(la_tab, [0]), torch.flip(t_tab, [0]))
        u = torch.acos(torch.exp(log_alpha + self.cosine_log_alpha_0))
        return u * 2.0 * (1.0 + self.cosine_s) / math.pi - self.cosine_s

    def beta(self, t):
        """beta(t) = -2 d(log alpha_t)/dt of the forward SDE dx = -beta x/2 dt + sqrt(beta) dw (our addition, for
        Euler-Maruyama); 'discrete': the slope of the piecewise-linear log alpha, constant per knot interval."""
        t = _as_time(t)
        if self.schedule == "linear":
            return self.beta_0 + t * (self.beta_1 - self.beta_0)
        if self.schedule == "cosine":
            u = (t + self.cosine_s) / (1.0 + self.cosine_s) * math.pi / 2.0
            return math.pi / (1.0 + self.cosine_s) * torch.tan(u)
        tp, lp = self.tables(t.device, t.dtype)
        k = _segment(t, tp)
        return -2.0 * (lp[k + 1] - lp[k]) / (tp[k + 1] - tp[k])


def default_network_time(noise_schedule):
    """U-ViT's map from solver time t to the network's time input: 999 t for continuous schedules (the original's
    ScoreModel), N t for discrete ones (its eval_*_discrete.py; fractional between training's integers n). The
    official DPM-Solver feeds t and 1000 (t - 1/N): pass `network_time=` to `model_wrapper`."""
    scale = float(noise_schedule.total_N) if noise_schedule.schedule == "discrete" else CONTINUOUS_TIME_SCALE
    return lambda t: scale * t


def _expand_dims(v, ndim):
    """(B,) -> (B, 1, ..., 1) with `ndim` dims in total, for broadcasting against x."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def model_wrapper(model, noise_schedule, model_type="noise", network_time=None):
    """Wrap a network into `model_fn(x (B, ...), t_continuous (B,)) -> eps (B, ...)` in x's dtype (the output is
    upcast, e.g. from bf16 under autocast, so the solver arithmetic stays float32), as the official API.

    model: called as model(x, t_input); bind conditions and guidance first (libs.sampling.guided_noise_fn).
    model_type: 'noise' (eps), 'x_start' (x0), 'v' (alpha eps - sigma x0, Salimans & Ho 2022) or 'score'
        (grad log p_t = -eps / sigma_t). network_time: t (B,) -> network input (B,); default `default_network_time`.
    """
    assert model_type in MODEL_TYPES, f"unknown model_type '{model_type}'; known: {', '.join(MODEL_TYPES)}"
    ns = noise_schedule
    to_input = network_time if network_time is not None else default_network_time(ns)

    def model_fn(x, t_continuous):
        out = model(x, to_input(t_continuous)).to(x.dtype)
        if out.shape != x.shape:
            raise InputError(f"the network returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}")
        if model_type == "noise":
            return out
        t = t_continuous.to(x.dtype)
        alpha = _expand_dims(ns.marginal_alpha(t), x.ndim)
        sigma = _expand_dims(ns.marginal_std(t), x.ndim)
        return {"x_start": lambda: (x - alpha * out) / sigma, "v": lambda: alpha * out + sigma * x,
                "score": lambda: -sigma * out}[model_type]()

    return model_fn


class DPM_Solver:
    """DPM-Solver (algorithm_type='dpmsolver', noise prediction) and DPM-Solver++ ('dpmsolver++', data prediction)
    of model_fn(x, t_continuous) -> eps (e.g. `model_wrapper`). correcting_x0_fn: None, 'dynamic_thresholding'
    (Imagen; needs 'dpmsolver++') or a callable (x0, t) -> x0 applied to every data prediction.
    model_output='data' (ours): model_fn returns x0 itself, for paths where eps does not determine x0 (the
    linear flow path at t = 1, alpha_t = 0); the updates only use alpha_t, sigma_t and lambda_t, so they hold on any
    Gaussian path x_t = alpha_t x0 + sigma_t eps (noise_schedule: NoiseScheduleVP or sde.LinearPathSchedule)."""

    def __init__(self, model_fn, noise_schedule, algorithm_type="dpmsolver++", correcting_x0_fn=None,
                 thresholding_max_val=1.0, dynamic_thresholding_ratio=0.995, model_output="noise"):
        assert algorithm_type in ALGORITHM_TYPES, f"unknown algorithm_type '{algorithm_type}'"
        # The noise-prediction solver never forms x0: a data output or an x0 correction needs 'dpmsolver++'.
        assert model_output in ("noise", "data") and (model_output == "noise" or algorithm_type == "dpmsolver++")
        assert correcting_x0_fn is None or algorithm_type == "dpmsolver++", "x0 corrections need 'dpmsolver++'"
        self.model_output = model_output
        if correcting_x0_fn == "dynamic_thresholding":
            correcting_x0_fn = self.dynamic_thresholding_fn
        self.model = lambda x, t: model_fn(x, t.expand(x.shape[0]))
        self.noise_schedule, self.algorithm_type = noise_schedule, algorithm_type
        self.predict_x0 = algorithm_type == "dpmsolver++"
        self.correcting_x0_fn = correcting_x0_fn
        self.thresholding_max_val = thresholding_max_val
        self.dynamic_thresholding_ratio = dynamic_thresholding_ratio
        self.nfe = 0

    def dynamic_thresholding_fn(self, x0, t=None):
        """Imagen's dynamic thresholding: clip x0 to the per-sample `ratio` quantile of |x0| (at least max_val) and rescale."""
        flat = x0.abs().reshape(x0.shape[0], -1)
        s = torch.quantile(flat.float(), self.dynamic_thresholding_ratio, dim=1).to(x0.dtype)
        s = _expand_dims(torch.clamp(s, min=self.thresholding_max_val), x0.ndim)
        return torch.maximum(torch.minimum(x0, s), -s) / s

    def noise_prediction_fn(self, x, t):
        """eps_theta(x, t); t is a scalar tensor."""
        self.nfe += 1
        return self.model(x, t)

    def data_prediction_fn(self, x, t):
        """x0_theta(x, t) = (x - sigma_t eps_theta) / alpha_t (or the model's own x0), then correcting_x0_fn if any."""
        ns = self.noise_schedule
        if self.model_output == "data":
            self.nfe += 1
            x0 = self.model(x, t)
        else:
            x0 = (x - ns.marginal_std(t) * self.noise_prediction_fn(x, t)) / ns.marginal_alpha(t)
        return x0 if self.correcting_x0_fn is None else self.correcting_x0_fn(x0, t)

    def model_fn(self, x, t):
        """The prediction the chosen algorithm integrates: x0 for 'dpmsolver++', eps for 'dpmsolver'."""
        return self.data_prediction_fn(x, t) if self.predict_x0 else self.noise_prediction_fn(x, t)

    def get_time_steps(self, skip_type, t_T, t_0, N, device, dtype=torch.float64):
        """(N+1,) decreasing times from t_T to t_0: uniform in lambda ('logSNR'), in t, or in sqrt(t)."""
        ns = self.noise_schedule
        forward, inverse = {"logSNR": (ns.marginal_lambda, ns.inverse_lambda), "time_uniform": (None, None),
                            "time_quadratic": (torch.sqrt, torch.square)}[skip_type]
        # Built in float64 and then cast, so a float32 grid is the correctly rounded float64 grid.
        ends = torch.tensor([float(t_T), float(t_0)], dtype=torch.float64, device=device)
        ends = forward(ends) if forward else ends
        if skip_type == "logSNR" and N > 1 and bool(torch.isneginf(ends[0])):
            # A path that reaches pure noise at t_T (lambda = -inf: the linear flow path at t = 1): one exact
            # first-order step from t_T, then N - 1 steps uniform in lambda over [-lambda(t_0), lambda(t_0)].
            ts = torch.linspace(-float(ends[1]), float(ends[1]), N, dtype=torch.float64, device=device)
            return torch.cat([ends[:1].new_tensor([float(t_T)]), inverse(ts)]).to(dtype)
        ts = torch.linspace(float(ends[0]), float(ends[1]), N + 1, dtype=torch.float64, device=device)
        return (inverse(ts) if inverse else ts).to(dtype)

    def get_orders_and_timesteps_for_singlestep_solver(self, steps, order, skip_type, t_T, t_0, device,
                                                       dtype=torch.float64):
        """(outer times (K+1,), K orders) of the singlestep solver, exactly `steps` model calls (DPM-Solver-fast,
        Lu et al. 2022a, Appendix C). 'logSNR': the K intervals are uniform in lambda; otherwise the outer
        points come from the `steps`-interval grid, an order-k step spanning k of its intervals."""
        if order == 3:
            orders = [3] * (steps // 3 - 1) + [2, 1] if steps % 3 == 0 else [3] * (steps // 3) + [steps % 3]
        else:
            orders = [order] * (steps // order) + [1] * (steps % order)
        if skip_type == "logSNR":
            return self.get_time_steps(skip_type, t_T, t_0, len(orders), device, dtype), orders
        idx = torch.cumsum(torch.tensor([0] + orders), dim=0).to(device)
        return self.get_time_steps(skip_type, t_T, t_0, steps, device, dtype)[idx], orders

    def _coefficients(self, s, t):
        """(ratio, mu_t, H, h) of the exponential integrator from s to t (see the module docstring)."""
        ns = self.noise_schedule
        h = ns.marginal_lambda(t) - ns.marginal_lambda(s)
        if self.predict_x0:
            return torch.exp(ns.marginal_log_std(t) - ns.marginal_log_std(s)), ns.marginal_alpha(t), -h, h
        return torch.exp(ns.marginal_log_mean_coeff(t) - ns.marginal_log_mean_coeff(s)), ns.marginal_std(t), h, h

    def _stage(self, x, s, h, r, model_s, r1=None, model_s1=None):
        """The model at lambda_s + r h, from the first-order step (plus, given the r1 stage, its psi_2 correction)."""
        t = self.noise_schedule.inverse_lambda(self.noise_schedule.marginal_lambda(s) + r * h)
        ratio, mu, H, _ = self._coefficients(s, t)
        u = ratio * x - mu * torch.expm1(H) * model_s
        if model_s1 is not None:
            u = u - (r / r1) * mu * (torch.expm1(H) / H - 1.0) * (model_s1 - model_s)
        return self.model_fn(u, t)

    def singlestep_dpm_solver_update(self, x, s, t, order, r1=None, r2=None, stages=(), return_stages=False):
        """One singlestep step of `order` (1-3) from s to t (scalar tensors), `order` model calls: DPM-Solver eq.
        (3.7) / Algorithms 4-5 and DPM-Solver++ Algorithm 1 (and its third-order counterpart), in (ratio, mu, H).
        Stage points at lambda_s + r1 h, lambda_s + r2 h (defaults 1/2; 1/3, 2/3). stages: model values at s (and
        r1) from the same x by a lower order (the adaptive pairs), reused. Returns x_t, or (x_t, stages)."""
        stages = list(stages) or [self.model_fn(x, s)]
        ratio, mu_t, H, h = self._coefficients(s, t)
        psi1 = torch.expm1(H)
        x_t = ratio * x - mu_t * psi1 * stages[0]  # first order (DDIM), shared by all orders
        if order >= 2:
            r1 = (0.5 if order == 2 else 1.0 / 3.0) if r1 is None else r1
            if len(stages) < 2:
                stages.append(self._stage(x, s, h, r1, stages[0]))
            if order == 2:  # second-order correction from the two stage predictions
                x_t = x_t - (0.5 / r1) * mu_t * psi1 * (stages[1] - stages[0])
            else:
                r2 = 2.0 / 3.0 if r2 is None else r2
                stages.append(self._stage(x, s, h, r2, stages[0], r1, stages[1]))
                x_t = x_t - (1.0 / r2) * mu_t * (psi1 / H - 1.0) * (stages[2] - stages[0])
        return (x_t, stages) if return_stages else x_t

    def multistep_dpm_solver_update(self, x, model_prev_list, t_prev_list, t, order):
        """One multistep step to t from the last `order` predictions (most recent last; no new model call).
        Order 2 is DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2). Order 3 integrates the quadratic through the
        last three predictions exactly: with D1 ~ h m' and D2 ~ h^2 m''/2 (divided differences in lambda),
        x_t = ratio x - mu_t [psi1 m0 + psi2 D1 + 2 psi3 D2], since int_0^h e^{H - u} u^2/2 du = h^2 psi3 (H = h):
        third order (the official code's psi3 weight makes its 3M second order; see the module docstring)."""
        ns, m = self.noise_schedule, model_prev_list
        ratio, mu_t, H, h = self._coefficients(t_prev_list[-1], t)
        psi1 = torch.expm1(H)
        if order == 1:
            return ratio * x - mu_t * psi1 * m[-1]
        lam0, lam1 = ns.marginal_lambda(t_prev_list[-1]), ns.marginal_lambda(t_prev_list[-2])
        r0 = (lam0 - lam1) / h
        D1_0 = (m[-1] - m[-2]) / r0  # ~ h * dm/dlambda
        if order == 2:
            return ratio * x - mu_t * psi1 * m[-1] - 0.5 * mu_t * psi1 * D1_0
        r1 = (lam1 - ns.marginal_lambda(t_prev_list[-3])) / h
        D1_1 = (m[-2] - m[-3]) / r1
        D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)  # ~ h * dm/dlambda, second-order accurate
        D2 = (D1_0 - D1_1) / (r0 + r1)  # ~ h^2/2 * d2m/dlambda2
        psi2 = psi1 / H - 1.0
        return ratio * x - mu_t * (psi1 * m[-1] + psi2 * D1 + 2.0 * (psi2 / H - 0.5) * D2)

    def dpm_solver_adaptive(self, x, order, t_T, t_0, h_init=0.05, atol=0.0078, rtol=0.05, theta=0.9, t_err=1e-5):
        """Adaptive step size (Lu et al. 2022a, Appendix C, Algorithm 3), order k-1 paired with order k: a step is
        accepted when the RMS of (x_high - x_low) / max(atol, rtol max(|x_low|, |x_prev|)) is <= 1 for every
        sample; h <- min(theta h E^{-1/order}, lambda_0 - lambda_s). Returns x at t_0."""
        assert order in (2, 3), f"the adaptive solver pairs orders 1/2 or 2/3; order must be 2 or 3, got {order}"
        ns = self.noise_schedule
        s, t_end, h = (torch.tensor(float(v), dtype=x.dtype, device=x.device) for v in (t_T, t_0, h_init))
        lambda_s, lambda_0 = ns.marginal_lambda(s), ns.marginal_lambda(t_end)
        x_prev = x
        r1 = 0.5 if order == 2 else 1.0 / 3.0
        while (s - t_end).abs() > t_err:
            t = ns.inverse_lambda(lambda_s + h)
            x_low, stages = self.singlestep_dpm_solver_update(x, s, t, order - 1, r1=r1, return_stages=True)
            # The higher order reuses the lower one's stages: one new model call per attempt.
            x_high = self.singlestep_dpm_solver_update(x, s, t, order, r1=r1, stages=stages)
            delta = torch.maximum(torch.full_like(x_low, atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            E = ((x_high - x_low) / delta).reshape(x.shape[0], -1).pow(2).mean(dim=1).sqrt().max()
            if not torch.isfinite(E):
                # A NaN error estimate would never accept a step: fail instead of looping forever.
                raise InputError(f"adaptive DPM-Solver: the model output became NaN/Inf near t = {float(s):.4g}")
            if E <= 1.0:
                x, x_prev, s = x_high, x_low, t
                lambda_s = ns.marginal_lambda(s)
            h = torch.minimum(theta * h * E.clamp(min=1e-12) ** (-1.0 / order), lambda_0 - lambda_s)
        return x

    def sample(self, x, steps=20, t_start=None, t_end=None, order=2, skip_type="time_uniform", method="multistep",
               lower_order_final=True, denoise_to_zero=False, return_intermediate=False, atol=0.0078, rtol=0.05):
        """Integrate the probability-flow ODE from t_start (default T) to t_end (default 1/N) starting at x.

        x: (B, ...) noise at t_start. Computed in float32 (float64 if x is float64); returns that dtype.
        method: 'singlestep' (DPM-Solver-fast order list, NFE = steps), 'singlestep_fixed' (steps // order steps of
        `order`), 'multistep' (NFE = steps; warm-up with orders 1..order-1; with lower_order_final and steps < 10 the
        last steps drop order, as in the official code), 'adaptive' (steps ignored).
        denoise_to_zero: one more call, returning the data prediction at t_end. return_intermediate: also return
        the list of states after every outer step (first: x).
        """
        # libs.sampling picks method, order and grid from its algorithm: a bad one is a caller's bug.
        assert method in METHODS, f"unknown method '{method}'; known: {', '.join(METHODS)}"
        assert skip_type in SKIP_TYPES, f"unknown skip_type '{skip_type}'; known: {', '.join(SKIP_TYPES)}"
        assert order in (1, 2, 3) and (method != "singlestep_fixed" or steps >= order), f"order {order}"
        check_start(x, None if method == "adaptive" else steps)
        ns = self.noise_schedule
        t_0 = 1.0 / ns.total_N if t_end is None else float(t_end)
        t_T = ns.T if t_start is None else float(t_start)
        # tolerance: times that went through float32
        assert 0.0 < t_0 < t_T <= ns.T * (1.0 + 1e-6), f"need 0 < t_end < t_start <= T, got {t_0}, {t_T}"
        # Solver state in float32 or better: low-precision x (or autocast outputs) would lose the small
        # differences the higher-order corrections are made of.
        out_dtype = x.dtype
        x = x.to(solver_dtype(x.dtype))
        dtype, device = x.dtype, x.device
        self.nfe = 0
        intermediates = [x]
        if method == "adaptive":
            x = self.dpm_solver_adaptive(x, order, t_T, t_0, atol=atol, rtol=rtol)
            intermediates.append(x)
        elif method == "multistep":
            ts = self.get_time_steps(skip_type, t_T, t_0, steps, device, dtype)
            t_prev, m_prev = [ts[0]], [self.model_fn(x, ts[0])]
            for step in range(1, steps + 1):
                step_order = min(order, step)  # warm-up: not enough history yet
                if lower_order_final and steps < 10:
                    # Few, large steps: high orders near t=0 are unstable (official code's rule).
                    step_order = min(step_order, steps + 1 - step)
                x = self.multistep_dpm_solver_update(x, m_prev, t_prev, ts[step], step_order)
                intermediates.append(x)
                t_prev.append(ts[step])
                if step < steps:  # the final state needs no prediction
                    m_prev.append(self.model_fn(x, ts[step]))
                t_prev, m_prev = t_prev[-order:], m_prev[-order:]
        else:
            if method == "singlestep":
                outer, orders = self.get_orders_and_timesteps_for_singlestep_solver(steps, order, skip_type, t_T, t_0,
                                                                                   device, dtype)
            else:
                orders = [order] * (steps // order)
                outer = self.get_time_steps(skip_type, t_T, t_0, len(orders), device, dtype)
            for s, t, step_order in zip(outer[:-1], outer[1:], orders):
                # Stage points: the inner points of the same grid type between s and t: r1 = 1/2 or (1/3, 2/3) on
                # a logSNR grid, the skipped grid points on a time-uniform one.
                lam = ns.marginal_lambda(self.get_time_steps(skip_type, float(s), float(t), step_order, device))
                r = ((lam[1:-1] - lam[0]) / (lam[-1] - lam[0])).to(dtype)
                x = self.singlestep_dpm_solver_update(x, s, t, step_order, *r)
                intermediates.append(x)
        if denoise_to_zero:
            x = self.data_prediction_fn(x, torch.tensor(t_0, dtype=dtype, device=device))
            intermediates.append(x)
        logger.debug("DPM-Solver %s %s order %d: %d model calls", self.algorithm_type, method, order, self.nfe)
        if out_dtype == torch.float64:
            x = x.to(out_dtype)
        return (x, intermediates) if return_intermediate else x
