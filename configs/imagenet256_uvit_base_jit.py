"""U-ViT-B/16 on ImageNet 256x256 pixels with x-prediction, JiT-style (train.py): Li & He 2025 ("Back to Basics: Let
Denoising Generative Models Denoise", arXiv 2511.13720) train plain ViTs with 16x16 patches on pixels by predicting the
clean image and taking the loss on the velocity it implies (sde.LinearFlow, prediction 'x0'); JiT-B/16 is width 768,
depth 12, 12 heads. UNTESTED AT FULL SCALE: built, stepped and sampled on a CPU with narrow widths only
(tests/test_latent_configs.py).

    accelerate launch --multi_gpu --num_processes 8 train.py --config=configs/imagenet256_uvit_base_jit.py

No autoencoder: 256 tokens of 16 x 16 x 3 = 768 pixel values. JiT's time distribution, logit-normal with mean -0.8
and std 0.8 in its time direction (t = 1 clean), is logit mean +0.8 here (t = 1 noise); no time shift (shift 1, as
JiT); Heun's method, 50 steps, JiT's guidance 2.9 in diffusers' convention = scale 1.9 in U-ViT's.
"""
from configs.base import d, get_config as base_config


def get_config():
    config = base_config()
    config.train.update(n_steps=750000, batch_size=1024, mode='cond')
    config.optimizer.update(lr=0.0002, weight_decay=0.0)
    config.lr_scheduler.warmup_steps = 5000
    config.objective.update(path='linear', prediction='x0', time_dist='logit_normal', logit_mean=0.8, logit_std=0.8)
    # num_classes = 1000 labels + the null label 1000 that guidance training substitutes.
    config.nnet = d(name='uvit', img_size=256, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                    mlp_ratio=4, qkv_bias=True, mlp_time_embed=False, num_classes=1001, use_checkpoint=True)
    config.dataset.update(name='imagenet', path='assets/datasets/ImageNet', resolution=256, kind='pixels', cfg=True,
                          p_uncond=0.1)
    config.fid.update(stat='assets/fid_stats/fid_stats_imagenet256_guided_diffusion.npz', steps=50)
    config.sample.update(sample_steps=50, n_samples=50000, mini_batch_size=50, algorithm='heun', cfg=True, scale=1.9)
    return config
