"""The analytic multiply-accumulate count of a U-ViT forward pass and model-FLOPs utilisation.

`uvit_forward_macs` counts the figure the U-ViT and DiT papers call "GFLOPs" (U-ViT-H/2 on 4x32x32
latents = 133 G); `mfu` turns a measured training throughput into a model-FLOPs utilisation against
the GPU's data-sheet peak (`peak_tflops`).
"""

# Dense (no sparsity) peak tensor-core throughput in TFLOP/s (2 FLOPs per multiply-accumulate), per
# the vendor data sheets. Keys are matched against torch.cuda.get_device_name() in order.
PEAK_TFLOPS = (
    # (name substring, {dtype: TFLOP/s})
    ("H200", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 66.9}),  # SXM (incl. "H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


def uvit_forward_macs(img_size, patch_size, in_chans, embed_dim, depth, mlp_ratio=4.0, num_classes=-1,
                      mlp_time_embed=False, conv=True, skip=True, num_text_tokens=0, clip_dim=768, **_ignored):
    """Multiply-accumulates of one U-ViT forward pass for ONE image, by layer kind.

    Counts every matmul (Linear layers, the patch-embedding and final convolutions, attention's
    q k^T and attn v); not softmax, LayerNorm, GELU, additions or embeddings lookups (< 1%).
    Takes the `config.nnet` entries (extra keys are ignored). num_text_tokens > 0 means the
    text-to-image U-ViT (uvit_t2i) with that many context tokens of width clip_dim.
    Returns a dict of MACs with 'total'; FLOPs = 2 x MACs.

    U-ViT-H/2 on (4, 32, 32) latents with 1001 classes: 133.3e9 MACs, the paper's "133 GFLOPs".
    """
    D = embed_dim
    L = (img_size // patch_size) ** 2  # patch tokens
    if num_text_tokens > 0:
        extras = 1 + num_text_tokens
    else:
        extras = 2 if num_classes > 0 else 1
    T = extras + L  # tokens through the transformer
    hidden = int(D * mlp_ratio)
    n_blocks = 2 * (depth // 2) + 1  # depth // 2 in-blocks + middle + depth // 2 out-blocks
    patch_dim = patch_size ** 2 * in_chans
    macs = {
        "patch_embed": L * patch_dim * D,  # p x p conv with stride p = one (patch_dim -> D) matmul per patch
        "time_embed": (D * 4 * D + 4 * D * D) if mlp_time_embed else 0,
        "context_embed": num_text_tokens * clip_dim * D,
        "qkv_proj": n_blocks * T * (3 * D * D + D * D),
        "attention": n_blocks * 2 * T * T * D,  # q k^T and attn v over all heads
        "mlp": n_blocks * T * 2 * D * hidden,
        "skip_linear": (depth // 2) * T * 2 * D * D if skip else 0,
        "decoder_pred": T * D * patch_dim,  # applied to every token, extras included, as the original
        "final_conv": img_size * img_size * in_chans * in_chans * 9 if conv else 0,
    }
    macs["total"] = sum(macs.values())
    return macs


def training_flops_per_image(forward_macs):
    """Model FLOPs of one training image counted as 3 forward passes (backward = 2 forwards).

    Convention of DiT-style MFU figures: forward "FLOPs" = MACs (the papers' GFLOPs), so this is
    3 x MACs. The hardware convention (2 FLOPs per MAC) gives twice as much;
    `mfu` reports both.
    """
    return 3 * forward_macs


def peak_tflops(device_name, precision):
    """Dense peak TFLOP/s of a known GPU for 'bf16' | 'fp16' | 'tf32' | 'fp32', else None."""
    for key, table in PEAK_TFLOPS:
        if key in device_name:
            return table.get(precision)
    return None


def mfu(images_per_s, forward_macs, peak_tflops_value):
    """Model-FLOPs utilisation of a training run, both conventions.

    Returns {'mfu_macs': 3 * MACs * images/s / peak (the papers' convention: 3 x 133 G per
    image for U-ViT-H/2), 'mfu_flops': the same with 2 FLOPs per MAC (PaLM's convention, twice the
    former)}; None values when the peak is unknown.
    """
    if not peak_tflops_value:
        return {"mfu_macs": None, "mfu_flops": None}
    achieved = training_flops_per_image(forward_macs) * images_per_s / (peak_tflops_value * 1e12)
    return {"mfu_macs": achieved, "mfu_flops": 2 * achieved}
