"""'celeba': CelebA faces at 64x64 from the aligned-and-cropped release (img_align_celeba).

Preprocessing as the paper (and DDIM before it): a 128x128 crop whose top-left corner is
(row 57, col 25), i.e. centred at (x=89, y=121) of the 178x218 aligned image, bilinear
resize to `resolution` (PIL, antialiased, as torchvision's Resize), random horizontal flip.

On disk: <path>/img_align_celeba/000001.jpg ... plus the official split list
<path>/list_eval_partition.txt ("000001.jpg 0" per line; 0 train, 1 valid, 2 test) or the
Kaggle copy's list_eval_partition.csv. torchvision's layout <path>/celeba/... is accepted too.
"""
import csv
import logging
import os

from PIL import Image

from libs.datasets.base import DatasetBase, ImageFileDataset, check_dataset_path, check_resolution, list_images
from libs.errors import ConfigError, DataError, MissingFileError

logger = logging.getLogger(__name__)

IMAGES_DIR = 'img_align_celeba'
PARTITION_FILES = ('list_eval_partition.txt', 'list_eval_partition.csv')
SPLITS = {'train': 0, 'valid': 1, 'test': 2, 'all': None}
# The paper's face crop in the 178x218 aligned images (top-left corner and side, pixels).
CROP_TOP, CROP_LEFT, CROP_SIZE = 57, 25, 128

HOW_TO_PREPARE = (
    "Download 'Align&Cropped Images' (img_align_celeba.zip) and list_eval_partition.txt from "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (or run `python -c \"import torchvision; "
    "torchvision.datasets.CelebA('<path>', split='train', target_type=[], download=True)\"`), so that "
    "<path>/img_align_celeba/000001.jpg and <path>/list_eval_partition.txt exist; then set config.dataset.path=<path>.")


def find_celeba_root(path):
    """The folder that holds img_align_celeba/ (path, path/celeba, or the parent of path)."""
    candidates = [path, os.path.join(path, 'celeba')]
    if os.path.basename(os.path.normpath(path)) == IMAGES_DIR:  # path names the image folder itself
        candidates.append(os.path.dirname(os.path.abspath(path)))
    for root in candidates:
        if os.path.isdir(os.path.join(root, IMAGES_DIR)):
            return root
    raise MissingFileError(f"CelebA aligned images not found at '{path}' (looked for {IMAGES_DIR}/ there and in "
                           f"{os.path.join(path, 'celeba')}). {HOW_TO_PREPARE}")


def read_partition(root):
    """{file name: partition 0/1/2} from the official .txt or the Kaggle .csv, or None if absent."""
    for name in PARTITION_FILES:
        file = os.path.join(root, name)
        if not os.path.isfile(file):
            continue
        partition = {}
        with open(file, newline='') as f:
            rows = csv.reader(f) if name.endswith('.csv') else (line.split() for line in f)
            for row in rows:
                if not row or row[0] == 'image_id':  # blank line or the csv header
                    continue
                try:
                    partition[row[0]] = int(row[1])
                except (IndexError, ValueError) as e:
                    raise DataError(f"CelebA split list '{file}' has a malformed line {row!r}; expected "
                                     "'<image name> <0|1|2>'. Re-download it.") from e
        return partition
    return None


class CelebAFaceCrop:
    """PIL image (178x218 aligned CelebA) -> the paper's 128x128 face crop resized to `resolution`."""

    def __init__(self, resolution):
        self.resolution = resolution

    def __call__(self, img):
        if img.width < CROP_LEFT + CROP_SIZE or img.height < CROP_TOP + CROP_SIZE:
            raise DataError(f"CelebA image of size {img.width}x{img.height} is smaller than the face crop "
                             f"(needs at least {CROP_LEFT + CROP_SIZE}x{CROP_TOP + CROP_SIZE}); use the aligned "
                             "178x218 images of img_align_celeba.")
        img = img.crop((CROP_LEFT, CROP_TOP, CROP_LEFT + CROP_SIZE, CROP_TOP + CROP_SIZE))
        if self.resolution != CROP_SIZE:
            img = img.resize((self.resolution, self.resolution), resample=Image.BILINEAR)
        return img


class CelebA(DatasetBase):
    """CelebA faces, unconditional: items {'x': (3, resolution, resolution) float32 in [-1, 1]}.

    path: folder holding img_align_celeba/ (and list_eval_partition.txt).
    resolution: output side in pixels (64 in the paper).
    split: 'train' (the paper; 162,770 images), 'valid', 'test', or 'all' (every image, no split list needed).
    random_flip: horizontal flip with probability 1/2.
    """

    def __init__(self, path, resolution=64, split='train', random_flip=True):
        resolution = check_resolution(resolution, 'celeba')
        if split not in SPLITS:
            raise ConfigError(f"celeba: split must be one of {sorted(SPLITS)}, got {split!r}.")
        root = find_celeba_root(check_dataset_path(path, 'celeba', HOW_TO_PREPARE))
        files = list_images(os.path.join(root, IMAGES_DIR), recursive=False)
        if SPLITS[split] is not None:
            partition = read_partition(root)
            if partition is None:
                raise MissingFileError(
                    f"CelebA split list ({' or '.join(PARTITION_FILES)}) not found in '{root}', needed for "
                    f"split={split!r}. Put it there, or set config.dataset.split='all' to use every image.")
            files = [f for f in files if partition.get(os.path.basename(f)) == SPLITS[split]]
        if not files:
            of_split = "" if SPLITS[split] is None else f" of split {split!r} (by the split list)"
            raise MissingFileError(f"no images{of_split} in '{os.path.join(root, IMAGES_DIR)}'. {HOW_TO_PREPARE}")
        logger.info("CelebA: %d images (split %s) from %s", len(files), split, root)
        super().__init__(train=ImageFileDataset(files, labels=None, transform=CelebAFaceCrop(resolution),
                                                random_flip=random_flip),
                         data_shape=(3, resolution, resolution), kind='pixels', num_classes=0)
