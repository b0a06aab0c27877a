"""Relative error of every sampler of every training objective against the exact probability-flow map, on
Gaussian data, through the one entry point libs.sampling.sample.

Data x0 ~ N(0, s^2 I): E[x0 | x_t] = a_t s^2 x / v_t and E[eps | x_t] = s_t x / v_t with v_t = a_t^2 s^2 + s_t^2,
so the exact network of each objective (noise, v, x0 on the VP schedules, velocity eps - x0 on the linear
flow path) is known in closed form, and the ODE maps x_T at t = 1 to x_T sqrt(v_end / v_1). The error is
max |x - x_exact| / max |x_exact| (float64: only the discretisation error). The order is the slope of
log(error) against log(steps) between the last two step counts.

    python benchmarks/objective_solver_table.py [--steps 10 20 40 80 160] [--s 0.5] [--markdown]
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.machine import describe_machine  # noqa: E402
from libs.sampling import sample  # noqa: E402
from sde import Objective, build_diffusion  # noqa: E402

# name -> (config.diffusion, objective, algorithms)
CASES = {
    "continuous VP, noise": ("continuous", Objective(), ("dpm_solver", "dpm_solver++_2m", "dpm_solver++_3m", "euler", "heun")),
    "continuous VP, v": ("continuous", Objective(prediction="v"), ("dpm_solver++_3m", "heun")),
    "continuous VP, x0": ("continuous", Objective(prediction="x0"), ("dpm_solver++_3m", "heun")),
    "discrete VP, v": ("discrete", Objective(prediction="v"), ("dpm_solver", "dpm_solver++_3m", "heun")),
    "linear flow, velocity": ("continuous", Objective(path="linear", prediction="velocity"),
                              ("euler", "heun", "dpm_solver++_2m", "dpm_solver++_3m")),
    "linear flow, velocity, shift 3": ("continuous", Objective(path="linear", prediction="velocity", shift=3.0),
                                       ("euler", "heun")),
    "linear flow, x0": ("continuous", Objective(path="linear", prediction="x0"), ("euler", "heun", "dpm_solver++_3m")),
}
# Network calls per step (Heun: 2, its last step to t = 0 is Euler).
NFE = {"heun": lambda steps, to_zero: 2 * steps - (1 if to_zero else 0)}


def exact_net(d, s0):
    """The exact prediction of d.objective for N(0, s0^2 I) data, reading its time input back as solver time."""
    def net(x, t_in):
        t = (t_in.double() / d.time_scale).reshape(-1, *[1] * (x.ndim - 1))
        a, s = d.coefficients(t)
        v = a ** 2 * s0 ** 2 + s ** 2
        x0, eps = a * s0 ** 2 * x / v, s * x / v
        return {"noise": eps, "x0": x0, "v": a * eps - s * x0, "velocity": eps - x0}[d.objective.prediction]
    return net


def end_time(d, algorithm):
    """Where each sampler stops (libs.sampling defaults): linear Euler / Heun at 0, else the DPM-Solver end."""
    if d.path == "linear":
        return 0.0 if algorithm in ("euler", "heun") else 1e-3
    return 1e-4 if d.time_kind == "continuous" else 1e-3


def relative_error(d, algorithm, steps, s0, x_T):
    t_end = end_time(d, algorithm)
    x = sample(exact_net(d, s0), d, x_T, algorithm=algorithm, steps=steps).double()
    a, s = d.coefficients(torch.tensor([1.0, t_end], dtype=torch.float64))
    v = a ** 2 * s0 ** 2 + s ** 2
    exact = x_T * math.sqrt(float(v[1] / v[0]))
    return float((x - exact).abs().max() / exact.abs().max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80, 160])
    parser.add_argument("--s", type=float, default=0.5, help="data standard deviation")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    print(f"float64 | {describe_machine()}")
    x_T = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    head = ["objective", "sampler"] + [f"{n} steps" for n in args.steps] + ["order"]
    rows = []
    for name, (kind, objective, algorithms) in CASES.items():
        d = build_diffusion(kind, objective)
        for algorithm in algorithms:
            errors = [relative_error(d, algorithm, n, args.s, x_T) for n in args.steps]
            order = math.log(errors[-2] / errors[-1]) / math.log(args.steps[-1] / args.steps[-2])
            rows.append([name, algorithm] + [f"{e:.2e}" for e in errors] + [f"{order:.2f}"])
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
        for row in [head] + rows:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print("Heun makes 2 network calls per step (2 steps - 1 when it ends at t = 0); the others 1.")


if __name__ == "__main__":
    main()
