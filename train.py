"""Train pixel-space, continuous-time U-ViTs (CIFAR10, CelebA 64, ImageNet 64, digits).

`accelerate launch ... train.py --config=configs/<config>.py`; the loop is libs/trainer.py (docs/training.md).
"""
from absl import app

from libs.family import PIXELS_CONTINUOUS
from libs.trainer import define_flags, main_for

define_flags()

if __name__ == '__main__':
    app.run(main_for(PIXELS_CONTINUOUS))
