"""What every dataset shares: `DatasetBase`, the two torch Datasets (in-memory tensors, image files), the ADM crops
and the flip. Randomness (flips, random crops) comes from torch's default generator only, never Python's `random`
or numpy's global state: the engine seeds torch in every DataLoader worker and saves its state (exact resume).
"""
import logging
import math
import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from libs.errors import ConfigError, DataError, MissingFileError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.gif', '.tif', '.tiff')

# Stable Diffusion's KL-f8 autoencoder: 4 latent channels, 8x spatial downsampling.
LATENT_CHANNELS = 4
LATENT_DOWNSAMPLE = 8


class DatasetBase:
    """A training set plus what the engine needs to know about it.

    Attributes:
        train: torch Dataset of dicts {'x': (C, H, W) float32 in [-1, 1]} plus 'y' (int64 scalar) when labelled.
        data_shape: x0 as the network sees it: (C, H, W) for pixels, (4, H/8, W/8) for 'images_for_autoencoder'.
        kind: 'pixels', 'images_for_autoencoder' (raw images the training script encodes) or 'latent_moments'
            (precomputed autoencoder moments, libs/datasets/features.py).
        num_classes: number of data classes, 0 for unlabelled data.
        image_shape: (C, H, W) of the items' 'x' (equal to data_shape for pixels).

    Sampling and evaluation need none of it: the FID statistics (config.fid.stat) and the class labels to sample
    (uniform over config.nnet's classes) come from the config.
    """

    def __init__(self, train, data_shape, kind='pixels', num_classes=0, image_shape=None):
        self.train = train
        self.data_shape = tuple(int(s) for s in data_shape)
        self.image_shape = self.data_shape if image_shape is None else tuple(int(s) for s in image_shape)
        self.kind = kind
        self.num_classes = int(num_classes)

    def source_image_shape(self):
        """(3, H, W) of the images behind the data: the items' images, or (3, R, R) for latent features of a known
        resolution R; None when unknown (the autoencoder's latent shape is checked against it)."""
        if self.kind != 'latent_moments':
            return self.image_shape
        r = getattr(self, 'resolution', None)
        return None if r is None else (3, int(r), int(r))

    def __repr__(self):
        return (f"{type(self).__name__}(n={len(self.train)}, data_shape={self.data_shape}, kind={self.kind!r}, "
                f"num_classes={self.num_classes})")


def maybe_flip(x, random_flip):
    """Horizontally flip x (C, H, W) with probability 1/2, drawing from torch's default RNG."""
    if random_flip and torch.rand(()) < 0.5:
        return x.flip(-1)
    return x


def uint8_to_unit_range(arr):
    """(H, W, C) uint8 array or RGB PIL image -> (C, H, W) float32 tensor in [-1, 1]."""
    # np.array copies: arrays viewing PIL images are read-only, which torch warns about.
    x = torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


class TensorImageDataset(Dataset):
    """Images held in memory. images: (N, C, H, W) uint8 in [0, 255] (kept as uint8 to spare memory) or float32 in
    [-1, 1]. labels: (N,) int64 or None."""

    def __init__(self, images, labels=None, random_flip=False):
        # The dataset classes build both from one checked file (cifar10, digits): an invariant.
        assert images.ndim == 4 and (labels is None or len(labels) == len(images)), \
            f"images {tuple(images.shape)}, labels {None if labels is None else len(labels)}"
        self.images = images
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        self.random_flip = random_flip

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        x = self.images[idx]
        # clone: a float item must not be a view into the dataset, which in-place ops would corrupt.
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float().clone()
        item = {'x': maybe_flip(x, self.random_flip)}
        if self.labels is not None:
            item['y'] = self.labels[idx]
        return item


class ImageFileDataset(Dataset):
    """Images read from files, preprocessed by `transform`: PIL RGB image -> PIL image of the training size (crops,
    resizes; may draw from torch's default RNG)."""

    def __init__(self, paths, labels=None, transform=None, random_flip=False):
        assert labels is None or len(labels) == len(paths), f"{len(paths)} paths, {len(labels)} labels"  # built together
        # One numpy array of encoded paths instead of a list of 1.28M str objects: DataLoader workers
        # touching list items bump their refcounts and slowly copy the parent's pages (copy-on-write).
        self._paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        self.transform = transform
        self.random_flip = random_flip

    def __len__(self):
        return len(self._paths)

    def path(self, idx):
        """The file of item `idx`."""
        return os.fsdecode(self._paths[idx])

    def __getitem__(self, idx):
        img = load_rgb(self.path(idx))
        if self.transform is not None:
            img = self.transform(img)
        item = {'x': maybe_flip(uint8_to_unit_range(img), self.random_flip)}
        if self.labels is not None:
            item['y'] = self.labels[idx]
        return item


# What a viewer shows behind transparent pixels: we composite on white (torchvision's convert('RGB') would
# keep whatever colour the transparent pixels happen to store, often black).
BACKGROUND = (255, 255, 255)


def to_rgb(img):
    """A PIL image of any mode -> the 8-bit RGB image a viewer shows: EXIF orientation applied, 16/32-bit
    grey scaled to 8 bits (Pillow's own convert would clip it: a 16-bit PNG became all white), palette, LA and
    RGBA images composited on white, CMYK (and YCCK JPEGs, which Pillow decodes to CMYK) converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):
        # 16-bit samples (PNG, TIFF; Pillow opens 16-bit grey as 'I;16' or 'I'): round(v * 255 / 65535).
        v = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(v * (255 / 65535)), 0, 255).astype(np.uint8), 'L')
    elif img.mode == 'F':  # float samples, taken to be in [0, 1]
        v = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(v * 255), 0, 255).astype(np.uint8), 'L')
    if img.mode == 'P':
        img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
    elif img.mode in ('LA', 'La', 'PA', 'RGBa') or (img.mode in ('L', 'RGB') and 'transparency' in img.info):
        img = img.convert('RGBA')
    if img.mode == 'RGBA':
        background = Image.new('RGB', img.size, BACKGROUND)
        background.paste(img, mask=img.getchannel('A'))
        return background
    return img.convert('RGB')


def load_rgb(path):
    """Open an image file as an 8-bit RGB PIL image (`to_rgb`); DataError naming the file if it is unreadable."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image '{path}' ({e}). The file is corrupt or not an image: "
                        "replace or delete it.") from e


def list_images(folder, recursive=True):
    """Sorted paths of the image files under `folder` (by extension, case-insensitive). Hidden files
    and folders are skipped (e.g. macOS '._x.jpg' resource forks, which are not images)."""
    def wanted(name):
        return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)

    found = []
    if recursive:
        for root, dirs, files in os.walk(folder, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
            found.extend(os.path.join(root, f) for f in files if wanted(f))
    else:
        found = [os.path.join(folder, f) for f in os.listdir(folder)
                 if wanted(f) and os.path.isfile(os.path.join(folder, f))]
    return sorted(found)


def _box_halve_then_bicubic(img, smaller_side):
    """Resize so the smaller side is `smaller_side`: BOX-halve while at least twice as large (better than one big
    bicubic step), then one BICUBIC resize. guided-diffusion's (ADM) preprocessing, which U-ViT reused for ImageNet."""
    while min(img.size) >= 2 * smaller_side:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = smaller_side / min(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)


def adm_center_crop(img, size):
    """ADM centre crop: PIL image -> (size x size) PIL image (offsets rounded down)."""
    img = _box_halve_then_bicubic(img, size)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def adm_random_crop(img, size, min_crop_frac=0.8, max_crop_frac=1.0):
    """ADM random crop: resize so the smaller side is uniform in [ceil(size / max_crop_frac), ceil(size /
    min_crop_frac)], then a uniformly placed (size x size) crop; torch's default generator."""
    lo = math.ceil(size / max_crop_frac)
    hi = math.ceil(size / min_crop_frac)
    smaller_side = int(torch.randint(lo, hi + 1, ()).item())
    img = _box_halve_then_bicubic(img, smaller_side)
    top = int(torch.randint(0, img.height - size + 1, ()).item())
    left = int(torch.randint(0, img.width - size + 1, ()).item())
    return img.crop((left, top, left + size, top + size))


def resolve_kind(kind, resolution, name):
    """Pick 'pixels' or 'images_for_autoencoder' (default: the autoencoder from 256 pixels up, as the paper's latent
    models) and return (kind, data_shape)."""
    if kind is None:
        kind = 'images_for_autoencoder' if resolution >= 256 else 'pixels'
    r = resolution // LATENT_DOWNSAMPLE
    shapes = {'pixels': (3, resolution, resolution), 'images_for_autoencoder': (LATENT_CHANNELS, r, r)}
    if kind not in shapes or (kind == 'images_for_autoencoder' and resolution % LATENT_DOWNSAMPLE):
        raise ConfigError(f"{name}: kind must be 'pixels' or 'images_for_autoencoder', the latter with a resolution "
                          f"that is a multiple of {LATENT_DOWNSAMPLE} (the KL-f8 autoencoder's downsampling); got "
                          f"kind {kind!r}, resolution {resolution}.")
    return kind, shapes[kind]


def check_resolution(resolution, name):
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ConfigError(f"{name}: resolution must be a positive integer, got {resolution!r}.")
    return int(resolution)


def check_dataset_path(path, name, how):
    """`path` as a str; ConfigError when config.dataset.path is unset, MissingFileError when absent."""
    if not isinstance(path, (str, os.PathLike)) or not str(os.fspath(path)).strip():
        raise ConfigError(f"{name}: config.dataset.path is not set to a folder path (got {path!r}). {how}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"{name}: dataset folder '{path}' does not exist. {how}")
    return path
