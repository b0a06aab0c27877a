"""U-ViT-S/4 on CelebA 64x64, unconditional, pixel space (train.py; FID 2.87 in the paper)."""
from configs.base import d, get_config as base_config


def get_config():
    config = base_config()
    config.train.update(n_steps=500000, batch_size=128, mode='uncond')
    config.optimizer.betas = (0.99, 0.99)
    config.lr_scheduler.warmup_steps = 5000
    config.nnet = d(name='uvit', img_size=64, patch_size=4, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4,
                    qkv_bias=False, mlp_time_embed=False, num_classes=-1)
    config.dataset.update(name='celeba', path='assets/datasets/celeba', resolution=64)
    config.fid.stat = 'assets/fid_stats/fid_stats_celeba64_train_50000_ddim.npz'
    # FID-50k with the reverse SDE, 1000 Euler-Maruyama steps, as the paper.
    config.sample.update(sample_steps=1000, n_samples=50000, mini_batch_size=500, algorithm='euler_maruyama_sde')
    return config
