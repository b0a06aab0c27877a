"""Throughput of FID statistics: images/s through quantisation + the FID Inception + float64 sums,
and the time of one 2048-d Frechet distance (ours vs scipy.linalg.sqrtm, as pytorch-fid).

    python benchmarks/bench_fid.py                      # CPU (and CUDA when present)
    python benchmarks/bench_fid.py --batch 50 --iters 5 --sqrtm

Uses the real weights when they are in the torch hub cache, random ones otherwise (same speed).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from benchmarks.machine import describe_machine, sync
from libs import fid
from libs.metrics import inception


def images_per_second(device, batch, iters, size):
    net = inception.FIDInceptionV3()
    path = inception.default_weights_path()
    net.load_state_dict(torch.load(path) if os.path.exists(path) else inception.random_state_dict())
    net = net.to(device)
    stats = fid.InceptionStatistics(device=device)
    x = torch.rand(batch, 3, size, size, device=device)
    splits = torch.zeros(batch, dtype=torch.long)
    fid.accumulate(stats, net, fid.quantize_like_png(x), splits)  # warm-up (cuDNN autotuning, allocations)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fid.accumulate(stats, net, fid.quantize_like_png(x), splits)
    sync(device)
    return batch * iters / (time.perf_counter() - start)


def frechet_seconds(device, with_sqrtm):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3000, 2048)), rng.standard_normal((4000, 2048))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    mu = np.zeros(2048)
    start = time.perf_counter()
    ours = fid.frechet_distance(mu, s1, mu, s2, device=device)
    t_ours = time.perf_counter() - start
    t_ref = float("nan")
    if with_sqrtm:
        from pytorch_fid.fid_score import calculate_frechet_distance  # optional

        start = time.perf_counter()
        ref = calculate_frechet_distance(mu, s1, mu, s2)
        t_ref = time.perf_counter() - start
        print(f"  FID ours {ours:.6f} vs pytorch-fid {ref:.6f} (relative difference {abs(ours - ref) / ref:.1e})")
    return t_ours, t_ref


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--size", type=int, default=32, help="input side (resized to 299 inside)")
    p.add_argument("--sqrtm", action="store_true", help="also time pytorch-fid's scipy sqrtm (minutes on a CPU)")
    args = p.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{describe_machine('cuda' if torch.cuda.is_available() else 'cpu')} | "
          f"load average {load:.1f} (figures are only comparable on an idle machine)")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        batch = args.batch if device.type == "cpu" else max(args.batch, 200)
        iters = args.iters if device.type == "cpu" else max(args.iters, 20)
        modes = [("fp32", False)] if device.type == "cpu" else [("fp32", False), ("tf32", True)]
        for label, tf32 in modes:
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
            ips = images_per_second(device, batch, iters, args.size)
            print(f"{name} {label}: {ips:.1f} images/s (batch {batch}); 50k images: {50000 / ips / 60:.1f} min")
        t_ours, t_ref = frechet_seconds(device, args.sqrtm and device.type == "cpu")
        print(f"{name}: Frechet distance 2048-d: ours {t_ours:.2f} s" + (f", scipy sqrtm {t_ref:.1f} s" if args.sqrtm and device.type == "cpu" else ""))


if __name__ == "__main__":
    main()
