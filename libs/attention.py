"""Scaled dot-product attention, softmax(q k^T * scale) v (no mask, no dropout), with a choice of kernel.

Backends: 'sdpa' (torch's scaled_dot_product_attention, the default), 'xformers' (memory_efficient_attention; on
CUDA when installed, else 'sdpa', logged once), 'math' (an explicit softmax: the reference the others are tested
against). Chosen once per process: `set_attention_backend(name)`, else UVIT_ATTENTION (read at import), else
'auto' (xformers on CUDA when installed, else sdpa). xformers is imported when a network is built (`prepare`).

q, k, v reach the kernel in their own dtype: unlike the original we do not upcast them under autocast, which
would keep the flash kernels from running; the math path takes its softmax in at least float32. qk_scale is
honoured by every backend (the original's SDPA and xformers paths ignored it; no published config sets it).

Forward-mode derivatives (MeanFlow's training target): the fused kernels have none, so under a torch.func
transform or on a dual tensor they run inside `FastAttention`, whose tangent is the exact JVP of softmax
attention computed in blocks of query rows (`attention_jvp`). 'math' is differentiated by torch directly.
"""
import logging
import os

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from libs.errors import ConfigError
from libs.logging_utils import log_once

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "xformers", "math")
ENV_VAR = "UVIT_ATTENTION"


def _normalise(name):
    return (name or "auto").strip().lower()


# Read once, here; validated by `prepare` / first use so that a bad value cannot break an import.
_requested = _normalise(os.environ.get(ENV_VAR))
_xformers_ops = None  # the xformers.ops module once imported, False if it cannot be


def _validate(name):
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend '{name}'; choose one of {', '.join(BACKENDS)} "
                          f"(via set_attention_backend or the {ENV_VAR} environment variable)")


def set_attention_backend(name=None):
    """Choose the attention backend for this process: 'auto', 'sdpa', 'xformers' or 'math'.

    None re-reads the UVIT_ATTENTION environment variable (default 'auto').
    """
    global _requested
    name = _normalise(os.environ.get(ENV_VAR) if name is None else name)
    _validate(name)
    _requested = name
    prepare()


def get_attention_backend():
    """The requested backend name (before the per-device fallback)."""
    _validate(_requested)
    return _requested


def prepare():
    """Validate the request and import xformers if it may be used.

    Called when a network is built, so that nothing is imported or mutated inside the forward
    pass (torch.compile cannot trace a global changing inside a checkpointed block).
    """
    if get_attention_backend() in ("auto", "xformers"):
        _xformers()


def _xformers():
    """xformers.ops, or None when it is not installed (the import is tried once)."""
    global _xformers_ops
    if _xformers_ops is None:
        try:
            import xformers.ops as xops  # optional
            _xformers_ops = xops
        except Exception:  # ImportError, or a broken build raising anything at import
            _xformers_ops = False
    return _xformers_ops or None


def resolve_backend(device):
    """The backend that actually runs for tensors on `device` (a torch.device)."""
    requested = get_attention_backend()
    if requested in ("sdpa", "math"):
        return requested
    usable = device.type == "cuda" and _xformers() is not None
    if requested == "xformers" and not usable and not torch.compiler.is_compiling():
        why = "tensors are not on CUDA" if device.type != "cuda" else "xformers is not installed"
        log_once(logger, f"attention backend 'xformers' requested but {why}; using 'sdpa'", logging.WARNING)
    return "xformers" if usable else "sdpa"


def _xformers_attention(q, k, v, scale):
    # xformers wants (B, L, H, Dh); ours are (B, H, L, Dh).
    out = _xformers().memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)  # (B, H, L, Dh)


def _math(q, k, v, scale):
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, L, L)
    # Softmax of the scores in at least float32: the reference path values accuracy over speed.
    attn = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)  # (B, H, L, L)
    return attn @ v  # (B, H, L, Dh)


# Query rows per block of the JVP rule: a block holds (B, H, rows, L) attention weights in float32.
JVP_BLOCK_ELEMENTS = 1 << 24


def attention_jvp(q, k, v, dq, dk, dv, scale, out):
    """The exact tangent of out = softmax(S) v, S = scale q k^T, along (dq, dk, dv): with P = softmax(S) and
    dS = scale (dq k^T + q dk^T), d out = P dv + (P * dS) v - rowsum(P * dS) out.

    All (B, H, L, Dh); `out` is the primal output (the fast kernel's). Computed in at least float32 over blocks
    of query rows (JVP_BLOCK_ELEMENTS weights each). Returns (B, H, L, Dh) in out's dtype.
    """
    work = torch.promote_types(q.dtype, torch.float32)
    B, H, L, _ = q.shape
    rows = max(1, JVP_BLOCK_ELEMENTS // max(1, B * H * k.shape[-2]))
    k_, v_, dk_, dv_ = (x.to(work) for x in (k, v, dk, dv))
    blocks = []
    for i in range(0, L, rows):
        qi, dqi, oi = (x[:, :, i:i + rows].to(work) for x in (q, dq, out))
        p = ((qi @ k_.transpose(-2, -1)) * scale).softmax(dim=-1)  # (B, H, rows, L)
        p_ds = p * ((dqi @ k_.transpose(-2, -1) + qi @ dk_.transpose(-2, -1)) * scale)  # (B, H, rows, L)
        blocks.append(p @ dv_ + p_ds @ v_ - p_ds.sum(-1, keepdim=True) * oi)  # (B, H, rows, Dh)
    return torch.cat(blocks, dim=2).to(out.dtype)


class FastAttention(torch.autograd.Function):
    """A fast kernel with an exact forward-mode rule (`attention_jvp`) and a backward that differentiates the
    explicit softmax, so torch.func.jvp / vjp / grad all work through it. Inputs as `attention`."""

    @staticmethod
    def forward(q, k, v, scale, backend):
        return KERNELS[backend](q, k, v, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, _ = inputs
        ctx.scale = scale
        ctx.save_for_forward(q, k, v, output)
        ctx.save_for_backward(q, k, v)

    @staticmethod
    def jvp(ctx, dq, dk, dv, _scale, _backend):
        q, k, v, out = ctx.saved_tensors
        zero = torch.zeros_like
        return attention_jvp(q, k, v, zero(q) if dq is None else dq, zero(k) if dk is None else dk,
                             zero(v) if dv is None else dv, ctx.scale, out)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            out = _math(*leaves, ctx.scale)
        return (*torch.autograd.grad(out, leaves, grad), None, None)


def _transformed(x):
    """True for a tensor inside a torch.func transform (jvp, vmap, grad) or carrying a forward-mode tangent (a dual
    tensor of torch.autograd.forward_ad), where fused kernels lack a rule."""
    return torch._C._functorch.is_functorch_wrapped_tensor(x) or fwAD.unpack_dual(x).tangent is not None


# Looked up at call time (not bound at import) so tests can wrap a kernel and see what it receives.
KERNELS = {"sdpa": lambda q, k, v, scale: F.scaled_dot_product_attention(q, k, v, scale=scale),
           "xformers": _xformers_attention, "math": _math}


def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v.

    q, k, v: (B, H, L, Dh), any float dtype (not upcast). scale: float, default Dh ** -0.5.
    Returns (B, H, L, Dh) in the dtype of the kernel's output (that of q under autocast).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    backend = resolve_backend(q.device)
    if not torch.compiler.is_compiling():  # logging inside a compiled graph would break it
        log_once(logger, f"attention backend: {backend} (requested '{get_attention_backend()}')")
        if backend != "math" and any(map(_transformed, (q, k, v))):
            log_once(logger, f"attention under forward-mode AD: {backend}'s output with the exact JVP rule "
                             "(libs.attention.attention_jvp, explicit weights in blocks of query rows)")
            return FastAttention.apply(q, k, v, scale, backend)
    return KERNELS[backend](q, k, v, scale)
