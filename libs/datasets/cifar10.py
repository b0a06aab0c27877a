"""'cifar10': the CIFAR10 training set read from the standard python-pickle batches.

When the batches are not in the configured folder, torchvision's downloader fetches and extracts
them there (as the original's dataset did); offline, a MissingFileError says what to fetch.

On disk (the release's `cifar-10-python.tar.gz`, also what torchvision downloads):
    <path>/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta
`path` may name that folder itself or its parent. Each batch is a pickled dict with
b'data' (10000, 3072) uint8 (all red, then green, then blue values of a 32x32 image, rows
first) and b'labels' (10000 ints in 0..9).
"""
import logging
import os
import pickle

import numpy as np
import torch

from libs.datasets.base import DatasetBase, TensorImageDataset
from libs.errors import ConfigError, DataError, MissingFileError, require_path

logger = logging.getLogger(__name__)

BATCHES_DIR = 'cifar-10-batches-py'
TRAIN_BATCHES = tuple(f'data_batch_{i}' for i in range(1, 6))
CIFAR10_TRAIN_SIZE = 50_000
CIFAR10_NUM_CLASSES = 10
CIFAR10_SIZE = 32

URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'  # what torchvision's CIFAR10 downloads
HOW_TO_PREPARE = (f"Download {URL} and extract it into config.dataset.path (`tar xzf cifar-10-python.tar.gz -C <path>` "
                  f"gives <path>/cifar-10-batches-py/data_batch_1..5).")


def download(path):
    """Fetch and extract the release into `path` with torchvision's downloader (checksum-verified)."""
    import torchvision  # heavy

    logger.info("CIFAR10 not found in '%s': downloading %s there", path, URL)
    try:
        torchvision.datasets.CIFAR10(path, train=True, download=True)
    except OSError as e:  # no network (urllib's URLError is an OSError), or a disk error
        raise MissingFileError(f"CIFAR10 is not in '{path}' and could not be downloaded ({e}). Download {URL} "
                               f"and extract it into '{path}' (`tar xzf cifar-10-python.tar.gz -C {path}`).") from e


def find_batches_dir(path):
    """The folder holding data_batch_1..5: `path` itself or `path`/cifar-10-batches-py; None when neither."""
    return next((d for d in (path, os.path.join(path, BATCHES_DIR))
                 if os.path.isfile(os.path.join(d, TRAIN_BATCHES[0]))), None)


def read_batch(file):
    """One pickle batch -> (images (n, 3, 32, 32) uint8, labels (n,) int64)."""
    require_path(file, "CIFAR10 batch", HOW_TO_PREPARE, kind='file')
    try:
        with open(file, 'rb') as f:
            # The release was pickled by Python 2: byte-string keys, hence encoding='bytes'.
            batch = pickle.load(f, encoding='bytes')
        data = batch.get(b'data', batch.get('data'))
        labels = batch.get(b'labels', batch.get('labels'))
        data = np.asarray(data, dtype=np.uint8)
        labels = np.asarray(labels, dtype=np.int64)
        n = len(labels)
        problem = (f"expected data of shape ({n}, 3072), got {data.shape}" if data.shape != (n, 3 * CIFAR10_SIZE ** 2)
                   else "labels outside 0..9" if n and (labels.min() < 0 or labels.max() >= CIFAR10_NUM_CLASSES)
                   else None)
    except Exception as e:  # a truncated or foreign file can fail in many ways inside pickle
        problem = f"{type(e).__name__}: {e}"
    if problem:
        raise DataError(f"CIFAR10 batch '{file}' is corrupt or not a CIFAR10 python batch ({problem}). "
                        f"Re-download it. {HOW_TO_PREPARE}")
    return torch.from_numpy(data.reshape(n, 3, CIFAR10_SIZE, CIFAR10_SIZE)), torch.from_numpy(labels)


class CIFAR10(DatasetBase):
    """CIFAR10 train set: items {'x': (3, 32, 32) float32 in [-1, 1], 'y': int64 in 0..9}.

    path: the extracted `cifar-10-batches-py` folder or its parent.
    random_flip: horizontal flip with probability 1/2 (the paper config turns it on).
    The paper's model is unconditional; labels are provided anyway (the engine ignores them).
    """

    def __init__(self, path, random_flip=True):
        if not path:
            raise ConfigError(f"cifar10: config.dataset.path is not set. {HOW_TO_PREPARE}")
        path = os.fspath(path)
        if find_batches_dir(path) is None:
            download(path)
        folder = find_batches_dir(path) or path  # a partial folder fails below, naming the missing batch
        parts = [read_batch(os.path.join(folder, name)) for name in TRAIN_BATCHES]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        if len(labels) != CIFAR10_TRAIN_SIZE:
            logger.warning("CIFAR10 at %s has %d training images, not the standard %d", folder, len(labels),
                           CIFAR10_TRAIN_SIZE)
        super().__init__(train=TensorImageDataset(images, labels, random_flip=random_flip),
                         data_shape=(3, CIFAR10_SIZE, CIFAR10_SIZE), kind='pixels', num_classes=CIFAR10_NUM_CLASSES)
