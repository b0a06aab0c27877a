"""libs/perf.py: the analytic FLOP count against torch's own operator-level counter and the
papers' published figures, the MFU arithmetic, and the switches."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from libs import perf
from libs.nnet import build_nnet

TINY = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4)


def _counted_flops(nnet, *args, **kwargs):
    """FLOPs of one forward as torch.utils.flop_counter sees the dispatched operators (2 per MAC)."""
    counter = FlopCounterMode(display=False)
    # The explicit-softmax backend runs attention as two batched matmuls the counter knows for sure.
    with perf.attention_backend("math"), counter, torch.no_grad():
        nnet(*args, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("extra", [
    dict(num_classes=-1, conv=True, mlp_time_embed=False),
    dict(num_classes=11, conv=False, mlp_time_embed=True),
    dict(num_classes=-1, conv=True, mlp_time_embed=False, skip=False, depth=5),  # odd depth: 2 + 1 + 2 blocks
])
def test_uvit_macs_match_flop_counter(extra):
    cfg = {**TINY, **extra}
    nnet = build_nnet(dict(name="uvit", **cfg)).eval()
    B = 3
    x = torch.randn(B, cfg["in_chans"], cfg["img_size"], cfg["img_size"])
    y = torch.randint(0, cfg["num_classes"], (B,)) if cfg["num_classes"] > 0 else None
    counted = _counted_flops(nnet, x, torch.rand(B) * 999, y)
    assert counted == 2 * B * perf.uvit_forward_macs(**cfg)["total"]


def test_uvit_t2i_macs_match_flop_counter():
    cfg = dict(TINY, clip_dim=24, num_clip_token=5)
    nnet = build_nnet(dict(name="uvit_t2i", **cfg)).eval()
    B = 2
    counted = _counted_flops(nnet, torch.randn(B, 3, 8, 8), torch.rand(B) * 999, torch.randn(B, 5, 24))
    macs = perf.uvit_forward_macs(**cfg, num_text_tokens=cfg["num_clip_token"])["total"]
    assert counted == 2 * B * macs


def test_published_gflops():
    # The U-ViT paper's Table (ImageNet 256, 4x32x32 latents): U-ViT-L/2 77 G, U-ViT-H/2 133 G.
    h2 = dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28, num_classes=1001, conv=False)
    l2 = dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1024, depth=20, num_classes=1001)
    assert perf.uvit_forward_macs(**h2)["total"] / 1e9 == pytest.approx(133, abs=0.5)
    assert perf.uvit_forward_macs(**l2)["total"] / 1e9 == pytest.approx(77, abs=1)


def test_mfu_hand_computed():
    # 6 steps/s at batch 128 of U-ViT-H/2 on a 756.5 TFLOP/s H100 PCIe: 3 * 133.2e9 * 768 / 756.5e12.
    macs = 133.2e9
    got = perf.mfu(6 * 128, macs, 756.5)
    assert got["mfu_macs"] == pytest.approx(3 * macs * 768 / 756.5e12)
    assert got["mfu_macs"] == pytest.approx(0.4057, abs=1e-3)
    assert got["mfu_flops"] == pytest.approx(2 * got["mfu_macs"])
    assert perf.mfu(100, macs, None) == {"mfu_macs": None, "mfu_flops": None}


def test_peak_tflops_lookup():
    assert perf.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert perf.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5
    assert perf.peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == 312.0
    assert perf.peak_tflops("Quadro RTX 6000", "bf16") is None


def test_configure_tf32_sets_and_returns_previous():
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        perf.configure_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert perf.configure_tf32(False) is True
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        perf.configure_tf32(before)


def test_maybe_compile_disabled_is_identity():
    m = torch.nn.Linear(2, 2)
    assert perf.maybe_compile(m, False) is m


def test_ema_loop_is_the_original_formula():
    torch.manual_seed(1)
    ema, online = [torch.randn(5), torch.randn(3, 2)], [torch.randn(5), torch.randn(3, 2)]
    expected = [0.9 * e + 0.1 * p for e, p in zip(ema, online)]
    perf.ema_update_loop(ema, online, 0.9)
    for got, want in zip(ema, expected):
        torch.testing.assert_close(got, want)


def test_optimizer_flags():
    assert perf.optimizer_flags("auto", "cpu") == {"foreach": True, "fused": False}
    assert perf.optimizer_flags("auto", "cuda") == {"foreach": False, "fused": True}
    assert perf.optimizer_flags("for-loop", "cpu") == {"foreach": False, "fused": False}
    with pytest.raises(Exception, match="not one of"):
        perf.optimizer_flags("apex", "cpu")


def test_attention_backend_context_restores():
    from libs import attention

    before = attention.get_attention_backend()
    with perf.attention_backend("math"):
        assert attention.get_attention_backend() == "math"
    assert attention.get_attention_backend() == before
