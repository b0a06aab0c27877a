"""U-ViT-L/2 on ImageNet 256 latents trained with MeanFlow (sde.MeanFlow; Geng et al. 2025, arXiv 2505.13447) for
one- and two-step sampling (train_ldm.py). UNTESTED AT FULL SCALE: the hyperparameters are the paper's for its
DiT models on the same latents as we read its Table 4 (check them there before a long run), never run here.

configs/imagenet256_uvit_large.py's network and data with the second time token (t, t - r); the paper's
training: Adam lr 1e-4, betas (0.9, 0.95), no weight decay, batch 256, 240 epochs (~1.2M steps), EMA 0.9999,
class dropout 0.1; (r, t) logit-normal(-0.4, 1.0) with r != t on 25% of the batch; adaptive weight p = 1;
guidance inside the target omega 0.2, kappa 0.92 (effective scale 2.5) for t in [0, 0.75]. Sampled unguided
with the 'meanflow' sampler: `--steps=1` (one call) or 2.
"""
from configs.imagenet256_uvit_large import get_config as large_config


def meanflow(config, n_steps=1_200_000):
    """The MeanFlow training of the paper on a U-ViT ImageNet 256 latent config."""
    config.nnet.second_time = True
    config.objective.update(path='meanflow', prediction='average_velocity', time_dist='logit_normal',
                            logit_mean=-0.4, logit_std=1.0, two_time_fraction=0.25, weight_power=1.0,
                            cfg_omega=0.2, cfg_kappa=0.92, cfg_t_min=0.0, cfg_t_max=0.75, second_time='t_minus_r')
    config.train.update(n_steps=n_steps, batch_size=256)
    config.optimizer.update(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    config.lr_scheduler.warmup_steps = 0
    config.ema_rate = 0.9999
    config.dataset.p_uncond = 0.1
    config.sample.update(algorithm='meanflow', sample_steps=1, cfg=False, scale=0.0)
    config.fid.steps = 1
    config.grid.update(steps=1, scale=0.0)
    return config


def get_config():
    return meanflow(large_config())
