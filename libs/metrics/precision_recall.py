"""Improved precision and recall (Kynkaanniemi et al. 2019, arXiv 1904.06991), as the ADM evaluator computes them.

Each set's manifold is the union of balls around its features whose radius is the distance to the k-th
nearest other feature of the same set (k = 3, ADM's `nhood_sizes=[3]`). Precision is the fraction of
sample features inside the reference manifold, recall the fraction of reference features inside the
sample manifold. ADM compares squared Euclidean distances with `<=`; equal to the k-NN distances here.
Pairwise distances are computed in blocks of `block` rows (4096 x 50k float64 = 1.6 GB), so no n x n matrix
is held.
"""
import torch

from libs.errors import InputError

DEFAULT_K = 3


def _squared_distances(a, b):
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]).clamp_min_(0)


def manifold_radii(features, k=DEFAULT_K, block=4096):
    """(n,) squared distance from each row of features (n, d) to its k-th nearest other row."""
    if len(features) <= k:
        raise InputError(f"precision/recall with k = {k} needs more than {k} features per set, got {len(features)}")
    radii = [torch.kthvalue(_squared_distances(features[s:s + block], features), k + 1, dim=1).values
             for s in range(0, len(features), block)]  # k + 1: the row itself is at distance 0
    return torch.cat(radii)


def _inside(points, centres, radii, block):
    """(len(points),) bool: the point lies in some ball (centre, radius^2)."""
    return torch.cat([(_squared_distances(points[s:s + block], centres) <= radii[None, :]).any(1)
                      for s in range(0, len(points), block)])


def precision_recall(real, fake, k=DEFAULT_K, block=4096, device=None):
    """(precision, recall) of fake (n2, d) against real (n1, d) feature sets, in float64 on `device`."""
    real, fake = (torch.as_tensor(a).to(device or "cpu", torch.float64) for a in (real, fake))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise InputError(f"precision/recall needs two (n, d) feature sets of the same d, got {tuple(real.shape)} "
                         f"and {tuple(fake.shape)}")
    real_radii, fake_radii = manifold_radii(real, k, block), manifold_radii(fake, k, block)
    precision = _inside(fake, real, real_radii, block).double().mean()
    recall = _inside(real, fake, fake_radii, block).double().mean()
    return float(precision), float(recall)
