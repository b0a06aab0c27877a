"""U-ViT-H/1 on ImageNet 256x256 DC-AE f32c32 latents (32, 8, 8), class-conditional with guidance (train_ldm.py):
the latent space of Chen et al. 2024 ("Deep Compression Autoencoder for Efficient High-Resolution Diffusion Models",
arXiv 2410.10733), whose U-ViT-H runs use depth 28, width 1152, 16 heads and patch size 1 (their 512 px setting;
at 256 px f32 latents are 8x8: 64 tokens). UNTESTED AT FULL SCALE: built, stepped and sampled on a CPU with a tiny
random DC-AE and narrow widths only (tests/test_latent_configs.py).

    python scripts/extract_imagenet_feature.py --autoencoder=mit-han-lab/dc-ae-f32c32-in-1.0-diffusers \\
        --resolution=256 --imagenet_train=<ImageNet train> --output=assets/datasets/imagenet256_dcae_f32c32_features
    accelerate launch --multi_gpu --num_processes 8 train_ldm.py --config=configs/imagenet256_uvit_huge_dcae.py

The autoencoder is read from a local diffusers folder or the Hugging Face cache (docs/latents.md); its latents are
scaled by the model's own scaling_factor (latent_scaling='model'). Objective: flow matching (velocity, logit-normal
times) with the time shift derived from the latent dimension: d = 32 x 8 x 8 = 2048, base 4096 (RAE's), shift
sqrt(2048 / 4096) = 0.707.
"""
from configs.imagenet256_uvit_large import get_config as large_config


def get_config():
    config = large_config()
    config.z_shape = (32, 8, 8)  # checked against the model when it loads
    config.autoencoder.update(pretrained_path='mit-han-lab/dc-ae-f32c32-in-1.0-diffusers', latent_scaling='model')
    config.objective.update(path='linear', prediction='velocity', time_dist='logit_normal', shift_base_dim=4096.0)
    config.nnet.update(img_size=8, patch_size=1, in_chans=32, embed_dim=1152, depth=28, num_heads=16, conv=False)
    config.dataset.update(path='assets/datasets/imagenet256_dcae_f32c32_features', p_uncond=0.1)
    config.sample.update(algorithm='dpm_solver++_2m', sample_steps=50, scale=0.4)
    config.fid.steps = 50
    return config
