"""Relative error of every sampler against the exact probability-flow map, on an analytic Gaussian model.

Data x0 ~ N(0, s^2 I): the exact noise predictor is eps*(x, t) = sigma_t x / v_t with v_t = alpha_t^2 s^2 +
sigma_t^2, and the probability-flow ODE maps x_T to x_T sqrt(v_end / v_T). The error is
max |x_solver - x_exact| / max |x_exact| over a batch (the solvers are linear maps here, so it does not
depend on the batch). float64 by default, so only the discretisation error is measured; --dtype float32
shows the rounding floor of float32 sampling.

    python benchmarks/solver_error_table.py [--steps 10 20 50 100 200] [--s 0.5] [--markdown] [--dtype float32]

Prints one row per solver: the error at each number of network calls (NFE), and the gain of the multistep
solvers over the paper protocols at equal NFE.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.machine import describe_machine  # noqa: E402
from dpm_solver_pp import DPM_Solver, model_wrapper  # noqa: E402
from sde import build_diffusion  # noqa: E402


def gaussian_eps_model(ns, s):
    """Network (x, t) -> exact eps* of N(0, s^2 I) data at solver time t."""

    def net(x, t):
        t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        alpha, sigma = ns.marginal_alpha(t), ns.marginal_std(t)
        return sigma * x / (alpha ** 2 * s ** 2 + sigma ** 2)

    return net


def exact_map(ns, s, x_T, t_start, t_end):
    """x at t_end on the probability-flow trajectory through x_T at t_start."""
    t = torch.tensor([t_start, t_end], dtype=torch.float64)
    v = ns.marginal_alpha(t) ** 2 * s ** 2 + ns.marginal_std(t) ** 2
    return x_T * math.sqrt(float(v[1] / v[0]))


# name -> (diffusion kind, DPM_Solver kwargs, sample kwargs, t_end)
SOLVERS = {
    "paper protocol, continuous (DPM-Solver-3 fast, logSNR, t_end 1e-4)":
        ("continuous", "dpmsolver", dict(order=3, skip_type="logSNR", method="singlestep"), 1e-4),
    "paper protocol, discrete (DPM-Solver++3 singlestep, time-uniform, t_end 1/N)":
        ("discrete", "dpmsolver++", dict(order=3, skip_type="time_uniform", method="singlestep"), 1e-3),
    "DPM-Solver-1 (DDIM), logSNR": ("continuous", "dpmsolver", dict(order=1, skip_type="logSNR", method="singlestep"), 1e-4),
    "DPM-Solver-2 singlestep, logSNR": ("continuous", "dpmsolver", dict(order=2, skip_type="logSNR", method="singlestep"), 1e-4),
    "DPM-Solver++2 singlestep, logSNR": ("continuous", "dpmsolver++", dict(order=2, skip_type="logSNR", method="singlestep"), 1e-4),
    "DPM-Solver++3 singlestep, logSNR": ("continuous", "dpmsolver++", dict(order=3, skip_type="logSNR", method="singlestep"), 1e-4),
    "DPM-Solver++(2M), logSNR [dpm_solver++_2m]": ("continuous", "dpmsolver++", dict(order=2, skip_type="logSNR", method="multistep"), 1e-4),
    "DPM-Solver++(3M), logSNR [dpm_solver++_3m]": ("continuous", "dpmsolver++", dict(order=3, skip_type="logSNR", method="multistep"), 1e-4),
    "DPM-Solver(3M) noise prediction, logSNR": ("continuous", "dpmsolver", dict(order=3, skip_type="logSNR", method="multistep"), 1e-4),
    "DPM-Solver++(2M), discrete, logSNR [dpm_solver++_2m]": ("discrete", "dpmsolver++", dict(order=2, skip_type="logSNR", method="multistep"), 1e-3),
    "DPM-Solver++(3M), discrete, logSNR [dpm_solver++_3m]": ("discrete", "dpmsolver++", dict(order=3, skip_type="logSNR", method="multistep"), 1e-3),
}


def relative_error(kind, algorithm_type, kwargs, t_end, steps, s, x_T):
    """(relative max error, NFE) of one solver run."""
    ns = build_diffusion(kind).schedule
    # The exact model reads solver time itself: no network time scale in between.
    model_fn = model_wrapper(gaussian_eps_model(ns, s), ns, network_time=lambda t: t)
    solver = DPM_Solver(model_fn, ns, algorithm_type=algorithm_type)
    x = solver.sample(x_T, steps=steps, t_start=1.0, t_end=t_end, **kwargs)
    exact = exact_map(ns, s, x_T.double(), 1.0, t_end)
    return float((x.double() - exact).abs().max() / exact.abs().max()), solver.nfe


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100, 200])
    parser.add_argument("--s", type=float, default=0.5, help="data standard deviation")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                        help="dtype of x_T, hence of the solver arithmetic (the exact map is always float64)")
    args = parser.parse_args()
    print(f"{args.dtype} solver arithmetic | {describe_machine()}")
    x_T = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(getattr(torch, args.dtype))

    table = {}
    for name, (kind, alg, kwargs, t_end) in SOLVERS.items():
        row = []
        for steps in args.steps:
            err, nfe = relative_error(kind, alg, kwargs, t_end, steps, args.s, x_T)
            if nfe != steps:
                raise RuntimeError(f"{name}: {nfe} network calls for {steps} steps")
            row.append(err)
        table[name] = row

    head = ["solver"] + [f"NFE {n}" for n in args.steps]
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for name, row in table.items():
            print(f"| {name} | " + " | ".join(f"{e:.2e}" for e in row) + " |")
    else:
        width = max(len(n) for n in table)
        print(" " * width + "".join(f"{h:>11}" for h in head[1:]))
        for name, row in table.items():
            print(f"{name:<{width}}" + "".join(f"{e:>11.2e}" for e in row))

    print()
    print("Gain at equal NFE (error of the paper protocol / error of the multistep solver):")
    pairs = [("continuous", "paper protocol, continuous (DPM-Solver-3 fast, logSNR, t_end 1e-4)",
              ["DPM-Solver++(2M), logSNR [dpm_solver++_2m]", "DPM-Solver++(3M), logSNR [dpm_solver++_3m]"]),
             ("discrete", "paper protocol, discrete (DPM-Solver++3 singlestep, time-uniform, t_end 1/N)",
              ["DPM-Solver++(2M), discrete, logSNR [dpm_solver++_2m]",
               "DPM-Solver++(3M), discrete, logSNR [dpm_solver++_3m]"])]
    for kind, base, others in pairs:
        for other in others:
            gains = ", ".join(f"NFE {n}: x{b / o:.2g}" for n, b, o in zip(args.steps, table[base], table[other]))
            print(f"  {kind}: {other.split('[')[-1].rstrip(']')}: {gains}")


if __name__ == "__main__":
    main()
