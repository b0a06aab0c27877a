"""Sharded, per-image-seeded sampling scored in-process by FID, Inception Score and the metrics of config.metrics.

`evaluate` is the one scoring path: the eval scripts (through `run_evaluation`) and training's
periodic FID both call it. Image i of an evaluation is a function of (seed, i) only: the
caller's `generate_fn` draws its noise with `libs.sampling.per_index_noise` (or the generators of
`libs.sampling.index_generators`), and labels / captions come from tables indexed by i. The indices
0..n_samples-1 are dealt to the processes as rank::world_size, so 1 or 8 processes make the
same images (up to kernel nondeterminism) and exactly n_samples of them.

Every batch is quantised as a PNG round trip would (libs.fid.quantize_like_png), scored by the
FID Inception network on the device that made it, and added to float64 sums; one all-reduce at
the end merges the processes, and every rank computes the FID (none waits alone in a collective
while rank 0 computes, which the original risked on long evaluations). The other metrics (libs/metrics/suite.py:
sFID, precision/recall, KID, FD-DINOv2, CLIP score) are fed from the same batches; the images can also be
streamed into an ADM-suite .npz (libs/metrics/sample_file.py), and `run_evaluation` repeats the evaluation
for each seed of config.metrics.seeds and writes one JSON record.
"""
import dataclasses
import json
import logging
import math
import os
import time

import numpy as np
import torch
from absl import flags
from ml_collections import config_flags
from PIL import Image
from tqdm import tqdm

from libs import fid
from libs.autoencoder import autoencoder_of
from libs.config_utils import define_config_flag, parse_and_validate
from libs.data_loader import mix_seed
from libs.datasets import dataset_kwargs, get_dataset, get_dataset_class
from libs.datasets.features import caption_contexts
from libs.errors import ConfigError, InputError, MissingFileError, exit_on_user_error
from libs.export import check_objective, config_of_weights, load_weights
from libs.family import describe_guidance
from libs.folder_score import MAX_SAMPLES as OFFLINE_SAMPLES
from libs.sampling import Sampler
from libs.io_utils import atomic_path, atomic_write_bytes
from libs.logging_utils import setup_logging
from libs.metrics.sample_file import ShardedSampleWriter, to_uint8_hwc
from libs.metrics.suite import (MetricOptions, MetricSuite, check_reference, check_reference_dims, load_networks,
                               load_reference)
from libs.nnet import build_nnet, load_nnet_state_dict
from libs.perf import configure_tf32

logger = logging.getLogger(__name__)


def shard_indices(n_samples, rank, world_size, mini_batch_size):
    """The batches (LongTensors) of global image indices that process `rank` generates.

    Rank r gets r, r + W, r + 2W, ... in ceil(ceil(n / W) / mini_batch_size) near-equal batches,
    so all ranks run the same number of batches (+-1 image each) and the union is 0..n-1 once.
    """
    assert n_samples >= 1 and mini_batch_size >= 1, "config.sample / config.fid checked them (config_utils)"
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
             keep_path=None, is_splits=fid.DEFAULT_IS_SPLITS, desc="FID", metrics=None, networks=None, npz_path=None,
             labels=None, prompts=None):
    """Generate n_samples images over all processes and score them. Every rank must call this.

    generate_fn(indices: LongTensor (b,)) -> (b, 3, H, W) float in [0, 1]; image i must depend
        only on (seed, i) (see the module docstring). It must not call collectives.
    fid_stat: the reference .npz (statistics 'mu', 'sigma', ... or an ADM reference batch; checked before
        any sampling) unless metrics.reference names one.
    seed: seeds torch's default generators per batch (from (seed, first index)) for samplers that
        draw from them; the caller's generator states are restored afterwards.
    keep_path: folder to also write the samples to as <index>.png (None = write nothing).
    metrics: a libs.metrics.suite.MetricOptions (None = FID and IS with inception_weights and is_splits).
    networks: the feature networks ({'inception': ..., ...}; None = loaded for `metrics` from local files).
    npz_path: also write the scored images as an ADM-suite .npz there (labels, when given, as 'arr_1').
    prompts: prompt of each image (sequence of str), for the CLIP score.
    Returns {'fid', 'inception_score', 'inception_score_std', ..., 'n'} (the same on every rank).
    """
    device = accelerator.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        options = metrics or MetricOptions(inception_weights=inception_weights, is_splits=is_splits)
        options = dataclasses.replace(options, reference=options.reference or fid_stat)
        return _evaluate(accelerator, generate_fn, n_samples, mini_batch_size, seed, options, networks, keep_path,
                         npz_path, labels, prompts, desc)


def _evaluate(accelerator, generate_fn, n_samples, mini_batch_size, seed, options, networks, keep_path, npz_path,
              labels, prompts, desc):
    check_reference(options.reference, options.names)  # fail before loading networks and hours of sampling
    device = accelerator.device
    networks = networks or load_networks(options, device)
    reference = check_reference_dims(load_reference(options.reference, options.names, networks, accelerator),
                                     networks)
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = shard_indices(n_samples, rank, world, mini_batch_size)
    suite = MetricSuite(options, n_samples, networks, device, prompts)
    writer = ShardedSampleWriter(npz_path, n_samples, rank, world) if npz_path else None
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
            suite.update(images, indices)
            if writer:
                writer.write(to_uint8_hwc(images), indices)
            if keep_path:
                os.makedirs(keep_path, exist_ok=True)
                _write_pngs(images, indices, keep_path)
            bar.update(len(indices))
    if writer:
        writer.close()
    result = suite.finish(accelerator, reference)
    if writer:
        accelerator.wait_for_everyone()  # every part is complete
        if accelerator.is_main_process:
            writer.join(None if labels is None else torch.as_tensor(labels)[:n_samples].numpy())
        accelerator.wait_for_everyone()  # the .npz exists for every rank
    logger.info("scored %d images in %.1f s: %s", n_samples, time.time() - start, format_metrics(result))
    return result


def format_metrics(result):
    """'FID 3.4012, IS 210.123 +- 3.210, sFID ...' of a results dict."""
    names = {"fid": "FID", "inception_score": "IS", "sfid": "sFID", "precision": "precision", "recall": "recall",
             "kid": "KID", "fd_dinov2": "FD-DINOv2", "clip_score": "CLIP score", "digit_accuracy": "digit_accuracy",
             "folder_accuracy": "folder_accuracy", "pixel_fd": "pixel_fd (not FID)"}
    parts = []
    for key, name in names.items():
        if key in result:
            std = result.get({"inception_score": "inception_score_std", "kid": "kid_std"}.get(key, ""))
            parts.append(f"{name} {result[key]:.4f}" + (f" +- {std:.4f}" if std is not None else ""))
    return ", ".join(parts)


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


def offline_scorer(config):
    """The training dataset when it scores samples itself with nothing downloaded (`sample_metric`: digits, an
    image folder; not FID), else None. Only such datasets are read by an evaluation."""
    if not hasattr(get_dataset_class(config.dataset.name), "sample_metric"):
        return None
    return get_dataset(config.dataset.name, **dataset_kwargs(config))


def offline_score(accelerator, data, generate_fn, n_samples, mini_batch_size, labels):
    """The dataset's own score ({'digit_accuracy' or 'folder_accuracy', 'pixel_fd', 'n'}) of the first
    min(n_samples, libs.folder_score.MAX_SAMPLES) images, the same on every rank."""
    n = min(n_samples, OFFLINE_SAMPLES)
    images = generate_all(accelerator, generate_fn, n, mini_batch_size)
    return {**data.sample_metric(images, None if labels is None else labels[:n]), "n": n}


def load_models(config, family, nnet_path, device, autoencoder_path=None):
    """(network in eval mode, autoencoder or None) on `device` for sampling; the autoencoder (latent
    families) from autoencoder_path or config.autoencoder.pretrained_path, with the config's scale factor."""
    check_objective(config, nnet_path, network=True)  # weights of another objective: one line, before loading
    state = load_weights(nnet_path)[0]  # a missing file is said before the network is built (U-ViT-H: 30 s)
    nnet = build_nnet(config.nnet)
    load_nnet_state_dict(nnet, state)
    nnet = nnet.to(device).eval().requires_grad_(False)
    autoencoder = None
    if family.data == "latents":
        autoencoder = autoencoder_of(config, autoencoder_path).to(device)
    return nnet, autoencoder


# -- the engine of eval.py, eval_ldm.py, eval_ldm_discrete.py, eval_t2i_discrete.py ----------------

def define_flags():
    """--config (file + --config.a.b=value overrides), --nnet_path, --output_path, --inception_weights."""
    define_config_flag("config", help_string="path of the configuration file (configs/X.py); default: the config "
                                             "saved with --nnet_path")
    flags.DEFINE_string("nnet_path", None, "network weights: a .pth state dict or a checkpoint directory "
                                           "(<workdir>/ckpts/<step>.ckpt, whose EMA network is used)", required=True)
    flags.DEFINE_string("output_path", None, "log file to append the evaluation log to")
    flags.DEFINE_string("inception_weights", None, "pt_inception-2015-12-05-6726825d.pth; default: the torch hub "
                                                   "cache (config.fid.inception_weights when set)")
    flags.DEFINE_integer("steps", None, "sampler steps (network calls of the one-step samplers 'meanflow' / "
                                        "'shortcut'); default config.sample.sample_steps")


def main_for(family):
    """The absl main of an eval*.py script that evaluates `family`."""
    def main(argv):
        del argv
        f = flags.FLAGS
        if f.steps is not None and f.config is not None:
            f.config.sample.sample_steps = f.steps  # checked (> 0) with the config, where it enters
        run_evaluation(f.config, f.nnet_path, family, output_path=f.output_path,
                       inception_weights=f.inception_weights,  # no --config: the one the weights carry
                       config_path=config_flags.get_config_filename(f["config"]) if f.config is not None else None)
    return exit_on_user_error(main)


def run_evaluation(config, nnet_path, family, output_path=None, inception_weights=None, config_path=None):
    """Sample config.sample.n_samples images with the protocol of config.sample and score them, once per seed.

    Reads only the weights, the autoencoder (latent families), the reference (config.metrics.reference or
    config.fid.stat), the feature networks of config.metrics.names and, for text-to-image, the caption
    contexts of <config.dataset.path>/val and its empty_context.npy; never the training data.
    The protocol (`Family.protocol(config, 'sample')`): config.sample.algorithm, sample_steps, guidance
    scale (when config.sample.cfg); labels (config.metrics.labels) uniform or balanced over the config's
    classes, seeded by each seed of config.metrics.seeds ('' = config.seed). config.metrics.npz also writes
    each seed's samples as an ADM-suite .npz; the JSON record (config.metrics.json, default
    <output_path>.json) holds every metric, the protocol and the checkpoint.
    `family` is the script's: a config of another family is a ConfigError naming the right script.
    Returns the dict of `evaluate` (on every rank) of the first seed, with 'per_seed' and 'summary' (mean, std,
    min, max of each metric over the seeds).
    """
    from accelerate import Accelerator  # heavy

    if config is None:  # the one saved with the weights (a checkpoint's, an export's, a .pth's <stem>.config.json)
        config = config_of_weights(nnet_path)
    family = family.for_config(config, "eval")
    options = MetricOptions.from_config(config, inception_weights)
    offline = None if options.reference else offline_scorer(config)  # no FID reference: the dataset's own score
    if not options.reference and offline is None:
        raise ConfigError("config.fid.stat names no FID reference statistics, so FID cannot be computed; compute "
                          "them with tools/compute_fid_stats.py and set --config.fid.stat=<file.npz>")
    accelerator = Accelerator()
    device = accelerator.device
    setup_logging(accelerator.is_main_process, output_path)
    configure_tf32(config.tf32)
    parse_and_validate(config, world_size=accelerator.num_processes)
    s, m = config.sample, config.get("metrics", {})
    algorithm, steps, scale = family.protocol(config, "sample")
    contexts = empty_context = prompts = None
    if family.condition == "text":
        contexts, empty_context = caption_contexts(config.dataset.path)
        prompts = contexts.prompts()  # the caption text of each image, for the CLIP score
        if scale > 0 and empty_context is None:
            raise MissingFileError(f"guided sampling needs the empty prompt's context {config.dataset.path}/"
                                   f"empty_context.npy: make it with scripts/extract_empty_feature.py")
    nnet, autoencoder = load_models(config, family, nnet_path, device)
    networks = load_networks(options, device) if offline is None else None
    seeds = parse_seeds(m.get("seeds", ""), int(config.seed))
    labels_kind = m.get("labels", "uniform")
    logger.info("evaluating %s (%s) on %d process(es), mixed precision %s: %s, %d steps, %s, "
                "%d samples, %s labels, seeds %s, metrics %s", nnet_path, family, accelerator.num_processes,
                accelerator.mixed_precision, algorithm, steps, describe_guidance(config, scale), s.n_samples,
                labels_kind, seeds, ",".join(options.names) if offline is None else
                f"the offline score of dataset {config.dataset.name!r} (not FID; no FID reference statistics)")
    results = []
    for seed in seeds:
        seeded = config.copy_and_resolve_references()
        with seeded.unlocked():
            seeded.seed = seed
        sampler = Sampler.for_config(seeded, family, nnet, device, autoencoder,
                                     family.null_condition(config, empty_context) if scale > 0 else None)
        labels = family.sample_labels(seeded, s.n_samples)
        generate_fn = sampler.generate_fn(algorithm, steps, scale, labels, contexts)
        with accelerator.autocast():
            if offline is not None:
                result = offline_score(accelerator, offline, generate_fn, int(s.n_samples), int(s.mini_batch_size),
                                       labels)
            else:
                result = evaluate(accelerator, generate_fn, int(s.n_samples), int(s.mini_batch_size),
                                  options.reference, seed, metrics=options, networks=networks,
                                  keep_path=s.get("path", "") or None,
                                  npz_path=npz_path_for(m.get("npz", ""), seed, len(seeds)), labels=labels,
                                  prompts=prompts)
        results.append({"seed": seed, **result})
    summary = summarize(results)
    record = {"config": config_path or config.dataset.name, "checkpoint": nnet_path,
              "protocol": {"family": str(family), "sampler": algorithm, "steps": steps, "guidance_scale": scale,
                           "labels": labels_kind if family.condition == "label" else family.condition,
                           "seeds": seeds, "n_samples": int(s.n_samples),
                           "metrics": list(options.names) if offline is None else
                           [k for k in results[0] if k not in ("seed", "n")],
                           "inception_resize": options.resize, "reference": options.reference,
                           "processes": accelerator.num_processes,
                           "mixed_precision": accelerator.mixed_precision},
              "results": results, "summary": summary,
              "npz": [npz_path_for(m.get("npz", ""), seed, len(seeds)) for seed in seeds] if m.get("npz") else []}
    json_path = m.get("json", "") or (output_path + ".json" if output_path else "")
    if json_path and accelerator.is_main_process:
        atomic_write_bytes((json.dumps(record, indent=1) + "\n").encode(), json_path)
        logger.info("wrote %s", json_path)
    for result in results:  # the last line(s) of the log: what was evaluated and its numbers
        logger.info("config=%s nnet_path=%s sampler=%s steps=%d scale=%g n_samples=%d %sseed=%d %s",
                    config_path or config.dataset.name, nnet_path, algorithm, steps, scale, result["n"],
                    f"FID={result['fid']:.4f} IS={result['inception_score']:.3f} " if "fid" in result
                    and "inception_score" in result else "", result["seed"], format_metrics(result))
    if len(seeds) > 1:
        logger.info("over %d seeds: %s", len(seeds), ", ".join(f"{k} {v['mean']:.4f} +- {v['std']:.4f}"
                                                              for k, v in summary.items()))
    return {**results[0], "per_seed": results, "summary": summary, "record": record}


def parse_seeds(text, default):
    """'0,1,2' -> [0, 1, 2]; '' -> [default] (parse_and_validate checked they are distinct integers)."""
    seeds = [int(t) for t in str(text).split(",") if t.strip()]
    assert len(set(seeds)) == len(seeds), text
    return seeds or [default]


def npz_path_for(path, seed, n_seeds):
    """The sample file of one seed: `path` itself for one seed, <stem>_seed<seed>.npz for several; None if ''."""
    if not path:
        return None
    return path if n_seeds == 1 else f"{path[:-4] if path.endswith('.npz') else path}_seed{seed}.npz"


def summarize(results):
    """{metric: {'mean', 'std' (sample std, ddof=1; 0 for one seed), 'min', 'max'}} over the seeds' results."""
    keys = [k for k, v in results[0].items() if k not in ("seed", "n") and isinstance(v, float)]
    out = {}
    for k in keys:
        v = np.array([r[k] for r in results], dtype=np.float64)
        out[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                  "min": float(v.min()), "max": float(v.max())}
    return out
