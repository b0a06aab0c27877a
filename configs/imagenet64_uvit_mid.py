"""U-ViT-M/4 on ImageNet 64x64, class-conditional without guidance, pixel space (train.py)."""
from configs.base import d, get_config as base_config


def get_config():
    config = base_config()
    config.train.update(n_steps=300000, batch_size=1024, mode='cond')
    config.optimizer.lr = 0.0003
    config.lr_scheduler.warmup_steps = 5000
    # 1000 classes and no null class: these models were trained and sampled without guidance.
    config.nnet = d(name='uvit', img_size=64, patch_size=4, embed_dim=768, depth=16, num_heads=12, mlp_ratio=4,
                    qkv_bias=False, mlp_time_embed=False, num_classes=1000, use_checkpoint=True)
    config.dataset.update(name='imagenet', path='assets/datasets/ImageNet', resolution=64)
    config.fid.stat = 'assets/fid_stats/fid_stats_imagenet64_guided_diffusion.npz'
    config.sample.update(sample_steps=50, n_samples=50000, mini_batch_size=200, algorithm='dpm_solver')
    return config
