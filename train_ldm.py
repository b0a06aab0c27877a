"""Train class-conditional latent U-ViTs with continuous time (ImageNet 256/512 U-ViT-L).

`accelerate launch ... train_ldm.py --config=configs/<config>.py`; the loop is libs/trainer.py (docs/training.md).
"""
from absl import app

from libs.family import LATENTS_CONTINUOUS
from libs.trainer import define_flags, main_for

define_flags()

if __name__ == '__main__':
    app.run(main_for(LATENTS_CONTINUOUS))
