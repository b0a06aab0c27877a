"""The few-step objectives (sde.MeanFlow, sde.Shortcut) and their sampler, against literal transcriptions of the
papers: MeanFlow's Algorithm 1 (Geng et al. 2025, arXiv 2505.13447) with its guided velocity (eq. 21), the shortcut
model's self-consistency target (Frans et al. 2024, arXiv 2410.12557, eq. 5), and one-step sampling x = eps - u."""
import pytest
import torch

import sde
from libs.config_utils import parse_and_validate
from libs.errors import ConfigError
from libs.sampling import algorithm_problem, sample
from libs.uvit import UViT

pytestmark = pytest.mark.usefixtures("one_thread")

B, NULL = 4, 3


def net64(seed=0):
    """A tiny class U-ViT with the second time token, float64, weights off their zero init."""
    torch.manual_seed(seed)
    net = UViT(img_size=4, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=NULL + 1,
               mlp_time_embed=True, second_time=True).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 1, 4, 4, dtype=torch.float64, generator=g)
    eps = torch.randn(B, 1, 4, 4, dtype=torch.float64, generator=g)
    t = torch.tensor([0.9, 0.6, 0.3, 0.75], dtype=torch.float64)
    r = torch.tensor([0.2, 0.6, 0.0, 0.5], dtype=torch.float64)
    y = torch.tensor([0, 1, NULL, 2])  # sample 2: a dropped label (the null class)
    return x0, eps, r, t, y


def meanflow(**objective):
    o = sde.Objective(path="meanflow", prediction="average_velocity", **objective)
    return sde.build_diffusion("continuous", o, null=NULL)


def algorithm_1(net, x, e, r, t, y, p=1.0, c=1e-3, omega=1.0, kappa=0.0):
    """The paper's Algorithm 1 (MeanFlow training), written out; guidance by its eq. 21 on labelled samples."""
    def fn(z, r, t):  # u_theta(z, r, t) with the (t, t - r) time inputs, network time 999 t
        return net(z, 999 * t, y=y, timesteps2=999 * (t - r))

    rb, tb = r.view(-1, 1, 1, 1), t.view(-1, 1, 1, 1)
    z = (1 - tb) * x + tb * e
    v = e - x
    if omega != 1.0 or kappa != 0.0:
        with torch.no_grad():
            u_c = net(z, 999 * t, y=y, timesteps2=0 * t)
            u_u = net(z, 999 * t, y=torch.full_like(y, NULL), timesteps2=0 * t)
        guided = omega * v + kappa * u_c + (1 - omega - kappa) * u_u
        v = torch.where((y != NULL).view(-1, 1, 1, 1), guided, v)
    u, dudt = torch.func.jvp(fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    u_tgt = (v - (tb - rb) * dudt).detach()
    error = u - u_tgt
    sq = (error ** 2).sum(dim=(1, 2, 3))
    return sq / (sq.detach() + c) ** p  # the adaptive L2 loss, per sample


@pytest.mark.parametrize("p,omega,kappa", [(1.0, 1.0, 0.0), (0.5, 1.0, 0.0), (1.0, 2.0, 0.0), (1.0, 1.5, 0.3)])
def test_meanflow_loss_and_gradient_equal_algorithm_1(p, omega, kappa):
    x0, eps, r, t, y = batch()
    mf = meanflow(weight_power=p, cfg_omega=omega, cfg_kappa=kappa)
    net_a, net_b = net64(), net64()
    ours = mf.loss_at(net_a, x0, eps, r, t, {"y": y})
    ref = algorithm_1(net_b, x0, eps, r, t, y, p=p, omega=omega, kappa=kappa)
    D = x0[0].numel()  # ours averages the squared error over the 16 pixels, the paper sums it
    assert ours.dtype == torch.float32  # the losses are float32, whatever the network's precision
    torch.testing.assert_close(ours * D, ref.float(), rtol=1e-6, atol=1e-9)
    (ours.sum() * D).backward()
    ref.sum().backward()  # through the jvp's primal output: the same gradient by another route
    for (name, a), b in zip(net_a.named_parameters(), net_b.parameters()):  # float32 losses: relative 1e-5
        assert (a.grad - b.grad).abs().max() <= 1e-5 * b.grad.abs().max() and b.grad.abs().max() > 0, name


def test_meanflow_jvp_on_the_leading_samples_only_changes_nothing():
    """Samples with r = t need no derivative: computing it for the first n_two only gives the same loss."""
    x0, eps, _, t, y = batch()
    r = torch.cat([t[:2] - 0.25, t[2:]])
    mf = meanflow()
    torch.testing.assert_close(mf.loss_at(net64(), x0, eps, r, t, {"y": y}, n_two=2),
                               mf.loss_at(net64(), x0, eps, r, t, {"y": y}), rtol=1e-6, atol=0)


def test_meanflow_with_r_equal_t_is_flow_matching_exactly():
    x0, *_ , y = batch()
    net = net64()
    flow = sde.build_diffusion("continuous", sde.Objective(path="linear", prediction="velocity"))
    mf = meanflow(two_time_fraction=0.0, weight_power=0.0)
    plain = flow.loss(lambda x, t, **c: net(x, t, timesteps2=torch.zeros_like(t), **c), x0,
                      generator=torch.Generator().manual_seed(5), y=y)
    ours = mf.loss(net, x0, generator=torch.Generator().manual_seed(5), y=y)
    assert torch.equal(ours, plain)


def test_meanflow_draws_r_below_t_on_the_leading_quarter():
    seen = {}

    def spy(z, t_input, y=None, timesteps2=None):
        seen.setdefault("calls", []).append((t_input.clone(), timesteps2.clone()))
        return torch.zeros_like(z)
    mf = meanflow(time_dist="logit_normal", logit_mean=-0.4)
    mf.loss(spy, torch.zeros(8, 1, 4, 4, dtype=torch.float64), generator=torch.Generator().manual_seed(0),
            y=torch.zeros(8, dtype=torch.long))
    t_in, gap = seen["calls"][-1]  # the prediction's forward: the whole batch
    assert (gap[:2] > 0).all() and (gap[2:] == 0).all() and (gap <= t_in).all()


def test_shortcut_target_equals_its_definition():
    x0, eps, _, _, y = batch()
    t = torch.tensor([0.5, 1.0, 0.25, 0.7], dtype=torch.float64)
    d = torch.tensor([0.125, 0.25, 0.0, 0.0], dtype=torch.float64)
    net = net64()
    sc = sde.build_diffusion("continuous", sde.Objective(path="shortcut", prediction="velocity"))
    ours = sc.loss_at(net, x0, eps, t, d, {"y": y}, n_two=2)

    def s(z, t, d, y):  # s_theta(z_t, t, d): network time 999 t, second input 999 d
        return net(z, 999 * t, y=y, timesteps2=999 * d)
    tb = t.view(-1, 1, 1, 1)
    z = (1 - tb) * x0 + tb * eps
    expected = []
    for i in range(B):
        zi, ti, di, yi = z[i:i + 1], t[i:i + 1], d[i:i + 1], y[i:i + 1]
        if i < 2:  # two steps of d (towards the data, t decreasing) = one step of 2d
            first = s(zi, ti, di, yi)
            second = s(zi - di * first, ti - di, di, yi)
            target, pred = (first + second) / 2, s(zi, ti, 2 * di, yi)
        else:  # flow matching at d = 0
            target, pred = eps[i:i + 1] - x0[i:i + 1], s(zi, ti, di, yi)
        expected.append(((target - pred) ** 2).mean())
    torch.testing.assert_close(ours, torch.stack(expected).detach().float(), rtol=1e-6, atol=1e-9)


def test_shortcut_draws_powers_of_two_on_their_grid():
    calls = []

    def spy(z, t_input, y=None, timesteps2=None):
        calls.append((t_input / 999, timesteps2 / 999))
        return torch.zeros_like(z)
    sc = sde.build_diffusion("continuous", sde.Objective(path="shortcut", prediction="velocity", two_time_fraction=0.5))
    sc.loss(spy, torch.zeros(64, 1, 4, 4), generator=torch.Generator().manual_seed(0), y=torch.zeros(64, dtype=torch.long))
    t, step = calls[-1]  # the prediction: self-consistency rows take 2d, flow-matching rows 0
    two_d = step[:32]
    assert (step[32:] == 0).all()
    k = torch.log2(two_d * 128)
    assert torch.equal(k, k.round()) and k.min() >= 1 and k.max() <= 7  # 2d in 2/128 .. 1
    assert torch.equal(t[:32] / two_d, (t[:32] / two_d).round()) and (t[:32] >= two_d).all() and (t <= 1).all()


@pytest.mark.parametrize("path", ["meanflow", "shortcut"])
def test_one_and_k_step_sampling_are_the_jumps(path):
    net = net64()
    pred = "average_velocity" if path == "meanflow" else "velocity"
    diffusion = sde.build_diffusion("continuous", sde.Objective(path=path, prediction=pred))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 1])
    with torch.no_grad():
        one = sample(net, diffusion, noise, algorithm=path, steps=1, cond={"y": y})
        expected = noise - net(noise, 999 * torch.ones(2, dtype=torch.float64), y=y, timesteps2=999 * torch.ones(2, dtype=torch.float64))
        torch.testing.assert_close(one, expected.float())
        two = sample(net, diffusion, noise, algorithm=path, steps=2, cond={"y": y})
        half = torch.full((2,), 0.5, dtype=torch.float64)
        mid = noise - 0.5 * net(noise, 999 * (2 * half), y=y, timesteps2=999 * half)
        end = mid - 0.5 * net(mid, 999 * half, y=y, timesteps2=999 * half)
        torch.testing.assert_close(two, end.float())


def test_samplers_refuse_models_of_other_objectives():
    assert "not this meanflow-path one" in algorithm_problem("heun", "meanflow", "continuous")
    assert "meanflow" in algorithm_problem("shortcut", "meanflow", "continuous")
    assert algorithm_problem("meanflow", "linear", "continuous") and algorithm_problem("dpm_solver", "shortcut", "continuous")
    assert not algorithm_problem("shortcut", "shortcut", "discrete")


def test_config_needs_the_second_time_token():
    from configs.digits_uvit_tiny_meanflow import get_config
    config = get_config()
    parse_and_validate(config, world_size=1)
    config.nnet.second_time = False
    with pytest.raises(ConfigError, match="nnet.second_time.*must be True"):
        parse_and_validate(config, world_size=1)
    from configs.digits_uvit_tiny_flow import get_config as flow
    config = flow()
    config.nnet.second_time = True  # a flow-matching network would carry an unused token
    with pytest.raises(ConfigError, match="must be False"):
        parse_and_validate(config, world_size=1)


@pytest.mark.parametrize("name,cls", [("digits_uvit_tiny_meanflow", sde.MeanFlow), ("digits_uvit_tiny_shortcut", sde.Shortcut),
                                      ("imagenet256_uvit_large_meanflow", sde.MeanFlow),
                                      ("imagenet256_uvit_huge_meanflow", sde.MeanFlow),
                                      ("imagenet256_uvit_large_shortcut", sde.Shortcut),
                                      ("imagenet256_uvit_huge_shortcut", sde.Shortcut)])
def test_few_step_configs_validate_and_build_their_objective(name, cls):
    import importlib
    config = importlib.import_module(f"configs.{name}").get_config()
    parse_and_validate(config, world_size=1)
    diffusion = sde.build_diffusion(config.diffusion, sde.Objective.of(config))
    assert type(diffusion) is cls and config.nnet.second_time
    assert not algorithm_problem(config.sample.algorithm, diffusion.path, config.diffusion)
