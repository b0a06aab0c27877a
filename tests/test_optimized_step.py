"""The trainer's own training step (`libs.trainer.train_step`) computes the textbook numbers.

A tiny `Run` is built as `libs.trainer.train` builds it: the network with the default attention
backend (SDPA), `libs.optim.build_optimizer`'s AdamW (fused on CPU and CUDA) prepared by accelerate,
`libs.optim.build_lr_scheduler`, `libs.ema.EMAUpdater`'s one `torch._foreach_lerp_`, the LSimple loss
of `sde.ContinuousVP`, the noise reseeded per step from (seed, rank, step). Three steps are checked
against an independent hand replay: explicit-softmax attention, AdamW's update formula written out,
the EMA recursion, all in float32 on the CPU.
"""
import copy

import ml_collections
import pytest
import torch
from accelerate import Accelerator

from libs import attention
from libs.data_loader import mix_seed
from libs.ema import make_ema
from libs.family import PIXELS_CONTINUOUS
from libs.nnet import build_nnet
from libs.optim import build_lr_scheduler, build_optimizer
from libs.trainer import Run, train_step
from sde import build_diffusion

NNET = dict(name="uvit", img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4,
            num_classes=5, conv=True)
OPT = dict(name="adamw", lr=1e-3, weight_decay=0.03, betas=(0.99, 0.999))
LR = dict(name="customized", warmup_steps=2)  # lr factors 0, 0.5, 1 over three steps (first step at lr 0)
EMA_RATE = 0.9
SEED = 1234
STEPS = 3


def _batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(STEPS)]


def _library_steps(ema_rate=EMA_RATE):
    """Three steps of libs.trainer.train_step (no gradient clipping, fp32, one process)."""
    torch.manual_seed(123)
    nnet = build_nnet(NNET)
    initial = copy.deepcopy(nnet.state_dict())
    nnet_ema = make_ema(nnet)
    optimizer = build_optimizer(nnet, ml_collections.ConfigDict(OPT))
    lr_scheduler = build_lr_scheduler(optimizer, ml_collections.ConfigDict(LR), n_steps=100)
    accelerator = Accelerator(cpu=True)
    train_nnet, optimizer = accelerator.prepare(nnet, optimizer)
    config = ml_collections.ConfigDict(dict(seed=SEED, grad_clip=0.0, ema_rate=ema_rate))
    r = Run(config=config, workdir=None, family=PIXELS_CONTINUOUS, accelerator=accelerator, data=None, nnet=nnet,
            nnet_ema=nnet_ema, optimizer=optimizer, lr_scheduler=lr_scheduler, loader=None,
            autoencoder=None, null=None, train_nnet=train_nnet)
    losses, applied = [], []
    for step, (x0, y) in enumerate(_batches()):
        loss, _, ok = train_step(r, {"x": x0, "y": y}, step)
        losses.append(loss.clone())
        applied.append(bool(ok))
    return dict(losses=torch.stack(losses), applied=applied, params=nnet.state_dict(), ema=nnet_ema.state_dict(),
                initial=initial, optimizer=optimizer.optimizer)


def _hand_steps():
    """The same three steps by hand: LSimple with the same draws, AdamW's formula, the EMA recursion."""
    torch.manual_seed(123)
    nnet = build_nnet(NNET)
    params = dict(nnet.named_parameters())
    ema = {k: v.detach().clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v2 = {k: torch.zeros_like(v) for k, v in params.items()}
    b1, b2 = OPT["betas"]
    schedule = build_diffusion("continuous").schedule
    losses = []
    previous = attention.get_attention_backend()
    attention.set_attention_backend("math")
    try:
        for i, (x0, y) in enumerate(_batches()):
            torch.manual_seed(mix_seed(mix_seed(SEED, 0), i))  # the step's own draws: (seed, rank 0, step)
            lr = OPT["lr"] * min(i / LR["warmup_steps"], 1.0)
            t = torch.rand(4)
            eps = torch.randn(x0.shape)
            alpha = schedule.marginal_alpha(t).view(4, 1, 1, 1)
            sigma = schedule.marginal_std(t).view(4, 1, 1, 1)
            loss = (nnet(alpha * x0 + sigma * eps, 999 * t, y) - eps).pow(2).mean()
            losses.append(loss.detach())
            nnet.zero_grad()
            loss.backward()
            with torch.no_grad():
                for k, p in params.items():
                    g = p.grad
                    p.mul_(1 - lr * OPT["weight_decay"])  # decoupled weight decay (Loshchilov & Hutter 2019)
                    m[k] = b1 * m[k] + (1 - b1) * g
                    v2[k] = b2 * v2[k] + (1 - b2) * g * g
                    m_hat, v_hat = m[k] / (1 - b1 ** (i + 1)), v2[k] / (1 - b2 ** (i + 1))
                    p.sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))
                    ema[k] = EMA_RATE * ema[k] + (1 - EMA_RATE) * p
    finally:
        attention.set_attention_backend(previous)
    return dict(losses=torch.stack(losses), params={k: p.detach() for k, p in params.items()}, ema=ema)


@pytest.fixture(scope="module")
def library():
    return _library_steps()


@pytest.fixture(scope="module")
def hand():
    return _hand_steps()


def test_library_step_uses_the_optimized_paths(library):
    assert attention.get_attention_backend() in ("auto", "sdpa")
    assert all(g["fused"] for g in library["optimizer"].param_groups)


def test_loss_matches_hand_computation(library, hand):
    torch.testing.assert_close(library["losses"], hand["losses"], rtol=1e-5, atol=1e-6)
    assert library["applied"] == [True] * STEPS


def test_parameters_and_ema_match_hand_computation(library, hand):
    moved = 0.0
    for k, p in hand["params"].items():
        torch.testing.assert_close(library["params"][k], p, rtol=1e-5, atol=2e-6, msg=k)
        torch.testing.assert_close(library["ema"][k], hand["ema"][k], rtol=1e-5, atol=2e-6, msg=k)
        moved = max(moved, (p - library["initial"][k]).abs().max().item())
    # Two steps at lr 5e-4 and 1e-3 move Adam's parameters by ~1e-3: far beyond the tolerance.
    assert moved > 1e-3


def test_comparison_sees_a_wrong_ema_rate(hand):
    wrong = _library_steps(ema_rate=0.91)
    with pytest.raises(AssertionError):
        for k in hand["ema"]:
            torch.testing.assert_close(wrong["ema"][k], hand["ema"][k], rtol=1e-5, atol=2e-6)
