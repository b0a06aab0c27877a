"""A new user's config for real MNIST digits, written as the README's "Your own data" section says: the
paper config closest to the data (class-conditional pixels: ImageNet 64) plus what differs. Used by
benchmarks/mnist_reference.py, which sets config.dataset.path to its prepared PNG folder.

28 px digits at resolution 14: the image_folder loader BOX-halves them. 7 x 7 tokens of width 128.
"""
from configs.base import d
from configs.imagenet64_uvit_mid import get_config as paper_config


def get_config(flips=''):
    """flips ('--config=benchmarks/mnist_user_config.py:off'): '' leaves random_flip to the image_folder
    default, as the user's config does; 'on' / 'off' set it (the benchmark's --project_flips)."""
    config = paper_config()
    config.train.update(batch_size=64, n_steps=4000, log_interval=50, eval_interval=4000, save_interval=4000)
    # Like the README's example, nothing is said about flips: the image_folder default applies.
    config.dataset.update(name='image_folder', path='', resolution=14, cfg=True, p_uncond=0.1)
    if flips:
        config.dataset.random_flip = {'on': True, 'off': False}[flips]
    config.nnet = d(name='uvit', img_size=14, patch_size=2, in_chans=3, embed_dim=128, depth=6, num_heads=4,
                    mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=11)  # 10 digits + null label
    config.optimizer.update(lr=1e-3, weight_decay=0.03, betas=(0.9, 0.99))
    config.lr_scheduler.update(name='customized', warmup_steps=200)
    config.ema_rate = 0.995
    config.fid.update(stat='', n_samples=0)  # no FID: the benchmark scores the samples itself
    config.sample.update(algorithm='dpm_solver', sample_steps=25, cfg=True, scale=2.0)
    config.grid.update(n_rows=10, n_cols=2, steps=10)
    config.log_with = ''
    config.dataloader.update(num_workers=1, pin_memory=False)
    return config
