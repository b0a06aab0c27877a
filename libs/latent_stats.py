"""Per-channel statistics of an autoencoder's latents over a data set, for latent_scaling='data'
(libs/diffusers_autoencoder.py): z = (latent - mean) / std per channel, so every channel the network sees has
zero mean and unit variance (the per-channel normalisation of LightningDiT's VA-VAE latents, Yao et al. 2025,
arXiv 2501.01423).

Computed once, in the extraction's single pass, over the posterior means of every stored entry: each shard record
keeps its float64 count, sum and sum of squares per channel (`sums`), so processes need not talk; the main process
adds them up (`combine`) and writes `latent_stats.json` beside the shards (`save`):

    {"channels": C, "count": n, "mean": [C floats], "std": [C floats]}

count is the number of latent values per channel (entries x h x w).
"""
import dataclasses
import json
import os

import torch

from libs.errors import CheckpointError, require_path
from libs.shards import shard_name
from libs.io_utils import atomic_write_bytes

FILE = "latent_stats.json"


def sums(latent):
    """{'count', 'sum', 'sumsq'} of a (B, C, h, w) batch: per-channel float64 sums (JSON-able lists)."""
    x = latent.detach().to("cpu", torch.float64).transpose(0, 1).reshape(latent.shape[1], -1)
    return {"count": int(x.shape[1]), "sum": x.sum(1).tolist(), "sumsq": x.pow(2).sum(1).tolist()}


def add(a, b):
    """The sums of two disjoint parts; None is the empty part."""
    if a is None:
        return b
    return {"count": a["count"] + b["count"], "sum": [x + y for x, y in zip(a["sum"], b["sum"])],
            "sumsq": [x + y for x, y in zip(a["sumsq"], b["sumsq"])]}


@dataclasses.dataclass(frozen=True)
class LatentStats:
    mean: torch.Tensor  # (C,) float64
    std: torch.Tensor  # (C,) float64, population standard deviation
    count: int

    @classmethod
    def combine(cls, parts):
        """The statistics of the union of parts (each a `sums` dict)."""
        total = None
        for p in parts:
            total = add(total, p)
        n = total["count"]
        mean = torch.tensor(total["sum"], dtype=torch.float64) / n
        var = (torch.tensor(total["sumsq"], dtype=torch.float64) / n - mean ** 2).clamp_min(0.0)
        return cls(mean, var.sqrt(), n)

    def save(self, path):
        record = {"channels": int(self.mean.numel()), "count": int(self.count), "mean": self.mean.tolist(),
                  "std": self.std.tolist()}
        atomic_write_bytes(json.dumps(record, indent=1).encode(), path)

    @classmethod
    def load(cls, path):
        """From a latent_stats.json; MissingFileError / CheckpointError in one line."""
        require_path(path, "latent statistics", f"The extraction writes {FILE} beside the features "
                     "(scripts/extract_imagenet_feature.py); point config.autoencoder.latent_stats at it", kind='file')
        try:
            with open(path) as f:
                r = json.load(f)
            mean, std = (torch.tensor(r[k], dtype=torch.float64) for k in ("mean", "std"))
            count = int(r["count"])
            problem = (None if mean.shape == std.shape and mean.ndim == 1 and bool((std > 0).all()) else
                       "mean and std must be lists of one length, std positive")
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = str(e)
        if problem:
            raise CheckpointError(f"cannot read latent statistics '{path}': {problem}; extract them again")
        return cls(mean, std, count)


def save_from_shards(folder, num_shards):
    """Combine the `latent_sums` of shards 0..num_shards-1 of a packed feature folder into <folder>/latent_stats.json;
    returns the LatentStats, or None when a shard has none (extracted before the statistics were kept)."""
    parts = []
    for k in range(num_shards):
        with open(os.path.join(folder, shard_name(k) + ".json")) as f:
            part = json.load(f).get("latent_sums")
        if part is None:
            return None
        parts.append(part)
    stats = LatentStats.combine(parts)
    stats.save(os.path.join(folder, FILE))
    return stats
