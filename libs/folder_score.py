"""The offline sample score of an own image folder (dataset 'image_folder'): no download, and not FID.

Two numbers, both against the folder's own images (the training images, centre-cropped, unflipped):
- folder_accuracy (labelled folders): the fraction of class-conditional samples that a classifier fit on the
  folder reads as the class they were sampled for (chance = 1 / classes). The classifier is a logistic
  regression on grey thumbnails of at most 16 x 16 pixels; its accuracy on held-out real images of the folder
  (`real_accuracy`, logged once) is the ceiling to read the samples' figure against;
- pixel_fd: the Frechet distance between Gaussians fitted to 8 x 8 grey thumbnails of the samples and of the
  real images (the FID formula with raw pixels as features, as the digits demo's).
Neither is comparable to FID or across datasets: they say whether a run learns the folder's classes and
pixel statistics, which is what a first run on own data needs to know. A folder reads at most
MAX_PER_CLASS images per class (MAX_UNLABELLED without classes) once per process.
"""
import logging

import numpy as np
import torch
import torch.nn.functional as F

from libs.digits_metrics import frechet_distance, gaussian_stats
from libs.errors import InputError

logger = logging.getLogger(__name__)

FD_SIZE = 8  # pixel_fd thumbnails: 64-d, estimable from a few hundred samples
CLASSIFIER_SIZE = 16  # at most: the classifier's thumbnails (256-d)
MAX_PER_CLASS = 300
MAX_UNLABELLED = 1000
HELD_OUT = 0.2  # of the read images: the real_accuracy of the classifier
MAX_SAMPLES = 1000  # samples scored per evaluation: enough for a 64-d covariance; FID runs keep their own count


def grey_thumbnails(images, size):
    """images (N, 1 or 3, H, W) in [0, 1] -> (N, min(size, H) ** 2) float64: channels averaged, area-pooled."""
    x = torch.as_tensor(images).detach().to('cpu', torch.float64)
    assert x.ndim == 4 and x.shape[1] in (1, 3), x.shape  # the dataset's images, or score's checked samples
    x = x.mean(dim=1, keepdim=True)
    if x.shape[-1] > size or x.shape[-2] > size:
        x = F.adaptive_avg_pool2d(x, size)
    return x.reshape(len(x), -1).numpy()


class FolderReference:
    """The real side of the score: fit once from real images (N, 3, H, W) in [0, 1] and their labels (N,) or None."""

    def __init__(self, images, labels=None, seed=0):
        self.size = min(CLASSIFIER_SIZE, images.shape[-1])
        self.mu, self.sigma = gaussian_stats(grey_thumbnails(images, FD_SIZE))
        self.classifier, self.real_accuracy = None, None
        if labels is not None:
            from sklearn.linear_model import LogisticRegression  # heavy

            labels = np.asarray(labels)
            order = np.random.default_rng(seed).permutation(len(labels))
            n_test = max(1, int(len(order) * HELD_OUT))
            features = grey_thumbnails(images, self.size)
            fit, test = order[n_test:], order[:n_test]
            if not len(np.unique(labels[fit])) == len(np.unique(labels)) >= 2:
                logger.info("folder score: folder_accuracy is off: %d real images in %d classes are too few to "
                            "fit a classifier on every class and test it", len(labels), len(np.unique(labels)))
                return
            self.classifier = LogisticRegression(max_iter=1000).fit(features[fit], labels[fit])
            self.real_accuracy = float((self.classifier.predict(features[test]) == labels[test]).mean())
            logger.info("folder score: a logistic regression on %dx%d grey thumbnails of %d real images reads %d "
                        "held-out ones at %.3f (the ceiling of folder_accuracy; chance %.3f). Not FID.", self.size,
                        self.size, len(fit), n_test, self.real_accuracy, 1 / len(np.unique(labels)))

    def score(self, images, labels=None):
        """{'pixel_fd': float >= 0, 'folder_accuracy': float in [0, 1] (with labels and a labelled folder)} of
        samples (N >= 2, 1 or 3, H, W) in [0, 1] and the classes they were sampled for."""
        if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) < 2:
            raise InputError(f"folder score: expected images (N, 1 or 3, H, W) with N >= 2 (a covariance), got "
                             f"{tuple(images.shape)}")
        mu, sigma = gaussian_stats(grey_thumbnails(images, FD_SIZE))
        result = {'pixel_fd': max(frechet_distance(mu, sigma, self.mu, self.sigma), 0.0)}
        if labels is not None and self.classifier is not None:
            labels = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
            predicted = self.classifier.predict(grey_thumbnails(images, self.size))
            result['folder_accuracy'] = float((predicted == labels).mean())
        return result


def chosen_indices(labels, n_items, seed=0):
    """The items a reference reads: at most MAX_PER_CLASS of each class (1,000 without labels), seeded."""
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.permutation(n_items)[:MAX_UNLABELLED])
    labels = np.asarray(labels)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:MAX_PER_CLASS]
                                   for c in np.unique(labels)]))


_REFERENCES = {}


def reference_of(key, load):
    """The FolderReference of a folder, built once per process; key: (path, resolution) names it, load() gives
    (images (N, 3, H, W) in [0, 1], labels or None)."""
    if key not in _REFERENCES:
        _REFERENCES.clear()  # one folder per run: keep one
        _REFERENCES[key] = FolderReference(*load())
    return _REFERENCES[key]
