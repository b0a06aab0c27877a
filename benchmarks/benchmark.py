"""U-ViT benchmark suite: prints one markdown table per section.

Sections (--only picks one or several, comma-separated; default all):
  train     training-step throughput (images/s) and peak memory of U-ViT-S/2 (CIFAR10 config) and U-ViT-L/2 on
            4x32x32 latents (ImageNet 256 config; U-ViT-H/2 too on CUDA), gradient checkpointing off and on; the
            trainer's step (step_variants.OPTIMIZED). Forward MACs counted analytically; MFU on CUDA.
  ablation  the plain step (math attention, for-loop AdamW, Python-loop EMA, loss.item() every step) against the
            optimized one and each optimisation removed in turn, in ONE process on one model, interleaved
            (A B C ... A B C ...), so the ratios share the noise.
  update    the parameter update alone on U-ViT-S/2's 44M parameters: AdamW for-loop / foreach / fused and the EMA
            as a Python loop / one torch._foreach_lerp_, interleaved (resolves the few percent the ablation cannot).
  sample    sampling throughput at --sample-nfe DPM-Solver steps: unguided; classifier-free guidance batched (one
            forward of 2B) and as two forwards of B (the original).
  features  autoencoder encode (KL-f8, 256x256 -> moments) and FID Inception statistics throughput, default and
            channels-last. Random weights: the speed does not depend on them.
  data      latent-feature loading, packed memory-mapped vs the original file per sample (libs.shards),
            through the training dataset class and a DataLoader.

Every setting of train / sample / features / data runs in a fresh subprocess, so its peak memory is its own: peak
RSS (ru_maxrss; includes the ~0.7 GB of the imported stack) on the CPU, torch.cuda.max_memory_allocated on CUDA.
Figures are medians of --steps timed repetitions after --warmup untimed ones.

    python benchmarks/benchmark.py --device cpu --only ablation --batch 32 --steps 3
    python benchmarks/benchmark.py --device cpu --only train,sample,features,data
    python benchmarks/benchmark.py --device cuda --only train --models H/2-latent --batch 128 \\
        --precision bf16 --steps 20 --warmup 5           # the H100 MFU measurement

CPU figures on a shared 2-core machine are noisy (tens of percent between runs): compare ratios within one run.
"""
import argparse
import importlib
import inspect
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import step_variants  # noqa: E402
from benchmarks.flops import mfu, peak_tflops, uvit_forward_macs  # noqa: E402
from benchmarks.machine import describe_machine, sync  # noqa: E402
from libs.autoencoder import SD_EMBED_DIM, SD_KL_F8_DDCONFIG, FrozenAutoencoderKL  # noqa: E402
from libs.data_loader import ResumableLoader  # noqa: E402
from libs.datasets.features import LabelledMoments  # noqa: E402
from libs.ema import EMAUpdater, make_ema  # noqa: E402
from libs.shards import ShardWriter, open_features, plan_shards, write_manifest  # noqa: E402
from libs.family import family_of  # noqa: E402
from libs.fid import InceptionStatistics, accumulate  # noqa: E402
from libs.nnet import NNETS, build_nnet  # noqa: E402
from libs.perf import configure_tf32, maybe_compile  # noqa: E402
from libs.sampling import sample  # noqa: E402
from sde import build_diffusion  # noqa: E402
from libs.metrics.inception import FIDInceptionV3, random_state_dict  # noqa: E402

SECTIONS = ("train", "ablation", "update", "sample", "features", "data")
# The paper configs whose network, optimizer and diffusion the benchmark runs.
MODELS = {
    "S/2-cifar10": "configs.cifar10_uvit_small",
    "L/2-latent": "configs.imagenet256_uvit_large",
    "H/2-latent": "configs.imagenet256_uvit_huge",
    "digits-tiny": "configs.digits_uvit_tiny",  # the dry runs' stand-in (benchmarks/gpu_check.py --tiny)
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=None, help="training batch of U-ViT-S/2 (and of the latent models "
                   "on CUDA); default 32 on the CPU, 128 on CUDA")
    p.add_argument("--latent-batch", type=int, default=None, help="training batch of the latent models; default "
                   "4 on the CPU (U-ViT-L/2 is 6x the work of S/2 per image), --batch on CUDA")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast precision")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (train and sample "
                   "sections; in the ablation an extra 'optimized + compile' variant)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend ('eager' checks the path without Inductor's minutes of compilation)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--steps", type=int, default=3, help="timed repetitions per setting (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--models", default=None, help="train section models, comma-separated keys of "
                   f"{list(MODELS)}; default S/2-cifar10,L/2-latent (+ H/2-latent on CUDA)")
    p.add_argument("--checkpointing", default="off,on", help="train section: off, on or off,on")
    p.add_argument("--ablation-extras", default="foreach", help="ablation: extra variants beyond the remove-one rows, "
                   "comma-separated of foreach (multi-tensor AdamW instead of fused), bf16, fp16 (autocast); '' for "
                   "none. bf16 is left out by default: without AVX512-BF16/AMX it is emulated (~7x slower matmuls)")
    p.add_argument("--ablation-only", default="", help="ablation: keep only these variants (comma-separated "
                   "name prefixes, e.g. 'plain,optimized'); '' keeps all")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads in every worker; 0 = PyTorch's default (one per core)")
    p.add_argument("--sample-batch", type=int, default=None, help="images per sampling call (default 8 CPU, 64 CUDA)")
    p.add_argument("--sample-nfe", type=int, default=50, help="DPM-Solver steps (network evaluations) per sample")
    p.add_argument("--sample-model", default=None, help="sample section model (default S/2-cifar10 with 10 "
                   "classes + null on the CPU, L/2-latent on CUDA)")
    p.add_argument("--data-items", type=int, default=4096, help="data section: feature entries written per layout")
    p.add_argument("--tf32", type=int, default=1, choices=[0, 1], help="TF32 matmuls on CUDA (config.tf32)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.batch = args.batch or (128 if cuda else 32)
    args.latent_batch = args.latent_batch or (args.batch if cuda else 4)
    args.sample_batch = args.sample_batch or (64 if cuda else 8)
    args.models = args.models or ("S/2-cifar10,L/2-latent,H/2-latent" if cuda else "S/2-cifar10,L/2-latent")
    args.sample_model = args.sample_model or ("L/2-latent" if cuda else "S/2-cifar10")
    bad = set(args.only.split(",")) - set(SECTIONS)
    if bad:
        p.error(f"unknown sections {sorted(bad)}; choose from {SECTIONS}")
    return args


# -- helpers shared by the workers -------------------------------------------------------------------

def paper_config(model):
    """The full config of a MODELS key."""
    return importlib.import_module(MODELS[model]).get_config()


def diffusion_of(config):
    """The config's diffusion (sde.ContinuousVP / DiscreteVP), through libs.family.family_of."""
    return build_diffusion(family_of(config).time)


def nnet_config(model, **overrides):
    """The model's config.nnet as a dict, with overrides."""
    nnet = paper_config(model).nnet.to_dict()
    # The network's defaults for what the config leaves out (e.g. in_chans=3), so the MAC count sees them.
    defaults = {k: p.default for k, p in inspect.signature(NNETS[nnet["name"]].__init__).parameters.items()
                if p.default is not inspect.Parameter.empty and k != "norm_layer"}
    return {**defaults, **nnet, **overrides}


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def timed(fn, device, steps, warmup):
    """Median seconds of fn() over `steps` calls after `warmup` calls; also the list."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def setup_device(args):
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        configure_tf32(bool(args.tf32))
        torch.cuda.reset_peak_memory_stats(device)
    return device


def batch_inputs(cfg, batch, device, generator_seed=0):
    """x0 (B, C, H, W) and the condition kwargs of a model config."""
    g = torch.Generator().manual_seed(generator_seed)
    x0 = torch.randn(batch, cfg["in_chans"], cfg["img_size"], cfg["img_size"], generator=g).to(device)
    cond = {}
    if cfg.get("num_classes", -1) > 0:
        cond["y"] = torch.randint(0, cfg["num_classes"], (batch,), generator=g).to(device)
    return x0, cond


def make_train_step(model, batch_size, device, options):
    """A step_variants.TrainStep of a paper config (its optimizer, EMA rate and diffusion), inputs included."""
    config = paper_config(model)
    cfg = nnet_config(model, use_checkpoint=False)
    torch.manual_seed(0)
    nnet = build_nnet(cfg).to(device)
    nnet.train()
    scaler = torch.amp.GradScaler(device.type) if options.precision == "fp16" else None
    # warmup_steps 0: the benchmark's first steps should not run at lr 0 (the speed is the same).
    step = step_variants.TrainStep(nnet, diffusion_of(config), config.optimizer, dict(name="customized", warmup_steps=0),
                          n_steps=config.train.n_steps, ema_rate=config.ema_rate, options=options, grad_scaler=scaler)
    x0, cond = batch_inputs(cfg, batch_size, device)
    return step, cfg, x0, cond


# -- workers (each runs in its own process) ------------------------------------------------------------

def worker_train(args, spec):
    """The trainer's own step (libs.trainer.train_step) on a paper config."""
    device = setup_device(args)
    cfg = nnet_config(spec["model"], use_checkpoint=spec["checkpointing"])
    torch.manual_seed(0)
    step = step_variants.trainer_step(build_nnet(cfg).to(device).train(), paper_config(spec["model"]),
                                      args.precision, args.compile, args.compile_backend)
    x0, cond = batch_inputs(cfg, spec["batch"], device)
    median, times = timed(lambda: step(x0, **cond), device, args.steps, args.warmup)
    macs = uvit_forward_macs(**cfg)["total"]
    out = dict(spec, step_s=median, times=times, images_per_s=spec["batch"] / median, peak_gb=peak_memory_gb(device),
               fwd_gmacs=macs / 1e9, params_m=sum(p.numel() for p in step.nnet.parameters()) / 1e6,
               threads=torch.get_num_threads())
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak_tflops(name, args.precision if args.precision != "fp32" else ("tf32" if args.tf32 else "fp32"))
        out.update(gpu=name, peak_tflops=peak, **mfu(out["images_per_s"], macs, peak))
    return out


def ablation_variants(args):
    """{row name: StepOptions}: plain, optimized, optimized minus each switch, and the extras."""
    o = step_variants.OPTIMIZED
    variants = {
        "plain": step_variants.PLAIN,
        "optimized": o,
        "- SDPA (math attention)": o.replace(attention="math"),
        "- fused AdamW (for-loop)": o.replace(optimizer="for-loop"),
        "- foreach EMA (Python loop)": o.replace(ema="loop"),
        "- no sync (loss.item() every step)": o.replace(sync_every_step=True),
    }
    extras = [e for e in args.ablation_extras.split(",") if e]
    if "foreach" in extras:
        variants["foreach AdamW instead of fused"] = o.replace(optimizer="foreach")
    if "bf16" in extras:
        variants["+ bf16 autocast"] = o.replace(precision="bf16")
    if "fp16" in extras:
        variants["+ fp16 autocast"] = o.replace(precision="fp16")
    if args.compile:
        variants["+ torch.compile"] = o.replace(compile=True)
    keep = [k for k in args.ablation_only.split(",") if k]
    if keep:
        variants = {n: v for n, v in variants.items() if n in ("plain", "optimized") or any(n.startswith(k) for k in keep)}
    return variants


def worker_ablation(args, spec):
    """All variants on one model and optimizer state, interleaved: round r visits them in an order rotated by r, so
    a load trend on a shared machine favours none; speed-ups are medians of per-round ratios."""
    device = setup_device(args)
    variants = ablation_variants(args)
    names = list(variants)
    step, cfg, x0, cond = make_train_step(spec["model"], spec["batch"], device, variants["plain"])
    for _ in range(args.warmup):  # first-call costs (allocator, kernels) of both attention paths and optimizers
        for name in ("plain", "optimized", *(n for n in names if variants[n].compile)):
            step(x0, options=variants[name], **cond)
    times = {name: [] for name in names}
    for r in range(args.steps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            start = time.perf_counter()
            step(x0, options=variants[name], **cond)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return dict(spec, times=times, peak_gb=peak_memory_gb(device))


def worker_update(args, spec):
    """AdamW step and EMA update alone, each implementation on its own state, interleaved."""
    device = setup_device(args)
    torch.manual_seed(0)
    nnet = build_nnet(nnet_config(spec["model"])).to(device)
    for p in nnet.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    params = list(nnet.parameters())
    fns = {}
    for kind in ("for-loop", "foreach", "fused"):
        opt = torch.optim.AdamW(params, lr=1e-9, weight_decay=0.03, betas=(0.99, 0.999),
                                **step_variants.optimizer_flags(kind, device))
        fns[f"AdamW {kind}"] = opt.step
    ema = make_ema(nnet)
    updater = EMAUpdater(ema, nnet)
    fns["EMA Python loop"] = lambda: step_variants.ema_update_loop(updater.ema_params, updater.online_params, 0.9999)
    fns["EMA foreach_lerp"] = lambda: updater.update(0.9999)
    fns["loss.item() (host sync)"] = lambda: torch.zeros((), device=device).add_(1).item()
    names = list(fns)
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    times = {n: [] for n in names}
    for r in range(max(args.steps, 5)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return dict(spec, times=times, n_params=sum(p.numel() for p in params))


class TwoForwards:
    """A network wrapper that runs a guided batch [x; x] as two forwards of B (the original's guidance)."""
    def __init__(self, nnet):
        self.nnet = nnet

    def __call__(self, x, t, **cond):
        B = x.shape[0] // 2
        first = self.nnet(x[:B], t[:B], **{k: v[:B] for k, v in cond.items()})
        second = self.nnet(x[B:], t[B:], **{k: v[B:] for k, v in cond.items()})
        return torch.cat([first, second], dim=0)


def worker_sample(args, spec):
    device = setup_device(args)
    cfg = nnet_config(spec["model"], use_checkpoint=False, **spec.get("overrides", {}))
    torch.manual_seed(0)
    nnet = build_nnet(cfg).to(device).eval().requires_grad_(False)
    net = maybe_compile(nnet, args.compile, backend=args.compile_backend)
    if spec["guidance"] == "two forwards":
        net = TwoForwards(net)
    diffusion = diffusion_of(paper_config(spec["model"]))
    x_T, cond = batch_inputs(cfg, spec["batch"], device)
    scale, uncond = 0.0, None
    if spec["guidance"] != "none":
        scale = spec.get("scale", 0.4)  # default ImageNet 256's; the cost does not depend on it
        uncond = {"y": torch.full_like(cond["y"], cfg["num_classes"] - 1)}
    amp = step_variants.AUTOCAST_DTYPES[args.precision]

    def run():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            sample(net, diffusion, x_T, algorithm=spec.get("algorithm", "dpm_solver"), steps=spec["nfe"], cond=cond,
                   uncond=uncond, scale=scale)

    median, times = timed(run, device, args.steps, args.warmup)
    return dict(spec, s=median, times=times, images_per_s=spec["batch"] / median, peak_gb=peak_memory_gb(device))


def worker_features(args, spec):
    device = setup_device(args)
    torch.manual_seed(0)
    B = spec["batch"]
    if spec["what"] == "autoencoder encode":
        model = FrozenAutoencoderKL(SD_KL_F8_DDCONFIG, SD_EMBED_DIM).to(device)
        x = torch.rand(B, 3, 256, 256, device=device) * 2 - 1
        fn = model.encode_moments
    else:
        model = FIDInceptionV3()
        model.load_state_dict(random_state_dict())
        model = model.to(device)
        x = torch.rand(B, 3, spec["image_size"], spec["image_size"], device=device)
        stats = InceptionStatistics(device=device)
        splits = torch.zeros(B, dtype=torch.long)  # every image in Inception-score split 0

        def fn(images):
            accumulate(stats, model, images, splits)
    if spec["channels_last"]:
        model.to(memory_format=torch.channels_last)  # NHWC: what oneDNN / cuDNN convolutions prefer
        x = x.contiguous(memory_format=torch.channels_last)
    amp = step_variants.AUTOCAST_DTYPES[args.precision] if spec["what"] == "autoencoder encode" else None

    def run():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            fn(x)

    median, times = timed(run, device, args.steps, args.warmup)
    return dict(spec, s=median, times=times, images_per_s=B / median, peak_gb=peak_memory_gb(device))


def write_feature_layouts(folder, n, shape=(8, 32, 32), shard_size=1024):
    """The same n (moments, label) entries in the packed format and in the original per-file layout."""
    rng = np.random.default_rng(0)
    packed, per_file = os.path.join(folder, "packed"), os.path.join(folder, "per_file")
    os.makedirs(per_file, exist_ok=True)
    plan = plan_shards(n, shard_size)
    for k, start, stop in plan:
        moments = rng.standard_normal((stop - start, *shape), dtype=np.float32)
        labels = rng.integers(0, 1000, stop - start)
        with ShardWriter(packed, k, stop - start, shape, with_labels=True) as w:
            w.write(0, moments, labels)
            w.commit()
        for j in range(stop - start):  # the original's files: a pickled object array (moments, label)
            obj = np.empty(2, dtype=object)
            obj[0], obj[1] = moments[j], int(labels[j])
            np.save(os.path.join(per_file, f"{start + j}.npy"), obj, allow_pickle=True)
    write_manifest(packed, len(plan))
    return packed, per_file


def worker_data(args, spec):
    device = torch.device("cpu")
    reader = open_features(spec["folder"])
    loader = ResumableLoader(LabelledMoments(reader), batch_size=spec["batch"], seed=0,
                             num_workers=spec["workers"], persistent_workers=True)
    it = iter(loader)
    n_batches = max(1, spec["items"] // spec["batch"] // 2)  # half an epoch per repetition

    def run():
        for _ in range(n_batches):
            next(it)

    median, times = timed(run, device, args.steps, args.warmup)
    return dict(spec, layout=reader.layout, s=median, times=times,
                samples_per_s=n_batches * spec["batch"] / median, peak_gb=peak_memory_gb(device))


WORKERS = {"train": worker_train, "ablation": worker_ablation, "update": worker_update, "sample": worker_sample,
           "features": worker_features, "data": worker_data}


# -- the parent: run settings in subprocesses, print tables ----------------------------------------------

def run_worker(cmd, timeout=None, env=None):
    """Run `cmd` (a worker printing its result dict as JSON on its last stdout line) in a fresh process
    group; its result, or {'error': ...} when it fails or outlives `timeout` seconds (the whole group,
    compile workers included, is then killed, so nothing hangs)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s (killed)"}
    if proc.returncode != 0:
        tail = err.strip().splitlines()[-1:] or ["(no output)"]
        sys.stderr.write(err[-3000:])
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(out.strip().splitlines()[-1])


def run_setting(section, spec, argv=None, timeout=None, env=None):
    """Run one setting in a fresh interpreter with this script's flags (or `argv`); its result dict (or {'error': ...})."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(dict(spec, section=section)),
           *(sys.argv[1:] if argv is None else argv)]
    return dict(spec, **run_worker(cmd, timeout, env))


def header(cols):
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))


def row(values):
    print("| " + " | ".join(str(v) for v in values) + " |", flush=True)


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def rate(x):
    """A throughput with 3 significant digits (0.0123, 1.23, 123)."""
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def section_train(args, mem):
    print(f"\n### Training step ({args.precision}{', compiled' if args.compile else ''}; zero_grad, loss, backward, "
          f"AdamW, LR scheduler, EMA; the trainer's optimized step)\n")
    cols = ["model", "batch", "checkpointing", "step (s)", "images/s", mem, "fwd GMACs/img", "params (M)"]
    if args.device == "cuda":
        cols += ["MFU (3x MACs)", "MFU (2 FLOP/MAC)"]
    header(cols)
    for model in args.models.split(","):
        batch = args.batch if model.startswith("S/") else args.latent_batch
        for ck in args.checkpointing.split(","):
            r = run_setting("train", dict(model=model, batch=batch, checkpointing=ck == "on"))
            if "error" in r:
                row([model, batch, ck, r["error"]])
                continue
            values = [model, batch, ck, fmt(r["step_s"]), rate(r["images_per_s"]), fmt(r["peak_gb"]),
                      fmt(r["fwd_gmacs"], 1), fmt(r["params_m"], 1)]
            if args.device == "cuda":
                values += [f"{100 * r['mfu_macs']:.1f}%" if r.get("mfu_macs") else "-",
                           f"{100 * r['mfu_flops']:.1f}%" if r.get("mfu_flops") else "-"]
            row(values)
            if args.device == "cuda":
                print(f"<!-- {r.get('gpu')}: peak {r.get('peak_tflops')} TFLOP/s; steps/s {1 / r['step_s']:.2f} -->")


def section_ablation(args, mem):
    model = "S/2-cifar10"
    print(f"\n### Ablation: {model}, batch {args.batch}, fp32 unless stated; one process, variants interleaved "
          f"({args.steps} rounds after {args.warmup} warm-up)\n")
    r = run_setting("ablation", dict(model=model, batch=args.batch))
    if "error" in r:
        print(r["error"])
        return
    t = r["times"]
    rounds = range(len(t["plain"]))
    header(["variant", "step (s), median", "all rounds (s)", "images/s", "speed-up vs plain (median of rounds)",
            "time vs optimized (median of rounds)"])
    for name, times in t.items():
        m = statistics.median(times)
        vs_plain = statistics.median(t["plain"][i] / times[i] for i in rounds)
        vs_opt = statistics.median(times[i] / t["optimized"][i] for i in rounds)
        row([name, fmt(m), ", ".join(f"{x:.2f}" for x in times), rate(args.batch / m), f"{vs_plain:.3f}x",
             f"{vs_opt:.3f}"])
    print(f"\n{mem} of the ablation process: {r['peak_gb']:.2f} GB (all variants share one model and state)")


def section_update(args, mem):
    model = "S/2-cifar10"
    print(f"\n### Parameter update alone: {model} parameters, interleaved, median of {max(args.steps, 5)} rounds\n")
    r = run_setting("update", dict(model=model))
    if "error" in r:
        print(r["error"])
        return
    header(["update", "time (ms), median", "all rounds (ms)"])
    for name, times in r["times"].items():
        row([name, fmt(1e3 * statistics.median(times), 1), ", ".join(f"{1e3 * t:.0f}" for t in times)])
    print(f"\n{r['n_params'] / 1e6:.1f}M parameters")


def section_sample(args, mem):
    model = args.sample_model
    overrides = {}
    if MODELS[model].endswith("cifar10_uvit_small"):
        overrides = {"num_classes": 11}  # guidance needs labels: CIFAR10's 10 classes + the null class
    print(f"\n### Sampling: {model}{' (class-conditional, 10 + null classes)' if overrides else ''}, "
          f"DPM-Solver {args.sample_nfe} steps, batch {args.sample_batch}, {args.precision}\n")
    header(["guidance", "network batch", "s / call", "images/s", mem])
    for guidance in ("none", "batched (one forward of 2B)", "two forwards"):
        key = "batched" if guidance.startswith("batched") else guidance
        r = run_setting("sample", dict(model=model, overrides=overrides, batch=args.sample_batch, nfe=args.sample_nfe,
                                       guidance=key))
        if "error" in r:
            row([guidance, r["error"]])
            continue
        nb = {"none": "B", "batched": "2B", "two forwards": "2 x B"}[key]
        row([guidance, nb, fmt(r["s"]), rate(r["images_per_s"]), fmt(r["peak_gb"])])


def section_features(args, mem):
    ae_batch = 2 if args.device == "cpu" else 32
    inc_batch = 16 if args.device == "cpu" else 200
    print(f"\n### Feature extraction and FID statistics ({'random weights; '}autoencoder in {args.precision}, "
          f"Inception always fp32)\n")
    header(["what", "input", "batch", "layout", "s / batch", "images/s", mem])
    for what, batch, size in (("autoencoder encode", ae_batch, 256), ("FID Inception statistics", inc_batch, 32)):
        for cl in (False, True):
            r = run_setting("features", dict(what=what, batch=batch, image_size=size, channels_last=cl))
            layout = "channels-last" if cl else "contiguous"
            if "error" in r:
                row([what, f"{size}x{size}", batch, layout, r["error"]])
                continue
            row([what, f"{size}x{size}", batch, layout, fmt(r["s"], 3), rate(r["images_per_s"]), fmt(r["peak_gb"])])


def section_data(args, mem):
    batch = 64
    print(f"\n### Latent feature loading: {args.data_items} ImageNet-256 entries (8x32x32 float32 moments + "
          f"label), batch {batch}, page cache warm\n")
    header(["layout", "DataLoader workers", "samples/s", "peak RSS (GB)"])
    with tempfile.TemporaryDirectory(prefix="uvit-bench-data-") as folder:
        packed, per_file = write_feature_layouts(folder, args.data_items)
        for workers in (0, 1):
            for name, path in (("packed memmap", packed), ("file per sample", per_file)):
                r = run_setting("data", dict(folder=path, items=args.data_items, batch=batch, workers=workers))
                if "error" in r:
                    row([name, workers, r["error"]])
                    continue
                row([name, workers, rate(r["samples_per_s"]), fmt(r["peak_gb"])])


def main():
    args = parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec.pop("section")](args, spec)))
        return
    mem = "peak CUDA alloc (GB)" if args.device == "cuda" else "peak RSS (GB)"
    print(f"U-ViT benchmark | device {args.device} | {describe_machine(args.device, args.threads)} | {args.precision} | "
          f"compile {args.compile} | median of {args.steps} after {args.warmup} warm-up | "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for section in args.only.split(","):
        globals()[f"section_{section}"](args, mem)


if __name__ == "__main__":
    main()
