"""U-ViT-L/2 on ImageNet 256 latents trained as a shortcut model (sde.Shortcut; Frans et al. 2024, arXiv
2410.12557) for 1- to 128-step sampling (train_ldm.py). UNTESTED AT FULL SCALE: the paper's ImageNet 256 latent
hyperparameters (its DiT-B runs, as we read them), never run here.

configs/imagenet256_uvit_large.py's network and data with the second time token (the step size d); AdamW lr 1e-4,
weight decay 0.1, batch 256, 800k steps, EMA 0.999, class dropout 0.1; 1/4 of each batch on self-consistency with
M = 128; guidance w = 1.5 at sampling (U-ViT scale 0.5). Sampled with the 'shortcut' sampler, `--steps=1` .. 128.
"""
from configs.imagenet256_uvit_large import get_config as large_config


def shortcut(config, n_steps=800_000):
    """The shortcut-model training of the paper on a U-ViT ImageNet 256 latent config."""
    config.nnet.second_time = True
    config.objective.update(path='shortcut', prediction='velocity', two_time_fraction=0.25, shortcut_steps=128)
    config.train.update(n_steps=n_steps, batch_size=256)
    config.optimizer.update(lr=1e-4, weight_decay=0.1)
    config.lr_scheduler.warmup_steps = 0
    config.ema_rate = 0.999
    config.dataset.p_uncond = 0.1
    config.sample.update(algorithm='shortcut', sample_steps=1, cfg=True, scale=0.5)
    config.fid.steps = 1
    config.grid.steps = 1
    return config


def get_config():
    return shortcut(large_config())
