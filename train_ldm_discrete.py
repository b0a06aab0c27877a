"""Train U-ViT: class-conditional latent diffusion with discrete time (SD betas): ImageNet 256/512 U-ViT-H.

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision fp16 train_ldm_discrete.py --config=configs/<config>.py
    python train_ldm_discrete.py --config=configs/<config>.py --config.train.batch_size=64 --workdir=runs/x   # one process

The loop lives in libs/trainer.py; this script only names the family it serves (libs/family.py): a
config of another family (config.diffusion, z_shape, network) stops with the name of its script.
"""
from absl import app

from libs.family import LATENTS_DISCRETE
from libs.trainer import define_flags, main_for

define_flags()

if __name__ == '__main__':
    app.run(main_for(LATENTS_DISCRETE))
