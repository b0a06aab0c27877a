"""Class ids -> images with a class-conditional U-ViT (the ImageNet models; latent or pixel space).

    python sample_class_cond.py --config=configs/imagenet256_uvit_large.py \\
        --nnet_path=assets/imagenet256_uvit_large.pth --class_ids=207,360,387 --n_per_class=4 --output_dir=out

Writes <output_dir>/<i>_class<c>.png for every image and <output_dir>/grid.png (one row per class).
Image i's starting noise is seeded by (--seed, i), so the same command gives the same images on any
device count or batch size. Guidance uses the config's scale s in eps_c + s (eps_c - eps_u) (the
original's convention; 0.4 for ImageNet 256) with the null class num_classes - 1; --scale overrides.
Continuous-time models (U-ViT-L, train_ldm.py) and discrete-time ones (U-ViT-H, train_ldm_discrete.py)
are sampled with their own paper protocol; the time kind is known for the published configs and given
by --time otherwise.

The helpers here (model loading, image writing) are shared with sample_t2i_discrete.py.
"""
import logging
import os
import sys

import torch
from absl import flags

from libs.errors import ConfigError, InputError, exit_on_user_error

logger = logging.getLogger("sample_class_cond")

# The diffusion time kind of each published config (sampling_protocols.md section 1).
PUBLISHED_TIME_KINDS = {
    "cifar10_uvit_small": "continuous", "celeba64_uvit_small": "continuous",
    "imagenet64_uvit_mid": "continuous", "imagenet64_uvit_large": "continuous",
    "imagenet256_uvit_large": "continuous", "imagenet512_uvit_large": "continuous",
    "imagenet256_uvit_huge": "discrete", "imagenet512_uvit_huge": "discrete",
    "mscoco_uvit_small": "discrete",
}
# ImageNet classes DiT's demo samples (golden retriever, otter, red panda, geyser, macaw, valley,
# balloon, arctic fox): a familiar first look at a 1000-class model.
DEFAULT_CLASS_IDS = [207, 360, 387, 974, 88, 979, 417, 279]


# -- shared with sample_t2i_discrete.py -------------------------------------------------------------

def define_common_flags(fv, argv):
    """Flags both sampling scripts take, defined on the FlagValues `fv`."""
    from libs.config_utils import define_config_flag

    define_config_flag("config", help_string="model config file, e.g. configs/imagenet256_uvit_large.py; "
                       "--config.a.b=value overrides entries", flag_values=fv, sys_argv=argv)
    flags.DEFINE_string("nnet_path", None, "network weights: a .pth state dict or a ckpts/<step>.ckpt directory",
                        flag_values=fv)
    flags.DEFINE_float("scale", None, "guidance scale s of eps_c + s (eps_c - eps_u); default: the config's "
                       "(config.sample.scale when config.sample.cfg, else 0)", flag_values=fv)
    flags.DEFINE_integer("steps", None, "solver steps (network evaluations); default config.sample.sample_steps",
                         flag_values=fv)
    flags.DEFINE_string("algorithm", None, "sampler (libs/sampling.py); default config.sample.algorithm",
                        flag_values=fv)
    flags.DEFINE_integer("seed", None, "image i's noise is seeded by (seed, i); default config.seed", flag_values=fv)
    flags.DEFINE_integer("batch_size", 16, "images per forward pass", flag_values=fv)
    flags.DEFINE_string("output_dir", "samples", "folder for the PNGs and grid.png", flag_values=fv)
    flags.DEFINE_string("autoencoder", None, "autoencoder checkpoint; default config.autoencoder.pretrained_path",
                        flag_values=fv)
    flags.DEFINE_enum("time", None, ["continuous", "discrete"], "diffusion time kind of the model; default: "
                      "known for the published configs", flag_values=fv)
    flags.DEFINE_string("device", "cuda" if torch.cuda.is_available() else "cpu", "torch device", flag_values=fv)
    flags.DEFINE_enum("precision", "auto", ["auto", "fp32", "fp16", "bf16"],
                      "autocast dtype; auto = fp16 on CUDA (as the original's evaluation), fp32 elsewhere",
                      flag_values=fv)


def parse_flags(fv, argv, doc):
    """Parse argv (argv[0] = program name) into fv; returns the positional arguments.

    --help prints `doc` and the flags, then exits.
    """
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
        sys.stdout.write(f"{doc}\nflags:\n{fv.get_help()}\n")
        raise SystemExit(0)
    try:
        rest = fv(argv)
    except flags.Error as e:
        raise ConfigError(f"{e}\nRun with --help for the flags.") from e
    if fv.config is None:
        raise ConfigError("--config is required, e.g. --config=configs/imagenet256_uvit_large.py")
    if not fv.nnet_path:
        raise ConfigError("--nnet_path is required: the network weights (.pth) or a ckpts/<step>.ckpt directory")
    if fv.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {fv.batch_size}")
    return rest[1:]


def time_kind(fv):
    if fv.time:
        return fv.time
    from ml_collections import config_flags

    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(fv["config"])))[0]
    if name not in PUBLISHED_TIME_KINDS:
        raise ConfigError(f"cannot tell whether config '{name}' is a continuous-time (train.py / train_ldm.py) or "
                          "a discrete-time (train_ldm_discrete.py / train_t2i_discrete.py) model: pass --time.")
    return PUBLISHED_TIME_KINDS[name]


def sampling_settings(fv, config):
    """(scale, steps, algorithm, seed) from the flags, defaulting to the config."""
    s = config.sample
    scale = fv.scale if fv.scale is not None else (float(s.scale) if s.cfg else 0.0)
    if scale < 0:
        raise ConfigError(f"--scale must be >= 0, got {scale}")
    steps = fv.steps if fv.steps is not None else int(s.sample_steps)
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    return scale, steps, fv.algorithm or s.algorithm, config.seed if fv.seed is None else fv.seed


def load_models(fv, config, device):
    """(nnet in eval mode, autoencoder or None) on `device`; the autoencoder uses the config's scale factor."""
    from libs.checkpoint import load_nnet_weights
    from libs.nnet import build_nnet, load_nnet_state_dict

    nnet = build_nnet(config.nnet)
    load_nnet_state_dict(nnet, load_nnet_weights(fv.nnet_path))
    nnet.to(device).eval()
    autoencoder = None
    if config.get("z_shape") is not None:
        from libs.autoencoder import get_model

        # The config's scale factor (0.23010 for MS-COCO): the original prompt demo used 0.18215 here.
        autoencoder = get_model(fv.autoencoder or config.autoencoder.pretrained_path,
                                scale_factor=config.autoencoder.scale_factor).to(device)
    return nnet, autoencoder


def sample_shape(config):
    if config.get("z_shape") is not None:
        return tuple(config.z_shape)
    return (config.nnet.get("in_chans", 3), config.nnet.img_size, config.nnet.img_size)


def autocast(fv, device):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[
        fv.precision if fv.precision != "auto" else ("fp16" if device.type == "cuda" else "fp32")]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def generate_batches(generate_fn, n, batch_size, fv, device):
    """Images 0..n-1 (n, 3, H, W) float32 in [0, 1] on the CPU, `batch_size` at a time, with a progress bar."""
    from tqdm import tqdm

    out = []
    with tqdm(total=n, unit="img", desc="sample") as bar:
        for idx in torch.arange(n).split(batch_size):
            with autocast(fv, device):
                out.append(generate_fn(idx).float().cpu())
            bar.update(len(idx))
    return torch.cat(out)


def write_images(images, names, output_dir, n_cols):
    """images (n, 3, H, W) in [0, 1] -> <output_dir>/<name>.png each and grid.png, all written atomically.

    Quantised as torchvision's save_image does (floor(255 x + 0.5)), so single images match the grid.
    """
    from PIL import Image

    from libs.io_utils import atomic_path
    from libs.sample_grid import save_grid

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


# -- class-conditional sampling ----------------------------------------------------------------------

def main(argv=None):
    from libs.family import Family
    from libs.logging_utils import setup_logging
    from sde import build_diffusion

    argv = list(sys.argv if argv is None else ["sample_class_cond.py", *argv])
    fv = flags.FlagValues()
    define_common_flags(fv, argv)
    flags.DEFINE_list("class_ids", None, "comma-separated class indices (default: DiT's 8 demo classes for "
                      "1000-class models)", flag_values=fv)
    flags.DEFINE_integer("n_per_class", 4, "images per class (one grid row per class)", flag_values=fv)
    extra = parse_flags(fv, argv, __doc__)
    if extra:
        raise ConfigError(f"unexpected arguments {extra}; give classes with --class_ids=207,360")
    setup_logging(True)
    config, device = fv.config, torch.device(fv.device)
    num_classes = int(config.nnet.get("num_classes", 0) or 0)
    n_data_classes = num_classes - 1 if config.dataset.get("cfg", False) else num_classes
    if n_data_classes <= 0:
        raise ConfigError(f"config.nnet.num_classes={num_classes}: this is not a class-conditional model.")
    if fv.class_ids:
        try:
            class_ids = [int(c) for c in fv.class_ids]
        except ValueError as e:
            raise ConfigError(f"--class_ids must be integers, got {fv.class_ids}") from e
    elif n_data_classes >= 1000:
        class_ids = list(DEFAULT_CLASS_IDS)
    else:
        raise ConfigError(f"give --class_ids (0..{n_data_classes - 1})")
    bad = [c for c in class_ids if not 0 <= c < n_data_classes]
    if bad:
        raise InputError(f"class ids {bad} are outside 0..{n_data_classes - 1} (the model's data classes).")
    if fv.n_per_class < 1:
        raise ConfigError(f"--n_per_class must be >= 1, got {fv.n_per_class}")
    scale, steps, algorithm, seed = sampling_settings(fv, config)
    if scale > 0 and not config.dataset.get("cfg", False):
        raise ConfigError(f"--scale {scale} needs a model trained with guidance dropout (config.dataset.cfg); "
                          "use --scale=0")
    time = time_kind(fv)

    nnet, autoencoder = load_models(fv, config, device)
    family = Family("latents" if autoencoder is not None else "pixels", time, "label")
    labels = torch.tensor(class_ids).repeat_interleave(fv.n_per_class)
    generate_fn = family.make_generate_fn(
        nnet, build_diffusion(time), shape=sample_shape(config), seed=seed, device=device, algorithm=algorithm,
        steps=steps, scale=scale, null=num_classes - 1 if scale > 0 else None, labels=labels,
        autoencoder=autoencoder)
    logger.info("sampling %d images of classes %s: %s, %d steps, guidance scale %g, seed %d, on %s", len(labels),
                class_ids, algorithm, steps, scale, seed, device)
    images = generate_batches(generate_fn, len(labels), fv.batch_size, fv, device)
    paths = write_images(images, [f"{i:04d}_class{int(c)}" for i, c in enumerate(labels)], fv.output_dir,
                         fv.n_per_class)
    logger.info("wrote %d images and grid.png to %s", len(paths), fv.output_dir)
    return paths


if __name__ == "__main__":
    exit_on_user_error(main)()  # a user error: its one-line message, no traceback
