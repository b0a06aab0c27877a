"""Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs", arXiv 1801.01401).

KID is the unbiased estimate of the squared MMD between two feature sets under the cubic polynomial
kernel k(x, y) = (x . y / d + 1)^3, averaged over random subsets (the paper and torch-fidelity:
100 subsets of 1000 features from each side, drawn without replacement):

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
              - 2 sum_{i, j} k(x_i, y_j) / m^2
"""
import numpy as np
import torch

from libs.errors import InputError

DEFAULT_SUBSETS = 100
DEFAULT_SUBSET_SIZE = 1000


def polynomial_mmd(x, y):
    """Unbiased squared MMD of x (m, d) and y (m, d) (float64 tensors) under (x . y / d + 1)^3."""
    d, m = x.shape[1], x.shape[0]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * kxy.mean())


def kernel_inception_distance(real, fake, subsets=DEFAULT_SUBSETS, subset_size=DEFAULT_SUBSET_SIZE, seed=0,
                              device=None):
    """(mean, std) over `subsets` of polynomial_mmd between random subsets of real (n1, d) and fake (n2, d).

    subset_size is capped by the smaller set (it must hold at least 2). The subsets are drawn by a torch
    generator seeded with `seed`, so the value is a function of the two feature sets (in index order) only.
    """
    real, fake = (torch.as_tensor(np.asarray(a)).to(device or "cpu", torch.float64) for a in (real, fake))
    m = min(subset_size, len(real), len(fake))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1] or m < 2:
        raise InputError(f"KID needs two (n, d) feature sets of the same d, n >= 2 (and subset_size >= 2), got "
                         f"{tuple(real.shape)} and {tuple(fake.shape)}")
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        i, j = torch.randperm(len(real), generator=g)[:m], torch.randperm(len(fake), generator=g)[:m]
        values.append(polynomial_mmd(real[i.to(real.device)], fake[j.to(fake.device)]))
    return float(np.mean(values)), float(np.std(values))
