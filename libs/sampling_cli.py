"""The command line shared by sample_class_cond.py and sample_t2i_discrete.py: flags, the sampling
settings they resolve to, batched generation and image writing."""
import math
import os
import sys

import torch
from absl import flags
from PIL import Image
from tqdm import tqdm

from libs.config_utils import define_config_flag
from libs.errors import ConfigError, require_path
from libs.export import config_of_weights
from libs.family import family_of, guidance_scale
from libs.io_utils import atomic_path
from libs.logging_utils import setup_logging
from libs.perf import configure_tf32
from libs.sample_grid import save_grid
from libs.sampling import algorithm_problem
from sde import Objective


def common_flags(argv, program):
    """(argv with the program name first, a FlagValues holding the flags both sampling scripts take).

    argv: the arguments after the program name; None: sys.argv.
    """
    argv = list(sys.argv if argv is None else [program, *argv])
    fv = flags.FlagValues()
    define_config_flag("config", help_string="model config file, e.g. configs/imagenet256_uvit_large.py; "
                       "--config.a.b=value overrides entries; default: the config saved with --nnet_path",
                       flag_values=fv, sys_argv=argv)
    flags.DEFINE_string("nnet_path", None, "network weights: a .pth state dict or a ckpts/<step>.ckpt directory",
                        flag_values=fv)
    flags.DEFINE_float("scale", None, "guidance scale s of eps_c + s (eps_c - eps_u); default: the config's "
                       "(config.sample.scale when config.sample.cfg, else 0)", flag_values=fv)
    flags.DEFINE_integer("steps", None, "solver steps (network evaluations); default config.sample.sample_steps",
                         flag_values=fv)
    flags.DEFINE_string("algorithm", None, "sampler (libs/sampling.py); default config.sample.algorithm",
                        flag_values=fv)
    flags.DEFINE_integer("seed", None, "image i's noise is seeded by (seed, i); default config.seed", flag_values=fv)
    flags.DEFINE_integer("batch_size", 16, "images per forward pass", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("output_dir", "samples", "folder for the PNGs and grid.png", flag_values=fv)
    flags.DEFINE_string("autoencoder", None, "autoencoder checkpoint; default config.autoencoder.pretrained_path",
                        flag_values=fv)
    flags.DEFINE_string("device", "cuda" if torch.cuda.is_available() else "cpu", "torch device", flag_values=fv)
    flags.DEFINE_enum("precision", "auto", ["auto", "fp32", "fp16", "bf16"],
                      "autocast dtype; auto = fp16 on CUDA (as the original's evaluation), fp32 elsewhere",
                      flag_values=fv)
    return argv, fv


def parse_flags(fv, argv, doc, condition):
    """Parse argv (argv[0] = program name) into fv, set up logging and TF32 (config.tf32).

    condition: what the script samples, 'label' or 'text'; another config is a ConfigError naming the
    right script. --help prints `doc` and the flags, then exits.
    Returns (positional arguments, config, device, family).
    """
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
        sys.stdout.write(f"{doc}\nflags:\n{fv.get_help()}\n")
        raise SystemExit(0)
    try:
        rest = fv(argv)
    except flags.Error as e:
        raise ConfigError(f"{e}\nRun with --help for the flags.") from e
    if not fv.nnet_path:
        raise ConfigError("--nnet_path is required: the network weights (.pth) or a ckpts/<step>.ckpt directory")
    require_path(fv.nnet_path, "--nnet_path", "Give a .pth state dict, a ckpts/<step>.ckpt directory or an "
                 "exported folder (tools/export.py).")  # before any network is built
    # No --config: the one saved with the weights (a checkpoint's, an export's, a .pth's <stem>.config.json).
    config = fv.config if fv.config is not None else config_of_weights(fv.nnet_path)
    family = family_of(config)
    if family.condition != condition:
        raise ConfigError("this config is text-to-image (config.nnet.name='uvit_t2i'): use sample_t2i_discrete.py"
                          if family.condition == 'text' else
                          "this config is unconditional: there are no classes to sample" if family.condition == 'none'
                          else "this config is class-conditional, not text-to-image (config.nnet.name='uvit_t2i'): "
                               "use sample_class_cond.py")
    setup_logging(True)
    configure_tf32(config.tf32)
    return rest[1:], config, torch.device(fv.device), family


def sampling_settings(fv, config):
    """(algorithm, steps, scale, seed) from the flags, defaulting to config.sample and config.seed."""
    s = config.sample
    scale = fv.scale if fv.scale is not None else guidance_scale(config)
    steps = fv.steps if fv.steps is not None else int(s.sample_steps)
    algorithm = fv.algorithm or s.algorithm
    # The flags, or the config's values they default to (these scripts do not run parse_and_validate): all
    # problems in one line, before any loading.
    problems = [] if math.isfinite(scale) and scale >= 0 else [f"--scale must be a finite number >= 0, got {scale}"]
    problems += [f"--steps must be >= 1, got {steps}"] if steps < 1 else []
    problem = algorithm_problem(algorithm, Objective.of(config).path, config.diffusion)
    problems += [f"--algorithm: {problem}"] if problem else []
    if problems:
        raise ConfigError("; ".join(problems))
    return algorithm, steps, scale, config.seed if fv.seed is None else fv.seed


def generate_batches(generate_fn, n, fv, device):
    """Images 0..n-1 (n, 3, H, W) float32 in [0, 1] on the CPU, --batch_size at a time, under --precision."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[
        fv.precision if fv.precision != "auto" else ("fp16" if device.type == "cuda" else "fp32")]
    out = []
    with tqdm(total=n, unit="img", desc="sample") as bar:
        for idx in torch.arange(n).split(fv.batch_size):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out.append(generate_fn(idx).float().cpu())
            bar.update(len(idx))
    return torch.cat(out)


def write_images(images, names, output_dir, n_cols):
    """images (n, 3, H, W) in [0, 1] -> <output_dir>/<name>.png each and grid.png, all written atomically.

    Quantised as torchvision's save_image does (floor(255 x + 0.5)), so single images match the grid.
    """
    os.makedirs(output_dir, exist_ok=True)
    arrays = images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    paths = []
    for a, name in zip(arrays, names):
        path = os.path.join(output_dir, f"{name}.png")
        with atomic_path(path) as tmp:
            Image.fromarray(a).save(tmp, format="PNG")
        paths.append(path)
    save_grid(images, os.path.join(output_dir, "grid.png"), n_cols)
    return paths
