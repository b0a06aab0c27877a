"""U-ViT-L/2 on ImageNet 256x256 latents of a 16-channel KL autoencoder (16, 32, 32), class-conditional with
guidance (train_ldm.py): the FLUX.1 VAE (black-forest-labs/FLUX.1-schnell, subfolder vae; the SD3 VAE,
stabilityai/stable-diffusion-3-medium-diffusers/vae, has the same shape). UNTESTED AT FULL SCALE: built, stepped and
sampled on a CPU with a tiny random 16-channel AutoencoderKL and narrow widths only (tests/test_latent_configs.py).

    python scripts/extract_imagenet_feature.py --autoencoder=black-forest-labs/FLUX.1-schnell/vae \\
        --resolution=256 --imagenet_train=<ImageNet train> --output=assets/datasets/imagenet256_flux_vae_features
    accelerate launch --multi_gpu --num_processes 8 train_ldm.py --config=configs/imagenet256_uvit_large_kl16.py

Latents are (sample - shift_factor) * scaling_factor of the model's config.json (FLUX: 0.1159, 0.3611;
latent_scaling='model'). Objective: flow matching (velocity, logit-normal times) with the time shift derived from
the latent dimension: d = 16 x 32 x 32 = 16384, base 4096 (RAE's), shift sqrt(16384 / 4096) = 2.
"""
from configs.imagenet256_uvit_large import get_config as large_config


def get_config():
    config = large_config()
    config.z_shape = (16, 32, 32)  # checked against the model when it loads
    config.autoencoder.update(pretrained_path='black-forest-labs/FLUX.1-schnell/vae', latent_scaling='model')
    config.objective.update(path='linear', prediction='velocity', time_dist='logit_normal', shift_base_dim=4096.0)
    config.nnet.update(in_chans=16)
    config.dataset.update(path='assets/datasets/imagenet256_flux_vae_features')
    config.sample.update(algorithm='dpm_solver++_2m', sample_steps=50)
    config.fid.steps = 50
    return config
