"""'cifar10': the CIFAR10 training set read from the standard python-pickle batches.

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

from libs.datasets.base import DatasetBase, TensorImageDataset, check_dataset_path, class_counts_of
from libs.errors import InputError, MissingFileError

logger = logging.getLogger(__name__)

BATCHES_DIR = 'cifar-10-batches-py'
TRAIN_BATCHES = tuple(f'data_batch_{i}' for i in range(1, 6))
TEST_BATCH = 'test_batch'
CIFAR10_TRAIN_SIZE = 50_000
CIFAR10_NUM_CLASSES = 10
CIFAR10_SIZE = 32
FID_STAT = 'assets/fid_stats/fid_stats_cifar10_train_pytorch.npz'

HOW_TO_PREPARE = (
    "Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into that folder "
    "(`tar xzf cifar-10-python.tar.gz -C <path>` gives <path>/cifar-10-batches-py/data_batch_1..5), or run "
    "`python -c \"import torchvision; torchvision.datasets.CIFAR10('<path>', download=True)\"`; "
    "then set config.dataset.path=<path>.")


def find_batches_dir(path):
    """The folder holding data_batch_1..5: `path` itself or `path`/cifar-10-batches-py."""
    for candidate in (path, os.path.join(path, BATCHES_DIR)):
        if os.path.isfile(os.path.join(candidate, TRAIN_BATCHES[0])):
            return candidate
    raise MissingFileError(f"CIFAR10 python batches not found at '{path}' (looked for {TRAIN_BATCHES[0]} there "
                           f"and in {os.path.join(path, BATCHES_DIR)}). {HOW_TO_PREPARE}")


def read_batch(file):
    """One pickle batch -> (images (n, 3, 32, 32) uint8, labels (n,) int64)."""
    if not os.path.isfile(file):
        raise MissingFileError(f"CIFAR10 batch '{file}' is missing. {HOW_TO_PREPARE}")
    try:
        with open(file, 'rb') as f:
            # The release was pickled by Python 2: byte-string keys, hence encoding='bytes'.
            batch = pickle.load(f, encoding='bytes')
        data = batch.get(b'data', batch.get('data'))
        labels = batch.get(b'labels', batch.get('labels'))
        data = np.asarray(data, dtype=np.uint8)
        labels = np.asarray(labels, dtype=np.int64)
    except Exception as e:  # a truncated or foreign file can fail in many ways inside pickle
        raise InputError(f"CIFAR10 batch '{file}' is corrupt or not a CIFAR10 python batch ({type(e).__name__}: {e}). "
                         f"Re-download it. {HOW_TO_PREPARE}") from e
    n = len(labels)
    if data.ndim != 2 or data.shape != (n, 3 * CIFAR10_SIZE * CIFAR10_SIZE):
        raise InputError(f"CIFAR10 batch '{file}': expected data of shape ({n}, 3072), got {data.shape}. "
                         f"Re-download it. {HOW_TO_PREPARE}")
    if n and (labels.min() < 0 or labels.max() >= CIFAR10_NUM_CLASSES):
        raise InputError(f"CIFAR10 batch '{file}': labels outside 0..9. Re-download it.")
    return torch.from_numpy(data.reshape(n, 3, CIFAR10_SIZE, CIFAR10_SIZE)), torch.from_numpy(labels)


class CIFAR10(DatasetBase):
    """CIFAR10 train set: items {'x': (3, 32, 32) float32 in [-1, 1], 'y': int64 in 0..9}.

    path: the extracted `cifar-10-batches-py` folder or its parent.
    random_flip: horizontal flip with probability 1/2 (the paper config turns it on).
    The paper's model is unconditional; labels are provided anyway (the engine ignores them).
    """

    def __init__(self, path, random_flip=True):
        folder = find_batches_dir(check_dataset_path(path, 'cifar10', HOW_TO_PREPARE))
        parts = [read_batch(os.path.join(folder, name)) for name in TRAIN_BATCHES]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        if len(labels) != CIFAR10_TRAIN_SIZE:
            logger.warning("CIFAR10 at %s has %d training images, not the standard %d", folder, len(labels),
                           CIFAR10_TRAIN_SIZE)
        super().__init__(
            train=TensorImageDataset(images, labels, random_flip=random_flip),
            data_shape=(3, CIFAR10_SIZE, CIFAR10_SIZE),
            kind='pixels',
            num_classes=CIFAR10_NUM_CLASSES,
            fid_stat=FID_STAT,
            class_counts=class_counts_of(labels, CIFAR10_NUM_CLASSES),
        )
