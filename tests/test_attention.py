"""Attention backends: agreement with the explicit softmax, qk_scale, precision, choice and logging."""
import logging
import math
import subprocess
import sys

import pytest
import torch

from libs import attention as attn_mod
from libs import logging_utils
from libs.errors import ConfigError
from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def _restore_backend():
    saved = attn_mod._requested
    yield
    attn_mod._requested = saved


def _qkv(dtype, B=2, H=3, L=17, Dh=8):
    return [torch.randn(B, H, L, Dh, dtype=dtype) for _ in range(3)]


def _closed_form(q, k, v, scale):
    """softmax(q k^T * scale) v written with einsum in float64, independent of libs.attention."""
    q, k, v = (t.double() for t in (q, k, v))
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    s = s - s.amax(-1, keepdim=True)
    w = s.exp() / s.exp().sum(-1, keepdim=True)
    return torch.einsum("bhij,bhjd->bhid", w, v)


@pytest.mark.parametrize("backend", ["sdpa", "math", "xformers"])  # xformers falls back to sdpa on CPU
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_backends_match_closed_form(backend, dtype, tol, scale):
    q, k, v = _qkv(dtype)
    attn_mod.set_attention_backend(backend)
    out = attn_mod.attention(q, k, v, scale=scale)
    ref = _closed_form(q, k, v, scale if scale is not None else q.shape[-1] ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_qk_scale_changes_the_result():
    # Guards against a backend silently ignoring the scale (the original's SDPA path did).
    q, k, v = _qkv(torch.float64)
    for backend in ("sdpa", "math"):
        attn_mod.set_attention_backend(backend)
        default = attn_mod.attention(q, k, v)
        scaled = attn_mod.attention(q, k, v, scale=3.0)
        assert not torch.allclose(default, scaled)


def test_xformers_falls_back_to_sdpa_on_cpu():
    attn_mod.set_attention_backend("xformers")
    assert attn_mod.resolve_backend(torch.device("cpu")) == "sdpa"
    attn_mod.set_attention_backend("auto")
    assert attn_mod.resolve_backend(torch.device("cpu")) == "sdpa"


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="flash3"):
        attn_mod.set_attention_backend("flash3")


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(attn_mod.ENV_VAR, "MATH ")
    attn_mod.set_attention_backend(None)
    assert attn_mod.get_attention_backend() == "math"
    monkeypatch.setenv(attn_mod.ENV_VAR, "sdpa")  # chosen once: a later change is not seen
    assert attn_mod.get_attention_backend() == "math"


def test_bad_environment_value_fails_at_model_build_not_import(monkeypatch):
    from libs.uvit import UViT
    monkeypatch.setattr(attn_mod, "_requested", "flash9")
    with pytest.raises(ConfigError, match="flash9.*UVIT_ATTENTION"):
        UViT(img_size=8, patch_size=2, embed_dim=16, depth=2, num_heads=2)


def test_backend_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(logging_utils, "_logged_once", set())
    attn_mod.set_attention_backend("sdpa")
    q, k, v = _qkv(torch.float32)
    with caplog.at_level(logging.INFO, logger=attn_mod.__name__):
        for _ in range(3):
            attn_mod.attention(q, k, v)
    messages = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert messages == ["attention backend: sdpa (requested 'sdpa')"]


def test_nothing_printed_at_import():
    code = "import libs.nnet, libs.uvit, libs.uvit_t2i, libs.attention"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_low_precision_inputs_are_not_upcast(backend, monkeypatch):
    seen = []
    kernel = attn_mod.KERNELS[backend]

    def spy(q, k, v, scale):
        seen.append((q.dtype, k.dtype, v.dtype))
        return kernel(q, k, v, scale)

    monkeypatch.setitem(attn_mod.KERNELS, backend, spy)
    attn_mod.set_attention_backend(backend)
    q, k, v = _qkv(torch.bfloat16)
    out = attn_mod.attention(q, k, v)
    assert seen == [(torch.bfloat16,) * 3]
    assert out.dtype == torch.bfloat16
    ref = _closed_form(q, k, v, q.shape[-1] ** -0.5)
    # bf16 has an 8-bit mantissa: ~1e-2 relative.
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["sdpa", "xformers", "math"])
def test_backends_agree_on_cuda_fp16(backend):
    q, k, v = (t.cuda().half() for t in _qkv(torch.float32, L=64, Dh=64))
    attn_mod.set_attention_backend(backend)
    out = attn_mod.attention(q, k, v)
    ref = _closed_form(q, k, v, 1 / math.sqrt(64))
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), ref, atol=5e-3, rtol=5e-3)
