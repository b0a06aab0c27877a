"""Train U-ViT: pixel-space diffusion with continuous time (VP-SDE): CIFAR10, CelebA 64, ImageNet 64, digits.

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision fp16 train.py --config=configs/<config>.py
    python train.py --config=configs/<config>.py --config.train.batch_size=64 --workdir=runs/x   # one process

The loop lives in libs/trainer.py; this script only names the family it serves (libs/family.py): a
config of another family (config.diffusion, z_shape, network) stops with the name of its script.
"""
from absl import app

from libs.family import PIXELS_CONTINUOUS
from libs.trainer import define_flags, main_for

define_flags()

if __name__ == '__main__':
    app.run(main_for(PIXELS_CONTINUOUS))
