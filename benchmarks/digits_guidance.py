"""The digit score of a trained digits run under guidance variants: plain classifier-free guidance, guidance
limited to a noise interval, and autoguidance by a weaker network. Everything goes through the engine
(libs.sampling.Sampler, config.sample keys), with the run's own config.json, so the objective is the run's.

    python benchmarks/digits_guidance.py --run workdir/digits_flow [--guide workdir/digits_guide/ckpts/300.ckpt]
        [--n 1000] [--scale 1.0]

Prints one row per variant: digit_accuracy (a classifier trained on real digits reads the sample as its class;
chance 0.1) and pixel_fd (lower is better), with the wall time of each evaluation.
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
from libs.family import family_of  # noqa: E402
from libs.sampling import Sampler  # noqa: E402
from sde import Objective  # noqa: E402


def variants(scale, guide):
    """(name, config.sample updates) of each variant; sigma = s_t / a_t (EDM's noise level)."""
    rows = [("unguided", dict(cfg=False, scale=0.0)),
            (f"CFG scale {scale:g}, every step (the demo)", dict(scale=scale)),
            (f"CFG scale {scale:g}, sigma in (0.28, 5.42] (EDM2's interval)", dict(scale=scale, guidance_sigma_min=0.28,
                                                                                guidance_sigma_max=5.42)),
            (f"CFG scale {scale:g}, sigma <= 1 (no guidance at high noise)", dict(scale=scale, guidance_sigma_max=1.0)),
            (f"CFG scale {2 * scale:g}, sigma in (0.28, 5.42]", dict(scale=2 * scale, guidance_sigma_min=0.28,
                                                                     guidance_sigma_max=5.42))]
    if guide:
        rows += [(f"autoguidance scale {scale:g} ({os.path.basename(os.path.dirname(os.path.dirname(guide)))})",
                  dict(scale=scale, guide_path=guide)),
                 (f"autoguidance scale {2 * scale:g}", dict(scale=2 * scale, guide_path=guide))]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a digits run folder (config.json, ckpts/)")
    parser.add_argument("--guide", default="", help="the weaker network for autoguidance (a ckpts/<step>.ckpt)")
    parser.add_argument("--n", type=int, default=1000, help="samples per variant")
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    with open(os.path.join(args.run, "config.json")) as f:
        base = ml_collections.ConfigDict(json.load(f))
    ckpt = latest_checkpoint(os.path.join(args.run, "ckpts"))
    family = family_of(base)
    data = get_dataset(base.dataset.name, **dataset_kwargs(base))
    nnet, _ = load_models(base, family, ckpt, "cpu")
    print(f"{ckpt}: objective {Objective.of(base).describe()}, {base.sample.algorithm} {base.sample.sample_steps} "
          f"steps, {args.n} samples | {describe_machine()}")
    print("| guidance | digit_accuracy | pixel_fd | wall s |\n|---|---|---|---|")
    for name, updates in variants(args.scale, args.guide):
        config = ml_collections.ConfigDict(base.to_dict())
        config.sample.update(updates)
        scale = float(config.sample.scale) if config.sample.cfg else 0.0
        sampler = Sampler.for_config(config, family, nnet, "cpu", None,
                                     family.null_condition(config) if scale > 0 else None)
        labels = family.sample_labels(config, args.n)
        start = time.time()
        gen = sampler.generate_fn(config.sample.algorithm, int(config.sample.sample_steps), scale, labels=labels)
        with torch.no_grad():
            images = torch.cat([gen(idx) for idx in torch.arange(args.n).split(500)])
        score = data.sample_metric(images, labels)
        print(f"| {name} | {score['digit_accuracy']:.3f} | {score['pixel_fd']:.3f} | {time.time() - start:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
