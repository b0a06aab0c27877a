"""Sample grids written during training: <workdir>/samples/<step>.png."""
import logging
import os

from libs.io_utils import atomic_path

logger = logging.getLogger(__name__)


def save_grid(images, path: str, n_cols: int, padding: int = 2):
    """Write images (N, 3, H, W) in [0, 1] as one PNG with `n_cols` images per row, atomically.

    Quantised to uint8 by round(255 x), as torchvision.utils.save_image does.
    """
    from torchvision.utils import save_image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        # The temporary name has no .png suffix, so name the format explicitly.
        save_image(images.float().cpu(), tmp, nrow=n_cols, padding=padding, format='PNG')
    logger.info("wrote sample grid %s", path)
    return path
