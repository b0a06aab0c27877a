"""libs.sampling.sample: dispatch to the paper protocols, batched classifier-free guidance, dtypes, errors."""
import math

import numpy as np
import pytest
import torch

from dpm_solver_pp import DPM_Solver, model_wrapper
from libs.errors import InputError
from libs.sampling import ALGORITHMS, guided_noise_fn, sample
from sde import build_diffusion

S = 0.5


def gaussian_net(diffusion, record=None):
    """nnet(x, timesteps) with the exact eps* of N(0, S^2 I) data; timesteps = diffusion.network_time(t)."""
    ns = diffusion.schedule
    scale = 999.0 if diffusion.time_kind == "continuous" else float(ns.total_N)

    def net(x, timesteps):
        if record is not None:
            record.append(timesteps.detach().clone())
        t = (timesteps / scale).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        a, s = ns.marginal_alpha(t), ns.marginal_std(t)
        return s * x / (a ** 2 * S ** 2 + s ** 2)

    return net


def exact(ns, x_T, t_end):
    t = torch.tensor([1.0, t_end], dtype=torch.float64)
    v = ns.marginal_alpha(t) ** 2 * S ** 2 + ns.marginal_std(t) ** 2
    return x_T * math.sqrt(float(v[1] / v[0]))


def label_net(calls):
    """A small class-conditional network (labels 0..10, 10 = null)."""
    emb = torch.randn(11, 4, generator=torch.Generator().manual_seed(1))

    def net(x, timesteps, y):
        calls.append(x.shape[0])
        return 0.3 * torch.tanh(x * (1 + timesteps.reshape(-1, 1) / 1000)) + 0.2 * emb[y]

    return net


def test_algorithm_list():
    assert ALGORITHMS == ("dpm_solver", "dpm_solver++_2m", "dpm_solver++_3m", "euler_maruyama_sde",
                          "euler_maruyama_ode", "euler", "heun", "flow_sde", "meanflow", "shortcut")


@pytest.mark.parametrize("kind", ["continuous", "discrete"])
def test_dpm_solver_is_the_paper_protocol(kind):
    d = build_diffusion(kind)
    x = torch.randn(3, 4)
    got = sample(gaussian_net(d), d, x, algorithm="dpm_solver", steps=20)
    fn = model_wrapper(gaussian_net(d), d.schedule, network_time=d.network_time)
    if kind == "continuous":
        ref = DPM_Solver(fn, d.schedule, algorithm_type="dpmsolver").sample(
            x, steps=20, t_start=1.0, t_end=1e-4, order=3, skip_type="logSNR", method="singlestep")
    else:
        ref = DPM_Solver(fn, d.schedule, algorithm_type="dpmsolver++").sample(
            x, steps=20, t_start=1.0, t_end=1e-3, order=3, skip_type="time_uniform", method="singlestep")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_discrete_protocol_network_inputs_at_50_steps():
    """The original discrete protocol feeds the network 1000, 980.02, ..., 40.96, 20.98; NFE = steps."""
    d = build_diffusion("discrete")
    record = []
    sample(gaussian_net(d, record), d, torch.randn(2, 3), algorithm="dpm_solver", steps=50)
    inputs = np.array([float(r[0]) for r in record])
    assert len(inputs) == 50
    np.testing.assert_allclose(inputs, 1000 - 19.98 * np.arange(50), atol=2e-3)


def test_continuous_protocol_network_inputs_at_50_steps():
    d = build_diffusion("continuous")
    record = []
    sample(gaussian_net(d, record), d, torch.randn(2, 3), algorithm="dpm_solver", steps=50)
    assert len(record) == 50
    assert float(record[0][0]) == pytest.approx(999.0, abs=1e-4)
    assert float(record[-1][0]) == pytest.approx(0.186, abs=1e-3)


@pytest.mark.parametrize("kind,t_end", [("continuous", 1e-4), ("discrete", 1e-3)])
@pytest.mark.parametrize("algorithm", ["dpm_solver", "dpm_solver++_2m", "dpm_solver++_3m"])
def test_dpm_algorithms_reach_the_exact_map(kind, t_end, algorithm):
    d = build_diffusion(kind)
    record = []
    x = torch.randn(4, 5, dtype=torch.float64)
    out = sample(gaussian_net(d, record), d, x, algorithm=algorithm, steps=50)
    ref = exact(d.schedule, x, t_end)
    assert len(record) == 50
    # Paper protocols: 4.7e-4 (continuous) and 1.5e-2 (discrete) at 50 steps; the multistep solvers do better.
    bound = 2e-2 if (kind, algorithm) == ("discrete", "dpm_solver") else 3e-3
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < bound


def test_multistep_beats_the_discrete_protocol_at_equal_nfe():
    d = build_diffusion("discrete")
    x = torch.randn(4, 5, dtype=torch.float64)
    ref = exact(d.schedule, x, 1e-3)
    err = {a: float((sample(gaussian_net(d), d, x, algorithm=a, steps=20).double() - ref).abs().max())
           for a in ("dpm_solver", "dpm_solver++_2m", "dpm_solver++_3m")}
    assert err["dpm_solver++_3m"] < err["dpm_solver++_2m"] < err["dpm_solver"] / 5


def test_t_end_is_passed_through():
    d = build_diffusion("continuous")
    x = torch.randn(3, 2, dtype=torch.float64)
    out = sample(gaussian_net(d), d, x, algorithm="dpm_solver++_3m", steps=40, t_end=0.05)
    err = lambda t_end: float((out.double() - exact(d.schedule, x, t_end)).abs().max())  # noqa: E731
    # The maps to t = 0.05 and to the default 1e-4 differ by 4%; 3M at 40 steps is within 5e-4.
    assert err(0.05) < 1e-3 < 1e-2 < err(1e-4)


@pytest.mark.parametrize("algorithm", ["euler_maruyama_ode", "euler_maruyama_sde"])
def test_euler_maruyama_dispatch(algorithm):
    d = build_diffusion("continuous")
    record = []
    x = torch.randn(3, 2)
    out = sample(gaussian_net(d, record), d, x, algorithm=algorithm, steps=30, generator=torch.Generator().manual_seed(0))
    assert len(record) == 30 and out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(AssertionError, match="continuous-time"):
        sample(gaussian_net(build_diffusion("discrete")), build_diffusion("discrete"), x, algorithm=algorithm)


def test_guidance_scale_zero_is_the_conditional_model_alone():
    calls = []
    net = label_net(calls)
    d = build_diffusion("continuous")
    x = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 4])
    got = sample(net, d, x, steps=6, cond={"y": y}, uncond={"y": torch.full((5,), 10)}, scale=0.0)
    assert calls == [5] * 6  # only conditional calls, never a doubled batch
    ref = sample(lambda x_, t_: net(x_, t_, y=y), d, x, steps=6)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_batched_guidance_equals_two_separate_calls():
    calls = []
    net = label_net(calls)
    d = build_diffusion("discrete")
    x = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 4])
    null = torch.full((5,), 10)
    scale = 0.4
    got = sample(net, d, x, steps=9, cond={"y": y}, uncond={"y": null}, scale=scale)
    assert calls == [10] * 9  # ONE forward per step, on the doubled batch

    def two_calls(x_, t_):  # the original: eps_c + scale * (eps_c - eps_u), two forwards
        eps_c, eps_u = net(x_, t_, y=y), net(x_, t_, y=null)
        return eps_c + scale * (eps_c - eps_u)

    ref = sample(two_calls, d, x, steps=9)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # DiT / diffusers / the official DPM-Solver: eps_u + w (eps_c - eps_u) with w = scale + 1, same samples.
    def dit_convention(x_, t_):
        eps_c, eps_u = net(x_, t_, y=y), net(x_, t_, y=null)
        return eps_u + (scale + 1) * (eps_c - eps_u)

    torch.testing.assert_close(got, sample(dit_convention, d, x, steps=9), rtol=1e-5, atol=1e-6)


def test_guidance_with_text_contexts():
    calls = []

    def net(x, timesteps, context):
        calls.append(context.shape)
        return 0.1 * x + context.mean(dim=(1, 2)).reshape(-1, 1)

    c = torch.randn(2, 77, 8)
    u = torch.zeros(2, 77, 8)
    eps = guided_noise_fn(net, {"context": c}, {"context": u}, scale=1.0)(torch.randn(2, 3), torch.ones(2))
    assert calls == [(4, 77, 8)] and eps.shape == (2, 3)


def test_bf16_autocast_network_gives_float32_samples():
    lin = torch.nn.Linear(6, 6)
    torch.nn.init.normal_(lin.weight, std=0.05)
    out_dtypes = []

    def net(x, timesteps):
        h = lin(x)
        out_dtypes.append(h.dtype)
        return h

    d = build_diffusion("continuous")
    x = torch.randn(3, 6)
    ref = sample(net, d, x, algorithm="dpm_solver++_3m", steps=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sample(net, d, x, algorithm="dpm_solver++_3m", steps=10)
    assert out_dtypes[-1] == torch.bfloat16 and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)


def test_float64_and_float16_inputs_return_float32():
    d = build_diffusion("continuous")
    for dtype in (torch.float64, torch.float16):
        assert sample(gaussian_net(d), d, torch.randn(2, 3).to(dtype), steps=5).dtype == torch.float32


def test_validation_errors():
    d = build_diffusion("continuous")
    net = gaussian_net(d)
    x = torch.randn(2, 3)
    with pytest.raises(AssertionError, match="dpm_solver, dpm_solver\\+\\+_2m"):
        sample(net, d, x, algorithm="ddim")
    with pytest.raises(AssertionError, match="steps"):
        sample(net, d, x, steps=0)
    with pytest.raises(InputError, match="NaN"):
        sample(net, d, torch.full((2, 3), float("nan")))
    with pytest.raises(InputError, match="uncond"):
        sample(net, d, x, cond={"y": torch.zeros(2, dtype=torch.long)}, scale=1.0)
    with pytest.raises(InputError, match="same keys"):
        sample(net, d, x, cond={"y": torch.zeros(2)}, uncond={"context": torch.zeros(2)}, scale=1.0)
    with pytest.raises(InputError, match="batched like x_T"):
        sample(net, d, x, cond={"y": torch.zeros(3, dtype=torch.long)}, uncond={"y": torch.zeros(3)}, scale=1.0)
    with pytest.raises(AssertionError, match="finite"):
        sample(net, d, x, scale=float("nan"))
    with pytest.raises(InputError, match="x_T"):
        sample(net, d, torch.zeros(3, dtype=torch.long))


@pytest.mark.cuda
def test_cuda_autocast_sampling_matches_cpu():
    d = build_diffusion("discrete")
    lin = torch.nn.Linear(6, 6)
    x = torch.randn(4, 6)
    ref = sample(lambda x_, t_: lin(x_) * 0.1, d, x, algorithm="dpm_solver++_3m", steps=12)
    lin_cuda = lin.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = sample(lambda x_, t_: lin_cuda(x_) * 0.1, d, x.cuda(), algorithm="dpm_solver++_3m", steps=12)
    assert got.dtype == torch.float32 and got.is_cuda
    torch.testing.assert_close(got.cpu(), ref, rtol=0.05, atol=0.05)
    loss = d.loss(lambda x_, n: lin_cuda(x_), torch.randn(4, 6, device="cuda"))
    assert loss.shape == (4,) and loss.dtype == torch.float32 and loss.is_cuda
