"""'digits': scikit-learn's bundled 8x8 handwritten digits, the CPU demo's dataset.

1,797 grey images with integer values 0..16 in 10 classes (sklearn.datasets.load_digits,
which ships inside scikit-learn: no download). Scaled linearly to [-1, 1] (0 -> -1, 16 -> 1).
No flips: a mirrored 2, 3 or 7 is not a digit.
"""
import torch
import torch.nn.functional as F

from libs.datasets.base import DatasetBase, TensorImageDataset
from libs.digits_metrics import digits_score
from libs.errors import ConfigError

DIGITS_SIZE = 8
DIGITS_MAX_VALUE = 16.0
DIGITS_NUM_CLASSES = 10
INTERPOLATIONS = ('nearest', 'bilinear')


def load_digits_arrays():
    """(images (1797, 8, 8) float64 in 0..16, labels (1797,) int64), as scikit-learn gives them."""
    from sklearn.datasets import load_digits  # heavy

    bunch = load_digits()
    return bunch.images, bunch.target


class Digits(DatasetBase):
    """sklearn digits as (1, resolution, resolution) images in [-1, 1] with labels 0..9.

    resolution: a multiple of 8 (default 8, the native size). Larger sizes are made by
        upsampling; 'nearest' (default) repeats each pixel in an (r/8 x r/8) block, so
        average-pooling back to 8x8 (what the digits metric does) recovers the original
        exactly; 'bilinear' gives smoother strokes but is not exactly invertible.
    """

    def __init__(self, resolution=DIGITS_SIZE, interpolation='nearest'):
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < DIGITS_SIZE \
                or resolution % DIGITS_SIZE or interpolation not in INTERPOLATIONS:
            raise ConfigError(f"digits: resolution must be a multiple of {DIGITS_SIZE} (8, 16, 32, ...) and "
                              f"interpolation one of {INTERPOLATIONS}; got {resolution!r} and {interpolation!r}.")
        images, labels = load_digits_arrays()
        x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8) in 0..16
        x = x / (DIGITS_MAX_VALUE / 2) - 1.0
        if resolution != DIGITS_SIZE:
            kw = {} if interpolation == 'nearest' else {'align_corners': False}
            x = F.interpolate(x, size=(resolution, resolution), mode=interpolation, **kw).clamp_(-1.0, 1.0)
        labels = torch.as_tensor(labels, dtype=torch.int64)
        super().__init__(train=TensorImageDataset(x.contiguous(), labels, random_flip=False),
                         data_shape=(1, resolution, resolution), kind='pixels', num_classes=DIGITS_NUM_CLASSES)
        self.resolution = resolution

    def sample_metric(self, images, labels=None):
        """Score generated digits (see libs.digits_metrics.digits_score).

        images: (N, 1, H, W) (or (N, 3, H, W) grey) in [0, 1]; labels: (N,) the classes they
        were sampled for, or None for unconditional samples.
        Returns {'digit_accuracy': float in [0, 1] (only with labels), 'pixel_fd': float}.
        """
        return digits_score(images, labels)
