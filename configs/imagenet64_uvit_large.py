"""U-ViT-L/4 on ImageNet 64x64, class-conditional without guidance, pixel space (train.py).
The U-ViT-M/4 config with the larger network.
"""
from configs.imagenet64_uvit_mid import get_config as imagenet64_mid_config


def get_config():
    config = imagenet64_mid_config()
    config.nnet.update(embed_dim=1024, depth=20, num_heads=16)
    return config
