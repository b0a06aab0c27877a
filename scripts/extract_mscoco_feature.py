"""Encode MS-COCO 2014 into autoencoder moments and CLIP contexts of every caption (mscoco256_features).

For each split (train2014 -> <output>/train, val2014 -> <output>/val): images are taken in increasing
image-id order; each is centre-cropped to its largest square (offsets rounded down), resized to
--resolution with Lanczos filtering, scaled to [-1, 1] and encoded to moments; every caption of the
image (in the order of the annotation file) is encoded by the CLIP text encoder to a (77, 768)
context. This is the original U-ViT preprocessing. Images without captions are skipped (logged).

Expected input layout (--coco_root): train2014/, val2014/, annotations/captions_{train,val}2014.json.
Output: the packed format of libs/shards.py, resumable shard by shard, split across processes by
`accelerate launch`. Then run extract_empty_feature.py and extract_test_prompt_feature.py.

    python scripts/extract_mscoco_feature.py --coco_root=assets/datasets/coco --output=assets/datasets/coco256_features

--repa_encoder=dinov2_vitb14 also stores each image's frozen-encoder patch features, for representation
alignment (libs/repa.py): training then runs neither the autoencoder nor the encoder.
"""
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import flags  # noqa: E402
from PIL import Image  # noqa: E402
from accelerate import PartialState  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from libs import latent_stats, shards  # noqa: E402
from libs.autoencoder import DEFAULT_PATH, feature_settings, get_model  # noqa: E402
from libs.clip import CLIP_VERSION, FrozenCLIPEmbedder  # noqa: E402
from libs.datasets.base import load_rgb, uint8_to_unit_range  # noqa: E402
from libs.errors import DataError, MissingFileError, exit_on_user_error  # noqa: E402
from libs.logging_utils import setup_logging  # noqa: E402
from libs.repa import extraction_encoder  # noqa: E402
from tools.cli import define_repa_encoder, define_resolution, parse_flags  # noqa: E402

logger = logging.getLogger("extract_mscoco_feature")
SPLITS = {"train": ("train2014", "captions_train2014.json"), "val": ("val2014", "captions_val2014.json")}


def read_coco_captions(captions_json, image_dir):
    """COCO caption annotations -> list of (image path, [captions]) sorted by image id."""
    if not os.path.isfile(captions_json):
        raise MissingFileError(f"COCO captions file '{captions_json}' not found. Download the 2014 annotations "
                               "(annotations_trainval2014.zip) and unpack them into <coco_root>/annotations/.")
    if not os.path.isdir(image_dir):
        raise MissingFileError(f"COCO image folder '{image_dir}' not found. Unpack train2014.zip / val2014.zip "
                               "into <coco_root>/.")
    try:
        with open(captions_json) as f:
            ann = json.load(f)
        files = {int(im["id"]): im["file_name"] for im in ann["images"]}
        captions = {i: [] for i in files}
        for a in ann["annotations"]:
            captions[int(a["image_id"])].append(str(a["caption"]))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"'{captions_json}' is not a COCO captions annotation file ({type(e).__name__}: {e}).") from e
    items, skipped = [], 0
    for i in sorted(files):
        if captions[i]:
            items.append((os.path.join(image_dir, files[i]), captions[i]))
        else:
            skipped += 1
    if skipped:
        logger.warning("%s: %d images have no caption and are skipped", captions_json, skipped)
    if not items:
        raise DataError(f"'{captions_json}' lists no captioned images.")
    return items


def center_square_lanczos(img, size):
    """PIL image -> (size, size) uint8 array: the largest centred square, Lanczos-resized."""
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), resample=Image.LANCZOS)
    return np.asarray(img)


class CocoImages(Dataset):
    def __init__(self, items, resolution):
        self.items, self.resolution = items, resolution

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return uint8_to_unit_range(center_square_lanczos(load_rgb(self.items[i][0]), self.resolution))


def define_flags(fv):
    flags.DEFINE_string("coco_root", None, "folder with train2014/, val2014/, annotations/", flag_values=fv)
    flags.DEFINE_string("output", None, "feature root (config.dataset.path); writes train/ and val/",
                        flag_values=fv)
    for name in ("coco_root", "output"):
        flags.mark_flag_as_required(name, flag_values=fv)
    flags.DEFINE_enum("split", "both", ["train", "val", "both"], "which split(s) to encode", flag_values=fv)
    define_resolution(fv, "image size in pixels (multiple of 8)")
    flags.DEFINE_string("autoencoder", DEFAULT_PATH, "autoencoder checkpoint (see libs/autoencoder.py)",
                        flag_values=fv)
    flags.DEFINE_string("clip", CLIP_VERSION, "CLIP text model: hub id (local cache) or directory", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "images (and caption batches) per forward pass", flag_values=fv)
    flags.DEFINE_integer("shard_size", 512, "images per shard (the unit of resuming)", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", shards.STORAGE_DTYPES, "storage precision", flag_values=fv)
    flags.DEFINE_integer("num_workers", 8, "image decoding processes per extraction process", flag_values=fv)
    define_repa_encoder(fv)


def parse_args(argv=None):
    """The flags of `argv` (the arguments after the program name; None: sys.argv[1:])."""
    return parse_flags(define_flags, argv, __doc__)[0]


def encode_shard(args, state, autoencoder, clip, items, k, start, stop, folder, settings, encoder=None,
                 repa_shape=None):
    """Encode images start..stop-1 into shard k of `folder`; yields the number of images done."""
    loader = DataLoader(torch.utils.data.Subset(CocoImages(items, args.resolution), range(start, stop)),
                        batch_size=args.batch_size, num_workers=args.num_workers, shuffle=False)
    captions = [items[i][1] for i in range(start, stop)]
    flat = [c for caps in captions for c in caps]
    r = args.resolution // autoencoder.downsample_factor
    context_shape = (clip.max_length, clip.hidden_size)
    with shards.ShardWriter(folder, k, stop - start, (autoencoder.moment_channels, r, r), dtype=args.dtype,
                              num_contexts=len(flat), context_shape=context_shape, repa_shape=repa_shape,
                              repa_dtype=args.repa_dtype) as writer:
        pos, sums = 0, None
        for x in loader:
            with torch.no_grad():
                moments = autoencoder.encode_moments(x.to(state.device)).float().cpu()
                repa = encoder(x.to(state.device)).cpu().numpy() if encoder is not None else None
            writer.write(pos, moments.numpy(), repa=repa)
            sums = latent_stats.add(sums, latent_stats.sums(autoencoder.mean_latent(moments)))
            pos += len(x)
            yield len(x)
        # Contexts go straight into the memory-mapped shard: a shard's captions can be gigabytes.
        writer.set_caption_counts([len(c) for c in captions])
        for i in range(0, len(flat), args.batch_size):
            writer.write_context_rows(i, clip(flat[i:i + args.batch_size]).cpu().numpy())
        writer.commit({"source_range": [start, stop], "settings": settings, "captions": captions, "latent_sums": sums,
                       "files": [os.path.basename(items[i][0]) for i in range(start, stop)]})


def main(argv=None):
    args = parse_args(argv)
    # cpu=True without CUDA: processes of `accelerate launch --multi_gpu` (torchrun) form a gloo group; without
    # it each CPU process would take itself for the only one and write every shard.
    state = PartialState(cpu=not torch.cuda.is_available())
    setup_logging(state.is_main_process)
    splits = ["train", "val"] if args.split == "both" else [args.split]
    jobs = [(s, read_coco_captions(os.path.join(args.coco_root, "annotations", SPLITS[s][1]),
                                   os.path.join(args.coco_root, SPLITS[s][0]))) for s in splits]
    autoencoder = get_model(args.autoencoder).to(state.device)
    clip = FrozenCLIPEmbedder(args.clip, device=state.device)
    encoder, repa_shape, repa_settings = extraction_encoder(args, args.resolution, state.device)
    for split, items in jobs:
        folder = os.path.join(args.output, split)
        settings = {"resolution": args.resolution, **feature_settings(autoencoder, args.autoencoder, args.resolution),
                    "clip": args.clip, "dtype": args.dtype, "num_images": len(items), **repa_settings}
        plan = shards.plan_shards(len(items), args.shard_size)
        todo = shards.pending_shards(folder, plan, state.process_index, state.num_processes, settings)
        logger.info("%s: %d images -> %d shards; process %d/%d has %d left", split, len(items), len(plan),
                    state.process_index, state.num_processes, len(todo))
        with tqdm(total=sum(b - a for _, a, b in todo), unit="img", desc=split, disable=not state.is_main_process) as bar:
            for k, start, stop in todo:
                for n in encode_shard(args, state, autoencoder, clip, items, k, start, stop, folder, settings,
                                      encoder, repa_shape):
                    bar.update(n)
        state.wait_for_everyone()
        if state.is_main_process:
            manifest = shards.write_manifest(folder, len(plan), info=settings)
            logger.info("%s: wrote %d images to %s", split, manifest["num_samples"], folder)
            latent_stats.save_from_shards(folder, len(plan))  # for latent_scaling="data"


if __name__ == "__main__":
    exit_on_user_error(main)()  # a user error: its one-line message, no traceback
