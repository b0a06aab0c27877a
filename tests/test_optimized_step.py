"""The optimized training step (SDPA, foreach AdamW, foreach-lerp EMA, no per-step sync) computes
the same numbers as the plain one (explicit-softmax attention, for-loop AdamW, Python-loop EMA,
loss.item() every step): same seed, fp32, CPU, a tiny U-ViT, three steps.

The plain step's results are also checked against an independent hand computation (the LSimple
loss from the same draws, AdamW's update formula, the EMA recursion), so the comparison cannot
pass by both sides being wrong the same way.
"""
import copy

import pytest
import torch

from libs import perf
from libs.nnet import build_nnet
from sde import build_diffusion

NNET = dict(name="uvit", img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4,
            num_classes=5, conv=True)
OPT = dict(name="adamw", lr=1e-3, weight_decay=0.03, betas=(0.99, 0.999))
LR = dict(name="customized", warmup_steps=2)  # lr factors 0, 0.5, 1 over three steps (first step at lr 0)
EMA_RATE = 0.9


def _run(options, steps=3, seed=0, ema_rate=EMA_RATE):
    torch.manual_seed(123)
    nnet = build_nnet(NNET)
    initial = copy.deepcopy(nnet.state_dict())
    step = perf.TrainStep(nnet, build_diffusion("continuous"), OPT, LR, n_steps=100, ema_rate=ema_rate,
                          options=options)
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(steps)]
    torch.manual_seed(seed)  # the loss's t and eps come from the default generator
    losses = [float(step(x0, y=y)) for x0, y in batches]
    return dict(losses=losses, params=nnet.state_dict(), ema=step.nnet_ema.state_dict(), initial=initial,
                batches=batches, optimizer=step.optimizer)


@pytest.fixture(scope="module")
def plain():
    return _run(perf.PLAIN)


@pytest.fixture(scope="module")
def optimized():
    return _run(perf.OPTIMIZED)


def test_presets_differ_in_every_switch():
    for field in ("attention", "optimizer", "ema", "sync_every_step"):
        assert getattr(perf.PLAIN, field) != getattr(perf.OPTIMIZED, field), field


def test_loss_equal(plain, optimized):
    torch.testing.assert_close(torch.tensor(optimized["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=1e-6)


def test_parameters_and_ema_equal(plain, optimized):
    moved = 0.0
    for k in plain["params"]:
        torch.testing.assert_close(optimized["params"][k], plain["params"][k], rtol=1e-5, atol=2e-6, msg=k)
        torch.testing.assert_close(optimized["ema"][k], plain["ema"][k], rtol=1e-5, atol=2e-6, msg=k)
        moved = max(moved, (plain["params"][k] - plain["initial"][k]).abs().max().item())
    # Two steps at lr 5e-4 and 1e-3 move Adam's parameters by ~1e-3: far beyond the tolerance.
    assert moved > 1e-3


def test_optimized_differs_when_a_step_is_wrong(plain):
    # The tolerance is tight enough to see a wrong EMA rate (the same run with rate 0.91).
    wrong = _run(perf.OPTIMIZED, ema_rate=0.91)
    with pytest.raises(AssertionError):
        for k in plain["ema"]:
            torch.testing.assert_close(wrong["ema"][k], plain["ema"][k], rtol=1e-5, atol=2e-6)


def test_plain_step_matches_hand_computation(plain):
    """Replay the three steps by hand: LSimple with the same draws, AdamW, then the EMA recursion."""
    torch.manual_seed(123)
    nnet = build_nnet(NNET)
    with perf.attention_backend("math"):
        params = dict(nnet.named_parameters())
        ema = {k: v.detach().clone() for k, v in params.items()}
        m = {k: torch.zeros_like(v) for k, v in params.items()}
        v2 = {k: torch.zeros_like(v) for k, v in params.items()}
        b1, b2 = OPT["betas"]
        schedule = build_diffusion("continuous").schedule
        torch.manual_seed(0)
        for i, (x0, y) in enumerate(plain["batches"]):
            lr = OPT["lr"] * min(i / LR["warmup_steps"], 1.0)
            t = torch.rand(4)
            eps = torch.randn(x0.shape)
            alpha = schedule.marginal_alpha(t).view(4, 1, 1, 1)
            sigma = schedule.marginal_std(t).view(4, 1, 1, 1)
            loss = (nnet(alpha * x0 + sigma * eps, 999 * t, y) - eps).pow(2).mean()
            assert loss.item() == pytest.approx(plain["losses"][i], rel=1e-5)
            nnet.zero_grad()
            loss.backward()
            with torch.no_grad():
                for k, p in params.items():
                    g = p.grad
                    p.mul_(1 - lr * OPT["weight_decay"])
                    m[k] = b1 * m[k] + (1 - b1) * g
                    v2[k] = b2 * v2[k] + (1 - b2) * g * g
                    m_hat, v_hat = m[k] / (1 - b1 ** (i + 1)), v2[k] / (1 - b2 ** (i + 1))
                    p.sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))
                    ema[k] = EMA_RATE * ema[k] + (1 - EMA_RATE) * p
    for k, p in params.items():
        torch.testing.assert_close(plain["params"][k], p.detach(), rtol=1e-5, atol=2e-6, msg=k)
        torch.testing.assert_close(plain["ema"][k], ema[k], rtol=1e-5, atol=2e-6, msg=k)


def test_optimizer_kind_switch_is_applied(optimized, plain):
    assert all(g["foreach"] and not g["fused"] for g in optimized["optimizer"].param_groups)
    assert all(not g["foreach"] and not g["fused"] for g in plain["optimizer"].param_groups)
