"""benchmarks/flops.py: the analytic FLOP count against torch's own operator-level counter and the
papers' published figures, and the MFU arithmetic."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import flops
from libs import attention
from libs.nnet import build_nnet

TINY = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4)


def _counted_flops(nnet, *args, **kwargs):
    """FLOPs of one forward as torch.utils.flop_counter sees the dispatched operators (2 per MAC)."""
    counter = FlopCounterMode(display=False)
    previous = attention.get_attention_backend()
    # The explicit-softmax backend runs attention as two batched matmuls the counter knows for sure.
    attention.set_attention_backend("math")
    try:
        with counter, torch.no_grad():
            nnet(*args, **kwargs)
    finally:
        attention.set_attention_backend(previous)
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
    assert counted == 2 * B * flops.uvit_forward_macs(**cfg)["total"]


def test_uvit_t2i_macs_match_flop_counter():
    cfg = dict(TINY, clip_dim=24, num_clip_token=5)
    nnet = build_nnet(dict(name="uvit_t2i", **cfg)).eval()
    B = 2
    counted = _counted_flops(nnet, torch.randn(B, 3, 8, 8), torch.rand(B) * 999, torch.randn(B, 5, 24))
    macs = flops.uvit_forward_macs(**cfg, num_text_tokens=cfg["num_clip_token"])["total"]
    assert counted == 2 * B * macs


def test_published_gflops():
    # The U-ViT paper's Table (ImageNet 256, 4x32x32 latents): U-ViT-L/2 77 G, U-ViT-H/2 133 G.
    h2 = dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28, num_classes=1001, conv=False)
    l2 = dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1024, depth=20, num_classes=1001)
    assert flops.uvit_forward_macs(**h2)["total"] / 1e9 == pytest.approx(133, abs=0.5)
    assert flops.uvit_forward_macs(**l2)["total"] / 1e9 == pytest.approx(77, abs=1)


def test_mfu_hand_computed():
    # 6 steps/s at batch 128 of U-ViT-H/2 on a 756.5 TFLOP/s H100 PCIe: 3 * 133.2e9 * 768 / 756.5e12.
    macs = 133.2e9
    got = flops.mfu(6 * 128, macs, 756.5)
    assert got["mfu_macs"] == pytest.approx(3 * macs * 768 / 756.5e12)
    assert got["mfu_macs"] == pytest.approx(0.4057, abs=1e-3)
    assert got["mfu_flops"] == pytest.approx(2 * got["mfu_macs"])
    assert flops.mfu(100, macs, None) == {"mfu_macs": None, "mfu_flops": None}


def test_peak_tflops_lookup():
    assert flops.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == 312.0
    assert flops.peak_tflops("Quadro RTX 6000", "bf16") is None
