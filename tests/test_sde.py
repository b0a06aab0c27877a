"""sde.py: schedules, LSimple by hand, the score adapter, reverse SDE / PF-ODE drifts and Euler-Maruyama.

Small tensors only (below torch's intra-op parallel grain), so the statistical test stays fast on 2 cores.
"""
import contextlib
import math

import numpy as np
import pytest
import torch

from libs.errors import InputError
from sde import ContinuousVP, DiscreteVP, ScoreModel, build_diffusion, stable_diffusion_beta_schedule

S = 0.5
B0, B1 = 0.1, 20.0


def log_alpha_linear(t):
    """Closed form of the linear VP-SDE, written independently of dpm_solver_pp (numpy)."""
    return -0.25 * t ** 2 * (B1 - B0) - 0.5 * t * B0


def gaussian_eps_net(diffusion, time_scale, record=None):
    """Exact eps* of N(0, S^2 I) data; the network sees t_input = time_scale * t."""
    ns = diffusion.schedule

    def net(x, t_input):
        if record is not None:
            record.append(t_input.detach().clone())
        t = (t_input / time_scale).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        a, s = ns.marginal_alpha(t), ns.marginal_std(t)
        return s * x / (a ** 2 * S ** 2 + s ** 2)

    return net


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread: on the shared 2-core CI machine, 2 threads were 15x slower for these sizes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ---------------------------------------------------------------- schedules and construction


def test_stable_diffusion_betas_match_the_formula_and_diffusers():
    betas = stable_diffusion_beta_schedule()
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    a, b = math.sqrt(0.00085), math.sqrt(0.012)
    n = np.arange(1, 1001)
    np.testing.assert_allclose(betas.numpy(), (a + (n - 1) * (b - a) / 999) ** 2, rtol=1e-13)
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear").betas
    np.testing.assert_allclose(betas.float().numpy(), ref.numpy(), rtol=1e-6)


def test_build_diffusion_kinds_and_shared_schedule():
    c, d = build_diffusion("continuous"), build_diffusion("discrete")
    assert isinstance(c, ContinuousVP) and isinstance(d, DiscreteVP)
    assert c.schedule.schedule == "linear" and (c.schedule.beta_0, c.schedule.beta_1) == (0.1, 20.0)
    assert d.schedule.schedule == "discrete" and d.schedule.total_N == 1000
    with pytest.raises(AssertionError, match="continuous, discrete"):
        build_diffusion("edm")


def test_network_time():
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(build_diffusion("continuous").network_time(t), torch.tensor([0.0, 499.5, 999.0]))
    torch.testing.assert_close(build_diffusion("discrete").network_time(t), torch.tensor([0.0, 500.0, 1000.0]))


def test_discrete_schedule_is_built_from_float32_betas():
    d = DiscreteVP()
    betas32 = stable_diffusion_beta_schedule().float().double()
    ref = np.cumprod(1 - betas32.numpy())
    alphas_cumprod = torch.exp(2.0 * d.schedule.log_alpha_array)  # the table the loss and samplers share
    np.testing.assert_allclose(alphas_cumprod.numpy(), ref, rtol=1e-12)
    # Published values of Stable Diffusion's schedule: abar_1 = 0.99915, abar_1000 = 4.66e-3.
    assert float(alphas_cumprod[0]) == pytest.approx(0.99915, abs=5e-6)
    assert float(alphas_cumprod[-1]) == pytest.approx(4.66e-3, rel=2e-3)


# ---------------------------------------------------------------- LSimple


def test_continuous_lsimple_matches_a_hand_computation():
    d = ContinuousVP()
    x0 = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(7))
    w = torch.randn(18, 18, generator=torch.Generator().manual_seed(8)) * 0.1
    seen = {}

    def net(x, t_input):
        seen["x"], seen["t"] = x.clone(), t_input.clone()
        return torch.tanh(x.reshape(5, -1) @ w).reshape(x.shape) * (t_input.reshape(-1, 1, 1, 1) / 999)

    loss = d.loss(net, x0, generator=torch.Generator().manual_seed(123))
    # Redraw the same numbers: t ~ U(0, 1) first, then eps, from the same generator.
    g = torch.Generator().manual_seed(123)
    t = torch.rand(5, generator=g).double().numpy()
    eps = torch.randn(x0.shape, generator=g).double().numpy()
    a = np.exp(log_alpha_linear(t)).reshape(-1, 1, 1, 1)
    s = np.sqrt(1 - a ** 2)
    x_t = a * x0.double().numpy() + s * eps
    np.testing.assert_allclose(seen["t"].numpy(), 999 * t, rtol=1e-6)
    np.testing.assert_allclose(seen["x"].numpy(), x_t, rtol=1e-5, atol=1e-6)
    pred = np.tanh(x_t.reshape(5, -1) @ w.double().numpy()).reshape(x_t.shape) * (999 * t / 999).reshape(-1, 1, 1, 1)
    expected = ((eps - pred) ** 2).reshape(5, -1).mean(axis=1)
    assert loss.shape == (5,) and loss.dtype == torch.float32
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


def test_discrete_lsimple_matches_a_hand_computation():
    d = DiscreteVP()
    x0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    seen = {}

    def net(x, n):
        seen["x"], seen["n"] = x.clone(), n.clone()
        return 0.5 * x

    loss = d.loss(net, x0, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    n = torch.randint(1, 1001, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g).double().numpy()
    abar = np.cumprod(1 - stable_diffusion_beta_schedule().numpy())[n.numpy() - 1].reshape(-1, 1)
    x_n = np.sqrt(abar) * x0.double().numpy() + np.sqrt(1 - abar) * eps
    assert seen["n"].dtype == torch.int64 and torch.equal(seen["n"], n)
    np.testing.assert_allclose(seen["x"].numpy(), x_n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss.numpy(), ((eps - 0.5 * x_n) ** 2).mean(axis=1), rtol=1e-5)


def test_loss_uses_torch_default_rng_and_covers_the_time_range():
    d = DiscreteVP()
    ns_seen = []
    net = lambda x, n: ns_seen.append(n) or torch.zeros_like(x)  # noqa: E731
    x0 = torch.zeros(20000, 1)
    torch.manual_seed(3)
    l1 = d.loss(net, x0)
    torch.manual_seed(3)
    l2 = d.loss(net, x0)
    assert torch.equal(l1, l2) and torch.equal(ns_seen[0], ns_seen[1])
    assert int(ns_seen[0].min()) == 1 and int(ns_seen[0].max()) == 1000
    # With a zero network the loss is mean(eps^2) per sample: chi-square, mean 1.
    assert float(l1.mean()) == pytest.approx(1.0, abs=0.05)


def test_loss_under_bf16_autocast_is_float32():
    lin = torch.nn.Linear(8, 8)
    net = lambda x, t: lin(x)  # noqa: E731
    x0 = torch.randn(4, 8)
    ref = ContinuousVP().loss(net, x0, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x0).dtype == torch.bfloat16
        got = ContinuousVP().loss(net, x0, generator=torch.Generator().manual_seed(0))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.02)


def test_loss_validation():
    d = ContinuousVP()
    with pytest.raises(InputError, match="x0"):
        d.loss(lambda x, t: x, torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(InputError, match="shape"):
        d.loss(lambda x, t: x[:, :1], torch.zeros(4, 3))


# ---------------------------------------------------------------- score adapter and drifts


def test_score_model_conversions_on_gaussian_data():
    d = ContinuousVP()
    sm = ScoreModel(gaussian_eps_net(d, 999.0), d)
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    a = torch.from_numpy(np.exp(log_alpha_linear(t.numpy()))).reshape(-1, 1)
    v = a ** 2 * S ** 2 + 1 - a ** 2
    # p_t = N(0, v_t I): score = -x / v; posterior mean E[x0 | x_t] = a S^2 x / v.
    torch.testing.assert_close(sm.score(x, t), -x / v, rtol=1e-10, atol=1e-12)


def test_pf_ode_drift_is_the_derivative_of_the_exact_flow():
    """Along x(t) = x_T sqrt(v_t / v_1) the velocity is x v'(t) / (2 v), v' by finite differences."""
    d = ContinuousVP()
    sm = ScoreModel(gaussian_eps_net(d, 999.0), d)
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=torch.float64)
    v = lambda u: np.exp(2 * log_alpha_linear(u)) * (S ** 2 - 1) + 1  # noqa: E731
    h = 1e-6
    dv = (v(t.numpy() + h) - v(t.numpy() - h)) / (2 * h)
    expected = x * torch.from_numpy(dv / (2 * v(t.numpy()))).reshape(-1, 1)
    torch.testing.assert_close(d.pf_ode_drift(sm, x, t), expected, rtol=1e-6, atol=1e-9)
    # The reverse SDE drift differs from the ODE drift by -beta score / 2.
    beta = torch.from_numpy(B0 + t.numpy() * (B1 - B0)).reshape(-1, 1)
    torch.testing.assert_close(d.reverse_sde_drift(sm, x, t) - d.pf_ode_drift(sm, x, t),
                               -0.5 * beta * sm.score(x, t), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- Euler-Maruyama


def em_gain_and_noise(steps, sde):
    """Per-step x <- a_k x + b_k z for the Gaussian model, from the protocol's formulas (numpy).

    Returns (prod of a_k, exact output variance for unit input variance).
    """
    grid = np.concatenate([[0.0], np.linspace(1e-3, 1.0, steps)])
    gain, var = 1.0, 1.0
    for i in range(steps, 0, -1):
        t, s = grid[i], grid[i - 1]
        beta = B0 + t * (B1 - B0)
        a2 = np.exp(2 * log_alpha_linear(t))
        v = a2 * S ** 2 + 1 - a2
        a = 1 + (-beta / 2 + (1.0 if sde else 0.5) * beta / v) * (s - t)
        gain *= a
        var = a * a * var + (beta * (t - s) if sde and i > 1 else 0.0)
    return gain, var


def test_euler_maruyama_grid_and_network_calls():
    d = ContinuousVP()
    record = []
    sm = ScoreModel(gaussian_eps_net(d, 999.0, record), d)
    x = torch.randn(3, 2, dtype=torch.float64)
    out = d.euler_maruyama(sm, x, 50, sde=False)
    assert len(record) == 50  # exactly S network calls
    ts = torch.stack([r[0] for r in record]).numpy() / 999.0
    np.testing.assert_allclose(ts, np.linspace(1e-3, 1.0, 50)[::-1], rtol=1e-12)  # upper end of each step
    gain, _ = em_gain_and_noise(50, sde=False)
    torch.testing.assert_close(out, x * gain, rtol=1e-10, atol=1e-12)


def test_euler_maruyama_sde_adds_no_noise_on_the_last_step():
    d = ContinuousVP()
    sm = ScoreModel(gaussian_eps_net(d, 999.0), d)
    x = torch.randn(3, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    d.euler_maruyama(sm, x, 7, sde=True, generator=g)
    g_ref = torch.Generator().manual_seed(11)
    for _ in range(6):  # 7 steps, noise on all but the last
        torch.randn(x.shape, generator=g_ref, dtype=torch.float64)
    assert torch.equal(g.get_state(), g_ref.get_state())


def test_euler_maruyama_ode_converges_to_the_exact_map_at_order_one():
    d = ContinuousVP()
    sm = ScoreModel(gaussian_eps_net(d, 999.0), d)
    x = torch.randn(2, 2, dtype=torch.float64)
    a1 = math.exp(log_alpha_linear(1.0))
    exact = x * S / math.sqrt(a1 ** 2 * S ** 2 + 1 - a1 ** 2)
    with single_thread():
        errs = [float((d.euler_maruyama(sm, x, n, sde=False) - exact).abs().max()) for n in (250, 500, 1000)]
    # The grid stops at 1e-3 before its last step, so the map ends at t = 0 exactly; Euler is first order.
    assert 0.4 < errs[1] / errs[0] < 0.6 and 0.4 < errs[2] / errs[1] < 0.6, errs


def test_euler_maruyama_sde_samples_have_the_data_mean_and_variance():
    """1000-step EM samples of N(0, S^2): |mean| < 4 SE and |var/S^2 - 1| < 4 sqrt(2/n) + the EM bias.

    The EM bias at 1000 steps is +0.09% (closed-form variance recursion, em_gain_and_noise); n = 30000.
    """
    d = ContinuousVP()
    sm = ScoreModel(gaussian_eps_net(d, 999.0), d)
    g = torch.Generator().manual_seed(2024)
    x_T = torch.randn(10000, 3, generator=g)
    with single_thread():
        out = d.euler_maruyama(sm, x_T, 1000, sde=True, generator=g)
    n = out.numel()
    _, var_em = em_gain_and_noise(1000, sde=True)
    assert abs(var_em / S ** 2 - 1) < 2e-3
    assert abs(float(out.mean())) < 4 * S / math.sqrt(n)
    assert abs(float(out.var()) / S ** 2 - 1) < 4 * math.sqrt(2 / n) + abs(var_em / S ** 2 - 1)


def test_euler_maruyama_per_sample_generators_make_samples_batch_independent():
    d = ContinuousVP()
    sm = ScoreModel(gaussian_eps_net(d, 999.0), d)
    x = torch.randn(3, 4)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    full = d.euler_maruyama(sm, x, 20, generator=gens([10, 11, 12]))
    alone = d.euler_maruyama(sm, x[1:2], 20, generator=gens([11]))
    torch.testing.assert_close(full[1:2], alone)
    with pytest.raises(InputError, match="one per sample"):
        d.euler_maruyama(sm, x, 20, generator=gens([1, 2]))
    with pytest.raises(AssertionError, match="steps"):
        d.euler_maruyama(sm, x, 0)
