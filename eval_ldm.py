"""Evaluate U-ViT latent models with continuous time (VP-SDE): ImageNet 256 / 512 U-ViT-L.

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision fp16 eval_ldm.py \
        --config=configs/imagenet256_uvit_large.py --nnet_path=imagenet256_uvit_large.pth --output_path=eval.log

As eval.py (FID and Inception Score with the config's protocol, libs/evaluation.py), with the
autoencoder decoding the sampled latents.
"""
from absl import app

from libs.evaluation import define_flags, main_for
from libs.family import LATENTS_CONTINUOUS

define_flags()

if __name__ == '__main__':
    app.run(main_for(LATENTS_CONTINUOUS))
