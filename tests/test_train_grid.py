"""Sample grids: layout, enlargement of tiny images, and save_image's uint8 quantisation."""
import numpy as np
import torch
from PIL import Image

from libs.sample_grid import save_grid


def test_grid_layout_and_values(tmp_path):
    images = torch.rand(6, 3, 8, 8)
    path = save_grid(images, str(tmp_path / 'g.png'), n_cols=3, padding=2, min_size=16)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 16 + 3 * 2, 3 * 16 + 4 * 2, 3)
    # Image 4 (row 1, col 1) starts at (2 + 16 + 2, 2 + 16 + 2); each pixel is repeated 2x2.
    top, left = 20, 20
    expected = np.floor(images[4].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(grid[top:top + 16:2, left:left + 16:2], expected)
    assert np.array_equal(grid[top + 1:top + 16:2, left + 1:left + 16:2], expected)
    assert not list(tmp_path.glob('.*tmp*'))  # written atomically, nothing left behind
