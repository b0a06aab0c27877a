"""Class ids -> images with a class-conditional U-ViT (the ImageNet models; latent or pixel space).

    python sample_class_cond.py --config=configs/imagenet256_uvit_large.py \\
        --nnet_path=assets/imagenet256_uvit_large.pth --class_ids=207,360,387 --n_per_class=4 --output_dir=out

Writes <output_dir>/<i>_class<c>.png for every image and <output_dir>/grid.png (one row per class).
Image i's starting noise is seeded by (--seed, i), so the same command gives the same images on any
device count or batch size. Guidance uses the config's scale s in eps_c + s (eps_c - eps_u) (the
original's convention; 0.4 for ImageNet 256) with the null class num_classes - 1; --scale overrides.
The diffusion (continuous VP-SDE or discrete) is the config's (config.diffusion); shared command-line
helpers are in libs/sampling_cli.py.
"""
import logging

import torch
from absl import flags

from libs.errors import ConfigError, exit_on_user_error
from libs.evaluation import load_models
from libs.family import data_classes
from libs.sampling import Sampler
from libs.sampling_cli import common_flags, generate_batches, parse_flags, sampling_settings, write_images

logger = logging.getLogger("sample_class_cond")

# ImageNet classes DiT's demo samples (golden retriever, otter, red panda, geyser, macaw, valley,
# balloon, arctic fox): a familiar first look at a 1000-class model.
DEFAULT_CLASS_IDS = [207, 360, 387, 974, 88, 979, 417, 279]


def main(argv=None):
    argv, fv = common_flags(argv, "sample_class_cond.py")
    flags.DEFINE_list("class_ids", None, "comma-separated class indices (default: DiT's 8 demo classes for "
                      "1000-class models)", flag_values=fv)
    flags.DEFINE_integer("n_per_class", 4, "images per class (one grid row per class)", lower_bound=1,
                         flag_values=fv)
    extra, config, device, family = parse_flags(fv, argv, __doc__, "label")
    if extra:
        raise ConfigError(f"unexpected arguments {extra}; give classes with --class_ids=207,360")
    n_data_classes = data_classes(config)
    if n_data_classes <= 0:
        raise ConfigError(f"config.nnet.num_classes={config.nnet.get('num_classes')}: this is not a "
                          "class-conditional model.")
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
        raise ConfigError(f"--class_ids {','.join(map(str, bad))}: outside 0..{n_data_classes - 1}, the classes of "
                          f"this model (config.nnet.num_classes={config.nnet.num_classes}"
                          f"{', the last one the null label of guidance' if config.dataset.cfg else ''})")
    algorithm, steps, scale, seed = sampling_settings(fv, config)
    if scale > 0 and not config.dataset.cfg:
        raise ConfigError(f"--scale {scale} needs a model trained with guidance dropout (config.dataset.cfg); "
                          "use --scale=0")

    nnet, autoencoder = load_models(config, family, fv.nnet_path, device, fv.autoencoder)
    labels = torch.tensor(class_ids).repeat_interleave(fv.n_per_class)
    sampler = Sampler.for_config(config, family, nnet, device, autoencoder,
                                 family.null_condition(config) if scale > 0 else None, seed=seed)
    generate_fn = sampler.generate_fn(algorithm, steps, scale, labels=labels)
    logger.info("sampling %d images of classes %s (%s time): %s, %d steps, guidance scale %g, seed %d, on %s",
                len(labels), class_ids, family.time, algorithm, steps, scale, seed, device)
    images = generate_batches(generate_fn, len(labels), fv, device)
    paths = write_images(images, [f"{i:04d}_class{int(c)}" for i, c in enumerate(labels)], fv.output_dir,
                         fv.n_per_class)
    logger.info("wrote %d images and grid.png to %s", len(paths), fv.output_dir)
    return paths


if __name__ == "__main__":
    exit_on_user_error(main)()  # a user error: its one-line message, no traceback
