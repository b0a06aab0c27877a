"""Prompts -> images with a text-to-image U-ViT (MS-COCO, discrete time, CLIP ViT-L/14 contexts).

    python sample_t2i_discrete.py --config=configs/mscoco_uvit_small.py --nnet_path=assets/mscoco_uvit_small.pth \\
        "A green train is coming down the tracks." "A small kitchen with a low ceiling." --output_dir=out
    python sample_t2i_discrete.py --config=... --nnet_path=... --prompts_file=prompts.txt --n_per_prompt=4

Writes <output_dir>/<p>_<k>.png (prompt p, sample k), prompts.json and grid.png (one row per prompt
when --n_per_prompt > 1). Prompts are encoded by CLIP on the fly; guidance compares with the context
of the empty prompt "" (from the same CLIP, or --empty_context, e.g. the dataset's empty_context.npy),
with the config's scale s in eps_c + s (eps_c - eps_u) (1.0 for MS-COCO = weight 2 on eps_c).
Latents are decoded with the config's autoencoder scale factor (0.23010 for MS-COCO): the original
demo used 0.18215 here, a bug fixed on purpose. Image i's noise is seeded by (--seed, i).
"""
import json
import logging
import os

import numpy as np
import torch
from absl import flags

from libs.clip import CLIP_VERSION, FrozenCLIPEmbedder
from libs.errors import ConfigError, DataError, exit_on_user_error, require_path
from libs.evaluation import load_models
from libs.family import describe_guidance
from libs.sampling import Sampler
from libs.io_utils import atomic_write_bytes
from libs.sampling_cli import common_flags, generate_batches, parse_flags, sampling_settings, write_images

logger = logging.getLogger("sample_t2i_discrete")


def read_prompts(path):
    """Non-empty lines of a UTF-8 text file."""
    with open(require_path(path, "prompts file", "Give a UTF-8 text file with one prompt per line.", kind='file'),
              encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def load_empty_context(path, shape):
    """(77, D) float32 tensor from an .npy file; DataError when it does not fit the network."""
    require_path(path, "--empty_context", "Make it with scripts/extract_empty_feature.py or leave the flag out to "
                 "encode \"\" with CLIP.", kind='file')
    c = torch.from_numpy(np.asarray(np.load(path), dtype=np.float32))
    if tuple(c.shape) != tuple(shape):
        raise DataError(f"--empty_context '{path}' has shape {tuple(c.shape)}, the network takes {tuple(shape)}.")
    return c


def main(argv=None):
    argv, fv = common_flags(argv, "sample_t2i_discrete.py")
    flags.DEFINE_string("prompts_file", None, "text file with one prompt per line (added after the positional "
                        "prompts)", flag_values=fv)
    flags.DEFINE_integer("n_per_prompt", 1, "images per prompt", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("clip", CLIP_VERSION, "CLIP text encoder: hub id (local cache) or directory", flag_values=fv)
    flags.DEFINE_string("empty_context", None, "(77, 768) .npy context of \"\" for guidance (default: encode \"\" "
                        "with --clip)", flag_values=fv)
    prompts, config, device, family = parse_flags(fv, argv, __doc__, "text")
    if fv.prompts_file:
        prompts += read_prompts(fv.prompts_file)
    if not prompts:
        raise ConfigError("no prompts: give them as arguments (\"a red bus\" \"a cat\") or with --prompts_file.")
    algorithm, steps, scale, seed = sampling_settings(fv, config)

    clip = FrozenCLIPEmbedder(fv.clip, device=device)
    context_shape = (config.nnet.num_clip_token, config.nnet.clip_dim)
    contexts = torch.cat([clip(prompts[i:i + 64]).cpu() for i in range(0, len(prompts), 64)])
    if tuple(contexts.shape[1:]) != context_shape:
        raise ConfigError(f"CLIP '{fv.clip}' gives contexts {tuple(contexts.shape[1:])}, the network takes "
                         f"{context_shape} (config.nnet.num_clip_token, clip_dim).")
    null = None
    if scale > 0:
        null = load_empty_context(fv.empty_context, context_shape) if fv.empty_context else clip([""])[0].cpu()
    del clip  # free its memory before sampling

    nnet, autoencoder = load_models(config, family, fv.nnet_path, device, fv.autoencoder)
    table = contexts.repeat_interleave(fv.n_per_prompt, dim=0)
    generate_fn = Sampler.for_config(config, family, nnet, device, autoencoder, null, seed=seed).generate_fn(
        algorithm, steps, scale, contexts=table)
    logger.info("sampling %d images for %d prompts: %s, %d steps, %s, latent scale %g, seed %d, on %s",
                len(table), len(prompts), algorithm, steps, describe_guidance(config, scale),
                autoencoder.scale_factor, seed, device)
    images = generate_batches(generate_fn, len(table), fv, device)
    names = [f"{p:03d}_{k:02d}" for p in range(len(prompts)) for k in range(fv.n_per_prompt)]
    n_cols = fv.n_per_prompt if fv.n_per_prompt > 1 else min(len(prompts), 8)
    paths = write_images(images, names, fv.output_dir, n_cols)
    atomic_write_bytes(json.dumps({n: prompts[i // fv.n_per_prompt] for i, n in enumerate(names)}, indent=1).encode(),
                       os.path.join(fv.output_dir, "prompts.json"))
    logger.info("wrote %d images, grid.png and prompts.json to %s", len(paths), fv.output_dir)
    return paths


if __name__ == "__main__":
    exit_on_user_error(main)()  # a user error: its one-line message, no traceback
