"""U-ViT-S/2 text-to-image on MS-COCO 256x256 latents with CLIP ViT-L/14 contexts (train_t2i_discrete.py).

The paper's deep variant (U-ViT-S/2 (Deep), depth 16) is this config with `--config.nnet.depth=16`.
"""
from configs.base import d, get_config as base_config


def get_config():
    config = base_config()
    config.diffusion = 'discrete'
    config.z_shape = (4, 32, 32)
    # 0.23010 is this config's own latent scaling (the original prompt demo used 0.18215 by mistake).
    config.autoencoder.update(pretrained_path='assets/stable-diffusion/autoencoder_kl.pth', scale_factor=0.23010)
    config.train.update(n_steps=1000000, batch_size=256, mode='cond')  # mode is unused by the text script
    config.optimizer.betas = (0.9, 0.9)
    config.lr_scheduler.warmup_steps = 5000
    config.nnet = d(name='uvit_t2i', img_size=32, in_chans=4, patch_size=2, embed_dim=512, depth=12, num_heads=8,
                    mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, clip_dim=768, num_clip_token=77)
    config.dataset.update(name='mscoco256_features', path='assets/datasets/coco256_features', cfg=True, p_uncond=0.1)
    config.fid.stat = 'assets/fid_stats/fid_stats_mscoco256_val.npz'
    # The original's eval_t2i_discrete.py always uses DPM-Solver (++, discrete protocol); scale 1 = weight 2 on eps_c.
    config.sample.update(sample_steps=50, n_samples=30000, mini_batch_size=50, algorithm='dpm_solver', cfg=True,
                         scale=1.0)
    return config
