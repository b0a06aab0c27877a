"""Sharded, per-image-seeded sampling scored by FID and Inception Score, in-process.

`evaluate` is the one scoring path: the eval scripts (through `run_evaluation`) and training's
periodic FID both call it. Image i of an evaluation is a function of (seed, i) only: the
caller's `generate_fn` draws its noise with `libs.family.per_index_noise` (or the generators of
`index_generators`), and labels / captions come from tables indexed by i. The indices
0..n_samples-1 are dealt to the processes as rank::world_size, so 1 or 8 processes make the
same images (up to kernel nondeterminism) and exactly n_samples of them.

Every batch is quantised as a PNG round trip would (libs.fid.quantize_like_png), scored by the
FID Inception network on the device that made it, and added to float64 sums; one all-reduce at
the end merges the processes, and every rank computes the FID (none waits alone in a collective
while rank 0 computes, which the original risked on long evaluations).
"""
import logging
import math
import os
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from libs import fid
from libs.data_loader import mix_seed
from libs.errors import ConfigError, InputError
from libs.io_utils import atomic_path

logger = logging.getLogger(__name__)


def shard_indices(n_samples, rank, world_size, mini_batch_size):
    """The batches (LongTensors) of global image indices that process `rank` generates.

    Rank r gets r, r + W, r + 2W, ... in ceil(ceil(n / W) / mini_batch_size) near-equal batches,
    so all ranks run the same number of batches (+-1 image each) and the union is 0..n-1 once.
    """
    if n_samples < 1 or mini_batch_size < 1:
        raise ConfigError(f"n_samples ({n_samples}) and mini_batch_size ({mini_batch_size}) must be positive")
    mine = torch.arange(rank, n_samples, world_size, dtype=torch.long)
    n_batches = math.ceil(math.ceil(n_samples / world_size) / mini_batch_size)
    return [b for b in torch.tensor_split(mine, n_batches) if b.numel() > 0]


def index_generators(seed, indices, device="cpu"):
    """One torch.Generator per image, seeded by (seed, i): for noise a sampler draws per step (SDE)."""
    return [torch.Generator(device=device).manual_seed(mix_seed(seed + 1, int(i))) for i in indices]


def _write_pngs(images, indices, folder):
    """Save quantised images (b, 3, H, W) in [0, 1] as <folder>/<index>.png, each atomically."""
    arrays = images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for a, i in zip(arrays, indices.tolist()):
        with atomic_path(os.path.join(folder, f"{i}.png")) as tmp:
            Image.fromarray(a).save(tmp, format="PNG")


def evaluate(accelerator, generate_fn, n_samples, mini_batch_size, fid_stat, seed, inception_weights=None,
             keep_path=None, is_splits=fid.DEFAULT_IS_SPLITS, desc="FID"):
    """Generate n_samples images over all processes and score them. Every rank must call this.

    generate_fn(indices: LongTensor (b,)) -> (b, 3, H, W) float in [0, 1]; image i must depend
        only on (seed, i) (see the module docstring). It must not call collectives.
    fid_stat: .npz with the reference 'mu' and 'sigma' (checked before any sampling).
    seed: seeds torch's default generators per batch (from (seed, first index)) for samplers that
        draw from them; the caller's generator states are restored afterwards.
    keep_path: folder to also write the samples to as <index>.png (None = write nothing).
    Returns {'fid', 'inception_score', 'inception_score_std', 'n'} (the same on every rank).
    """
    ref_mu, ref_sigma = fid.load_statistics(fid_stat)  # fail before hours of sampling, not after
    from tools.inception import load_fid_inception

    device = accelerator.device
    inception = load_fid_inception(inception_weights, device=device)
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = shard_indices(n_samples, rank, world, mini_batch_size)
    splits = min(is_splits, n_samples)
    stats = fid.InceptionStatistics(splits=splits, device=device)
    if keep_path and accelerator.is_main_process:
        os.makedirs(keep_path, exist_ok=True)
    fork_devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    start = time.time()
    with torch.random.fork_rng(devices=fork_devices), \
            tqdm(total=sum(len(b) for b in batches), desc=desc, unit="img", disable=not accelerator.is_main_process) as bar:
        for indices in batches:
            torch.manual_seed(mix_seed(seed, int(indices[0])))
            images = generate_fn(indices)
            if images.ndim != 4 or images.shape[0] != len(indices) or images.shape[1] != 3:
                raise InputError(f"generate_fn returned shape {tuple(images.shape)} for {len(indices)} indices; "
                                 f"expected ({len(indices)}, 3, H, W) in [0, 1]")
            images = fid.quantize_like_png(images.to(device))
            fid.accumulate(stats, inception, images, fid.split_ids(indices, n_samples, splits))
            if keep_path:
                os.makedirs(keep_path, exist_ok=True)
                _write_pngs(images, indices, keep_path)
            bar.update(len(indices))
    stats.reduce(accelerator)
    n = int(stats.n)
    if n != n_samples:  # internal invariant of the sharding
        raise RuntimeError(f"scored {n} images instead of {n_samples}")
    mu, sigma = stats.mean_and_covariance()
    if mu.shape != ref_mu.shape:
        raise InputError(f"FID statistics '{fid_stat}' are {ref_mu.shape[0]}-d but the features are {mu.shape[0]}-d")
    value = fid.frechet_distance(mu, sigma, ref_mu, ref_sigma)
    is_mean, is_std = stats.inception_score()
    logger.info("scored %d images in %.1f s: FID %.4f, IS %.3f +- %.3f", n, time.time() - start, value, is_mean, is_std)
    return {"fid": value, "inception_score": is_mean, "inception_score_std": is_std, "n": n}
