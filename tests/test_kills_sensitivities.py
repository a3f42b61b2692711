"""Oracle tests written to kill the mutation-testing survivors (issue 29) of the gradient-method
axis: `solve/sensitivities.py` (the registry), `ode_sensitivities.py`, `deq_sensitivities.py`,
and the per-sequence solve (`solve/per_sequence.py`)."""

import types

import pytest
import torch

import bertode
from bertode.solve import sensitivities
from bertode.solve.deq_sensitivities import ImplicitGradient, PhantomGradient
from bertode.solve.ode_sensitivities import Adjoint, Autograd, InterpolatedAdjoint


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in the test are forgotten afterwards (the registry's entries and the defaults)."""
    monkeypatch.setattr(sensitivities.SENSITIVITIES, "_entries", dict(sensitivities.SENSITIVITIES._entries))
    monkeypatch.setattr(sensitivities, "_DEFAULTS", dict(sensitivities._DEFAULTS))


def test_registering_sets_a_familys_default_only_when_asked(scratch_registry):
    class Plain(bertode.ODESensitivity):
        def __call__(self, problem):
            return problem.autograd()

    class Chosen(Plain):
        pass

    assert bertode.register_sensitivity("kill_plain")(Plain) is Plain
    assert sensitivities.default_sensitivity("ode") == "autograd" and sensitivities.default_sensitivity("deq") == "ift"
    assert sensitivities.get_sensitivity("kill_plain") is Plain and Plain.registry_name == "kill_plain"
    assert "kill_plain" in sensitivities.available_sensitivities("ode")
    assert "kill_plain" not in sensitivities.available_sensitivities("deq")
    assert bertode.register_sensitivity("kill_chosen", default=True)(Chosen) is Chosen
    assert sensitivities.default_sensitivity("ode") == "kill_chosen"
    assert sensitivities.default_sensitivity("deq") == "ift"
    assert bertode.BertODEConfig(vocab_size=64, hidden_size=32).sensitivity == "kill_chosen"


def test_a_method_reads_its_config_fields_and_kwargs_and_a_config_may_lack_the_kwargs():
    config = types.SimpleNamespace(adjoint_solver="rk4", adjoint_atol=1e-3, adjoint_rtol=1e-6)
    method = Adjoint.from_config(config)  # no sensitivity_kwargs attribute at all
    assert (method.adjoint_solver, method.adjoint_atol, method.adjoint_rtol) == ("rk4", 1e-3, 1e-6)
    phantom = PhantomGradient.from_config(types.SimpleNamespace(deq_phantom_steps=3, sensitivity_kwargs=None))
    assert phantom.steps == 3
    ift = ImplicitGradient.from_config(types.SimpleNamespace(
        deq_backward_solver="anderson", deq_backward_max_iter=7, deq_backward_tol=1e-3, sensitivity_kwargs={}))
    assert (ift.backward_solver, ift.backward_max_iter, ift.backward_tol) == ("anderson", 7, 1e-3)


def test_a_method_shows_its_class_and_options():
    assert repr(Adjoint("rk4", 1e-3)) == "Adjoint(adjoint_solver='rk4', adjoint_atol=0.001, adjoint_rtol=0.0001)"
    assert repr(Autograd()) == "Autograd()"
    assert repr(PhantomGradient(2)) == "PhantomGradient(steps=2)"


def test_the_adjoints_defaults_are_the_configs():
    config = bertode.BertODEConfig(vocab_size=64, hidden_size=32)
    method = Adjoint()
    assert (method.adjoint_solver, method.adjoint_atol, method.adjoint_rtol) == (
        config.adjoint_solver, config.adjoint_atol, config.adjoint_rtol) == (None, 1e-4, 1e-4)


@pytest.mark.parametrize("adjoint_solver, stage_sum", [
    (None, lambda x: 1 + x),  # the forward solver (Euler) backwards
    ("rk4", lambda x: 1 + x + x ** 2 / 2 + x ** 3 / 6 + x ** 4 / 24),
])
def test_the_adjoint_solves_backwards_with_its_adjoint_solver(adjoint_solver, stage_sum):
    """dz/dt = a z with Euler forward: the adjoint a' = -a lambda, solved backwards on the same grid by the
    adjoint solver, gives dz1/dz0 = R(a h)^n, R the solver's stability polynomial (Euler's or RK4's)."""
    from bertode.solve.ode import ODESolve

    a = torch.nn.Parameter(torch.tensor(-1.5, dtype=torch.float64))
    z0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    solve = ODESolve("euler", sensitivity=Adjoint(adjoint_solver=adjoint_solver), steps=4)
    z1, _ = solve(z0, lambda t, z: a * z, [a], 0.0, 1.0)
    torch.testing.assert_close(z1, z0.detach() * (1 - 1.5 * 0.25) ** 4, rtol=1e-14, atol=1e-14)
    z1.sum().backward()
    torch.testing.assert_close(z0.grad, torch.full_like(z0, stage_sum(-1.5 * 0.25) ** 4), rtol=1e-12, atol=1e-12)
