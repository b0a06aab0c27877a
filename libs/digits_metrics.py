"""The CPU demo's score for generated handwritten digits (no Inception network needed).

Two numbers, both against scikit-learn's 1,797 real 8x8 digits:
- digit_accuracy: the fraction of class-conditional samples that a classifier trained on the
  real digits recognises as the label they were sampled for (about 0.1 = chance for noise);
- pixel_fd: the Frechet distance between Gaussians fitted to the samples and to the real
  digits in 64-d pixel space (pixel values in [0, 1]); the FID formula with raw pixels as the
  features.
Samples larger than 8x8 are average-pooled to 8x8 first.
"""
import functools
import logging

import numpy as np
import torch
import torch.nn.functional as F

from libs.errors import InputError

logger = logging.getLogger(__name__)

DIGITS_SIZE = 8
DIGITS_MAX_VALUE = 16.0
# Range slack for samples that were clamped to [0, 1] after float arithmetic.
_RANGE_TOLERANCE = 1e-3


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    mu: (d,), sigma: (d, d) symmetric positive semi-definite. Computed in float64 through
    tr (sigma1 sigma2)^(1/2) = tr (s1 sigma2 s1)^(1/2) with s1 = sigma1^(1/2): both square roots
    are of symmetric PSD matrices (eigh, negative rounding noise clipped), which stays exact for
    singular covariances, e.g. the digits' always-blank corner pixels.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise InputError(f"frechet_distance: mismatched shapes mu {mu1.shape}/{mu2.shape}, "
                         f"sigma {sigma1.shape}/{sigma2.shape}")
    s1 = _psd_sqrt(sigma1)
    middle = s1 @ sigma2 @ s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _psd_sqrt(sigma):
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_stats(features):
    """features (N, d) -> (mean (d,), covariance (d, d) with the unbiased N-1 divisor), float64."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


@functools.lru_cache(maxsize=1)
def _reference():
    """(classifier, mu, sigma) of the real digits, built once per process (about a second)."""
    from sklearn.datasets import load_digits  # heavy
    from sklearn.svm import SVC  # heavy

    bunch = load_digits()
    # An RBF SVC with gamma=0.001 on the raw 0..16 values is scikit-learn's own digits example;
    # it recognises held-out real digits about 99% of the time.
    classifier = SVC(gamma=0.001).fit(bunch.data, bunch.target)
    mu, sigma = gaussian_stats(bunch.data / DIGITS_MAX_VALUE)
    logger.debug("digits metric: classifier and reference statistics ready")
    return classifier, mu, sigma


def to_digit_pixels(images):
    """images (N, 1 or 3, H, W) in [0, 1] (tensor or array) -> (N, 64) float64 in [0, 1] at 8x8.

    Three-channel images (grey digits written as RGB) are averaged over channels; images
    larger than 8x8 are average-pooled, which exactly undoes nearest upsampling by an integer factor.
    """
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    x = x.detach().to('cpu', torch.float64)
    lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
    if (x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] < 2 or min(x.shape[2:]) < DIGITS_SIZE
            or lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE):
        raise InputError(f"digits metric: expected N >= 2 images (a covariance) of shape (N, 1 or 3, H, W), H and W "
                         f">= 8, values in [0, 1] (map network outputs with ((x + 1) / 2).clamp(0, 1)); got shape "
                         f"{tuple(x.shape)}, values in [{lo:.3f}, {hi:.3f}]")
    x = x.mean(dim=1, keepdim=True)
    if x.shape[2:] != (DIGITS_SIZE, DIGITS_SIZE):
        x = F.adaptive_avg_pool2d(x, DIGITS_SIZE)
    return x.reshape(x.shape[0], -1).numpy()


def digits_score(images, labels=None):
    """Score samples against the real digits.

    images: (N, 1, H, W) or (N, 3, H, W) in [0, 1], N >= 2; labels: (N,) ints in 0..9 or None.
    Returns {'pixel_fd': float >= 0} plus 'digit_accuracy' (float in [0, 1]) when labels are given.
    """
    pixels = to_digit_pixels(images)
    classifier, mu_real, sigma_real = _reference()
    mu, sigma = gaussian_stats(pixels)
    result = {'pixel_fd': max(frechet_distance(mu, sigma, mu_real, sigma_real), 0.0)}
    if labels is not None:
        labels = np.asarray(labels.detach().cpu() if torch.is_tensor(labels) else labels).reshape(-1)
        if labels.shape[0] != pixels.shape[0]:
            raise InputError(f"digits metric: {pixels.shape[0]} images but {labels.shape[0]} labels")
        predicted = classifier.predict(pixels * DIGITS_MAX_VALUE)
        result['digit_accuracy'] = float((predicted == labels).mean())
    return result
