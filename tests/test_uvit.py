"""U-ViT numerics on tiny models: layers against independent implementations (timm, einops,
closed forms), the whole network against a reference assembled from them, long skips,
gradient checkpointing, mixed precision and input validation."""
import copy

import einops
import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block as TimmBlock

from benchmarks.bench_uvit import SIZES
from libs import attention as attn_mod
from libs import uvit, uvit_t2i
from libs.errors import ConfigError, InputError
from libs.uvit_layers import Block, timestep_embedding, unpatchify

TINY = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=4)
TINY_T2I = dict(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=4, num_heads=4, clip_dim=12, num_clip_token=5)


@pytest.fixture(autouse=True)
def _restore_backend():
    saved = attn_mod._requested
    yield
    attn_mod._requested = saved


# Layers against independent implementations.

@pytest.mark.parametrize("dim", [8, 9, 512])
def test_timestep_embedding_closed_form(dim):
    t = torch.tensor([0., 1., 17.5, 999.], dtype=torch.float64)
    got = timestep_embedding(t, dim)
    half = dim // 2
    f = 10000.0 ** (-np.arange(half) / half)
    args = t.numpy()[:, None] * f[None]
    ref = np.concatenate([np.cos(args), np.sin(args)] + ([np.zeros((4, 1))] if dim % 2 else []), axis=1)
    assert got.dtype == torch.float32 and got.shape == (4, dim)
    # float32 arguments up to 999 rad: absolute phase error ~1e-4.
    np.testing.assert_allclose(got.numpy(), ref, atol=3e-4)


def test_timestep_embedding_is_float32_for_low_precision_input():
    t = torch.tensor([3., 500.], dtype=torch.bfloat16)
    assert timestep_embedding(t, 16).dtype == torch.float32


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_block_matches_timm(qkv_bias):
    torch.manual_seed(1)
    ours = Block(32, num_heads=4, qkv_bias=qkv_bias).double()
    ref = TimmBlock(32, num_heads=4, qkv_bias=qkv_bias, norm_layer=nn.LayerNorm).double()
    for p in ours.parameters():  # non-trivial LayerNorm and bias values
        nn.init.normal_(p, std=0.3)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-12, rtol=1e-12)


def test_skip_block_fuses_current_then_skip():
    torch.manual_seed(2)
    ours = Block(32, num_heads=4, skip=True).double()
    ref = TimmBlock(32, num_heads=4, norm_layer=nn.LayerNorm).double()
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("skip_linear")})
    x, skip = torch.randn(2, 7, 32, dtype=torch.float64), torch.randn(2, 7, 32, dtype=torch.float64)
    w, b = ours.skip_linear.weight, ours.skip_linear.bias
    fused = x @ w[:, :32].T + skip @ w[:, 32:].T + b
    torch.testing.assert_close(ours(x, skip), ref(fused), atol=1e-12, rtol=1e-12)


def test_unpatchify_matches_einops():
    x = torch.randn(2, 16, 2 * 2 * 3)
    ref = einops.rearrange(x, "B (h w) (p1 p2 C) -> B C (h p1) (w p2)", h=4, p1=2, p2=2)
    assert torch.equal(unpatchify(x, 3), ref)


# The whole network against a reference built from timm blocks, einops and the closed forms.

def _reference_forward(model, x, t, cond_tokens):
    """An independent U-ViT forward: timm Blocks carrying our weights, einops for the patch
    layout, the sinusoid in float64. cond_tokens: (B, k, D) condition tokens placed before
    (class: label) or after (text: context) the time token, as the paper's configs do."""
    def timm_copy(blk):
        ref = TimmBlock(model.embed_dim, num_heads=blk.attn.num_heads, qkv_bias=blk.attn.qkv.bias is not None,
                        norm_layer=nn.LayerNorm).double()
        ref.load_state_dict({k: v for k, v in blk.state_dict().items() if not k.startswith("skip_linear")})
        return ref

    D, p = model.embed_dim, model.patch_size
    patches = einops.rearrange(x, "B C (h p1) (w p2) -> B (h w) (C p1 p2)", p1=p, p2=p)
    patches = patches @ model.patch_embed.proj.weight.reshape(D, -1).T + model.patch_embed.proj.bias
    half = D // 2
    args = t[:, None].double() * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    time = model.time_embed(torch.cat([args.cos(), args.sin()], 1)).unsqueeze(1)
    if isinstance(model, uvit.UViT):
        tokens = [cond_tokens, time, patches] if cond_tokens is not None else [time, patches]
    else:
        tokens = [time, cond_tokens, patches]
    h = torch.cat(tokens, 1) + model.pos_embed
    skips = []
    for blk in model.in_blocks:
        h = timm_copy(blk)(h)
        skips.append(h)
    h = timm_copy(model.mid_block)(h)
    for blk in model.out_blocks:
        s = skips.pop()
        if blk.skip_linear is not None:
            h = blk.skip_linear(torch.cat([h, s], -1))
        h = timm_copy(blk)(h)
    h = model.decoder_pred(model.norm(h))[:, model.extras:]
    g = model.img_size // p
    img = einops.rearrange(h, "B (h w) (p1 p2 C) -> B C (h p1) (w p2)", h=g, p1=p, p2=p)
    return model.final_layer(img)


def _randomise(model):
    """Give every parameter a non-trivial value (zero biases would hide ordering bugs)."""
    torch.manual_seed(3)
    for p in model.parameters():
        nn.init.normal_(p, std=0.2)
    return model


@pytest.mark.parametrize("kw", [
    dict(num_classes=10, mlp_time_embed=True),
    dict(num_classes=-1, conv=False),
    dict(num_classes=-1, skip=False, qkv_bias=True),
])
def test_uvit_matches_reference(kw):
    model = _randomise(uvit.UViT(**TINY, **kw).double().eval())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([3.0, 998.5], dtype=torch.float64)
    y = torch.tensor([0, 9]) if kw["num_classes"] > 0 else None
    with torch.no_grad():
        out = model(x, t, y)
        ref = _reference_forward(model, x, t, model.label_emb(y).unsqueeze(1) if y is not None else None)
    assert out.shape == x.shape
    # The model's sinusoid is float32 by design (phase error ~1e-4 rad at t ~ 1000), the
    # reference's float64; anything structural (token order, skips, layout) is off by O(1).
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_uvit_t2i_matches_reference():
    model = _randomise(uvit_t2i.UViT(**TINY_T2I, mlp_time_embed=True).double().eval())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([1.0, 1000.0], dtype=torch.float64)
    c = torch.randn(2, 5, 12, dtype=torch.float64)
    with torch.no_grad():
        out = model(x, t, c)
        ref = _reference_forward(model, x, t, model.context_embed(c))
    assert out.shape == x.shape
    # The model's sinusoid is float32 by design (phase error ~1e-4 rad at t ~ 1000), the
    # reference's float64; anything structural (token order, skips, layout) is off by O(1).
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_float64_with_mlp_time_embed_runs():
    # The original crashed here (float32 sinusoid into a float64 Linear).
    model = uvit.UViT(**TINY, mlp_time_embed=True).double()
    out = model(torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.tensor([5.0]))
    assert out.dtype == torch.float64


def test_scalar_timestep_is_broadcast():
    model = uvit.UViT(**TINY).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        a = model(x, 250.0)
        b = model(x, torch.tensor(250.0))
        c = model(x, torch.full((3,), 250.0))
    assert torch.equal(a, c) and torch.equal(b, c)


# Structure: odd depth, long skips, presets.

def test_odd_depth_builds_the_even_depth_below():
    torch.manual_seed(0)
    odd = uvit.UViT(**{**TINY, "depth": 5})
    torch.manual_seed(0)
    even = uvit.UViT(**{**TINY, "depth": 4})
    assert len(odd.in_blocks) == len(odd.out_blocks) == 2
    sd_odd, sd_even = odd.state_dict(), even.state_dict()
    assert list(sd_odd) == list(sd_even)
    assert all(torch.equal(sd_odd[k], sd_even[k]) for k in sd_odd)


def test_long_skips_are_last_in_first_out():
    model = uvit.UViT(**{**TINY, "depth": 6}).eval()
    in_outputs, skips_received = {}, {}
    for i, blk in enumerate(model.in_blocks):
        blk.register_forward_hook(lambda m, a, out, i=i: in_outputs.__setitem__(i, out))
    for i, blk in enumerate(model.out_blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: skips_received.__setitem__(i, a[1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8), torch.tensor([1.0]))
    n = len(model.in_blocks)
    assert n == 3
    for i in range(n):
        assert skips_received[i] is in_outputs[n - 1 - i]


@pytest.mark.parametrize("name,size", [("U-ViT-S/2", (512, 12, 8, 2)), ("U-ViT-S/4", (512, 12, 8, 4)),
                                       ("U-ViT-S-deep/2", (512, 16, 8, 2)), ("U-ViT-M/4", (768, 16, 12, 4)),
                                       ("U-ViT-L/2", (1024, 20, 16, 2)), ("U-ViT-L/4", (1024, 20, 16, 4)),
                                       ("U-ViT-H/2", (1152, 28, 16, 2)), ("U-ViT-H/4", (1152, 28, 16, 4))])
def test_presets(name, size):
    with torch.device("meta"):
        m = uvit.UViT(**SIZES[name], img_size=32, in_chans=4, num_classes=1001)
    assert (m.embed_dim, m.depth, m.mid_block.attn.num_heads, m.patch_size) == size
    assert len(m.in_blocks) == size[1] // 2 and m.num_classes == 1001


def test_no_weight_decay_names_a_parameter():
    model = uvit.UViT(**TINY)
    names = dict(model.named_parameters())
    assert model.no_weight_decay() == {"pos_embed"} and "pos_embed" in names


def test_initialisation_follows_the_paper():
    model = uvit.UViT(**{**TINY, "embed_dim": 256})
    w = model.mid_block.mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max().item() <= 2.0
    assert torch.all(model.mid_block.mlp.fc1.bias == 0)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002


# Gradient checkpointing and mixed precision.

def _set_use_checkpoint(model):
    for block in [*model.in_blocks, model.mid_block, *model.out_blocks]:
        block.use_checkpoint = True


def test_checkpointing_gives_the_same_gradients(monkeypatch):
    torch.manual_seed(0)
    plain = uvit.UViT(**TINY, num_classes=5).train()
    ckpt = copy.deepcopy(plain)
    _set_use_checkpoint(ckpt)
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(k) or original(*a, **k))

    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([1, 4])
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        (model(x, t, y) ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == 5 and all(k.get("use_reentrant") is False for k in calls)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def _saved_bytes(model, *inputs):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    return total[0], out


def test_checkpointing_saves_fewer_activations():
    model = uvit.UViT(**{**TINY, "img_size": 16}).train()
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1.0] * 4)
    plain_bytes, _ = _saved_bytes(model, x, t)
    _set_use_checkpoint(model)
    ckpt_bytes, out = _saved_bytes(model, x, t)
    out.mean().backward()
    assert ckpt_bytes < plain_bytes / 3


def test_checkpointing_off_in_eval():
    model = uvit.UViT(**TINY, use_checkpoint=True).eval()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([1.0])
    with torch.no_grad():
        a = model(x, t)
    model.train()
    with torch.no_grad():
        b = model(x, t)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_bf16_autocast_forward_backward(backend, monkeypatch):
    seen = []
    kernel = attn_mod.KERNELS[backend]

    def spy(q, k, v, scale):
        seen.append({q.dtype, k.dtype, v.dtype})
        return kernel(q, k, v, scale)

    monkeypatch.setitem(attn_mod.KERNELS, backend, spy)
    attn_mod.set_attention_backend(backend)
    model = uvit.UViT(**TINY, num_classes=5, mlp_time_embed=True, use_checkpoint=True).train()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([0, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    out.float().pow(2).mean().backward()
    assert seen and all(s == {torch.bfloat16} for s in seen)
    assert torch.isfinite(out).all()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())
    with torch.no_grad():
        ref = model(x, t, y)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


# Input validation.

def _bad_inputs():
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([1.0, 2.0])
    y = torch.tensor([0, 1])
    cls = dict(**TINY, num_classes=5)
    unc = dict(**TINY)
    return [
        ("channels", cls, (torch.randn(2, 4, 8, 8), t, y), r"\(B, 3, 8, 8\).*\(2, 4, 8, 8\)"),
        ("size", cls, (torch.randn(2, 3, 16, 16), t, y), r"\(B, 3, 8, 8\).*\(2, 3, 16, 16\)"),
        ("ndim", cls, (torch.randn(3, 8, 8), t, y), r"\(3, 8, 8\)"),
        ("missing y", cls, (x, t, None), "needs labels"),
        ("unexpected y", unc, (x, t, y), "unconditional"),
        ("y too large", cls, (x, t, torch.tensor([0, 5])), r"\[0, 5\).*\[5\]"),
        ("y negative", cls, (x, t, torch.tensor([-1, 0])), r"\[-1\]"),
        ("y float", cls, (x, t, torch.tensor([0.0, 1.0])), "integer"),
        ("y shape", cls, (x, t, torch.tensor([0, 1, 2])), r"\(2,\)"),
        ("t shape", cls, (x, torch.tensor([1.0, 2.0, 3.0]), y), r"timesteps.*\(2,\).*\(3,\)"),
        ("t 2d", cls, (x, torch.ones(2, 1), y), r"timesteps.*\(2, 1\)"),
    ]


@pytest.mark.parametrize("what,kw,args,match", _bad_inputs(), ids=[b[0] for b in _bad_inputs()])
def test_bad_input_raises(what, kw, args, match):
    model = uvit.UViT(**kw)
    with pytest.raises(InputError, match=match):
        model(*args)


@pytest.mark.parametrize("context,match", [
    (torch.randn(2, 4, 12), r"\(2, 5, 12\).*\(2, 4, 12\)"),
    (torch.randn(2, 5, 11), r"\(2, 5, 12\).*\(2, 5, 11\)"),
    (torch.randn(1, 5, 12), r"\(2, 5, 12\).*\(1, 5, 12\)"),
    (None, r"\(2, 5, 12\).*NoneType"),
])
def test_bad_context_raises(context, match):
    model = uvit_t2i.UViT(**TINY_T2I)
    with pytest.raises(InputError, match=match):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), context)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_backends_agree(dtype):
    torch.manual_seed(0)
    model = uvit.UViT(**{**TINY, "img_size": 16, "embed_dim": 128}, num_classes=5, use_checkpoint=True).cuda().train()
    x, t, y = torch.randn(4, 3, 16, 16, device="cuda"), torch.rand(4, device="cuda") * 999, torch.tensor([0, 1, 2, 4], device="cuda")
    outs = {}
    for backend in ("math", "sdpa", "xformers"):
        attn_mod.set_attention_backend(backend)
        model.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            out = model(x, t, y)
        out.float().pow(2).mean().backward()
        outs[backend] = (out.float(), model.mid_block.attn.qkv.weight.grad.clone())
    for backend in ("sdpa", "xformers"):
        torch.testing.assert_close(outs[backend][0], outs["math"][0], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(outs[backend][1], outs["math"][1], atol=2e-2, rtol=5e-2)
