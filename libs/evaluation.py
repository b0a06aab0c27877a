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

import torch
from PIL import Image
from tqdm import tqdm

from libs import fid
from libs.data_loader import mix_seed
from libs.errors import ConfigError, InputError, exit_on_user_error
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
    device = accelerator.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _evaluate(accelerator, generate_fn, n_samples, mini_batch_size, fid_stat, seed, inception_weights,
                         keep_path, is_splits, desc)


def _evaluate(accelerator, generate_fn, n_samples, mini_batch_size, fid_stat, seed, inception_weights, keep_path,
              is_splits, desc):
    ref_mu, ref_sigma = fid.load_statistics(fid_stat)  # fail before hours of sampling, not after
    if ref_mu.shape != (2048,):
        raise InputError(f"FID statistics '{fid_stat}' are {ref_mu.shape[0]}-d; FID uses the 2048-d pool3 features. "
                         f"Recompute them with tools/compute_fid_stats.py")
    from tools.inception import load_fid_inception

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


# -- the engine of eval.py, eval_ldm.py, eval_ldm_discrete.py, eval_t2i_discrete.py ----------------

def define_flags():
    """--config (file + --config.a.b=value overrides), --nnet_path, --output_path, --inception_weights."""
    from absl import flags

    from libs.config_utils import define_config_flag

    define_config_flag("config", help_string="path of the configuration file (configs/X.py)")
    flags.DEFINE_string("nnet_path", None, "network weights: a .pth state dict or a checkpoint directory "
                                           "(<workdir>/ckpts/<step>.ckpt, whose EMA network is used)", required=True)
    flags.DEFINE_string("output_path", None, "log file to append the evaluation log to")
    flags.DEFINE_string("inception_weights", None, "pt_inception-2015-12-05-6726825d.pth; default: the torch hub "
                                                   "cache (config.fid.inception_weights when set)")


def main_for(family):
    """The absl main of an eval*.py script that evaluates `family`."""
    def main(argv):
        from absl import flags
        from ml_collections import config_flags

        del argv
        f = flags.FLAGS
        run_evaluation(f.config, f.nnet_path, family, output_path=f.output_path,
                       inception_weights=f.inception_weights,
                       config_path=config_flags.get_config_filename(f["config"]))
    return exit_on_user_error(main)


def run_evaluation(config, nnet_path, family, output_path=None, inception_weights=None, config_path=None):
    """Sample config.sample.n_samples images with the protocol of config.sample and score them.

    The protocol: config.sample.algorithm ('dpm_solver' = the paper's solver for the family's time
    kind), sample_steps, guidance scale (when config.sample.cfg), labels drawn by the dataset's
    sample_labels (seeded by config.seed) or the dataset's FID caption contexts, latents decoded by
    the autoencoder in chunks. Returns the dict of `evaluate` (on every rank).
    """
    from accelerate import Accelerator

    from libs.checkpoint import load_nnet_weights
    from libs.config_utils import parse_and_validate
    from libs.datasets import get_dataset
    from libs.logging_utils import setup_logging
    from libs.nnet import build_nnet, load_nnet_state_dict
    from libs.trainer import dataset_kwargs
    from sde import build_diffusion

    if config is None:
        raise ConfigError("no config given: pass --config=configs/<name>.py")
    accelerator = Accelerator()
    device = accelerator.device
    setup_logging(accelerator.is_main_process, output_path)
    torch.backends.cuda.matmul.allow_tf32 = bool(config.get("tf32", True))
    torch.backends.cudnn.allow_tf32 = bool(config.get("tf32", True))
    parse_and_validate(config, world_size=accelerator.num_processes)
    family = family.for_config(config)
    s = config.sample
    scale = float(s.scale) if s.cfg else 0.0

    # Data: shapes, labels / captions to sample with, the reference statistics.
    data = get_dataset(config.dataset.name, **dataset_kwargs(config))
    family.check(config, data)
    if not data.fid_stat:
        raise ConfigError(f"dataset {config.dataset.name!r} defines no FID reference statistics, so FID cannot be "
                          f"computed for it; for your own images compute them with tools/compute_fid_stats.py and "
                          f"name them in the config (image_folder datasets: config.dataset.fid_stat='<file.npz>')")
    shape = tuple(config.z_shape) if family.data == "latents" else tuple(data.data_shape)
    labels = contexts = None
    if family.condition == "label":
        labels = data.sample_labels(int(s.n_samples), torch.Generator().manual_seed(int(config.seed)))
    elif family.condition == "text":
        contexts = getattr(data, "fid_contexts", None)
        if contexts is None:
            raise ConfigError(f"dataset {config.dataset.name!r} gives no caption contexts to sample with (the "
                              f"MS-COCO val2014 features); extract them with scripts/extract_mscoco_feature.py")
    null = family.null_condition(config, data) if scale > 0 else None

    # Models.
    nnet = build_nnet(config.nnet)
    load_nnet_state_dict(nnet, load_nnet_weights(nnet_path))
    nnet = nnet.to(device).eval().requires_grad_(False)
    autoencoder = None
    if family.data == "latents":
        from libs.autoencoder import get_model

        autoencoder = get_model(config.autoencoder.pretrained_path, config.autoencoder.scale_factor).to(device)
    diffusion = build_diffusion(family.time)
    generate_fn = family.make_generate_fn(nnet, diffusion, shape=shape, seed=int(config.seed), device=device,
                                          algorithm=s.algorithm, steps=int(s.sample_steps), scale=scale, null=null,
                                          labels=labels, contexts=contexts, autoencoder=autoencoder)
    logger.info("evaluating %s (%s) on %d process(es), mixed precision %s: %s, %d steps, guidance scale %g, "
                "%d samples", nnet_path, family, accelerator.num_processes, accelerator.mixed_precision, s.algorithm,
                s.sample_steps, scale, s.n_samples)

    # Sample and score.
    weights = inception_weights or config.get("fid", {}).get("inception_weights", None)
    with accelerator.autocast():
        result = evaluate(accelerator, generate_fn, int(s.n_samples), int(s.mini_batch_size), data.fid_stat,
                          int(config.seed), inception_weights=weights, keep_path=s.get("path", "") or None)
    logger.info("config=%s nnet_path=%s sampler=%s steps=%d scale=%g n_samples=%d FID=%.4f IS=%.3f",
                config_path or config.dataset.name, nnet_path, s.algorithm, s.sample_steps, scale, result["n"],
                result["fid"], result["inception_score"])
    return result
