"""FID and Inception Score statistics: PNG quantisation, streaming moments, the distances.

FID (Heusel et al. 2017, arXiv 1706.08500) fits a Gaussian to the 2048-d pool3 features of the FID Inception
network (libs/metrics/inception.py) on each image set: d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
Inception Score (Salimans et al. 2016, arXiv 1606.03498): IS = exp(E_x KL(p(y|x) || p(y))), averaged over `splits`
contiguous chunks of the samples.

Statistics are float64 sums (count, sum of features, sum of outer products; per IS split: count, sum of p(y|x),
sum of sum_y p log p), so batches from any number of processes merge exactly by addition and no 50,000 x 2048
feature matrix is ever held.
"""
import logging
import math
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from libs.errors import ConfigError, DataError, InputError, MissingFileError, require_path
from libs.io_utils import atomic_savez

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # as pytorch-fid
DEFAULT_IS_SPLITS = 10  # Salimans et al.'s reference code and every published IS table


def quantize_like_png(x):
    """x: (B, 3, H, W) float in [0, 1] -> float32 equal to a save_image PNG read back by ToTensor: save_image stores
    uint8(clamp(255 x + 0.5, 0, 255)) (round half up, in float32), ToTensor divides by 255; so in-process FID equals
    FID on the PNGs."""
    assert x.ndim == 4, x.shape  # the evaluation's and the tools' own image batches
    x = x.float()
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        raise InputError(f"images {bad[:10]} (batch positions) contain NaN or inf: the sampler diverged; check the "
                         f"checkpoint, the guidance scale and the number of steps")
    return x.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).float().div(255)


def split_ids(indices, n_total, splits):
    """IS split of each global sample index (long (b,)): split k holds the indices in
    [floor(k n_total / splits), floor((k + 1) n_total / splits)), the slices of Salimans et al.'s reference code
    and torch-fidelity. Index i is in split k iff floor(k n / s) <= i, i.e. k n < (i + 1) s, so
    k = floor(((i + 1) s - 1) / n)."""
    i = torch.as_tensor(indices, dtype=torch.long)
    return torch.div((i + 1) * splits - 1, int(n_total), rounding_mode="floor")


class InceptionStatistics:
    """Streaming float64 moments of Inception features and IS sums; mergeable across processes.
    dims: feature size (2048 for FID). splits: number of IS splits (0 = no IS)."""

    def __init__(self, dims=2048, splits=DEFAULT_IS_SPLITS, num_classes=1008, device="cpu"):
        self.dims, self.splits, self.num_classes = dims, splits, num_classes
        kw = dict(dtype=torch.float64, device=device)
        self.n = torch.zeros((), **kw)
        self.feature_sum = torch.zeros(dims, **kw)
        self.outer_sum = torch.zeros(dims, dims, **kw)
        self.split_n = torch.zeros(max(splits, 1), **kw)
        self.split_p_sum = torch.zeros(max(splits, 1), num_classes, **kw)
        self.split_plogp_sum = torch.zeros(max(splits, 1), **kw)

    def _tensors(self):
        return [self.n, self.feature_sum, self.outer_sum, self.split_n, self.split_p_sum, self.split_plogp_sum]

    def update(self, features, logits=None, splits_of_batch=None):
        """features: (b, dims); logits: (b, num_classes) or None; splits_of_batch: (b,) int in [0, splits)."""
        assert features.ndim == 2 and features.shape[1] == self.dims, (features.shape, self.dims)  # the Inception's
        f = features.to(self.feature_sum.device, torch.float64)
        self.n += f.shape[0]
        self.feature_sum += f.sum(0)
        self.outer_sum.addmm_(f.t(), f)
        if logits is None or self.splits == 0:
            return
        assert splits_of_batch is not None, "logits need their splits (libs.fid.split_ids)"
        logp = torch.log_softmax(logits.to(self.feature_sum.device, torch.float64), dim=1)
        p = logp.exp()
        s = torch.as_tensor(splits_of_batch, device=p.device, dtype=torch.long)
        self.split_n.index_add_(0, s, torch.ones_like(s, dtype=torch.float64))
        self.split_p_sum.index_add_(0, s, p)
        self.split_plogp_sum.index_add_(0, s, (p * logp).sum(1))

    def reduce(self, accelerator=None):
        """Sum the statistics of all processes in place (one collective; every rank must call it)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self
        flat = torch.cat([t.reshape(-1) for t in self._tensors()]).to(accelerator.device)
        flat = accelerator.reduce(flat, reduction="sum")
        offset = 0
        for t in self._tensors():
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return self

    def mean_and_covariance(self):
        """(mu (dims,), sigma (dims, dims)) as float64 numpy, sigma unbiased like numpy.cov."""
        n = float(self.n)
        if n < 2:
            raise DataError(f"FID needs at least 2 images (a covariance), got {int(n)}; give more images")
        mu = self.feature_sum / n
        sigma = (self.outer_sum - n * torch.outer(mu, mu)) / (n - 1)
        sigma = (sigma + sigma.t()) / 2  # remove rounding asymmetry
        return mu.cpu().numpy(), sigma.cpu().numpy()

    def inception_score(self):
        """(mean, std) over the non-empty splits of exp(mean_x sum_y p log p - sum_y pbar log pbar)."""
        if self.splits == 0 or float(self.split_n.sum()) == 0:
            return float("nan"), float("nan")
        scores = []
        for k in range(self.splits):
            nk = float(self.split_n[k])
            if nk == 0:
                continue
            pbar = self.split_p_sum[k] / nk
            entropy_of_mean = -(pbar * torch.log(pbar.clamp_min(1e-300))).sum()
            scores.append(math.exp(float(self.split_plogp_sum[k]) / nk + float(entropy_of_mean)))
        return float(np.mean(scores)), float(np.std(scores))


def frechet_distance(mu1, sigma1, mu2, sigma2, device=None):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 on `device` (default CPU).

    Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, equal to those of the symmetric PSD
    L^T S1 L with S2 = L L^T (Cholesky): one symmetric eigenvalue problem replaces scipy.linalg.sqrtm of the
    non-symmetric S1 S2 (no complex arithmetic, ~10x faster at 2048-d). The factored side is whichever is positive
    definite (50k-image reference statistics are; a few generated images are not); if neither, the symmetric root
    S1^(1/2) S2 S1^(1/2) is used. Rounding can make tiny eigenvalues negative: clipped to 0, warned if not tiny.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    problems = [f"mismatched shapes mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape} (both sides must "
                "come from the same Inception layer, 2048-d pool3)"] if (mu1.shape, mu2.shape, s1.shape, s2.shape) != (
        (d,), (d,), (d, d), (d, d)) else []
    problems += [f"{name} contains NaN or inf" for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2),
                                                                ("sigma2", s2)) if not np.isfinite(a).all()]
    if problems:
        raise InputError(f"FID statistics: {'; '.join(problems)}")
    a, b = (torch.from_numpy(m).to(device or "cpu") for m in (s1, s2))
    a, b = (a + a.T) / 2, (b + b.T) / 2
    for other, factored in ((a, b), (b, a)):
        chol, info = torch.linalg.cholesky_ex(factored)
        if int(info) == 0:
            m = chol.T @ other @ chol
            break
    else:
        w, v = torch.linalg.eigh(a)
        _warn_if_negative(w, "sigma1")
        root = (v * w.clamp_min(0).sqrt()) @ v.T
        m = root @ b @ root
    w = torch.linalg.eigvalsh((m + m.T) / 2)
    _warn_if_negative(w, "the product of the covariances")
    tr_covmean = float(w.clamp_min(0).sqrt().sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _warn_if_negative(eigenvalues, what):
    scale = max(float(eigenvalues.abs().max()), 1e-300)
    if float(eigenvalues.min()) < -1e-6 * scale:
        logger.warning("%s has a negative eigenvalue %.3g (largest %.3g): a covariance is not positive "
                       "semi-definite beyond rounding; the FID may be inaccurate", what, float(eigenvalues.min()), scale)


def load_statistics(path):
    """(mu, sigma) float64 from an .npz with arrays 'mu' and 'sigma' (pytorch-fid / upstream format)."""
    require_path(path, "FID reference statistics", "Download the published file into assets/fid_stats/ (see "
                 "docs/evaluation.md) or compute it from your images: python tools/compute_fid_stats.py "
                 f"--path=<image folder> --output={path}", kind='file')
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        problem = (f"mu {mu.shape} and sigma {sigma.shape}, expected (D,) and (D, D)"
                   if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) else
                   None if np.isfinite(mu).all() and np.isfinite(sigma).all() else "NaN or inf")
    except Exception as e:  # a truncated or foreign file fails in many ways inside numpy
        problem = f"cannot read it ({type(e).__name__}: {e})"
    if problem:
        raise ConfigError(f"FID statistics '{path}': {problem}; it must be an .npz with finite arrays 'mu' (2048,) and "
                          "'sigma' (2048, 2048). Recompute it with tools/compute_fid_stats.py")
    return mu, sigma


def save_statistics(path, stats, source, **extra):
    """Write mu, sigma (float64), n, a description of the source and any `extra` arrays atomically to `path`."""
    mu, sigma = stats.mean_and_covariance()
    atomic_savez(path, mu=mu, sigma=sigma, n=np.int64(stats.n), source=np.array(str(source)), **extra)
    logger.info("wrote FID statistics of %d images (%s) to %s", int(stats.n), source, path)


@torch.no_grad()
def accumulate(stats, model, images, splits_of_batch=None):
    """Feed a batch (b, 3, H, W) in [0, 1] (already quantised) through `model` into `stats`, in float32 with
    autocast off: fp16 features would shift the FID."""
    device = next(model.parameters()).device
    images = images.to(device, non_blocking=True)
    with torch.autocast(device_type=device.type, enabled=False):
        if stats.splits and stats.dims == 2048:
            features, logits = model(images, with_logits=True)
        else:
            features, logits = model(images, dims=stats.dims), None
    stats.update(features, logits, splits_of_batch)


class ImageFolder(torch.utils.data.Dataset):
    """The images of one folder (not recursive), sorted by name, as float (3, H, W) in [0, 1], read like
    pytorch-fid: PIL -> RGB -> ToTensor."""

    where = ""  # where the images are looked for, below the folder (for the message)

    def __init__(self, path):
        self.files = self.list_files(path) if os.path.isdir(path) else None
        if not self.files:
            raise MissingFileError(f"image folder '{path}' does not exist (or is not a folder)" if self.files is None else
                                   f"no images in folder '{path}'{self.where}")

    @staticmethod
    def list_files(path):
        return sorted(os.path.join(path, f) for f in os.listdir(path) if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as im:
                a = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise DataError(f"cannot read image '{self.files[i]}' ({type(e).__name__}: {e}); remove or replace it") from e
        return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div(255)


def _collate_same_size(batch):
    sizes = {tuple(x.shape) for x in batch}
    if len(sizes) > 1:
        raise DataError(f"images of different sizes {sorted(sizes)} in one folder; resize them to one size first")
    return torch.stack(batch)


def dataset_statistics(dataset, model, batch_size=50, num_workers=0, splits=DEFAULT_IS_SPLITS, dims=2048,
                       accelerator=None, desc="Inception features"):
    """InceptionStatistics of a dataset of (3, H, W) images in [0, 1], sharded over processes if given.

    Items are split as rank::world_size and the result is reduced over processes.
    """
    n = len(dataset)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = next(model.parameters()).device
    stats = InceptionStatistics(dims=dims, splits=splits, device=device)
    order = torch.arange(rank, n, world)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order.tolist()), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate_same_size)
    start = 0
    for images in tqdm(loader, desc=desc, disable=rank != 0, unit="batch"):
        idx = order[start:start + images.shape[0]]
        start += images.shape[0]
        accumulate(stats, model, images, split_ids(idx, n, splits) if splits else None)
    return stats.reduce(accelerator)
