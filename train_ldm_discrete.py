"""Train class-conditional latent U-ViTs with discrete time (ImageNet 256/512 U-ViT-H).

`accelerate launch ... train_ldm_discrete.py --config=configs/<config>.py`; the loop is libs/trainer.py (docs/training.md).
"""
from absl import app

from libs.family import LATENTS_DISCRETE
from libs.trainer import define_flags, main_for

define_flags()

if __name__ == '__main__':
    app.run(main_for(LATENTS_DISCRETE))
