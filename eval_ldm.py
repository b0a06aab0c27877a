"""Evaluate U-ViT latent models with continuous time (VP-SDE): ImageNet 256 / 512 U-ViT-L.

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision fp16 eval_ldm.py \
        --config=configs/imagenet256_uvit_large.py --nnet_path=imagenet256_uvit_large.pth --output_path=eval.log

Samples config.sample.n_samples images with the config's protocol and logs FID and Inception
Score; the engine (shared by the four eval scripts and training) is libs/evaluation.py. Reads the
weights, the autoencoder, the FID statistics config.fid.stat, never the training data.
A config of another family (config.diffusion, z_shape, network) stops with the name of its script.
"""
from absl import app

from libs.evaluation import define_flags, main_for
from libs.family import LATENTS_CONTINUOUS

define_flags()

if __name__ == '__main__':
    app.run(main_for(LATENTS_CONTINUOUS))
