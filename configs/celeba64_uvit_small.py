"""U-ViT-S/4 on CelebA 64x64, unconditional, pixel space (train.py; FID 2.87 in the paper): the
CIFAR10 U-ViT-S recipe at 64x64 with patch size 4 and the release's CelebA optimizer settings.
"""
from configs.cifar10_uvit_small import get_config as cifar10_config


def get_config():
    config = cifar10_config()
    config.optimizer.betas = (0.99, 0.99)
    config.lr_scheduler.warmup_steps = 5000
    config.nnet.update(img_size=64, patch_size=4)
    config.dataset.update(name='celeba', path='assets/datasets/celeba', resolution=64)
    config.fid.stat = 'assets/fid_stats/fid_stats_celeba64_train_50000_ddim.npz'
    return config
