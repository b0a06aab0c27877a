"""Feature extraction throughput and feature reading time, packed vs the original per-file layout.

1. Extraction (images/s end to end: decode JPEG, crop, encode image + flip, write shards) of
   scripts/extract_{imagenet,mscoco}_feature.py on a synthetic image folder with the tiny random autoencoder / CLIP
   (benchmarks/tiny_models.py), and the encoder forward alone. --full adds the SD KL-f8 encoder (random weights).
2. Reading: random entries through the dataset class (moments + label, as a DataLoader worker) from N (8, 32, 32)
   float32 entries, packed (memory-mapped .npy shards) or one pickled .npy each (the original's). Warm page cache:
   this measures per-access overhead (open + unpickle vs a memory-map slice), not disk.

    python benchmarks/bench_features.py                      # defaults: 32 images at 256, 4096 entries
    python benchmarks/bench_features.py --images 64 --resolution 256 --entries 20000 --full

CPU figures on shared machines are noisy: compare ratios within one run.
"""
import argparse
import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.machine import describe_machine  # noqa: E402
from libs import shards as F  # noqa: E402
from libs.autoencoder import SD_KL_F8_DDCONFIG, FrozenAutoencoderKL, get_model  # noqa: E402
from libs.datasets.features import ImageNetFeatures  # noqa: E402
from benchmarks.tiny_models import write_tiny_autoencoder, write_tiny_clip  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32, help="synthetic images to extract")
    p.add_argument("--resolution", type=int, default=256, help="crop size of the ImageNet extraction")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--entries", type=int, default=4096, help="feature entries for the read benchmark")
    p.add_argument("--read_batch", type=int, default=256, help="entries per read batch")
    p.add_argument("--repeats", type=int, default=10, help="timed read batches (median reported)")
    p.add_argument("--full", action="store_true", help="also time the full SD KL-f8 encoder (slow on a CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p.parse_args(argv)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def write_images(folder, n, classes=4, seed=0):
    """n random JPEGs of ImageNet-like sizes (about 400x350) in `classes` class folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        d = os.path.join(folder, f"n{i % classes:08d}")
        os.makedirs(d, exist_ok=True)
        h, w = int(rng.integers(300, 400)), int(rng.integers(300, 500))
        # Smooth random images compress like photos; white noise would make decoding unrealistically slow.
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        p = os.path.join(d, f"n{i % classes:08d}_{i}.JPEG")
        img.save(p, quality=90)
        paths.append(p)
    return paths


def bench_extraction(args, tmp):
    results = {}
    folder = os.path.join(tmp, "imagenet")
    write_images(folder, args.images)
    ae = write_tiny_autoencoder(os.path.join(tmp, "ae.pth"))
    script = load_script("extract_imagenet_feature")
    common = ["--imagenet_train", folder, "--resolution", str(args.resolution), "--autoencoder", ae,
              "--batch_size", str(args.batch_size), "--num_workers", "0"]
    script.main(common + ["--output", os.path.join(tmp, "warmup")])  # imports, allocator warm-up
    start = time.perf_counter()
    script.main(common + ["--output", os.path.join(tmp, "inet_features")])
    results["imagenet_extract_images_per_s"] = args.images / (time.perf_counter() - start)

    x = torch.rand(args.batch_size, 3, args.resolution, args.resolution) * 2 - 1
    models = {"tiny": get_model(ae)}
    if args.full:
        models["sd_kl_f8"] = FrozenAutoencoderKL(SD_KL_F8_DDCONFIG, 4)
    for name, model in models.items():
        batch = x if name == "tiny" else x[:2]
        with torch.no_grad():
            model.encode_moments(batch[:1])
            start = time.perf_counter()
            model.encode_moments(batch)
        results[f"encoder_{name}_images_per_s"] = len(batch) / (time.perf_counter() - start)

    # MS-COCO: 5 captions per image, tiny CLIP, at 256 pixels.
    coco = os.path.join(tmp, "coco")
    os.makedirs(os.path.join(coco, "annotations"))
    img_dir = os.path.join(coco, "val2014")
    os.makedirs(img_dir)
    ann = {"images": [], "annotations": []}
    for i, p in enumerate(sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs)):
        name = f"{i}.jpg"
        os.link(p, os.path.join(img_dir, name))
        ann["images"].append({"id": i, "file_name": name})
        ann["annotations"] += [{"id": 5 * i + k, "image_id": i, "caption": f"the cat number {k}"} for k in range(5)]
    with open(os.path.join(coco, "annotations", "captions_val2014.json"), "w") as f:
        json.dump(ann, f)
    clip = write_tiny_clip(os.path.join(tmp, "clip"), hidden_size=768 // 8)
    start = time.perf_counter()
    load_script("extract_mscoco_feature").main(["--coco_root", coco, "--output", os.path.join(tmp, "coco_features"),
                                                "--split", "val", "--autoencoder", ae, "--clip", clip,
                                                "--batch_size", str(args.batch_size), "--num_workers", "0"])
    results["mscoco_extract_images_per_s"] = args.images / (time.perf_counter() - start)
    return results


def bench_reading(args, tmp):
    rng = np.random.default_rng(0)
    n, shape = args.entries, (8, 32, 32)
    packed, per_file = os.path.join(tmp, "packed"), os.path.join(tmp, "per_file")
    os.makedirs(per_file)
    plan = F.plan_shards(n, 1024)
    for k, a, b in plan:
        with F.ShardWriter(packed, k, b - a, shape, with_labels=True) as w:
            w.write(0, rng.standard_normal((b - a, *shape), dtype=np.float32), rng.integers(0, 1000, b - a))
            w.commit()
    F.write_manifest(packed, len(plan))
    for i in range(n):  # the original: np.save of a (moments, label) tuple, i.e. a pickled object array
        np.save(os.path.join(per_file, f"{i}.npy"),
                np.array((rng.standard_normal(shape, dtype=np.float32), np.int64(i % 1000)), dtype=object),
                allow_pickle=True)
    results = {}
    for name, folder in (("packed", packed), ("per_file", per_file)):
        start = time.perf_counter()
        data = ImageNetFeatures(folder, resolution=256).train
        results[f"open_{name}_s"] = time.perf_counter() - start
        for how in ("per_item", "batched"):
            times = []
            for r in range(args.repeats + 1):
                idx = torch.randint(0, n, (args.read_batch,), generator=torch.Generator().manual_seed(r)).tolist()
                start = time.perf_counter()
                # What a DataLoader worker does: per item (__getitem__) or the whole batch (__getitems__).
                items = [data[i] for i in idx] if how == "per_item" else data.__getitems__(idx)
                torch.stack([it["moments"] for it in items])
                if r:  # the first batch opens the memory maps: not timed
                    times.append(time.perf_counter() - start)
            results[f"read_batch_{name}_{how}_ms"] = 1000 * statistics.median(times)
    results["per_file_over_packed_batched"] = (results["read_batch_per_file_per_item_ms"]
                                               / results["read_batch_packed_batched_ms"])
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    print(describe_machine())
    with tempfile.TemporaryDirectory() as tmp:
        results = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                   "images": args.images, "resolution": args.resolution, "entries": args.entries,
                   "read_batch": args.read_batch}
        results.update(bench_extraction(args, tmp))
        results.update(bench_reading(args, tmp))
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return results


if __name__ == "__main__":
    main()
