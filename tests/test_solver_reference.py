"""Our DPM-Solver++(2M) against an independent implementation: diffusers' DPMSolverMultistepScheduler.

Same SD discrete schedule, same time grid (diffusers' sigmas mapped to our continuous time through
inverse_lambda, lambda = -log sigma_VE), same analytic Gaussian model; the two must agree to float32
rounding. (3M is not compared: diffusers weights the second divided difference by phi_3 where the exact
Taylor coefficient is 2 phi_3, see dpm_solver_pp.multistep_dpm_solver_update.)
"""
import math

import pytest
import torch

from dpm_solver_pp import DPM_Solver
from sde import DiscreteVP

S = 0.5
STEPS = 20


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy-2 __array__ notice inside diffusers
@pytest.mark.parametrize("use_lu_lambdas", [False, True], ids=["linspace-timesteps", "uniform-lambda"])
def test_2m_matches_diffusers(use_lu_lambdas):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="sigma_min", lower_order_final=True,
        timestep_spacing="linspace", use_lu_lambdas=use_lu_lambdas)
    sched.set_timesteps(STEPS)
    sigmas_ve = sched.sigmas.double()  # sigma_t / alpha_t at each grid point, the last one the final time

    def eps_at(x, sigma_ve):
        abar = 1.0 / (1.0 + sigma_ve ** 2)
        return math.sqrt(1.0 - abar) * x / (abar * S ** 2 + 1.0 - abar)

    x_T = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x_T.float()
    for k in sched.timesteps:
        eps = eps_at(x.double(), float(sigmas_ve[sched.step_index or 0])).float()
        x = sched.step(eps, k, x).prev_sample
    ref = x.double()

    ns = DiscreteVP().schedule
    ts = ns.inverse_lambda(-torch.log(sigmas_ve))  # (STEPS + 1,) our continuous times of the same grid

    def model_fn(x_, t):
        a, s = ns.marginal_alpha(t).reshape(-1, 1), ns.marginal_std(t).reshape(-1, 1)
        return s * x_ / (a ** 2 * S ** 2 + s ** 2)

    solver = DPM_Solver(model_fn, ns, algorithm_type="dpmsolver++")
    x = x_T.clone()
    t_prev, m_prev = [ts[0]], [solver.model_fn(x, ts[0])]
    for step in range(1, STEPS + 1):
        x = solver.multistep_dpm_solver_update(x, m_prev, t_prev, ts[step], min(2, step))
        t_prev = (t_prev + [ts[step]])[-2:]
        if step < STEPS:
            m_prev = (m_prev + [solver.model_fn(x, ts[step])])[-2:]
    assert float((x - ref).abs().max() / ref.abs().max()) < 5e-6
