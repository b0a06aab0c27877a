"""'image_folder': your own images, with or without class subfolders.

    <path>/cat/0001.jpg, <path>/dog/xyz.png ...   -> class-conditional, labels 0..K-1 in the
                                                     sorted order of the subfolder names
    <path>/0001.jpg, <path>/0002.png ...          -> unconditional (num_classes 0)

Images inside a class folder may sit in deeper subfolders. Every image is resized and cropped
to a square of `resolution` pixels with ADM's preprocessing (BOX-halving, BICUBIC resize of the
smaller side, centre or random crop), flipped only when asked (random_flip=True). See docs/datasets.md.
Samples are scored offline against the folder itself (`sample_metric`, libs/folder_score.py; not FID).
"""
import logging
import os

import torch

from libs.datasets.base import (IMAGE_EXTENSIONS, DatasetBase, ImageFileDataset, check_dataset_path,
                                check_resolution, list_images, load_rgb, resolve_kind, uint8_to_unit_range)
from libs.datasets.imagenet import ADMCrop
from libs.errors import ConfigError, MissingFileError
from libs.folder_score import chosen_indices, reference_of

logger = logging.getLogger(__name__)

HOW_TO_PREPARE = (
    "Put your images (" + ", ".join(IMAGE_EXTENSIONS) + ") in one folder, or in one subfolder per class, and set "
    "config.dataset.path to that folder (see docs/datasets.md).")


def scan_image_folder(path):
    """(files, labels or None, class names) of an image folder, following the rules in the module docstring."""
    subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith('.'))
    top_files = list_images(path, recursive=False)
    per_class = {d: list_images(os.path.join(path, d), recursive=True) for d in subdirs}
    empty = [d for d, f in per_class.items() if not f]
    classes = [d for d in subdirs if per_class[d]]
    if classes and top_files:
        raise ConfigError(
            f"image_folder: '{path}' holds both images ({len(top_files)}, e.g. '{os.path.basename(top_files[0])}') and "
            f"class subfolders with images ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}). "
            "Move the loose images into a class folder (class-conditional) or the subfolders' images up "
            "(unconditional).")
    if empty and classes:
        logger.warning("image_folder: ignoring subfolders without images: %s", ', '.join(empty))
    if classes:
        files = [f for d in classes for f in per_class[d]]
        labels = [i for i, d in enumerate(classes) for _ in per_class[d]]
        return files, labels, classes
    if not top_files:
        raise MissingFileError(f"image_folder: no images found in '{path}'. {HOW_TO_PREPARE}")
    return top_files, None, []


class ImageFolder(DatasetBase):
    """A folder of images: items {'x': (3, resolution, resolution) float32 in [-1, 1]} plus 'y' (int64)
    when the images are arranged in class subfolders (self.classes holds the folder names).

    path: the folder.
    resolution: side of the square training images in pixels.
    random_crop: ADM's random crop (smaller side resized to 100-125% of the resolution, crop placed
        uniformly) instead of the centre crop; a mild augmentation for small datasets.
    random_flip: horizontal flip with probability 1/2. Off by default: on digits, text or anything whose
        mirror image is another thing, a flipping run reaches the same loss but half its samples come out
        mirrored (on real MNIST a real-digit classifier read 0.42 of mirrored digits against 0.91; see
        benchmarks/README.md); turn it on for photos, whose mirror image is as likely.
    kind: 'pixels' or 'images_for_autoencoder' (default: the autoencoder from 256 pixels up).
    """

    def __init__(self, path, resolution, random_crop=False, random_flip=False, kind=None):
        resolution = check_resolution(resolution, 'image_folder')
        kind, data_shape = resolve_kind(kind, resolution, 'image_folder')
        path = check_dataset_path(path, 'image_folder', HOW_TO_PREPARE)
        if not os.path.isdir(path):
            raise ConfigError(f"image_folder: '{path}' is a file; config.dataset.path must be a folder of images.")
        files, labels, self.classes = scan_image_folder(path)
        num_classes = len(self.classes)
        logger.info("image_folder: %d images in %s from %s, %s", len(files),
                    f"{num_classes} classes" if num_classes else "no classes (unconditional)", path,
                    "half of them mirrored (random_flip=True)" if random_flip else
                    "none mirrored (config.dataset.random_flip=True mirrors half: for photos, not digits or text)")
        super().__init__(
            train=ImageFileDataset(files, labels, transform=ADMCrop(resolution, random_crop), random_flip=random_flip),
            data_shape=data_shape,
            kind=kind,
            num_classes=num_classes,
            image_shape=(3, resolution, resolution),
        )
        self.resolution = resolution
        self.path = path

    def sample_metric(self, images, labels=None):
        """The offline score of samples against this folder (libs/folder_score.py; not FID).

        images: (N, 3, H, W) in [0, 1], N >= 2; labels: (N,) the classes they were sampled for, or None.
        Returns {'pixel_fd': float, 'folder_accuracy': float in [0, 1] (labelled folders, with labels)}.
        """
        return reference_of((self.path, self.resolution), self._reference_images).score(images, labels)

    def _reference_images(self):
        """(images (n, 3, r, r) in [0, 1], labels or None) of the folder items the score reads: centre-cropped,
        unflipped, whatever config.dataset.random_crop / random_flip say for training."""
        data, crop = self.train, ADMCrop(self.resolution, False)
        labels = None if data.labels is None else data.labels.numpy()
        chosen = chosen_indices(labels, len(data))
        images = torch.stack([(uint8_to_unit_range(crop(load_rgb(data.path(int(i))))) + 1) / 2 for i in chosen])
        return images, None if labels is None else labels[chosen]
