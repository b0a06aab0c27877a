"""Encode the ImageNet training set into autoencoder moments for imagenet{256,512}_features.

Every image is centre-cropped as guided-diffusion (ADM) does it (BOX halving, BICUBIC resize of the
short side, centre crop), scaled to [-1, 1], and encoded together with its horizontal flip: entry
2i holds the moments of image i and entry 2i+1 those of its mirror image, both with the label of
image i = the index of its class folder among the sorted class folders (torchvision ImageFolder's rule).

Output: the packed format of libs/shards.py, shard by shard; a stopped run resumes where it
stopped (finished shards are skipped). Several processes split the shards:

    python scripts/extract_imagenet_feature.py --imagenet_train=assets/datasets/ImageNet/train \\
        --resolution=256 --output=assets/datasets/imagenet256_features
    accelerate launch --num_processes 8 scripts/extract_imagenet_feature.py ...   # same flags

--repa_encoder=dinov2_vitb14 also stores each entry's frozen-encoder patch features (the image's or its
flip's), for representation alignment (libs/repa.py), so training runs neither the autoencoder nor the
encoder: (N, E) per entry at --repa_dtype (DINOv2 ViT-B/14 at 224: 256 x 768, 393 KB in float16, ~1 TB for
ImageNet's 2.56M entries).
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import flags  # noqa: E402
from accelerate import PartialState  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from libs import latent_stats, shards  # noqa: E402
from libs.autoencoder import DEFAULT_PATH, feature_settings, get_model  # noqa: E402
from libs.datasets.base import adm_center_crop, list_images, load_rgb, uint8_to_unit_range  # noqa: E402
from libs.errors import DataError, MissingFileError, exit_on_user_error  # noqa: E402
from libs.logging_utils import setup_logging  # noqa: E402
from libs.repa import extraction_encoder  # noqa: E402
from tools.cli import define_repa_encoder, define_resolution, parse_flags  # noqa: E402

logger = logging.getLogger("extract_imagenet_feature")


def list_imagenet(root):
    """(paths, labels, class names): class folders sorted by name, images sorted within each."""
    if not os.path.isdir(root):
        raise MissingFileError(f"ImageNet training folder '{root}' not found. Pass --imagenet_train <folder with "
                               "one sub-folder per class (n01440764/, ...)>.")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DataError(f"'{root}' has no class sub-folders; ImageNet's train folder holds one folder per class.")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = list_images(os.path.join(root, name))
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise DataError(f"no images under '{root}'.")
    return paths, labels, classes


class CenterCropped(Dataset):
    """Image i -> ((3, R, R) float32 in [-1, 1], label)."""

    def __init__(self, paths, labels, resolution):
        self.paths, self.labels, self.resolution = paths, labels, resolution

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = adm_center_crop(load_rgb(self.paths[i]), self.resolution)
        return uint8_to_unit_range(np.asarray(img)), self.labels[i]


def define_flags(fv):
    flags.DEFINE_string("imagenet_train", None, "ImageNet train folder (one sub-folder per class)", flag_values=fv)
    flags.DEFINE_string("output", None, "feature folder to write (config.dataset.path)", flag_values=fv)
    for name in ("imagenet_train", "output"):
        flags.mark_flag_as_required(name, flag_values=fv)
    define_resolution(fv, "crop size in pixels (256 or 512; multiple of 8)")
    flags.DEFINE_string("autoencoder", DEFAULT_PATH, "autoencoder checkpoint (see libs/autoencoder.py)",
                        flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "images per forward pass (x2 with the flips)", flag_values=fv)
    flags.DEFINE_integer("shard_size", 2048, "images per shard (the unit of resuming)", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", shards.STORAGE_DTYPES, "storage precision", flag_values=fv)
    flags.DEFINE_integer("num_workers", 8, "image decoding processes per extraction process", flag_values=fv)
    define_repa_encoder(fv)
    flags.DEFINE_enum("autocast", "no", ["no", "fp16", "bf16"],
                      "run the encoder under autocast (faster on GPUs; not bit-identical to the original's fp32)",
                      flag_values=fv)


def parse_args(argv=None):
    """The flags of `argv` (the arguments after the program name; None: sys.argv[1:])."""
    return parse_flags(define_flags, argv, __doc__)[0]


def encode_shard(args, state, autoencoder, data, k, start, stop, settings, encoder=None, repa_shape=None):
    loader = DataLoader(torch.utils.data.Subset(data, range(start, stop)), batch_size=args.batch_size,
                        num_workers=args.num_workers, shuffle=False)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.autocast)
    with shards.ShardWriter(args.output, k, 2 * (stop - start), autoencoder_moments_shape(autoencoder, args),
                              dtype=args.dtype, with_labels=True, repa_shape=repa_shape,
                              repa_dtype=args.repa_dtype) as writer:
        pos, sums = 0, None
        for x, y in loader:
            x = x.to(state.device)
            both = torch.cat([x, x.flip(-1)])
            with torch.no_grad(), torch.autocast(state.device.type, dtype=dtype, enabled=dtype is not None):
                moments = autoencoder.encode_moments(both).float().cpu()
                repa = encoder(both).cpu() if encoder is not None else None
            b = len(x)
            # Interleave: entry 2i = image i, 2i+1 = its flip.
            inter = torch.stack([moments[:b], moments[b:]], dim=1).flatten(0, 1)
            repa = None if repa is None else torch.stack([repa[:b], repa[b:]], dim=1).flatten(0, 1).numpy()
            writer.write(pos, inter.numpy(), y.repeat_interleave(2).numpy(), repa=repa)
            sums = latent_stats.add(sums, latent_stats.sums(autoencoder.mean_latent(moments)))
            pos += 2 * b
            yield b
        writer.commit({"source_range": [start, stop], "settings": settings, "latent_sums": sums})


def autoencoder_moments_shape(autoencoder, args):
    r = args.resolution // autoencoder.downsample_factor
    return (autoencoder.moment_channels, r, r)


def main(argv=None):
    args = parse_args(argv)
    # cpu=True without CUDA: processes of `accelerate launch --multi_gpu` (torchrun) form a gloo group; without
    # it each CPU process would take itself for the only one and write every shard.
    state = PartialState(cpu=not torch.cuda.is_available())
    setup_logging(state.is_main_process)
    paths, labels, classes = list_imagenet(args.imagenet_train)
    autoencoder = get_model(args.autoencoder).to(state.device)
    settings = {"resolution": args.resolution, **feature_settings(autoencoder, args.autoencoder, args.resolution),
                "dtype": args.dtype, "autocast": args.autocast, "num_images": len(paths), "flip": True}
    encoder, repa_shape, repa_settings = extraction_encoder(args, args.resolution, state.device)
    settings.update(repa_settings)  # nothing without --repa_encoder: earlier extractions still resume
    plan = shards.plan_shards(len(paths), args.shard_size)
    todo = shards.pending_shards(args.output, plan, state.process_index, state.num_processes, settings)
    logger.info("%d images in %d classes -> %d shards; process %d/%d has %d left", len(paths), len(classes),
                len(plan), state.process_index, state.num_processes, len(todo))
    data = CenterCropped(paths, labels, args.resolution)
    with tqdm(total=sum(stop - start for _, start, stop in todo), unit="img", disable=not state.is_main_process,
              desc="encode") as bar:
        for k, start, stop in todo:
            for n in encode_shard(args, state, autoencoder, data, k, start, stop, settings, encoder, repa_shape):
                bar.update(n)
    state.wait_for_everyone()
    if state.is_main_process:
        manifest = shards.write_manifest(args.output, len(plan), info={**settings, "classes": classes})
        logger.info("wrote %d feature entries to %s", manifest["num_samples"], args.output)
        stats = latent_stats.save_from_shards(args.output, len(plan))
        if stats is not None:  # per-channel statistics of the posterior means, for latent_scaling='data'
            logger.info("latent statistics (%s): per-channel std %.3g..%.3g", latent_stats.FILE,
                        float(stats.std.min()), float(stats.std.max()))


if __name__ == "__main__":
    exit_on_user_error(main)()  # a user error: its one-line message, no traceback
