"""U-ViT-H/2 on ImageNet 256 latents trained as a shortcut model (train_ldm_discrete.py): configs/
imagenet256_uvit_large_shortcut.py's training on configs/imagenet256_uvit_huge.py's network and data. UNTESTED AT
FULL SCALE.
"""
from configs.imagenet256_uvit_huge import get_config as huge_config
from configs.imagenet256_uvit_large_shortcut import shortcut


def get_config():
    return shortcut(huge_config())
