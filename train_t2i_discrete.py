"""Train text-to-image latent U-ViTs with discrete time (MS-COCO).

`accelerate launch ... train_t2i_discrete.py --config=configs/<config>.py`; the loop is libs/trainer.py (docs/training.md).
"""
from absl import app

from libs.family import TEXT_LATENTS_DISCRETE
from libs.trainer import define_flags, main_for

define_flags()

if __name__ == '__main__':
    app.run(main_for(TEXT_LATENTS_DISCRETE))
