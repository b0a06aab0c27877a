"""Post-hoc EMA (libs/posthoc_ema.py, tools/posthoc_ema.py): EDM2's width <-> exponent map, the power-function
update against its closed-form weights, and a width reconstructed from snapshots against the same width tracked
directly during the same run."""
import os

import numpy as np
import pytest
import torch
from torch import nn

from libs.errors import ConfigError
from libs.posthoc_ema import (PowerEMA, gamma_from_sigma_rel, list_snapshots, profile_inner, reconstruct,
                              sigma_rel_from_gamma, solve_coefficients)
from tools import posthoc_ema as tool

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gamma_of_edm2s_widths():
    # EDM2 (Karras et al. 2024), Sec. 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)
    assert gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.15, 0.28):
        assert sigma_rel_from_gamma(gamma_from_sigma_rel(s)) == pytest.approx(s, rel=1e-9)
    with pytest.raises(ConfigError, match="must lie in"):
        gamma_from_sigma_rel(0.3)


def test_profile_inner_products_match_numerical_integration():
    tau = np.linspace(0, 700, 2_000_001)[1:]
    omega = lambda t, g: np.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), 0.0)  # noqa: E731
    for t1, g1, t2, g2 in ((300, 6.9, 700, 17.0), (700, 2.0, 700, 6.9), (500, 17.0, 200, 1.5)):
        numeric = np.trapezoid(omega(t1, g1) * omega(t2, g2), tau)
        assert profile_inner(t1, g1, t2, g2) == pytest.approx(numeric, rel=1e-4)


def test_the_update_gives_each_step_its_closed_form_weight():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))
    ema = PowerEMA(net, (0.1,))
    g = ema.gammas[0]
    thetas = []
    for step in range(1, 31):
        with torch.no_grad():
            net[0].weight.copy_(torch.randn(3, 4))
        thetas.append(net[0].weight.detach().double().clone())
        ema.update(step)
    t = 30
    # Step tau's weight in the power EMA at t: (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1).
    expected = sum(((tau ** (g + 1) - (tau - 1) ** (g + 1)) / t ** (g + 1)) * th for tau, th in
                   enumerate(thetas, 1))
    torch.testing.assert_close(ema.averages[0][0].double(), expected, rtol=1e-5, atol=1e-6)


def _run(workdir, n_steps=400, interval=8, widths=(0.05, 0.10), direct=(0.07, 0.15)):
    """A tiny regression trained with Adam on noisy targets; the post-hoc profiles snapshotted every `interval`
    steps and, in the same run, power EMAs of `direct` widths tracked directly."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    stored, tracked = PowerEMA(net, widths), PowerEMA(net, direct)
    w = torch.randn(8, 1)
    for step in range(1, n_steps + 1):
        x = torch.randn(32, 8)
        loss = ((net(x) - x @ w - 0.5 * torch.randn(32, 1)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        stored.update(step)
        tracked.update(step)
        if step % interval == 0:
            stored.save_snapshot(workdir, step)
    return net, tracked


def _relative(a, b):
    flat = lambda d: torch.cat([v.double().flatten() for _, v in sorted(d.items())])  # noqa: E731
    return ((flat(a) - flat(b)).norm() / flat(b).norm()).item()


def test_a_reconstructed_width_equals_the_one_tracked_directly(tmp_path):
    net, tracked = _run(str(tmp_path))
    assert [s for s, _ in list_snapshots(str(tmp_path))] == list(range(8, 401, 8))
    assert not [n for n in os.listdir(tmp_path / 'posthoc_ema') if not n.endswith('.pth')]  # no temporaries
    direct = tracked.state_dict()['averages']
    for k, width in enumerate(tracked.sigma_rels):
        state, info = reconstruct(str(tmp_path), width)
        assert info['step'] == 400 and info['snapshots'] == 50
        assert _relative(state, direct[k]) <= 1e-4, width
    # The comparison can tell widths apart: the neighbouring width and the online weights are far off.
    assert _relative(reconstruct(str(tmp_path), 0.05)[0], direct[0]) > 1e-3
    assert _relative(dict(net.state_dict()), direct[0]) > 1e-2
    # At an earlier snapshot's step, from the snapshots up to it.
    state, info = reconstruct(str(tmp_path), 0.10, step=200)
    assert info['snapshots'] == 25


def test_the_command_writes_a_state_dict_and_refuses_what_it_cannot_reconstruct(tmp_path):
    net, _ = _run(str(tmp_path), n_steps=96, direct=())
    out = tool.main([f'--workdir={tmp_path}', '--sigma_rel=0.07', f'--output={tmp_path / "ema.pth"}'])
    state = torch.load(out, weights_only=True)
    assert set(state) == set(net.state_dict())
    expected = reconstruct(str(tmp_path), 0.07)[0]
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    for width in (0.005, 0.28):  # far narrower than a snapshot interval; flatter than the profiles span
        with pytest.raises(ConfigError) as e:
            tool.main([f'--workdir={tmp_path}', f'--sigma_rel={width}'])
        message = str(e.value)
        assert '\n' not in message and f'sigma_rel={width} cannot be reconstructed' in message
        assert 'widths from' in message
    with pytest.raises(ConfigError, match="no snapshot at step 50"):
        tool.main([f'--workdir={tmp_path}', '--sigma_rel=0.07', '--step=50'])


def test_a_skipped_step_leaves_the_profiles_as_they_are():
    # Like the fixed-rate EMA: a non-finite step (applied False) moves no profile, an applied one does.
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    ema = PowerEMA(net, (0.05, 0.1))
    with torch.no_grad():
        net.weight.add_(1.0)
    before = [[p.clone() for p in avg] for avg in ema.averages]
    ema.update(5, torch.tensor(False))
    assert all(torch.equal(a, b) for avg, old in zip(ema.averages, before) for a, b in zip(avg, old))
    ema.update(5, torch.tensor(True))
    assert all(not torch.equal(avg[0], old[0]) for avg, old in zip(ema.averages, before))


def _edm2_coefficients(steps, gammas, step, gamma):
    """EDM2's Algorithm 3 written out (Karras et al. 2024, App. C.3): the inner product of two power profiles
    (t_a, g_a), (t_b, g_b) is (g_a + 1)(g_b + 1) (t_a / t_b)^e / ((g_a + g_b + 1) max(t_a, t_b)) with e = g_b
    when t_a < t_b, else -g_a; the normal equations are solved and the solution divided by its sum."""
    def inner(ta, ga, tb, gb):
        e = np.where(ta < tb, gb, -ga)
        return (ga + 1) * (gb + 1) * (ta / tb) ** e / ((ga + gb + 1) * np.maximum(ta, tb))
    t, g = np.float64(steps)[:, None], np.float64(gammas)[:, None]
    x = np.linalg.solve(inner(t, g, t.T, g.T), inner(t, g, np.float64(step), np.float64(gamma)))
    return (x / x.sum())[:, 0]


def test_the_reconstruction_is_edm2s_rescaled_one_and_matches_a_float64_ema(tmp_path):
    # A float64 tiny model, 200 Adam steps, snapshots of widths 0.05 / 0.10 every 10 steps; widths between them
    # and a little beyond tracked directly in float64 in the same run.
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1)).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    stored, tracked = PowerEMA(net, (0.05, 0.10)), PowerEMA(net, (0.06, 0.085, 0.12))
    w = torch.randn(6, 1, dtype=torch.float64)
    for step in range(1, 201):
        x = torch.randn(32, 6, dtype=torch.float64)
        loss = ((net(x) - x @ w - 0.5 * torch.randn(32, 1, dtype=torch.float64)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        stored.update(step)
        tracked.update(step)
        if step % 10 == 0:
            stored.save_snapshot(str(tmp_path), step)
    steps = [s for s in range(10, 201, 10) for _ in (0, 1)]
    gammas = [gamma_from_sigma_rel(s) for _ in range(10, 201, 10) for s in (0.05, 0.10)]
    direct = tracked.state_dict()['averages']
    for k, width in enumerate(tracked.sigma_rels):
        c, _ = solve_coefficients(steps, gammas, 200, gamma_from_sigma_rel(width))
        assert c.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(c, _edm2_coefficients(steps, gammas, 200, gamma_from_sigma_rel(width)),
                                   rtol=1e-6, atol=1e-9 * np.abs(c).max())
        state, _ = reconstruct(str(tmp_path), width)
        assert _relative(state, direct[k]) <= 1e-4, width
