"""dpm_solver_pp: schedules against closed forms / independent references, model_wrapper, solver mechanics.

Accuracy against the exact probability-flow map lives in test_solver_convergence.py.
"""
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from dpm_solver_pp import DPM_Solver, NoiseScheduleVP, model_wrapper
from libs.errors import InputError

S = 0.5  # data std of the analytic Gaussian model


def sd_betas(dtype=torch.float32):
    """Stable Diffusion's betas written out from the formula beta_n = (a + (n-1)(b-a)/999)^2 (not from sde.py)."""
    a, b = math.sqrt(0.00085), math.sqrt(0.012)
    n = np.arange(1000, dtype=np.float64)
    return torch.from_numpy((a + n * (b - a) / 999.0) ** 2).to(dtype)


SCHEDULES = {
    "linear": lambda: NoiseScheduleVP("linear", continuous_beta_0=0.1, continuous_beta_1=20.0),
    "cosine": lambda: NoiseScheduleVP("cosine"),
    "discrete": lambda: NoiseScheduleVP("discrete", betas=sd_betas()),
}


def gaussian_net(ns, time_scale):
    """Exact noise predictor of N(0, S^2 I) data, called with the network time t_input = time_scale * t."""

    def net(x, t_input):
        t = (t_input / time_scale).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        a, s = ns.marginal_alpha(t), ns.marginal_std(t)
        return s * x / (a ** 2 * S ** 2 + s ** 2)

    return net


# ---------------------------------------------------------------- schedules


def test_linear_schedule_published_values():
    ns = SCHEDULES["linear"]()
    t = torch.tensor([1.0, 1e-4], dtype=torch.float64)
    alpha, sigma, lam = ns.marginal_alpha(t), ns.marginal_std(t), ns.marginal_lambda(t)
    # The VP-SDE linear schedule's values at t = 1 and t = 1e-4 (beta 0.1 -> 20), to the digits usually quoted.
    assert float(alpha[0]) == pytest.approx(6.57e-3, rel=1e-3)
    assert float(sigma[0]) == pytest.approx(0.99998, abs=1e-5)
    assert float(lam[0]) == pytest.approx(-5.03, abs=6e-3)  # -5.025, usually quoted as -5.03
    assert float(alpha[1]) == pytest.approx(0.999995, abs=1e-6)
    assert float(sigma[1]) == pytest.approx(3.18e-3, rel=2e-3)
    assert float(lam[1]) == pytest.approx(5.75, abs=5e-3)


def test_linear_schedule_is_the_integral_of_beta():
    ns = SCHEDULES["linear"]()
    for t in [0.0, 0.013, 0.3, 0.77, 1.0]:
        integral, _ = integrate.quad(lambda u: 0.1 + u * (20.0 - 0.1), 0.0, t)
        alpha2 = float(ns.marginal_alpha(torch.tensor(t, dtype=torch.float64))) ** 2
        assert alpha2 == pytest.approx(math.exp(-integral), rel=1e-12)
        assert float(ns.beta(torch.tensor(t, dtype=torch.float64))) == pytest.approx(0.1 + t * 19.9, rel=1e-12)


def test_cosine_schedule_closed_form_and_end_time():
    ns = SCHEDULES["cosine"]()
    s = 0.008
    f = lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731  Nichol & Dhariwal eq. 17
    for t in [0.0, 0.1, 0.5, 0.9]:
        abar = float(ns.marginal_alpha(torch.tensor(t, dtype=torch.float64))) ** 2
        assert abar == pytest.approx(f(t) / f(0.0), rel=1e-12)
    # T is where beta(t) = -d log abar / dt reaches 999.
    assert float(ns.beta(torch.tensor(ns.T, dtype=torch.float64))) == pytest.approx(999.0, rel=1e-9)


def test_discrete_schedule_matches_diffusers_and_published_values():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear").alphas_cumprod.double()
    ns = SCHEDULES["discrete"]()
    n = torch.arange(1, 1001, dtype=torch.float64)
    abar = ns.marginal_alpha(n / 1000) ** 2
    torch.testing.assert_close(abar, ref, rtol=2e-6, atol=0)
    assert float(abar[0]) == pytest.approx(0.99915, abs=5e-6)
    assert float(abar[-1]) == pytest.approx(4.66e-3, rel=2e-3)
    # alphas_cumprod= builds the same schedule.
    ns2 = NoiseScheduleVP("discrete", alphas_cumprod=torch.cumprod(1 - sd_betas(torch.float64), 0))
    torch.testing.assert_close(ns2.marginal_lambda(n / 1000), ns.marginal_lambda(n / 1000), rtol=1e-6, atol=1e-6)


def test_discrete_schedule_is_piecewise_linear_with_linear_extrapolation():
    ns = SCHEDULES["discrete"]()
    la = 0.5 * torch.cumsum(torch.log(1 - sd_betas().double()), 0)  # (1000,) log alpha at t_n = n/1000
    # Midpoints between knots are the average of their neighbours.
    t_mid = (torch.arange(1, 1000, dtype=torch.float64) + 0.5) / 1000
    torch.testing.assert_close(ns.marginal_log_mean_coeff(t_mid), (la[:-1] + la[1:]) / 2, rtol=1e-10, atol=1e-12)
    # Below the first knot the first segment is extended: log alpha(0) = 2 la_1 - la_2.
    t0 = torch.tensor([0.0], dtype=torch.float64)
    torch.testing.assert_close(ns.marginal_log_mean_coeff(t0), (2 * la[0] - la[1]).reshape(1), rtol=1e-10, atol=1e-12)
    # beta(t) is -2 times the slope of the segment.
    torch.testing.assert_close(ns.beta(t_mid), -2 * (la[1:] - la[:-1]) * 1000, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_inverse_lambda_inverts_marginal_lambda(name):
    ns = SCHEDULES[name]()
    lo = 1e-3 if name == "discrete" else 1e-4
    t = torch.linspace(lo, ns.T, 257, dtype=torch.float64)
    torch.testing.assert_close(ns.inverse_lambda(ns.marginal_lambda(t)), t, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_beta_is_minus_twice_the_derivative_of_log_alpha(name):
    ns = SCHEDULES[name]()
    t = torch.linspace(0.01, 0.98, 50, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(ns.marginal_log_mean_coeff(t).sum(), t)
    torch.testing.assert_close(ns.beta(t.detach()), -2 * grad, rtol=1e-10, atol=1e-10)


def test_std_and_lambda_are_consistent():
    ns = SCHEDULES["linear"]()
    t = torch.linspace(1e-4, 1, 100, dtype=torch.float64)
    a, s = ns.marginal_alpha(t), ns.marginal_std(t)
    torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(t), rtol=0, atol=1e-14)
    torch.testing.assert_close(ns.marginal_lambda(t), torch.log(a / s), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ns.marginal_log_std(t), torch.log(s), rtol=1e-10, atol=1e-12)


def test_schedule_validation():
    with pytest.raises(AssertionError, match="unknown noise schedule"):
        NoiseScheduleVP("quadratic")
    with pytest.raises(AssertionError, match="exactly one"):
        NoiseScheduleVP("discrete")
    with pytest.raises(AssertionError, match="exactly one"):
        NoiseScheduleVP("discrete", betas=sd_betas(), alphas_cumprod=sd_betas())
    bad = sd_betas().clone()
    bad[3] = float("nan")
    with pytest.raises(InputError, match="betas"):
        NoiseScheduleVP("discrete", betas=bad)
    with pytest.raises(InputError, match="1-D"):
        NoiseScheduleVP("discrete", betas=sd_betas().reshape(10, 100))


# ---------------------------------------------------------------- model_wrapper


@pytest.mark.parametrize("model_type", ["x_start", "v", "score"])
def test_model_types_convert_to_the_same_noise(model_type):
    ns = SCHEDULES["linear"]()
    eps_net = gaussian_net(ns, 999.0)

    def other_net(x, t_input):
        t = (t_input / 999.0).reshape(-1, 1)
        a, s = ns.marginal_alpha(t), ns.marginal_std(t)
        eps = eps_net(x, t_input)
        x0 = (x - s * eps) / a
        return {"x_start": x0, "v": a * eps - s * x0, "score": -eps / s}[model_type]

    x = torch.randn(6, 5, dtype=torch.float64)
    t = torch.linspace(0.01, 0.99, 6, dtype=torch.float64)
    ref = model_wrapper(eps_net, ns, model_type="noise")(x, t)
    got = model_wrapper(other_net, ns, model_type=model_type)(x, t)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)


def test_network_time_defaults_and_override():
    seen = []

    def net(x, t_input):
        seen.append(t_input.clone())
        return torch.zeros_like(x)

    x = torch.zeros(2, 3)
    t = torch.tensor([0.5, 1.0])
    model_wrapper(net, SCHEDULES["linear"]())(x, t)
    model_wrapper(net, SCHEDULES["discrete"]())(x, t)
    model_wrapper(net, SCHEDULES["discrete"](), network_time=lambda u: 1000 * (u - 1e-3))(x, t)
    torch.testing.assert_close(seen[0], torch.tensor([499.5, 999.0]))
    torch.testing.assert_close(seen[1], torch.tensor([500.0, 1000.0]))
    torch.testing.assert_close(seen[2], torch.tensor([499.0, 999.0]))


def test_model_wrapper_validation():
    ns = SCHEDULES["linear"]()
    net = lambda x, t: x  # noqa: E731
    with pytest.raises(AssertionError, match="model_type"):
        model_wrapper(net, ns, model_type="eps")
    bad = model_wrapper(lambda x, t: x[:, :2], ns)
    with pytest.raises(InputError, match="shape"):
        bad(torch.zeros(3, 4), torch.ones(3))


# ---------------------------------------------------------------- solver mechanics


def counting_gaussian_solver(ns, algorithm_type, time_scale, record=None):
    net = gaussian_net(ns, time_scale)

    def recorded(x, t_input):
        if record is not None:
            record.append(float(t_input[0]))
        return net(x, t_input)

    return DPM_Solver(model_wrapper(recorded, ns), ns, algorithm_type=algorithm_type)


@pytest.mark.parametrize("steps", list(range(1, 26)) + [50])
def test_singlestep_order_lists_use_exactly_steps_calls(steps):
    ns = SCHEDULES["linear"]()
    solver = counting_gaussian_solver(ns, "dpmsolver", 999.0)
    for order in (1, 2, 3):
        _, orders = solver.get_orders_and_timesteps_for_singlestep_solver(steps, order, "logSNR", 1.0, 1e-4, "cpu")
        assert sum(orders) == steps
        assert all(o <= order for o in orders)
    _, orders3 = solver.get_orders_and_timesteps_for_singlestep_solver(steps, 3, "logSNR", 1.0, 1e-4, "cpu")
    # At most two lower-order steps, at the end (DPM-Solver-fast, Lu et al. 2022a Appendix C).
    assert orders3[: len(orders3) - 2] == [3] * (len(orders3) - 2)
    x = torch.randn(2, 3, dtype=torch.float64)
    solver.sample(x, steps=steps, t_start=1.0, t_end=1e-4, order=3, skip_type="logSNR", method="singlestep")
    assert solver.nfe == steps


def test_fifty_step_fast_orders_and_stage_points():
    """The continuous paper protocol at 50 steps: 17 intervals, orders 3 x16 then 2; stage points at 1/3, 2/3
    (1/2) in lambda."""
    ns = SCHEDULES["linear"]()
    record = []
    solver = counting_gaussian_solver(ns, "dpmsolver", 999.0, record)
    outer, orders = solver.get_orders_and_timesteps_for_singlestep_solver(50, 3, "logSNR", 1.0, 1e-4, "cpu")
    assert orders == [3] * 16 + [2]
    lam_outer = ns.marginal_lambda(outer)
    torch.testing.assert_close(lam_outer, torch.linspace(float(lam_outer[0]), float(lam_outer[-1]), 18,
                                                         dtype=torch.float64), rtol=0, atol=1e-9)
    solver.sample(torch.randn(2, 3, dtype=torch.float64), steps=50, t_start=1.0, t_end=1e-4, order=3,
                  skip_type="logSNR", method="singlestep")
    lam_in = ns.marginal_lambda(torch.tensor(record, dtype=torch.float64) / 999.0)
    h = float(lam_outer[1] - lam_outer[0])
    expected = []
    for k, o in enumerate(orders):
        fr = [0, 1 / 3, 2 / 3] if o == 3 else [0, 1 / 2]
        expected += [float(lam_outer[k]) + f * h for f in fr]
    torch.testing.assert_close(lam_in, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-9)
    # Section 6: inputs go from 999.0 down to 0.186 (the last stage point).
    assert record[0] == pytest.approx(999.0, abs=1e-6) and record[-1] == pytest.approx(0.186, abs=1e-3)


def test_time_uniform_singlestep_stage_points_are_the_grid_points():
    """The discrete paper protocol: at 50 steps the network sees 1000 - 19.98 k, k = 0..49."""
    ns = SCHEDULES["discrete"]()
    record = []
    solver = counting_gaussian_solver(ns, "dpmsolver++", 1000.0, record)
    solver.sample(torch.randn(2, 3), steps=50, t_start=1.0, t_end=1e-3, order=3, skip_type="time_uniform",
                  method="singlestep")
    expected = 1000.0 - 19.98 * np.arange(50)
    np.testing.assert_allclose(record, expected, atol=2e-3)


def test_multistep_uses_steps_calls_and_handles_few_steps():
    ns = SCHEDULES["linear"]()
    x = torch.randn(3, 4, dtype=torch.float64)
    for steps in (1, 2, 3, 5, 12):
        for order in (1, 2, 3):
            solver = counting_gaussian_solver(ns, "dpmsolver++", 999.0)
            out = solver.sample(x, steps=steps, t_start=1.0, t_end=1e-3, order=order, skip_type="logSNR",
                                method="multistep")
            assert solver.nfe == steps
            assert torch.isfinite(out).all()


def test_first_order_noise_and_data_forms_are_the_same_update():
    """DPM-Solver-1 and DPM-Solver++1 are both DDIM: identical for ANY model (Lu et al. 2022b, section 4)."""
    ns = SCHEDULES["linear"]()
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    net = lambda x, t: torch.sin(x @ w) * (t.reshape(-1, 1) / 999.0)  # noqa: E731  not a Gaussian model
    x = torch.randn(5, 4, dtype=torch.float64)
    outs = [DPM_Solver(model_wrapper(net, ns), ns, algorithm_type=a).sample(
        x, steps=7, t_start=1.0, t_end=1e-3, order=1, skip_type="time_quadratic", method="singlestep")
        for a in ("dpmsolver", "dpmsolver++")]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)


def test_denoise_to_zero_and_return_intermediate():
    ns = SCHEDULES["linear"]()
    x = torch.randn(3, 4, dtype=torch.float64)
    solver = counting_gaussian_solver(ns, "dpmsolver++", 999.0)
    last, inter = solver.sample(x, steps=12, t_start=1.0, t_end=1e-3, order=3, method="singlestep",
                                skip_type="logSNR", return_intermediate=True)
    assert len(inter) == 1 + 5 and inter[0] is not None and torch.equal(inter[-1], last)
    solver2 = counting_gaussian_solver(ns, "dpmsolver++", 999.0)
    den = solver2.sample(x, steps=12, t_start=1.0, t_end=1e-3, order=3, method="singlestep", skip_type="logSNR",
                         denoise_to_zero=True)
    assert solver2.nfe == 13
    t = torch.tensor(1e-3, dtype=torch.float64)
    a, s = ns.marginal_alpha(t), ns.marginal_std(t)
    torch.testing.assert_close(den, last * a * S ** 2 / (a ** 2 * S ** 2 + s ** 2), rtol=1e-10, atol=1e-12)


def test_dynamic_thresholding_clips_to_the_quantile():
    ns = SCHEDULES["linear"]()
    solver = DPM_Solver(lambda x, t: x, ns, correcting_x0_fn="dynamic_thresholding", dynamic_thresholding_ratio=0.9)
    x0 = torch.tensor([[0.1, -0.5, 3.0, -4.0, 2.0, 0.0, 1.0, -1.5, 0.3, 6.0],
                       [0.1, 0.2, -0.3, 0.4, 0.5, 0.6, -0.7, 0.8, 0.9, 0.95]])
    out = solver.dynamic_thresholding_fn(x0)
    q = np.quantile(np.abs(x0.numpy()), 0.9, axis=1)  # numpy's linear interpolation, as torch.quantile
    for i in range(2):
        s = max(q[i], 1.0)
        np.testing.assert_allclose(out[i].numpy(), np.clip(x0[i].numpy(), -s, s) / s, rtol=1e-6)
    with pytest.raises(AssertionError, match="dpmsolver\\+\\+"):
        DPM_Solver(lambda x, t: x, ns, algorithm_type="dpmsolver", correcting_x0_fn="dynamic_thresholding")


def test_solver_validation():
    ns = SCHEDULES["linear"]()
    solver = counting_gaussian_solver(ns, "dpmsolver", 999.0)
    x = torch.randn(2, 3)
    with pytest.raises(AssertionError, match="unknown method"):
        solver.sample(x, method="heun")
    with pytest.raises(AssertionError, match="skip_type"):
        solver.sample(x, skip_type="karras")
    with pytest.raises(AssertionError, match="order"):
        solver.sample(x, order=4)
    with pytest.raises(AssertionError, match="steps"):
        solver.sample(x, steps=0)
    with pytest.raises(AssertionError, match="t_end"):
        solver.sample(x, t_start=0.5, t_end=0.6)
    with pytest.raises(InputError, match="NaN"):
        solver.sample(torch.full((2, 3), float("nan")))
    with pytest.raises(AssertionError, match="algorithm_type"):
        DPM_Solver(lambda x, t: x, ns, algorithm_type="ddim")
    nan_solver = DPM_Solver(lambda x, t: x * float("nan"), ns)
    with pytest.raises(InputError, match="NaN"):
        nan_solver.sample(x, method="adaptive", order=2)


def test_dtypes_low_precision_inputs_are_solved_in_float32():
    ns = SCHEDULES["linear"]()
    solver = counting_gaussian_solver(ns, "dpmsolver++", 999.0)
    x = torch.randn(2, 3)
    out, inter = solver.sample(x.to(torch.bfloat16), steps=6, order=2, skip_type="logSNR", t_start=1.0,
                               t_end=1e-3, return_intermediate=True)
    assert out.dtype == torch.float32 and all(v.dtype == torch.float32 for v in inter)
    assert solver.sample(x.double(), steps=6, t_start=1.0, t_end=1e-3).dtype == torch.float64


def test_bf16_autocast_network_keeps_solver_in_float32():
    lin = torch.nn.Linear(8, 8)
    torch.nn.init.normal_(lin.weight, std=0.05)
    ns = SCHEDULES["linear"]()
    out_dtypes = []

    def net(x, t_input):
        h = lin(x)
        out_dtypes.append(h.dtype)
        return (h * (t_input.reshape(-1, 1) / 999.0)).to(h.dtype)

    x = torch.randn(4, 8)
    ref = DPM_Solver(model_wrapper(net, ns), ns).sample(x, steps=10, order=3, skip_type="logSNR", method="multistep")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        solver = DPM_Solver(model_wrapper(net, ns), ns)
        got, inter = solver.sample(x, steps=10, order=3, skip_type="logSNR", method="multistep",
                                   return_intermediate=True)
    assert out_dtypes[-1] == torch.bfloat16  # the network really ran in bf16
    assert got.dtype == torch.float32 and all(v.dtype == torch.float32 for v in inter)
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)


ALL_METHODS = [("singlestep", o) for o in (1, 2, 3)] + [("singlestep_fixed", o) for o in (1, 2, 3)] + \
    [("multistep", o) for o in (1, 2, 3)] + [("adaptive", o) for o in (2, 3)]


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_nan_sweep_over_every_solver_order_and_skip_type(schedule):
    ns = SCHEDULES[schedule]()
    w = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 0.5
    net = lambda x, t: torch.tanh(x @ w) + 0.1 * x  # noqa: E731
    x = torch.randn(3, 6)
    t_end = 1e-3
    for algorithm_type in ("dpmsolver", "dpmsolver++"):
        for method, order in ALL_METHODS:
            for skip_type in ("time_uniform", "logSNR", "time_quadratic"):
                if method == "adaptive" and skip_type != "logSNR":
                    continue  # the adaptive solver chooses its own steps
                solver = DPM_Solver(model_wrapper(net, ns), ns, algorithm_type=algorithm_type)
                out = solver.sample(x, steps=7, t_end=t_end, order=order, method=method, skip_type=skip_type)
                assert out.shape == x.shape and out.dtype == torch.float32
                assert torch.isfinite(out).all(), (algorithm_type, method, order, skip_type)
