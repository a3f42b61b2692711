"""Solutions against oracles: torchdiffeq on the same field, and rk4's order of accuracy."""

import math

import pytest
import torch
import torchdiffeq

import bertode
from conftest import tiny_ode_config


def _site_and_dynamics(dtype=torch.float32, **config):
    torch.manual_seed(0)
    model = bertode.BertODEModel(tiny_ode_config(num_hidden_layers=1, **config)).to(dtype).eval()
    # Larger weights than BERT's init so the dynamics are far from linear.
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    site = model.encoder.layer[0].feed_forward
    x = torch.randn(2, 6, 32, dtype=dtype, generator=torch.Generator().manual_seed(2))

    def dynamics(t, z):
        return site.field(t, z, lambda h: site.branch(h, None), site.norm)

    return site, x, dynamics


def _solve(site, x):
    return site.solve(x, lambda t, z: site.field(t, z, lambda h: site.branch(h, None), site.norm),
                      site.dynamics_parameters(), 0.0, 1.0)[0]


@pytest.mark.parametrize("solver", ["dopri5", "tsit5"])
@pytest.mark.parametrize("vector_field", ["residual", "add_norm"])
def test_adaptive_solution_matches_torchdiffeq(solver, vector_field):
    site, x, dynamics = _site_and_dynamics(solver=solver, atol=1e-7, rtol=1e-7, vector_field=vector_field)
    with torch.no_grad():
        ours = _solve(site, x)
        reference = torchdiffeq.odeint(dynamics, x, torch.tensor([0.0, 1.0]), method="dopri5", atol=1e-7, rtol=1e-7)[-1]
    assert (ours - x).abs().max() > 1e-2  # the flow moved the state
    assert (ours - reference).abs().max() <= 1e-5


def test_torchdiffeq_backend_matches_torchdyn_backend():
    site_dyn, x, _ = _site_and_dynamics(solver="dopri5", atol=1e-7, rtol=1e-7)
    site_tde, _, _ = _site_and_dynamics(solver="dopri5", atol=1e-7, rtol=1e-7, ode_backend="torchdiffeq")
    with torch.no_grad():
        assert (_solve(site_dyn, x) - _solve(site_tde, x)).abs().max() <= 1e-5


def test_rk4_converges_with_order_four_in_float64():
    site, x, dynamics = _site_and_dynamics(dtype=torch.float64, solver="rk4")
    with torch.no_grad():
        reference = torchdiffeq.odeint(dynamics, x, torch.tensor([0.0, 1.0], dtype=torch.float64),
                                       method="dopri5", atol=1e-13, rtol=1e-13)[-1]
        errors = []
        steps = [2, 4, 8, 16]
        for n in steps:
            site.solve.steps = n
            errors.append((_solve(site, x) - reference).abs().max().item())
    slopes = [math.log(errors[i] / errors[i + 1], 2) for i in range(len(errors) - 1)]
    order = (math.log(errors[0]) - math.log(errors[-1])) / math.log(steps[-1] / steps[0])
    assert abs(order - 4) <= 0.3, (errors, slopes)
