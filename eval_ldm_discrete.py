"""Evaluate U-ViT latent models with discrete time (Stable Diffusion betas): ImageNet 256 / 512 U-ViT-H.

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision fp16 eval_ldm_discrete.py \
        --config=configs/imagenet256_uvit_huge.py --nnet_path=imagenet256_uvit_huge.pth --output_path=eval.log

As eval_ldm.py, for the networks trained on Stable Diffusion's discrete-time schedule.
"""
from absl import app

from libs.evaluation import define_flags, main_for
from libs.family import LATENTS_DISCRETE

define_flags()

if __name__ == '__main__':
    app.run(main_for(LATENTS_DISCRETE))
