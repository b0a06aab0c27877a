"""U-ViT-H/2 on ImageNet 256x256 autoencoder latents (4, 32, 32), class-conditional with guidance
(train_ldm_discrete.py, discrete time): the U-ViT-L/2 recipe with what the release changed for H/2.
"""
from configs.imagenet256_uvit_large import get_config as large_config


def get_config():
    config = large_config()
    config.diffusion = 'discrete'
    config.autoencoder.pretrained_path = 'assets/stable-diffusion/autoencoder_kl_ema.pth'
    config.train.n_steps = 500000
    config.nnet.update(embed_dim=1152, depth=28, conv=False)
    config.dataset.p_uncond = 0.1
    return config
