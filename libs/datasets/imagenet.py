"""'imagenet': ImageNet-1k from the raw training images.

On disk: <path>/train/n01440764/n01440764_10026.JPEG ... (the ILSVRC2012 train tar extracted
into one folder per synset). The label of a file is the index of its name's prefix (the
synset id before the first '_') in the sorted set of prefixes, as the original did; for the
standard layout that is the index of its class folder in sorted order.

resolution 64 (the paper's pixel models): ADM preprocessing - BOX-halve while the image is
at least twice the target, one BICUBIC resize of the smaller side to 64, centre crop
(or ADM's random crop), random flip. Resolution 256 / 512: the same centre crop gives the
images the KL-f8 autoencoder encodes on the fly (kind 'images_for_autoencoder'), identical
to what the feature-extraction script encodes.
"""
import logging
import os

from libs.datasets.base import (DatasetBase, ImageFileDataset, adm_center_crop, adm_random_crop, check_dataset_path,
                                check_resolution, list_images, resolve_kind)
from libs.errors import ConfigError, MissingFileError

logger = logging.getLogger(__name__)

IMAGENET_TRAIN_SIZE = 1_281_167
IMAGENET_NUM_CLASSES = 1000

HOW_TO_PREPARE = (
    "Download ILSVRC2012_img_train.tar from https://image-net.org, extract it to <path>/train/ and extract each "
    "class tar inside it so that <path>/train/n01440764/n01440764_10026.JPEG exists (e.g. `cd <path>/train && "
    "for f in *.tar; do d=${f%.tar}; mkdir -p $d && tar xf $f -C $d && rm $f; done`); then set "
    "config.dataset.path=<path>.")


class ADMCrop:
    """PIL image -> (resolution x resolution) PIL image by ADM's centre or random crop."""

    def __init__(self, resolution, random_crop=False):
        self.resolution = resolution
        self.random_crop = random_crop

    def __call__(self, img):
        if self.random_crop:
            return adm_random_crop(img, self.resolution)
        return adm_center_crop(img, self.resolution)


def synset_of(file):
    """'.../n01440764_10026.JPEG' -> 'n01440764' (the file name before the first '_')."""
    return os.path.basename(file).split('_')[0]


class ImageNet(DatasetBase):
    """ImageNet train set: items {'x': (3, resolution, resolution) float32 in [-1, 1], 'y': int64}.

    path: folder holding train/ (or the train folder itself).
    resolution: 64 for the pixel models; 256 / 512 give kind 'images_for_autoencoder'.
    random_crop: ADM's random crop instead of the centre crop (not used by the paper).
    random_flip: horizontal flip with probability 1/2.
    kind: override 'pixels' / 'images_for_autoencoder' (default: by resolution, autoencoder from 256 up).
    """

    def __init__(self, path, resolution, random_crop=False, random_flip=True, kind=None):
        resolution = check_resolution(resolution, 'imagenet')
        kind, data_shape = resolve_kind(kind, resolution, 'imagenet')
        path = check_dataset_path(path, 'imagenet', HOW_TO_PREPARE)
        train_dir = os.path.join(path, 'train')
        if not os.path.isdir(train_dir) and os.path.basename(os.path.normpath(path)) == 'train':
            train_dir = path
        logger.info("imagenet: listing the images under %s", train_dir)
        files = list_images(train_dir, recursive=True) if os.path.isdir(train_dir) else []
        if not files:
            raise MissingFileError(f"imagenet: no images under '{train_dir}'. {HOW_TO_PREPARE}")
        synsets = [synset_of(f) for f in files]
        # Labels come from the file names, as the original; a tree whose names do not start with their
        # folder's synset (e.g. re-encoded '0001.png' files) would give every file its own class.
        prefix = len(os.path.join(train_dir, ''))
        odd = next((f for f, s in zip(files, synsets) if f[prefix:].split(os.sep, 1)[0] != s), None)
        if odd is not None:
            raise ConfigError(
                f"imagenet: '{odd}' is not named <synset>_<n>.JPEG inside its synset folder train/<synset>/, the "
                f"layout of ILSVRC2012_img_train.tar. {HOW_TO_PREPARE} For images laid out otherwise (one "
                "folder per class, any file names) use config.dataset.name='image_folder'.")
        self.classes = sorted(set(synsets))
        index = {s: i for i, s in enumerate(self.classes)}
        labels = [index[s] for s in synsets]
        if len(files) != IMAGENET_TRAIN_SIZE or len(self.classes) != IMAGENET_NUM_CLASSES:
            logger.warning("imagenet: found %d images in %d classes, not the standard %d in %d", len(files),
                           len(self.classes), IMAGENET_TRAIN_SIZE, IMAGENET_NUM_CLASSES)
        super().__init__(train=ImageFileDataset(files, labels, transform=ADMCrop(resolution, random_crop),
                                                random_flip=random_flip),
                         data_shape=data_shape, kind=kind, num_classes=len(self.classes),
                         image_shape=(3, resolution, resolution))
        self.resolution = resolution
