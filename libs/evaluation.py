"""Sharded, per-image-seeded sampling scored by FID and Inception Score, in-process.

`evaluate` is the one scoring path: the eval scripts (through `run_evaluation`) and training's
periodic FID both call it. Image i of an evaluation is a function of (seed, i) only: the
caller's `generate_fn` draws its noise with `libs.family.per_index_noise` (or the generators of
`libs.family.index_generators`), and labels / captions come from tables indexed by i. The indices
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

import torch
from absl import flags
from ml_collections import config_flags
from PIL import Image
from tqdm import tqdm

from libs import fid
from libs.autoencoder import get_model
from libs.checkpoint import load_nnet_weights
from libs.config_utils import define_config_flag, parse_and_validate
from libs.data_loader import mix_seed
from libs.datasets.features import caption_contexts
from libs.errors import ConfigError, InputError, MissingFileError, exit_on_user_error
from libs.family import Sampler
from libs.saved_config import check_objective
from libs.io_utils import atomic_path
from libs.logging_utils import setup_logging
from libs.nnet import build_nnet, load_nnet_state_dict
from libs.perf import configure_tf32
from tools.inception import load_fid_inception

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
    device = accelerator.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _evaluate(accelerator, generate_fn, n_samples, mini_batch_size, fid_stat, seed, inception_weights,
                         keep_path, is_splits, desc)


def _evaluate(accelerator, generate_fn, n_samples, mini_batch_size, fid_stat, seed, inception_weights, keep_path,
              is_splits, desc):
    ref_mu, ref_sigma = fid.load_statistics(fid_stat)  # fail before hours of sampling, not after
    if ref_mu.shape != (2048,):
        raise ConfigError(f"FID statistics '{fid_stat}' are {ref_mu.shape[0]}-d; FID uses the 2048-d pool3 features. "
                         f"Recompute them with tools/compute_fid_stats.py")
    device = accelerator.device
    inception = load_fid_inception(inception_weights, device=device)
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = shard_indices(n_samples, rank, world, mini_batch_size)
    splits = min(is_splits, n_samples)
    stats = fid.InceptionStatistics(splits=splits, device=device)
    if keep_path and accelerator.is_main_process:
        os.makedirs(keep_path, exist_ok=True)
    start = time.time()
    with tqdm(total=sum(len(b) for b in batches), desc=desc, unit="img", disable=not accelerator.is_main_process) as bar:
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
    value = fid.frechet_distance(mu, sigma, ref_mu, ref_sigma, device=device if device.type == "cuda" else None)
    is_mean, is_std = stats.inception_score()
    logger.info("scored %d images in %.1f s: FID %.4f, IS %.3f +- %.3f", n, time.time() - start, value, is_mean, is_std)
    return {"fid": value, "inception_score": is_mean, "inception_score_std": is_std, "n": n}


def generate_all(accelerator, generate_fn, n_samples, mini_batch_size) -> torch.Tensor:
    """All n_samples images (n, 3, H, W) on the CPU of every process, each made by the process owning its
    index (the batches of `shard_indices`). For scores computed on the images themselves (digits)."""
    from accelerate.utils import gather_object  # heavy

    batches = shard_indices(n_samples, accelerator.process_index, accelerator.num_processes, mini_batch_size)
    parts = [(idx, generate_fn(idx).cpu()) for idx in batches]
    out = None
    for idx, images in gather_object(parts) if accelerator.num_processes > 1 else parts:
        if out is None:
            out = torch.empty((n_samples, *images.shape[1:]), dtype=images.dtype)
        out[idx] = images
    return out


def load_models(config, family, nnet_path, device, autoencoder_path=None):
    """(network in eval mode, autoencoder or None) on `device` for sampling; the autoencoder (latent
    families) from autoencoder_path or config.autoencoder.pretrained_path, with the config's scale factor."""
    check_objective(config, nnet_path)  # weights of another objective: one line, before loading
    nnet = build_nnet(config.nnet)
    load_nnet_state_dict(nnet, load_nnet_weights(nnet_path))
    nnet = nnet.to(device).eval().requires_grad_(False)
    autoencoder = None
    if family.data == "latents":
        autoencoder = get_model(autoencoder_path or config.autoencoder.pretrained_path,
                                config.autoencoder.scale_factor).to(device)
    return nnet, autoencoder


# -- the engine of eval.py, eval_ldm.py, eval_ldm_discrete.py, eval_t2i_discrete.py ----------------

def define_flags():
    """--config (file + --config.a.b=value overrides), --nnet_path, --output_path, --inception_weights."""
    define_config_flag("config", help_string="path of the configuration file (configs/X.py)")
    flags.DEFINE_string("nnet_path", None, "network weights: a .pth state dict or a checkpoint directory "
                                           "(<workdir>/ckpts/<step>.ckpt, whose EMA network is used)", required=True)
    flags.DEFINE_string("output_path", None, "log file to append the evaluation log to")
    flags.DEFINE_string("inception_weights", None, "pt_inception-2015-12-05-6726825d.pth; default: the torch hub "
                                                   "cache (config.fid.inception_weights when set)")


def main_for(family):
    """The absl main of an eval*.py script that evaluates `family`."""
    def main(argv):
        del argv
        f = flags.FLAGS
        run_evaluation(f.config, f.nnet_path, family, output_path=f.output_path,
                       inception_weights=f.inception_weights,
                       config_path=config_flags.get_config_filename(f["config"]))
    return exit_on_user_error(main)


def run_evaluation(config, nnet_path, family, output_path=None, inception_weights=None, config_path=None):
    """Sample config.sample.n_samples images with the protocol of config.sample and score them.

    Reads only the weights, the autoencoder (latent families), config.fid.stat and, for text-to-image,
    the caption contexts of <config.dataset.path>/val and its empty_context.npy; never the training data.
    The protocol (`Family.protocol(config, 'sample')`): config.sample.algorithm, sample_steps, guidance
    scale (when config.sample.cfg); labels uniform over the config's classes (seeded by config.seed).
    `family` is the script's: a config of another family is a ConfigError naming the right script.
    Returns the dict of `evaluate` (on every rank).
    """
    from accelerate import Accelerator  # heavy

    if config is None:
        raise ConfigError("no config given: pass --config=configs/<name>.py")
    family = family.for_config(config, "eval")
    if not config.fid.stat:
        raise ConfigError("config.fid.stat names no FID reference statistics, so FID cannot be computed; compute "
                          "them with tools/compute_fid_stats.py and set --config.fid.stat=<file.npz>")
    accelerator = Accelerator()
    device = accelerator.device
    setup_logging(accelerator.is_main_process, output_path)
    configure_tf32(config.tf32)
    parse_and_validate(config, world_size=accelerator.num_processes)
    s = config.sample
    algorithm, steps, scale = family.protocol(config, "sample")
    contexts = empty_context = None
    if family.condition == "text":
        contexts, empty_context = caption_contexts(config.dataset.path)
        if scale > 0 and empty_context is None:
            raise MissingFileError(f"guided sampling needs the empty prompt's context {config.dataset.path}/"
                                   f"empty_context.npy: make it with scripts/extract_empty_feature.py")
    nnet, autoencoder = load_models(config, family, nnet_path, device)
    sampler = Sampler.for_config(config, family, nnet, device, autoencoder,
                                 family.null_condition(config, empty_context) if scale > 0 else None)
    generate_fn = sampler.generate_fn(algorithm, steps, scale, family.sample_labels(config, s.n_samples), contexts)
    logger.info("evaluating %s (%s) on %d process(es), mixed precision %s: %s, %d steps, guidance scale %g, "
                "%d samples", nnet_path, family, accelerator.num_processes, accelerator.mixed_precision, algorithm,
                steps, scale, s.n_samples)
    weights = inception_weights or config.fid.inception_weights
    with accelerator.autocast():
        result = evaluate(accelerator, generate_fn, int(s.n_samples), int(s.mini_batch_size), config.fid.stat,
                          int(config.seed), inception_weights=weights, keep_path=s.get("path", "") or None)
    logger.info("config=%s nnet_path=%s sampler=%s steps=%d scale=%g n_samples=%d FID=%.4f IS=%.3f",
                config_path or config.dataset.name, nnet_path, algorithm, steps, scale, result["n"],
                result["fid"], result["inception_score"])
    return result
