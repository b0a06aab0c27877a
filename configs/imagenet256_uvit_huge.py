"""U-ViT-H/2 on ImageNet 256x256 autoencoder latents (4, 32, 32), class-conditional with guidance
(train_ldm_discrete.py, discrete time).
"""
from configs.base import d, get_config as base_config


def get_config():
    config = base_config()
    config.diffusion = 'discrete'
    config.z_shape = (4, 32, 32)
    config.autoencoder.pretrained_path = 'assets/stable-diffusion/autoencoder_kl_ema.pth'
    config.train.update(n_steps=500000, batch_size=1024, mode='cond')
    config.lr_scheduler.warmup_steps = 5000
    # num_classes = 1000 labels + the null label 1000 that guidance training substitutes.
    config.nnet = d(name='uvit', img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28, num_heads=16,
                    mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=1001, use_checkpoint=True, conv=False)
    config.dataset.update(name='imagenet256_features', path='assets/datasets/imagenet256_features', cfg=True,
                          p_uncond=0.1)
    config.fid.stat = 'assets/fid_stats/fid_stats_imagenet256_guided_diffusion.npz'
    config.sample.update(sample_steps=50, n_samples=50000, mini_batch_size=50, algorithm='dpm_solver', cfg=True,
                         scale=0.4)
    return config
