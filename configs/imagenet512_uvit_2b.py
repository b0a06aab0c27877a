"""A 2B-parameter U-ViT/4 on ImageNet 512x512 autoencoder latents (4, 64, 64), class-conditional with guidance,
trained sharded (FSDP2, docs/distributed.md): the ImageNet 512 U-ViT-H recipe with a wider, deeper network.

Widths: those of DC-AE's UViT-2B (Chen et al. 2024, arXiv 2410.10733): width 2048, 32 heads of 64 channels, MLP
ratio 4. At DC-AE's depth 28 this U-ViT counts 1.58B parameters (29 blocks + 14 skip projections); depth 36 (18
in-blocks, a middle block, 18 out-blocks) brings it to 2.02B, the depth-for-width growth of U-ViT-L -> H. Not a
paper config: nothing here was trained to a published FID; it is the first size DDP cannot hold on an 80 GB GPU
with room for activations (2.02B x (4 weights + 4 gradients + 8 AdamW + 4 EMA) bytes = 40 GB replicated; sharded
over 8 GPUs, 5 GB each).
"""
from configs.imagenet512_uvit_huge import get_config as huge_config


def get_config():
    config = huge_config()
    config.nnet.update(embed_dim=2048, depth=36, num_heads=32, use_checkpoint=True)
    # Built on the meta device (no full copy per process), bf16 compute with float32 master weights.
    config.fsdp.update(enabled=True, mixed_precision='bf16', meta_init=True)
    return config
