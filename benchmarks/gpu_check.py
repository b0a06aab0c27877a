"""The check to run when a GPU is lent for a few minutes: one command, one table, within 8 minutes.

    python benchmarks/gpu_check.py                        # on one CUDA GPU
    python benchmarks/gpu_check.py --device cpu --tiny    # the dry run (CI): every piece, on the digits model

Pieces, in order of importance, each in its own process group with its own timeout, so a missing
piece or a hang is a row saying so, never a hung check; no piece starts once --budget is spent:
  train      U-ViT-H/2 on ImageNet-256 latents (4x32x32), the trainer's step in bf16: step time,
             images/s, peak memory, MFU (benchmarks/benchmark.py's train worker), with SDPA, with
             xformers (when installed) and with torch.compile
  sample     sampling throughput of the paper protocol of imagenet256_uvit_huge (its sampler, 50 steps,
             guidance 0.4 as one batched forward of 2B), fp16 autocast as the README's launch command
  run        a short training run in fp16 (GradScaler) and in bf16 on one fixed batch: first and last
             loss and the non-finite (skipped) steps; then the bf16 run sharded with FSDP2 over the one
             GPU (config.fsdp's path: bf16 policy, fp32 master weights): its step time and peak memory
             against the DDP path's row above (one GPU shards nothing: the cost of the machinery)
  tests      the CUDA-only tests (pytest -m cuda)
  fewstep    the training step of MeanFlow and of shortcut models against flow matching on U-ViT-L/2 latents
             (bf16; benchmarks/fewstep_step_time.py): MeanFlow's step time and both ratios
On CUDA each piece is a fresh interpreter (CUDA cannot be forked); on the CPU it is forked from this
process, which has imported everything once, so the dry run takes seconds, not a minute of imports.
The table goes to stdout (paste it into benchmarks/README.md with the machine line above it); the exit
status is 1 when a piece failed or timed out. --tiny swaps U-ViT-H/2 for the digits demo's network,
tiny batches and step counts, the 'eager' compile backend and one test file, so the whole path runs
on a CPU in seconds.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import select
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks import benchmark, fewstep_step_time, step_variants  # noqa: E402
from benchmarks.benchmark import (batch_inputs, fmt, header, nnet_config, paper_config, peak_memory_gb, rate,  # noqa: E402
                                  row, run_worker, setup_device, sync)
from benchmarks.machine import describe_machine  # noqa: E402
from libs.attention import set_attention_backend  # noqa: E402
from libs.nnet import build_nnet  # noqa: E402

SIZES = {  # model, train batch, timed steps, warm-up steps, run steps, sample batch, sample steps
    "full": dict(model="H/2-latent", batch=128, steps=10, warmup=3, run_steps=30, sample_batch=64, nfe=50,
                 tests="tests", compile_backend="inductor", fewstep_model="L/2-latent", fewstep_batch=64),
    "tiny": dict(model="digits-tiny", batch=8, steps=1, warmup=1, run_steps=3, sample_batch=4, nfe=2,
                 tests="tests/test_attention.py", compile_backend="eager", fewstep_model="digits-tiny",
                 fewstep_batch=8),
}
TIMEOUTS = {"train": 120, "train+compile": 300, "sample": 120, "run": 120, "tests": 240, "fewstep": 120}
SAMPLE_CONFIG = "H/2-latent"  # whose sampling settings are the protocol (imagenet256_uvit_huge)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="the dry run: tiny model, batches and steps")
    p.add_argument("--budget", type=float, default=470.0, help="seconds after which no piece starts "
                   "(each also has its own timeout)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker_tests(path):
    """pytest -m cuda on `path` in this process: the outcome counts (a setup error counts as failed)."""
    import pytest  # heavy

    counts, failures = {"passed": 0, "failed": 0, "skipped": 0}, []

    class Count:
        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                counts[report.outcome] += 1
                if report.outcome == "failed":
                    failures.append(report.nodeid.split("/")[-1])

    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # the table keeps the terminal
        code = pytest.main(["-m", "cuda", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, path)], plugins=[Count()])
    return dict(counts, exit=int(code), failures=failures)


def worker_run(spec):
    """A short training run of the trainer's step on one fixed batch: (first, last) loss, non-finite steps."""
    device = setup_device(argparse.Namespace(device=spec["device"], threads=0, tf32=1))
    cfg = nnet_config(spec["model"], use_checkpoint=False)
    torch.manual_seed(0)
    step = step_variants.trainer_step(build_nnet(cfg).to(device).train(), paper_config(spec["model"]),
                                      spec["precision"], sharded=spec.get("sharded", False))
    x0, cond = batch_inputs(cfg, spec["batch"], device)
    losses, skipped = [], torch.zeros((), dtype=torch.int64, device=device)
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        loss, _, applied = step(x0, **cond)
        losses.append(loss)
        skipped += ~applied
    sync(device)
    losses = [float(v) for v in torch.stack(losses).cpu()]
    return dict(spec, first_loss=losses[0], last_loss=losses[-1], nonfinite=int(skipped),
                step_s=(time.perf_counter() - start) / spec["steps"], peak_gb=peak_memory_gb(device))


def worker_fewstep(spec):
    """MeanFlow's and the shortcut model's training step against flow matching's (fewstep_step_time)."""
    device = setup_device(argparse.Namespace(device=spec["device"], threads=0, tf32=1))
    times = fewstep_step_time.step_times(spec["model"], spec["batch"], device, spec["steps"], spec["rounds"],
                                         spec["precision"])
    median = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    base = median["flow matching"]
    return dict(spec, step_s=median["MeanFlow (25% r != t)"], peak_gb=peak_memory_gb(device),
                meanflow_ratio=median["MeanFlow (25% r != t)"] / base,
                shortcut_ratio=median["shortcut (25% self-consistency)"] / base, flow_s=base)


def execute(job):
    """Run one piece in this process: {'kind': 'train' | 'sample' (benchmark.py's workers, with its flags
    'argv' and the 'attention' backend), 'run' or 'tests', 'spec': ...} -> its result dict."""
    if job["kind"] == "tests":
        return worker_tests(job["spec"]["tests"])
    if job["kind"] == "run":
        return worker_run(job["spec"])
    if job["kind"] == "fewstep":
        return worker_fewstep(job["spec"])
    set_attention_backend(job.get("attention", "auto"))
    return benchmark.WORKERS[job["kind"]](benchmark.parse_args(job["argv"]), job["spec"])


def run_forked(job, timeout):
    """execute(job) in a forked child in its own process group; its result, or {'error': ...} when it
    raises, dies or outlives `timeout` seconds (the group is then killed)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's code
        os.setsid()
        os.close(read_end)
        try:
            out, code = json.dumps(execute(job)), 0
        except BaseException as e:  # noqa: BLE001 (the parent reports it as the piece's row)
            out, code = json.dumps({"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}), 1
        os.write(write_end, out.encode())
        os._exit(code)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                os.killpg(pid, signal.SIGKILL)
                return {"error": f"timed out after {timeout:.0f} s (killed)"}
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return json.loads(b"".join(chunks) or b'{"error": "the piece died without a result"}')


def run_piece(args, job, timeout):
    """The piece's result dict: a fresh interpreter on CUDA, a fork on the CPU."""
    if args.device == "cuda":
        return run_worker([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)], timeout)
    return run_forked(job, timeout)


def pieces(args):
    """[(name, timeout, job or a result dict)] in the order they run."""
    size = SIZES["tiny" if args.tiny else "full"]
    bench = ["--device", args.device, "--steps", str(size["steps"]), "--warmup", str(size["warmup"]),
             "--compile-backend", size["compile_backend"]]
    train = dict(model=size["model"], batch=size["batch"], checkpointing=False)
    label = f"{size['model']}, batch {size['batch']}, bf16"
    protocol = paper_config(SAMPLE_CONFIG).sample
    sample = dict(model=size["model"], batch=size["sample_batch"], nfe=size["nfe"], guidance="batched",
                  algorithm=protocol.algorithm, scale=protocol.scale)
    xformers = (dict(kind="train", spec=train, argv=bench + ["--precision", "bf16"], attention="xformers")
                if importlib.util.find_spec("xformers") is not None else
                {"missing": "xformers is not installed (pip install xformers)"})

    def run(precision, sharded=False):
        return dict(kind="run", spec=dict(model=size["model"], batch=size["batch"], steps=size["run_steps"],
                                          precision=precision, device=args.device, sharded=sharded))

    return [
        (f"train {label}, SDPA", TIMEOUTS["train"],
         dict(kind="train", spec=train, argv=bench + ["--precision", "bf16"], attention="sdpa")),
        (f"sample {size['model']}, {protocol.algorithm} {size['nfe']} steps, guidance {protocol.scale}, "
         f"batch {size['sample_batch']}, fp16", TIMEOUTS["sample"],
         dict(kind="sample", spec=sample, argv=bench + ["--precision", "fp16"])),
        (f"run {size['run_steps']} steps fp16", TIMEOUTS["run"], run("fp16")),
        (f"run {size['run_steps']} steps bf16", TIMEOUTS["run"], run("bf16")),
        (f"run {size['run_steps']} steps bf16, FSDP2 on 1 GPU (vs the row above)", TIMEOUTS["run"],
         run("bf16", sharded=True)),
        ("CUDA-only tests (pytest -m cuda)", TIMEOUTS["tests"], dict(kind="tests", spec=dict(tests=size["tests"]))),
        (f"train {label}, xformers", TIMEOUTS["train"], xformers),
        (f"train {label}, SDPA + torch.compile ({size['compile_backend']})", TIMEOUTS["train+compile"],
         dict(kind="train", spec=train, argv=bench + ["--precision", "bf16", "--compile"], attention="sdpa")),
        (f"MeanFlow / shortcut step vs flow matching, {size['fewstep_model']}, batch {size['fewstep_batch']}, bf16",
         TIMEOUTS["fewstep"], dict(kind="fewstep", spec=dict(model=size["fewstep_model"], batch=size["fewstep_batch"],
                                                             steps=size["steps"], rounds=3, precision="bf16",
                                                             device=args.device))),
    ]


def cells(r):
    """step or call (s), images/s, peak memory (GB), MFU, non-finite steps, result."""
    if "error" in r or "missing" in r:
        return ["-"] * 5 + [f"FAILED: {r['error']}" if "error" in r else f"missing: {r['missing']}"]
    if "passed" in r:
        summary = f"{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped"
        summary += f" ({', '.join(r['failures'][:3])})" if r["failures"] else ""
        return ["-"] * 5 + [("ok: " if r["failed"] == 0 and r["exit"] in (0, 5) else "FAILED: ") + summary]
    if "meanflow_ratio" in r:
        return [fmt(r["step_s"], 3), rate(r["batch"] / r["step_s"]), fmt(r["peak_gb"]), "-", "-",
                f"ok: MeanFlow {r['meanflow_ratio']:.2f}x, shortcut {r['shortcut_ratio']:.2f}x flow matching's "
                f"{r['flow_s']:.3f} s"]
    if "first_loss" in r:
        return [fmt(r["step_s"], 3), rate(r["batch"] / r["step_s"]), fmt(r["peak_gb"]), "-", str(r["nonfinite"]),
                f"ok: loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}"]
    mfu = f"{100 * r['mfu_macs']:.1f}%" if r.get("mfu_macs") else "-"
    return [fmt(r.get("step_s", r.get("s")), 3), rate(r["images_per_s"]), fmt(r["peak_gb"]), mfu, "-", "ok"]


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(execute(json.loads(args.worker))))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run the dry run with --device cpu --tiny", file=sys.stderr)
        return 1
    start = time.perf_counter()
    print(f"GPU check | {describe_machine(args.device)} | {'tiny dry run' if args.tiny else 'full'} | "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    header(["piece", "step or call (s)", "images/s", "peak mem (GB)", "MFU (3x MACs)", "non-finite steps", "result",
            "wall (s)"])
    failed = 0
    for name, timeout, job in pieces(args):
        left = args.budget - (time.perf_counter() - start)
        t0 = time.perf_counter()
        if left < 10:
            r = {"error": f"not started: the {args.budget:.0f} s budget is spent"}
        else:
            r = job if "missing" in job else dict(job["spec"], **run_piece(args, job, min(timeout, left)))
        t = time.perf_counter() - t0
        failed += "error" in r or cells(r)[-1].startswith("FAILED")
        row([name, *cells(r), f"{t:.0f}"])
    print(f"\n{failed} piece(s) failed; {time.perf_counter() - start:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
