"""Training-step time of the few-step objectives against flow matching on the same network: zero_grad, the
objective's loss, backward, AdamW, in the order the trainer runs them. MeanFlow's overhead is its forward-mode
derivative (dual tensors, on the two_time_fraction of the batch with r != t) and, with guidance inside the
target, one unconditional forward; the shortcut model's is two no-grad forwards on its self-consistency quarter.

    python benchmarks/fewstep_step_time.py --models digits-tiny,S/2-cifar10 --batch 64,8   # the CPU table
    python benchmarks/fewstep_step_time.py --device cuda --models L/2-latent --batch 64 --precision bf16

Rows interleave the objectives round by round (the median of --rounds rounds of --steps steps each), so a shared
machine's drift hits them alike; the ratio is to flow matching's median. Every network is built with the second
time token (config.nnet.second_time), flow matching feeding it 0.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.benchmark import batch_inputs, nnet_config  # noqa: E402
from benchmarks.machine import describe_machine, sync  # noqa: E402
from libs.nnet import build_nnet  # noqa: E402
from sde import Objective, build_diffusion  # noqa: E402

OBJECTIVES = {  # name -> the objective (build_diffusion); null label 0 for guidance inside the target
    "flow matching": Objective(path="linear", prediction="velocity", time_dist="logit_normal"),
    "MeanFlow (25% r != t)": Objective(path="meanflow", prediction="average_velocity", time_dist="logit_normal"),
    "MeanFlow + guidance in the target": Objective(path="meanflow", prediction="average_velocity",
                                                   time_dist="logit_normal", cfg_omega=2.0),
    "shortcut (25% self-consistency)": Objective(path="shortcut", prediction="velocity"),
}


def step_times(model, batch, device, steps, rounds, precision="fp32"):
    """{objective name: [seconds per step of each round]} of model (a benchmarks.benchmark MODELS key)."""
    cfg = nnet_config(model, use_checkpoint=False, second_time=True)
    torch.manual_seed(0)
    nnet = build_nnet(cfg).to(device).train()
    x0, cond = batch_inputs(cfg, batch, device)
    optimizer = torch.optim.AdamW(nnet.parameters(), lr=1e-4)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    losses = {}
    for name, objective in OBJECTIVES.items():
        if objective.cfg_omega != 1.0 and not cond:
            continue  # guidance needs a condition: unconditional models have no such row
        d = build_diffusion("continuous", objective, null=0)
        if objective.path == "linear":
            losses[name] = lambda d=d: d.loss(lambda x, t, **c: nnet(x, t, timesteps2=torch.zeros_like(t), **c),
                                              x0, **cond)
        else:
            losses[name] = lambda d=d: d.loss(nnet, x0, **cond)

    def step(loss_fn):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn().mean()
        loss.backward()
        optimizer.step()

    times = {name: [] for name in losses}
    for name, fn in losses.items():  # warm-up: one step each
        step(fn)
    for _ in range(rounds):
        for name, fn in losses.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step(fn)
            sync(device)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def table(times):
    """Markdown rows: objective, median step (s), ratio to flow matching."""
    base = statistics.median(times["flow matching"])
    rows = ["| objective | step (s), median | ratio to flow matching |", "|---|---|---|"]
    for name, ts in times.items():
        rows.append(f"| {name} | {statistics.median(ts):.4f} | {statistics.median(ts) / base:.2f}x |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", default="digits-tiny,S/2-cifar10", help="benchmarks/benchmark.py MODELS keys")
    p.add_argument("--batch", default="64,8", help="a batch per model (comma-separated)")
    p.add_argument("--steps", type=int, default=3, help="steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"{describe_machine(args.device)} | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for model, batch in zip(args.models.split(","), map(int, args.batch.split(","))):
        print(f"\n{model}, batch {batch}, {args.precision}, {args.rounds} rounds of {args.steps} steps\n")
        print(table(step_times(model, batch, device, args.steps, args.rounds, args.precision)), flush=True)


if __name__ == "__main__":
    main()
