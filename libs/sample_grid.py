"""Sample grids written during training: <workdir>/samples/<step>.png."""
import logging
import math
import os

import torch.nn.functional as F

from libs.io_utils import atomic_path

logger = logging.getLogger(__name__)


def save_grid(images, path: str, n_cols: int, padding: int = 2, min_size: int = 32):
    """Write images (N, 3, H, W) in [0, 1] as one PNG with `n_cols` images per row, atomically.

    Images smaller than `min_size` pixels are enlarged by pixel repetition (the 8x8 digits would
    otherwise make a thumbnail). Quantised to uint8 by round(255 x), as torchvision.utils.save_image does.
    """
    from torchvision.utils import save_image  # heavy

    images = images.float().cpu()
    factor = math.ceil(min_size / min(images.shape[-2:]))
    if factor > 1:
        images = F.interpolate(images, scale_factor=factor, mode='nearest')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        # The temporary name has no .png suffix, so name the format explicitly.
        save_image(images, tmp, nrow=n_cols, padding=padding, format='PNG')
    logger.info("wrote sample grid %s", path)
    return path
