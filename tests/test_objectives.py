"""Training objectives (sde.Objective): the losses against their formulas, the time distributions, the samplers of
every objective against the exact ODE of Gaussian data, guidance interval and autoguidance, and the one-line refusal
of weights of another objective."""
import json
import math
import os

import ml_collections
import pytest
import torch

from configs.base import get_config as base_config
from libs.errors import ConfigError
from libs.sampling import ALGORITHMS, guided_noise_fn, sample
from libs.export import check_objective
from sde import ContinuousVP, DiscreteVP, LinearFlow, Objective, build_diffusion, shift_time

S0 = 0.5  # data x0 ~ N(0, S0^2 I)
OBJECTIVES = {"vp/noise": ("continuous", Objective()), "vp/v": ("continuous", Objective(prediction="v")),
              "vp/x0": ("continuous", Objective(prediction="x0")),
              "discrete vp/v": ("discrete", Objective(prediction="v")),
              "linear/velocity": ("continuous", Objective(path="linear", prediction="velocity"))}
# The samplers' tests also run JiT's x-prediction on the linear path (its loss has its own test below).
SAMPLED = {**OBJECTIVES, "linear/x0": ("continuous", Objective(path="linear", prediction="x0"))}


def exact_net(d, calls=None):
    """The exact prediction of d.objective for N(0, S0^2 I) data: E[x0 | x_t] = a S0^2 x / v, E[eps | x_t] = s x / v,
    v = a^2 S0^2 + s^2; the network reads its time input back as solver time."""
    def net(x, t_in, **cond):
        if calls is not None:
            calls.append(x.shape[0])
        t = (t_in.double() / d.time_scale).reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        a, s = d.coefficients(t)
        v = a ** 2 * S0 ** 2 + s ** 2
        x0, eps = a * S0 ** 2 * x / v, s * x / v
        return {"noise": eps, "x0": x0, "v": a * eps - s * x0, "velocity": eps - x0}[d.objective.prediction]
    return net


def exact_map(d, x_T, t_end):
    """The probability-flow ODE of Gaussian data maps x_T at t = 1 to x_T sqrt(v_end / v_1)."""
    a, s = d.coefficients(torch.tensor([1.0, t_end], dtype=torch.float64))
    v = a ** 2 * S0 ** 2 + s ** 2
    return x_T * math.sqrt(float(v[1] / v[0]))


# ----------------------------------------------------------------------------- losses


class Recorder(torch.nn.Module):
    """Returns a fixed tensor and records its inputs."""

    def __init__(self, out):
        super().__init__()
        self.out, self.inputs = out, []

    def forward(self, x, t, **cond):
        self.inputs.append((x, t))
        return self.out


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_loss_equals_its_formula_at_fixed_draws(name):
    kind, objective = OBJECTIVES[name]
    d = build_diffusion(kind, objective)
    x0 = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    out = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    net = Recorder(out)
    loss = d.loss(net, x0, generator=torch.Generator().manual_seed(3))
    # The same draws, in the documented order: time (t, or n) then eps.
    g = torch.Generator().manual_seed(3)
    if kind == "discrete":
        n = torch.randint(1, 1001, (6,), generator=g)
        abar = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
        a, t_in = abar[n - 1].sqrt(), n
    else:
        t = torch.rand(6, generator=g)
        t_in = 999.0 * t
        a = 1 - t if objective.path == "linear" else torch.exp(-0.25 * t.double() ** 2 * 19.9 - 0.05 * t.double())
    eps = torch.randn(6, 1, 4, 4, generator=g)
    a = a.reshape(-1, 1, 1, 1)
    s = a.new_tensor(1.0) - a if objective.path == "linear" else (1 - a ** 2).sqrt()
    target = {"noise": eps, "x0": x0, "v": a * eps - s * x0, "velocity": eps - x0}[objective.prediction]
    expected = ((target - out) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)
    x_seen, t_seen = net.inputs[0]
    torch.testing.assert_close(x_seen, (a * x0 + s * eps).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t_seen.double(), t_in.double())


def test_linear_x0_loss_is_jits_velocity_loss():
    """x-prediction on the linear path: the loss is JiT's (Li & He 2025, Alg. 1) written in its own time direction,
    z = t_j x + (1 - t_j) e with t_j = 1 - t, v = (x - z) / max(1 - t_j, 0.05), v_pred = (x_pred - z) / max(...)."""
    d = build_diffusion("continuous", Objective(path="linear", prediction="x0"))
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    x_pred = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    net = Recorder(x_pred)
    loss = d.loss(net, x, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.rand(64, generator=g)
    e = torch.randn(64, 1, 4, 4, generator=g)
    assert (t < 0.05).any() and (t > 0.05).any()  # both sides of the clamp are exercised
    tj = (1 - t).reshape(-1, 1, 1, 1)
    z = tj * x + (1 - tj) * e
    v = (x - z) / (1 - tj).clamp_min(0.05)
    v_pred = (x_pred - z) / (1 - tj).clamp_min(0.05)
    torch.testing.assert_close(loss, ((v - v_pred) ** 2).mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.inputs[0][0], z)


def test_dimension_shift_is_sd3s_definition():
    """shift_base_dim derives the shift sqrt(d / d_base) from the generated C H W (Esser et al. 2024 eq. 23, where
    the shifted time is t' = s t / (1 + (s - 1) t)); training draws and the sampling grid both use it."""
    config = base_config()
    config.z_shape = (16, 32, 32)
    config.objective.update(path="linear", prediction="velocity", shift_base_dim=4096.0)
    o = Objective.of(config)
    assert o.shift == pytest.approx(math.sqrt(16 * 32 * 32 / 4096)) == pytest.approx(2.0)
    config.z_shape = None
    config.nnet.update(in_chans=3, img_size=256)
    assert Objective.of(config).shift == pytest.approx(math.sqrt(3 * 256 * 256 / 4096))
    t = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    s = o.shift
    torch.testing.assert_close(o.draw_time(1000, torch.Generator().manual_seed(0), "cpu"), s * t / (1 + (s - 1) * t))
    # The sampler's grid: Euler with `steps` steps calls the network at the shifted uniform grid.
    calls = []
    d = build_diffusion("continuous", o)
    sample(lambda x, t_in: calls.append(float(t_in[0]) / d.time_scale) or torch.zeros_like(x), d, torch.randn(1, 2),
           algorithm="euler", steps=4)
    u = torch.linspace(1, 0, 5, dtype=torch.float64)[:4]
    assert calls == pytest.approx((s * u / (1 + (s - 1) * u)).tolist())
    config.objective.shift = 3.0
    with pytest.raises(ConfigError, match="give the shift or derive it"):
        Objective.of(config)


def test_default_objective_is_the_original_lsimple():
    """Objective() draws and computes exactly what the paper's ContinuousVP did (bit for bit)."""
    x0 = torch.randn(5, 3, 4, 4)
    net = lambda x, t: x * 0.3 + t.reshape(-1, 1, 1, 1) / 999  # noqa: E731
    loss = ContinuousVP().loss(net, x0, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    t = torch.rand(5, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    la = (-0.25 * t ** 2 * 19.9 - 0.5 * t * 0.1).reshape(-1, 1, 1, 1)
    xt = torch.exp(la) * x0 + torch.sqrt(-torch.expm1(2 * la)) * eps
    assert torch.equal(loss, (eps - net(xt, 999.0 * t)).pow(2).reshape(5, -1).mean(1))
    assert repr(build_diffusion("continuous")) == "ContinuousVP()" and repr(build_diffusion("discrete")) == "DiscreteVP(N=1000)"


def test_paper_configs_keep_the_default_objective():
    import importlib
    names = [f[:-3] for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs"))
             if f.endswith(".py") and f not in ("__init__.py", "base.py", "digits_uvit_tiny_flow.py",
                                                "own_data_cpu.py", "imagenet256_uvit_huge_dcae.py",
                                                "imagenet256_uvit_large_kl16.py",
                                                "imagenet256_uvit_base_jit.py")
             and not f.endswith(("_meanflow.py", "_shortcut.py"))]  # the few-step configs: tests/test_fewstep.py
    for name in names:
        config = importlib.import_module(f"configs.{name}").get_config()
        assert Objective.of(config) == Objective(), name
        assert config.sample.guidance_sigma_min == config.sample.guidance_sigma_max == 0.0 and not config.sample.guide_path


def test_logit_normal_and_shift_times():
    o = Objective(path="linear", prediction="velocity", time_dist="logit_normal", logit_mean=0.5, logit_std=0.8)
    t = o.draw_time(20000, torch.Generator().manual_seed(0), "cpu")
    z = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t, torch.sigmoid(0.5 + 0.8 * z))
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean()) - 0.5) < 0.03 and abs(float(logit.std()) - 0.8) < 0.03
    # Shift 3 of a uniform t: P(t' <= 1/2) = P(t <= 1/4) (inverse map t = t' / (3 - 2 t')).
    ts = Objective(path="linear", prediction="velocity", shift=3.0).draw_time(20000, torch.Generator().manual_seed(1), "cpu")
    assert abs(float((ts <= 0.5).float().mean()) - 0.25) < 0.015
    assert float(shift_time(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)


@pytest.mark.parametrize("objective, kind, match", [
    (Objective(path="linear"), "continuous", "takes 'velocity' or 'x0'"),
    (Objective(prediction="velocity"), "continuous", "takes 'noise' or 'v' or 'x0'"),
    (Objective(time_dist="logit_normal"), "discrete", "draws n uniformly"),
    (Objective(shift=2.0), "continuous", "shift is of the linear path"),
    (Objective(path="edm"), "continuous", "not one of"),
])
def test_bad_objectives_are_one_line(objective, kind, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_diffusion(kind, objective)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- samplers


ORDERS = {"euler": 1, "heun": 2, "dpm_solver++_2m": 2, "dpm_solver++_3m": 3}


@pytest.mark.parametrize("name", list(SAMPLED))
@pytest.mark.parametrize("algorithm", list(ORDERS))
def test_solver_error_falls_at_its_order(name, algorithm):
    kind, objective = SAMPLED[name]
    d = build_diffusion(kind, objective)
    x_T = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t_end = 0.0 if (d.path == "linear" and algorithm in ("euler", "heun")) else \
        1e-3 if d.path == "linear" else 1e-4 if kind == "continuous" else 1e-3
    exact = exact_map(d, x_T, t_end)
    errors = []
    for steps in (20, 80):
        x = sample(exact_net(d), d, x_T, algorithm=algorithm, steps=steps).double()
        errors.append(float((x - exact).abs().max() / exact.abs().max()))
    slope = math.log(errors[0] / errors[1]) / math.log(4)
    # The discrete schedule's log alpha is piecewise linear in t (1000 knots): its derivative jumps, which costs
    # Heun, whose steps straddle the knots, half an order (measured 1.5); the DPM-Solvers work in lambda.
    order = 1.5 if (kind == "discrete" and algorithm == "heun") else ORDERS[algorithm]
    assert slope > order - 0.3, (errors, slope)
    assert errors[1] < 2e-2


def test_flow_sde_samples_the_data_distribution():
    """Euler-Maruyama on the linear path's reverse SDE: N(0, S0^2) samples (mean and variance within 4 standard
    errors), a different path than the ODE's."""
    d = build_diffusion("continuous", Objective(path="linear", prediction="velocity"))
    x_T = torch.randn(4000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = sample(exact_net(d), d, x_T, algorithm="flow_sde", steps=200, generator=torch.Generator().manual_seed(1)).double()
    n = x.numel()
    assert abs(float(x.mean())) < 4 * S0 / math.sqrt(n)
    assert abs(float(x.var()) - S0 ** 2) < 4 * S0 ** 2 * math.sqrt(2 / n) + 0.01 * S0 ** 2
    ode = sample(exact_net(d), d, x_T, algorithm="heun", steps=50).double()
    assert float((x - ode).abs().mean()) > 0.1  # the noise moved the samples


@pytest.mark.parametrize("algorithm, objective", [("dpm_solver", Objective(path="linear", prediction="velocity")),
                                                  ("euler_maruyama_ode", Objective(path="linear", prediction="velocity")),
                                                  ("flow_sde", Objective())])
def test_a_sampler_of_another_path_is_refused(algorithm, objective):
    d = build_diffusion("continuous", objective)
    with pytest.raises(AssertionError, match="path") as e:
        sample(exact_net(d), d, torch.randn(2, 4), algorithm=algorithm, steps=4)
    assert "\n" not in str(e.value)


def test_every_algorithm_runs_on_some_path():
    for algorithm in set(ALGORITHMS) - {"meanflow", "shortcut"}:  # two-time networks: tests/test_fewstep.py
        path = "linear" if algorithm == "flow_sde" else "vp"
        d = build_diffusion("continuous", Objective(path=path, prediction="velocity" if path == "linear" else "noise"))
        assert sample(exact_net(d), d, torch.randn(2, 4), algorithm=algorithm, steps=3).shape == (2, 4)


# ----------------------------------------------------------------------------- guidance


def branch_net(calls):
    """A 'network' whose output is the condition's value: cond y = 1 -> 1, null y = 0 -> 0 (times ones)."""
    def net(x, t_in, y):
        calls.append((x.shape[0], t_in.clone()))
        return torch.ones_like(x) * y.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    return net


def test_guidance_interval_guides_only_inside():
    calls = []
    y, null = torch.ones(3), torch.zeros(3)
    level = lambda t_in: t_in / 10  # noqa: E731 (sigma = t_in / 10 here)
    fn = guided_noise_fn(branch_net(calls), {"y": y}, {"y": null}, 2.0, interval=(0.3, 0.6), noise_level=level)
    x = torch.zeros(3, 2)
    # Per sample: sigma 0.2 (outside), 0.5 (inside), 0.9 (outside): 1 + 2 (1 - 0) = 3 only for the middle one.
    out = fn(x, torch.tensor([2.0, 5.0, 9.0]))
    torch.testing.assert_close(out[:, 0], torch.tensor([1.0, 3.0, 1.0]))
    # A call wholly outside makes only the conditional pass (half the work).
    calls.clear()
    torch.testing.assert_close(fn(x, torch.full((3,), 9.0)), torch.ones(3, 2))
    assert [c[0] for c in calls] == [3]
    # No upper limit (hi = 0): everything above lo is guided; no interval = the plain guidance.
    fn = guided_noise_fn(branch_net(calls), {"y": y}, {"y": null}, 2.0, interval=(0.3, 0.0), noise_level=level)
    torch.testing.assert_close(fn(x, torch.tensor([2.0, 5.0, 90.0]))[:, 0], torch.tensor([1.0, 3.0, 3.0]))


def test_guidance_interval_in_sample_uses_edm_sigma():
    """sample(interval=...) guides exactly at the solver times with lo < s_t / a_t <= hi."""
    d = build_diffusion("continuous", Objective(path="linear", prediction="velocity"))
    calls = []
    y = torch.ones(2)
    sample(branch_net(calls), d, torch.randn(2, 3), algorithm="euler", steps=10, cond={"y": y},
           uncond={"y": torch.zeros(2)}, scale=1.0, interval=(0.5, 2.0))
    ts = [float(t[0]) / d.time_scale for _, t in calls]
    guided = [n == 4 for n, _ in calls]
    sigmas = [t / (1 - t) if t < 1 else math.inf for t in ts]  # t = 1: pure noise, sigma = inf
    assert guided == [0.5 < s <= 2.0 for s in sigmas] and any(guided) and not all(guided)


def gaussian_class_net(d):
    """Exact velocity of class-conditional Gaussian data x0 ~ N(m y, S0^2 I) on the linear path (null y = 0)."""
    m = torch.tensor([1.5, -0.8, 0.4], dtype=torch.float64)

    def net(x, t_in, y):
        t = (t_in.double() / d.time_scale).reshape(-1, 1)
        mean = m * y.double().reshape(-1, 1)
        a, s = 1 - t, t
        v = a ** 2 * S0 ** 2 + s ** 2
        x0 = mean + a * S0 ** 2 * (x - a * mean) / v
        eps = (s * (x - a * mean) / v)
        return (eps - x0).to(x.dtype)
    return net


def authors_heun(net, d, x, y, null, scale, lo, hi, steps):
    """Kynkaanniemi et al. 2024's sampler rule written out on Heun (Karras et al. 2022, Alg. 1, no churn) over the
    linear path's ODE dx/dt = u, t uniform from 1 to 0: whether a step is guided is decided ONCE, by the noise
    level of its start t_cur, sigma = t_cur / (1 - t_cur), for both of its evaluations; the last step is Euler."""
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        sigma = t_cur / (1 - t_cur) if t_cur < 1 else math.inf
        w = scale if lo < sigma <= hi else 0.0

        def velocity(x_, t_):
            t_in = torch.full((x_.shape[0],), float(t_) * d.time_scale, dtype=torch.float64)
            c, u = net(x_, t_in, y), net(x_, t_in, null)
            return c + w * (c - u)
        d_cur = velocity(x, t_cur)
        x_next = x + (t_next - t_cur) * d_cur
        if t_next > 0:
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + velocity(x_next, t_next))
        x = x_next
    return x


def test_per_step_guidance_interval_is_the_authors_heun():
    d = build_diffusion("continuous", Objective(path="linear", prediction="velocity"))
    net = gaussian_class_net(d)
    x_T = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y, null = torch.ones(6), torch.zeros(6)
    lo, hi, steps = 0.28, 5.42, 13  # EDM2's interval; several Heun steps straddle its edges
    kw = dict(algorithm="heun", steps=steps, cond={"y": y}, uncond={"y": null}, scale=2.0, interval=(lo, hi))
    ours = sample(net, d, x_T, **kw)  # per_step: the default
    theirs = authors_heun(net, d, x_T, y, null, 2.0, lo, hi, steps)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=1e-6)
    per_evaluation = sample(net, d, x_T, **kw, interval_rule="per_evaluation")
    assert (per_evaluation - ours).abs().max() > 1e-3  # the two rules differ at the edges


def test_per_step_rule_holds_for_the_stages_of_a_singlestep_dpm_solver_step():
    d = build_diffusion("continuous", Objective())
    for rule in ("per_step", "per_evaluation"):
        calls = []
        sample(branch_net(calls), d, torch.randn(2, 3), algorithm="dpm_solver", steps=12, cond={"y": torch.ones(2)},
               uncond={"y": torch.zeros(2)}, scale=1.0, interval=(1.0, 20.0), interval_rule=rule)
        guided = [n == 4 for n, _ in calls]
        assert len(calls) == 12 and any(guided) and not all(guided)
        stages = [guided[i:i + 3] for i in range(0, 12, 3)]  # order 3: four steps of three evaluations
        assert (rule == "per_step") == all(len(set(s)) == 1 for s in stages)
        if rule == "per_step":  # decided by the step's first evaluation, at its start
            a, s = d.coefficients(torch.stack([calls[i][1][0] for i in range(0, 12, 3)]).double() / d.time_scale)
            assert [g[0] for g in stages] == [1.0 < float(v) <= 20.0 for v in s / a]


def test_autoguidance_guides_with_the_weaker_network():
    calls = []
    main = lambda x, t, y: torch.full_like(x, 2.0) * y.reshape(-1, 1)  # noqa: E731
    weak = lambda x, t, y: calls.append(y) or torch.full_like(x, 0.5) * y.reshape(-1, 1)  # noqa: E731
    y = torch.tensor([1.0, 2.0])
    out = guided_noise_fn(main, {"y": y}, None, 1.5, guide=weak)(torch.zeros(2, 3), torch.ones(2))
    # out = c + s (c - g) with the guide on the SAME condition: (2 + 1.5 * 1.5) y.
    torch.testing.assert_close(out[:, 0], torch.tensor([4.25, 8.5]))
    assert torch.equal(calls[0], y)


# ----------------------------------------------------------------------------- the objective travels with the weights


def run_dir(tmp_path, objective):
    """A run folder as training leaves it: config.json and ckpts/10.ckpt."""
    config = base_config()
    config.objective.update(objective)
    (tmp_path / "ckpts" / "10.ckpt").mkdir(parents=True)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    return str(tmp_path / "ckpts" / "10.ckpt")


def test_weights_of_another_objective_are_refused_in_one_line(tmp_path):
    ckpt = run_dir(tmp_path, dict(path="linear", prediction="velocity"))
    flow, eps = base_config(), base_config()
    flow.objective.update(path="linear", prediction="velocity")
    check_objective(flow, ckpt)  # the same objective: fine
    with pytest.raises(ConfigError, match="trained with objective linear/velocity .* this config says vp/noise") as e:
        check_objective(eps, ckpt)
    assert "\n" not in str(e.value)
    check_objective(eps, str(tmp_path / "bare.pth"))  # a bare .pth carries no config: nothing to check


def test_config_validation_refuses_an_init_from_of_another_objective(tmp_path):
    from libs.config_utils import parse_and_validate
    from configs.digits_uvit_tiny import get_config
    config = get_config()
    config.init.path = run_dir(tmp_path, dict(path="linear", prediction="velocity"))
    with pytest.raises(ConfigError, match="config.init.path .* linear/velocity"):
        parse_and_validate(config, world_size=1)


def test_sampler_of_a_config_knows_its_objective():
    from configs.digits_uvit_tiny_flow import get_config
    from libs.family import family_of
    from libs.sampling import Sampler
    config = get_config()
    config.sample.update(guidance_sigma_min=0.1, guidance_sigma_max=3.0)
    sampler = Sampler.for_config(config, family_of(config), None, "cpu")
    assert isinstance(sampler.diffusion, LinearFlow) and sampler.interval == (0.1, 3.0) and sampler.guide is None
    assert sampler.interval_rule == "per_step"  # the authors' rule by default
    config = ml_collections.ConfigDict(get_config().to_dict())
    config.objective.update(path="vp", prediction="noise")
    config.sample.algorithm = "dpm_solver"
    assert isinstance(Sampler.for_config(config, family_of(config), None, "cpu").diffusion, ContinuousVP)
    assert isinstance(build_diffusion("discrete", Objective(prediction="x0")), DiscreteVP)


def test_scripts_and_export_refuse_another_objective(tmp_path):
    import sample_class_cond
    from libs.export import export_meta, export_model
    eps_ckpt = run_dir(tmp_path / "eps", {})
    flow_config = os.path.join(os.path.dirname(__file__), "..", "configs", "digits_uvit_tiny_flow.py")
    with pytest.raises(ConfigError, match="trained with objective vp/noise .* this config says linear/velocity"):
        sample_class_cond.main([f"--config={flow_config}", f"--nnet_path={eps_ckpt}", "--class_ids=1",
                                f"--output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="--algorithm: 'dpm_solver' samples vp-path models"):
        sample_class_cond.main([f"--config={flow_config}", f"--nnet_path={eps_ckpt}", "--class_ids=1",
                                "--algorithm=dpm_solver", f"--output_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()
    flow = base_config()
    flow.objective.update(path="linear", prediction="velocity")
    with pytest.raises(ConfigError, match="checkpoint .* vp/noise"):
        export_model(eps_ckpt, str(tmp_path / "export"), flow)
    assert not (tmp_path / "export").exists()
    assert Objective.of(export_meta(flow)) == Objective(path="linear", prediction="velocity")
