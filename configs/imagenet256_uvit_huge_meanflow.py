"""U-ViT-H/2 on ImageNet 256 latents trained with MeanFlow (train_ldm_discrete.py, the H/2 config's time kind):
configs/imagenet256_uvit_large_meanflow.py's training (the paper's hyperparameters for its largest model as we
read its Table 4) on configs/imagenet256_uvit_huge.py's network and data. UNTESTED AT FULL SCALE.
"""
from configs.imagenet256_uvit_huge import get_config as huge_config
from configs.imagenet256_uvit_large_meanflow import meanflow


def get_config():
    return meanflow(huge_config())
