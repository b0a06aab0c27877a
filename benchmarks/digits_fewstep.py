"""The digit score against the number of network calls for digits runs of any objective: MeanFlow and shortcut
models with their own samplers (k calls = k jumps), flow matching with Euler (1, 2, 4 calls) and the demo's Heun
(13 steps = 25 calls). Everything goes through the engine (libs.sampling.Sampler) with each run's config.json, so
the guidance is the run's own: config.sample.scale when config.sample.cfg (one batched forward of the conditional
and unconditional branches per call), none for MeanFlow, whose guidance is inside its training target.

    python benchmarks/digits_fewstep.py --runs workdir/meanflow,workdir/shortcut,workdir/flow [--calls 1,2,4,25]

Prints one row per run and number of calls: digit_accuracy (a classifier trained on real digits reads the sample
as its class; chance 0.1) and pixel_fd (lower is better), with the checkpoint's step.
"""
import argparse
import json
import os
import sys
import time

import ml_collections
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.machine import describe_machine  # noqa: E402
from libs.checkpoint import latest_checkpoint  # noqa: E402
from libs.datasets import dataset_kwargs, get_dataset  # noqa: E402
from libs.evaluation import load_models  # noqa: E402
from libs.family import family_of, guidance_scale  # noqa: E402
from libs.sampling import Sampler  # noqa: E402
from sde import Objective  # noqa: E402


def protocol(config, calls):
    """(algorithm, steps) that make `calls` network calls with the run's objective."""
    path = Objective.of(config).path
    if path in ("meanflow", "shortcut"):
        return path, calls
    if calls == 25 and config.sample.algorithm == "heun":
        return "heun", 13  # the flow demo's protocol: 12 Heun steps of 2 calls, a last Euler step
    return "euler", calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="comma-separated digits run folders (config.json, ckpts/)")
    parser.add_argument("--calls", default="1,2,4,25")
    parser.add_argument("--n", type=int, default=1000, help="samples per row (the demo's score uses 1,000)")
    parser.add_argument("--ckpt", default="", help="a checkpoint to use instead of each run's latest (one run)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    print(f"{describe_machine()} | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.n} samples per row\n")
    print("| run | objective | step | sampler | network calls | digit_accuracy | pixel_fd | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs.split(","):
        with open(os.path.join(run, "config.json")) as f:
            config = ml_collections.ConfigDict(json.load(f))
        ckpt = args.ckpt or latest_checkpoint(os.path.join(run, "ckpts"))
        family = family_of(config)
        data = get_dataset(config.dataset.name, **dataset_kwargs(config))
        nnet, _ = load_models(config, family, ckpt, "cpu")
        scale = guidance_scale(config)
        sampler = Sampler.for_config(config, family, nnet, "cpu", None,
                                     family.null_condition(config) if scale > 0 else None)
        labels = family.sample_labels(config, args.n)
        for calls in map(int, args.calls.split(",")):
            algorithm, steps = protocol(config, calls)
            start = time.time()
            gen = sampler.generate_fn(algorithm, steps, scale, labels=labels)
            with torch.no_grad():
                images = torch.cat([gen(idx) for idx in torch.arange(args.n).split(500)])
            score = data.sample_metric(images, labels)
            print(f"| {os.path.basename(run.rstrip('/'))} | {Objective.of(config).path} | "
                  f"{os.path.basename(ckpt).split('.')[0]} | {algorithm} {steps}, scale {scale:g} | {calls} | "
                  f"{score['digit_accuracy']:.3f} | {score['pixel_fd']:.3f} | {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
