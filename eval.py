"""Evaluate U-ViT pixel-space models with continuous time (VP-SDE): CIFAR10, CelebA 64, ImageNet 64, digits.

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision fp16 eval.py \
        --config=configs/cifar10_uvit_small.py --nnet_path=cifar10_uvit_small.pth --output_path=eval.log

Samples config.sample.n_samples images with the config's protocol and logs FID and Inception
Score (and the metrics of --config.metrics.names, docs/evaluation.md); the engine (shared by the four eval scripts and training) is libs/evaluation.py. Reads the
weights, the FID statistics config.fid.stat, never the training data.
A config of another family (config.diffusion, z_shape, network) stops with the name of its script.
"""
from absl import app

from libs.evaluation import define_flags, main_for
from libs.family import PIXELS_CONTINUOUS

define_flags()

if __name__ == '__main__':
    app.run(main_for(PIXELS_CONTINUOUS))
