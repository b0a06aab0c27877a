"""Forward-mode derivatives through attention and the whole U-ViT: every backend the machine has, against
central finite differences in float64 (an independent check of libs.attention.attention_jvp)."""
import logging

import pytest
import torch

from libs import attention as attn_mod
from libs import logging_utils
from libs.uvit import UViT
from sde import _jvp

BACKENDS = ["sdpa", "math", "xformers"]  # xformers falls back to sdpa off CUDA


@pytest.fixture(autouse=True)
def _restore_backend():
    saved = attn_mod._requested
    yield
    attn_mod._requested = saved


def _central(f, primals, tangents, h=1e-5):
    plus = f(*(p + h * t for p, t in zip(primals, tangents)))
    minus = f(*(p - h * t for p, t in zip(primals, tangents)))
    return (plus - minus) / (2 * h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_jvp_matches_finite_differences(backend):
    attn_mod.set_attention_backend(backend)
    g = torch.Generator().manual_seed(0)
    primals = tuple(torch.randn(2, 3, 13, 8, dtype=torch.float64, generator=g) for _ in range(3))
    tangents = tuple(torch.randn(2, 3, 13, 8, dtype=torch.float64, generator=g) for _ in range(3))
    out, tangent = torch.func.jvp(lambda q, k, v: attn_mod.attention(q, k, v, scale=0.4), primals, tangents)
    fd = _central(lambda q, k, v: attn_mod.attention(q, k, v, scale=0.4), primals, tangents)
    torch.testing.assert_close(out, attn_mod.attention(*primals, scale=0.4), rtol=0, atol=1e-12)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)


def test_jvp_rule_works_in_blocks_of_query_rows(monkeypatch):
    """A block smaller than the sequence gives the same tangent as one block."""
    g = torch.Generator().manual_seed(1)
    q, k, v, dq, dk, dv = (torch.randn(1, 2, 11, 4, dtype=torch.float64, generator=g) for _ in range(6))
    out = attn_mod._math(q, k, v, 0.5)
    whole = attn_mod.attention_jvp(q, k, v, dq, dk, dv, 0.5, out)
    monkeypatch.setattr(attn_mod, "JVP_BLOCK_ELEMENTS", 2 * 11 * 3)  # 3 query rows per block
    torch.testing.assert_close(attn_mod.attention_jvp(q, k, v, dq, dk, dv, 0.5, out), whole, rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_on_dual_tensors_matches_finite_differences(backend):
    """torch.autograd.forward_ad's dual tensors (the objective's JVP), a tangent on some inputs only."""
    attn_mod.set_attention_backend(backend)
    g = torch.Generator().manual_seed(3)
    q, k, v, dk = (torch.randn(2, 3, 13, 8, dtype=torch.float64, generator=g) for _ in range(4))
    with torch.autograd.forward_ad.dual_level():
        out = attn_mod.attention(q, torch.autograd.forward_ad.make_dual(k, dk), v, scale=0.4)
        tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
    fd = _central(lambda k: attn_mod.attention(q, k, v, scale=0.4), (k,), (dk,))
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)


def test_fast_backend_under_jvp_is_logged_once(caplog, monkeypatch):
    attn_mod.set_attention_backend("sdpa")
    monkeypatch.setattr(logging_utils, "_logged_once", set())
    q = torch.randn(1, 1, 5, 4)
    with caplog.at_level(logging.INFO, logger="libs.attention"):
        for _ in range(3):
            torch.func.jvp(lambda x: attn_mod.attention(x, x, x), (q,), (q,))
    assert sum("exact JVP rule" in r.getMessage() for r in caplog.records) == 1


def _net(use_checkpoint, second_time=True):
    torch.manual_seed(0)
    net = UViT(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=3,
               mlp_time_embed=True, use_checkpoint=use_checkpoint, second_time=second_time).double()
    with torch.no_grad():  # non-zero everywhere (the default init zeroes biases) so every path is exercised
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_checkpoint", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_network_jvp_matches_finite_differences(backend, use_checkpoint, grad):
    """The MeanFlow tangent (dz, dr, dt) = (v, 0, 1) through the U-ViT with two time tokens, in training mode
    (checkpointing active when grad is enabled) and under no_grad (how the objective computes its target)."""
    attn_mod.set_attention_backend(backend)
    net = _net(use_checkpoint).train()
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=g)
    v = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=g)
    r = torch.tensor([0.1, 0.3, 0.5], dtype=torch.float64)
    t = torch.tensor([0.4, 0.9, 0.5], dtype=torch.float64)
    y = torch.tensor([0, 2, 1])

    def u(z, r, t):
        return net(z, 999 * t, y=y, timesteps2=999 * (t - r))

    with torch.set_grad_enabled(grad):
        out, tangent = torch.func.jvp(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
        fd = _central(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)), h=1e-6)
    assert tangent.abs().max() > 1e-3  # a real derivative, not zeros on both sides
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_objective_jvp_matches_finite_differences(backend, use_checkpoint):
    """sde._jvp (dual tensors, the network's vector parameters dual with zero tangent) under no_grad, as MeanFlow's
    target computes it; r without a tangent."""
    attn_mod.set_attention_backend(backend)
    net = _net(use_checkpoint).train()
    g = torch.Generator().manual_seed(4)
    z, v = (torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=g) for _ in range(2))
    r, t = torch.tensor([0.1, 0.3, 0.5], dtype=torch.float64), torch.tensor([0.4, 0.9, 0.5], dtype=torch.float64)
    y = torch.tensor([0, 2, 1])

    def u(net, z, r, t):
        return net(z, 999 * t, y=y, timesteps2=999 * (t - r))

    with torch.no_grad():
        tangent = _jvp(net, u, (z, r, t), (v, None, torch.ones_like(t)))
        fd = _central(lambda z, t: u(net, z, r, t), (z, t), (v, torch.ones_like(t)), h=1e-6)
    assert tangent.abs().max() > 1e-3
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-7)
