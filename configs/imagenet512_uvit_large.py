"""U-ViT-L/4 on ImageNet 512x512 autoencoder latents (4, 64, 64), class-conditional with guidance
(train_ldm.py, continuous time). The ImageNet 256 U-ViT-L config with what differs at 512.
"""
from configs.imagenet256_uvit_large import get_config as imagenet256_config


def get_config():
    config = imagenet256_config()
    config.z_shape = (4, 64, 64)
    config.train.n_steps = 500000
    # Patch 4 on the 64x64 latents keeps the 256-token sequence of the 256 model.
    config.nnet.update(img_size=64, patch_size=4)
    config.dataset.update(name='imagenet512_features', path='assets/datasets/imagenet512_features')
    config.fid.stat = 'assets/fid_stats/fid_stats_imagenet512_guided_diffusion.npz'
    config.sample.scale = 0.7
    return config
