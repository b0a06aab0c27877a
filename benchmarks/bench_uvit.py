"""Training-step time and peak memory of a U-ViT, with and without gradient checkpointing.

Default: U-ViT-S/2 of the CIFAR10 config (img 32, patch 2, width 512, 13 blocks, 44.3M
parameters), unconditional, batch 32. Each setting runs in a fresh subprocess so that its peak
memory is its own: peak RSS on the CPU (getrusage), torch.cuda.max_memory_allocated on CUDA.

A step is: noise the batch (VP, as in training), forward, MSE to the noise, backward; that is
the "fwd+bwd" figure. With --optimizer the step also runs AdamW (the CIFAR10 config's settings)
and zero_grad, timed apart, so the update's share of a step shows.
--mode sample times one forward without gradients instead.

    python benchmarks/bench_uvit.py --device cpu --batch 32 --steps 3 --optimizer
    python benchmarks/bench_uvit.py --device cuda --batch 128 --model U-ViT-H/2 --img-size 32 \
        --in-chans 4 --num-classes 1001 --precision bf16 --steps 20

CPU figures on shared machines are noisy (tens of percent): compare the ratios within one run.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.machine import describe_machine, sync  # noqa: E402
from libs.attention import resolve_backend, set_attention_backend  # noqa: E402
from libs.uvit import UViT  # noqa: E402

# The paper's network sizes (Table 1 of arXiv 2209.12152): the rest (img_size, in_chans, num_classes,
# conv) is the config's. The text-to-image models use the same S sizes with libs.uvit_t2i.UViT.
SIZES = {
    "U-ViT-S/2": dict(patch_size=2, embed_dim=512, depth=12, num_heads=8),
    "U-ViT-S/4": dict(patch_size=4, embed_dim=512, depth=12, num_heads=8),
    "U-ViT-S-deep/2": dict(patch_size=2, embed_dim=512, depth=16, num_heads=8),
    "U-ViT-M/4": dict(patch_size=4, embed_dim=768, depth=16, num_heads=12),
    "U-ViT-L/2": dict(patch_size=2, embed_dim=1024, depth=20, num_heads=16),
    "U-ViT-L/4": dict(patch_size=4, embed_dim=1024, depth=20, num_heads=16),
    "U-ViT-H/2": dict(patch_size=2, embed_dim=1152, depth=28, num_heads=16),
    "U-ViT-H/4": dict(patch_size=4, embed_dim=1152, depth=28, num_heads=16),
}
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "xformers", "math"])
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS), help="autocast precision")
    p.add_argument("--model", default="U-ViT-S/2", help="a key of SIZES")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=-1)
    p.add_argument("--conv", type=int, default=1, choices=[0, 1])
    p.add_argument("--optimizer", action="store_true", help="also time an AdamW step and zero_grad, apart")
    p.add_argument("--mode", default="train", choices=["train", "sample"])
    p.add_argument("--checkpointing", default="off,on", help="settings to run: off, on or off,on")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args, use_checkpoint):
    """Run one setting in this process; return a dict of figures."""
    device = torch.device(args.device)
    set_attention_backend(args.attention)
    torch.manual_seed(0)
    model = UViT(**SIZES[args.model], img_size=args.img_size, in_chans=args.in_chans, num_classes=args.num_classes,
                                    conv=bool(args.conv), use_checkpoint=use_checkpoint).to(device)
    model.train(args.mode == "train")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.03, betas=(0.99, 0.999)) if args.optimizer else None
    B = args.batch
    x0 = torch.randn(B, args.in_chans, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.num_classes, (B,), device=device) if args.num_classes > 0 else None
    amp_dtype = getattr(torch, PRECISIONS[args.precision]) if PRECISIONS[args.precision] else None
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def fwd_bwd():
        t = torch.rand(B, device=device)
        eps = torch.randn_like(x0)
        # VP-SDE noising of the continuous-time models (alpha^2 + sigma^2 = 1); cost is negligible.
        alpha = torch.cos(t * torch.pi / 2).view(B, 1, 1, 1)
        xt = alpha * x0 + (1 - alpha ** 2).sqrt() * eps
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(xt, 999 * t, y)
        loss = (out.float() - eps).pow(2).mean()
        loss.backward()

    def sample():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            model(x0, torch.full((B,), 500.0, device=device), y)

    times, opt_times = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        if args.mode == "train":
            fwd_bwd()
        else:
            sample()
        sync(device)
        mid = time.perf_counter()
        if opt is not None and args.mode == "train":
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
        elif args.mode == "train":
            model.zero_grad(set_to_none=True)
        end = time.perf_counter()
        if i >= args.warmup:
            times.append(mid - start)
            opt_times.append(end - mid)
    result = {
        "checkpointing": use_checkpoint,
        "backend": resolve_backend(device),
        "step_s": statistics.median(times),
        "steps_s": times,
        "opt_s": statistics.median(opt_times) if opt is not None else None,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "rss_after_build_GB": rss_model / 1e9,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["peak_cuda_GB"] = torch.cuda.max_memory_allocated(device) / 1e9
        result["gpu"] = torch.cuda.get_device_name(device)
    return result


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args, use_checkpoint=os.environ["BENCH_CKPT"] == "on")))
        return
    print(f"{args.model} img {args.img_size} in_chans {args.in_chans} classes {args.num_classes} | batch {args.batch} | "
          f"{args.mode} | {args.precision} | attention {args.attention} | device {args.device} | "
          f"{describe_machine(args.device)}")
    print(f"median of {args.steps} steps after {args.warmup} warm-up, each setting in a fresh process")
    rows = []
    for setting in args.checkpointing.split(","):
        env = dict(os.environ, BENCH_CKPT=setting)
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", *sys.argv[1:]],
                             env=env, capture_output=True, text=True)
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
            raise SystemExit(f"setting checkpointing={setting} failed (exit {res.returncode})")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    mem_key = "peak_cuda_GB" if args.device.startswith("cuda") else "peak_rss_GB"
    label = "fwd+bwd" if args.mode == "train" else "forward (no grad)"
    header = f"| checkpointing | {label} median (s) | steps (s) | AdamW step (s) | {mem_key} | attention |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        opt = f"{r['opt_s']:.2f}" if r["opt_s"] is not None else "-"
        steps = ", ".join(f"{s:.2f}" for s in r["steps_s"])
        print(f"| {'on' if r['checkpointing'] else 'off'} | {r['step_s']:.2f} | {steps} | {opt} | {r[mem_key]:.2f} | {r['backend']} |")
    print(f"params {rows[0]['params_M']:.2f}M; RSS after building the model {rows[0]['rss_after_build_GB']:.2f} GB; "
          f"{rows[0]['threads']} threads")


if __name__ == "__main__":
    main()
