"""Tiny random diffusers autoencoders saved as diffusers folders (config.json + safetensors), for the tests of any
autoencoder (libs/diffusers_autoencoder.py): a FLUX/SD3-like 16-channel AutoencoderKL (no quant convs, with a
shift_factor), downsampling by 8 as FLUX's, and a DC-AE-like AutoencoderDC downsampling by 32 as f32c32: 256 px images
give the latent sizes of the shipped configs, (16, 32, 32) and (8, 8, 8), with widths of 8-16 to stay fast on a CPU."""
import os

import torch

diffusers = __import__("pytest").importorskip("diffusers")

KL16_SCALE, KL16_SHIFT = 0.3611, 0.1159  # FLUX.1's VAE scaling_factor / shift_factor
DC_SCALE = 0.41407  # DC-AE f32c32-in-1.0's scaling_factor


def tiny_kl16():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=1, norm_num_groups=8,
        sample_size=32, scaling_factor=KL16_SCALE, shift_factor=KL16_SHIFT, use_quant_conv=False,
        use_post_quant_conv=False).eval()


def tiny_dcae():
    torch.manual_seed(0)
    blocks, widths = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3, (8, 8, 16, 16, 32, 32)
    multiscales = ((),) * 3 + ((5,),) * 3
    return diffusers.AutoencoderDC(
        in_channels=3, latent_channels=32, attention_head_dim=8, encoder_block_types=blocks, decoder_block_types=blocks,
        encoder_block_out_channels=widths, decoder_block_out_channels=widths, encoder_layers_per_block=(1,) * 6,
        decoder_layers_per_block=(1,) * 6, encoder_qkv_multiscales=multiscales, decoder_qkv_multiscales=multiscales,
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=DC_SCALE).eval()


def save(model, folder):
    """model.save_pretrained(folder) -> folder (str)."""
    model.save_pretrained(str(folder))
    return str(folder)


def save_kl16(folder):
    return save(tiny_kl16(), folder)


def save_dcae(folder):
    return save(tiny_dcae(), folder)


def make_hub_cache(cache, repo, model, subfolder=""):
    """A Hugging Face hub cache under `cache` holding `model` as repo (in `subfolder`), laid out as the hub client
    writes it (models--org--name/refs/main -> snapshots/<revision>/...)."""
    revision = "0" * 40
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(revision)
    return save(model, os.path.join(root, "snapshots", revision, subfolder))
