"""Improved precision and recall (Kynkaanniemi et al. 2019, arXiv 1904.06991), as the ADM evaluator computes them.

Each set's manifold is the union of balls around its features whose radius is the distance to the k-th
nearest other feature of the same set (k = 3, ADM's `nhood_sizes=[3]`). Precision is the fraction of
sample features inside the reference manifold, recall the fraction of reference features inside the
sample manifold. ADM compares squared Euclidean distances with `<=`; equal to the k-NN distances here.
Pairwise distances are computed in blocks of `block` rows (4096 x 50k float64 = 1.6 GB), so no n x n matrix
is held.

Arithmetic (`ARITHMETICS`): 'float64' (the default) evaluates the written formula
|a|^2 - 2 a.b + |b|^2 in float64. 'adm' rounds as ADM's evaluator (guided-diffusion's DistanceBlock): the
float32 features cast to float16, squares, row sums, the product a.b (float32 accumulation of the exact
float16 products, as its GPU matmul) and each addition rounded to float16, clamped at 0; where a block holds
a non-finite value (float16 overflows above 65504) the block is recomputed in float32, as ADM's does. ADM's
tables were made this way; near-ties then fall differently, which moves precision / recall by ~1e-2 at a few
hundred samples (docs/evaluation.md). ADM's fallback blocks are 10,000 x 10,000; here a row block against
all columns, which differs only when some but not all of those blocks overflow.
"""
import torch

from libs.errors import InputError

DEFAULT_K = 3
ARITHMETICS = ("float64", "adm")


def _squared_distances(a, b):
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]).clamp_min_(0)


def _adm_squared_distances(a, b):
    """ADM's float16 pairwise squared distances of float32 a (m, d), b (n, d), returned as float64 (exact)."""
    def in_dtype(dtype):
        a_, b_ = a.to(dtype), b.to(dtype)
        norm_a = (a_ * a_).float().sum(1).to(dtype)  # squares rounded to dtype, summed in float32
        norm_b = (b_ * b_).float().sum(1).to(dtype)
        ab = (a_.float() @ b_.float().T).to(dtype)
        return ((norm_a[:, None] - 2 * ab) + norm_b[None, :]).clamp_min(0)
    d = in_dtype(torch.float16)
    if not bool(torch.isfinite(d).all()):
        d = in_dtype(torch.float32)
    return d.double()


def manifold_radii(features, k=DEFAULT_K, block=4096, distances=_squared_distances):
    """(n,) squared distance from each row of features (n, d) to its k-th nearest other row."""
    assert len(features) > k, (len(features), k)  # precision_recall checks its sets
    radii = [torch.kthvalue(distances(features[s:s + block], features), k + 1, dim=1).values
             for s in range(0, len(features), block)]  # k + 1: the row itself is at distance 0
    return torch.cat(radii)


def _inside(points, centres, radii, block, distances):
    """(len(points),) bool: the point lies in some ball (centre, radius^2)."""
    return torch.cat([(distances(points[s:s + block], centres) <= radii[None, :]).any(1)
                      for s in range(0, len(points), block)])


def precision_recall(real, fake, k=DEFAULT_K, block=4096, device=None, arithmetic="float64"):
    """(precision, recall) of fake (n2, d) against real (n1, d) feature sets on `device`; arithmetic: 'float64'
    (the formula as written) or 'adm' (ADM's float16 distances on float32 features; module docstring)."""
    assert arithmetic in ARITHMETICS, arithmetic  # config.metrics.prc_arithmetic / --prc_arithmetic checked there
    dtype, distances = ((torch.float64, _squared_distances) if arithmetic == "float64"
                        else (torch.float32, _adm_squared_distances))
    real, fake = (torch.as_tensor(a).to(device or "cpu", dtype) for a in (real, fake))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1] or min(len(real), len(fake)) <= k:
        raise InputError(f"precision/recall with k = {k} needs two (n, d) feature sets of the same d, n > k, got "
                         f"{tuple(real.shape)} and {tuple(fake.shape)}")
    real_radii, fake_radii = (manifold_radii(x, k, block, distances) for x in (real, fake))
    precision = _inside(fake, real, real_radii, block, distances).double().mean()
    recall = _inside(real, fake, fake_radii, block, distances).double().mean()
    return float(precision), float(recall)
