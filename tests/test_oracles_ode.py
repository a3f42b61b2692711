"""`ODESolve`'s less travelled paths against closed forms and their peer libraries, called
directly (issue 29: they kill `bertode/solve/ode.py`'s mutants; docs/testing.md, "Mutation testing").

* the adaptive solvers' recording subclass: it notes each forward step's t (and hands the
  observer the state) and steps exactly as its torchdyn base;
* truncated backpropagation (``backprop=k``): Euler's recursion on dz/dt = a z + t, its
  gradient through the last k steps only, the skipped steps the identity;
* torchode's fixed steps: the same Euler recursion, each sequence at its own time;
* torchdiffeq's adjoint: bit for bit what ``torchdiffeq.odeint_adjoint`` gives with the
  same forward and backward options.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bertode.solve import ode, observe
from bertode.solve.ode import ODEProblem, ODESolve
from bertode.solve.ode_sensitivities import Adjoint
from bertode.solve.solvers import get_solver
from bertode.solve.stats import SolveRecord


class Linear(nn.Module):
    """dz/dt = a z + t, elementwise (any state shape; t a scalar or one time per sequence)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, t, z):
        return self.a * z + t


def _euler(z0, a, t0, t1, steps):
    """Euler's states z_0..z_n on dz/dt = a z + t, in float64."""
    h, states = (t1 - t0) / steps, [z0]
    for k in range(steps):
        states.append(states[-1] + h * (a * states[-1] + (t0 + k * h)))
    return states


def test_recording_solver_notes_forward_steps_and_steps_as_its_base(monkeypatch):
    monkeypatch.setattr(ode, "_RECORDING_CLASSES", {})  # built afresh: a solve earlier in the process cached one
    base = type(get_solver("dopri5").build(torch.float64))
    cls = ode.recording_solver_class(base)
    assert cls is ode.recording_solver_class(base) and issubclass(cls, base)
    assert cls.__name__ == "RecordingDormandPrince45"
    plain, recording = base(torch.float64), cls(torch.float64)
    assert recording.record is None
    x, t = torch.tensor([[1.0, -0.5, 2.0]], dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64)

    def f(t, x):
        return torch.cos(t) * x

    k1 = 2 * f(t, x)  # a given first stage is used, not recomputed
    expected = plain.step(f, x, t, 0.1, k1=k1)
    for got, want in zip(recording.step(f, x, t, 0.1, k1=k1)[:3], expected[:3]):  # without a record: a plain step
        assert torch.equal(got, want)
    recording.record = SolveRecord(name="probe")

    class Notes:
        def __init__(self):
            self.seen = []

        def note(self, t, x):
            self.seen.append((t, x))

    notes = Notes()
    with observe.observing(notes):
        got = recording.step(f, x, t, 0.1, k1=k1)
    assert torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])
    assert recording.record.step_times == [t] and len(notes.seen) == 1
    assert notes.seen[0][0] is t and notes.seen[0][1] is x
    recording.record.phase = "backward"  # an adjoint's backward steps are not the forward solve's
    recording.step(f, x, t, 0.1)
    assert recording.record.step_times == [t]


def test_truncated_backprop_is_eulers_recursion_with_the_last_k_steps_differentiated():
    field, a = Linear(-0.7), -0.7
    z0 = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64, requires_grad=True)
    z1, _ = ODESolve("euler", steps=4)(z0, field, list(field.parameters()), 0.0, 1.0, backprop=2)
    states = _euler(z0.detach(), a, 0.0, 1.0, 4)
    torch.testing.assert_close(z1, states[4], rtol=1e-14, atol=1e-14)
    z1.sum().backward()
    h = 0.25
    # the first two steps are the identity backwards; the last two, z <- z + h (a z + t), are differentiated
    torch.testing.assert_close(z0.grad, torch.full_like(z0, (1 + a * h) ** 2), rtol=1e-14, atol=1e-14)
    da = (h * states[3] + (1 + a * h) * h * states[2]).sum()  # z_2 is a constant of a (computed without a graph)
    torch.testing.assert_close(field.a.grad, da, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError) as error:
        ODESolve("euler", steps=4, ode_backend="torchdiffeq")(z0, field, [field.a], 0.0, 1.0, backprop=2)
    assert str(error.value) == ("depth backprop=2 is invalid with ode_backend='torchdiffeq': the truncated solve "
                                "steps with torchdyn's solvers; allowed: ode_backend='torchdyn'")


def test_problem_grid_and_step_on_a_non_autonomous_field():
    field = Linear(0.3)
    z0 = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    problem = ODEProblem(ODESolve("heun", steps=4), z0, field, [], 0.5, 1.5, SolveRecord(name="probe"))
    assert problem.grid() == [0.5, 0.75, 1.0, 1.25, 1.5]
    with torch.no_grad():
        stepped = problem.step(z0, 0.75, 0.25)
    k1 = 0.3 * z0 + 0.75  # Heun at t = 0.75: both stages at their own times
    k2 = 0.3 * (z0 + 0.25 * k1) + 1.0
    torch.testing.assert_close(stepped, z0 + 0.125 * (k1 + k2), rtol=1e-14, atol=1e-14)
    adaptive = ODEProblem(ODESolve("dopri5"), z0, field, [], 0.0, 1.0, SolveRecord(name="probe"))
    with pytest.raises(ValueError) as error:
        adaptive.grid()
    assert str(error.value) == "solver='dopri5' is adaptive: it has no fixed grid"


def test_torchode_fixed_steps_are_eulers_recursion_per_sequence():
    field = Linear(-0.4)
    z0 = torch.tensor([[[1.0, -2.0]], [[0.5, 3.0]]], dtype=torch.float64)
    with torch.no_grad():
        z1, record = ODESolve("euler", steps=5, ode_backend="torchode")(z0, field, [], 0.0, 2.0)
    torch.testing.assert_close(z1, _euler(z0, -0.4, 0.0, 2.0, 5)[-1], rtol=1e-12, atol=1e-12)
    assert record.per_sequence["accepted"].tolist() == [5, 5]
    solve = ODESolve("dopri5", ode_backend="torchode", atol=1e-12, rtol=1e-12, max_steps=3)
    with pytest.raises(RuntimeError) as error, torch.no_grad():
        solve(z0, field, [], 0.0, 2.0, name="probe")
    assert str(error.value).startswith("torchode solve 'probe' failed on sequence(s) [0, 1] (")
    assert str(error.value).endswith("); allowed: at most max_steps=3 steps per sequence, finite dynamics")
    with pytest.raises(ValueError) as error:
        ODESolve("rk4", ode_backend="torchode")(z0, field, [], 0.0, 1.0)
    assert str(error.value) == ("solver='rk4' is invalid with ode_backend='torchode'; allowed: a solver torchode has "
                                "(dopri5, tsit5, euler, heun)")


@pytest.mark.parametrize("solver, steps, adjoint_solver", [("dopri5", 1, "rk4"), ("rk4", 3, None)])
def test_torchdiffeq_adjoint_is_odeint_adjoint_with_the_same_options(solver, steps, adjoint_solver):
    import torchdiffeq

    z0 = torch.tensor([[[0.5, -1.0, 2.0]], [[1.5, 0.25, -0.75]]], dtype=torch.float64)
    sensitivity = Adjoint(adjoint_solver=adjoint_solver, adjoint_atol=1e-2, adjoint_rtol=1e-2)
    solve = ODESolve(solver, sensitivity=sensitivity, steps=steps, atol=1e-4, rtol=1e-4, ode_backend="torchdiffeq")
    ours_field, peer_field = Linear(-0.9), Linear(-0.9)
    ours_z0, peer_z0 = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    ours, _ = solve(ours_z0, ours_field, list(ours_field.parameters()), 0.0, 1.0)
    t_span = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    spec, backward = get_solver(solver), get_solver(adjoint_solver or solver)
    peer = torchdiffeq.odeint_adjoint(
        peer_field, peer_z0.reshape(2, -1), t_span, method=spec.torchdiffeq, atol=1e-4, rtol=1e-4,
        adjoint_params=(peer_field.a,), adjoint_method=backward.torchdiffeq, adjoint_atol=1e-2, adjoint_rtol=1e-2)[-1]
    assert torch.equal(ours.reshape(2, -1), peer)
    (ours * torch.arange(6.0, dtype=torch.float64).view(2, 1, 3)).sum().backward()
    (peer * torch.arange(6.0, dtype=torch.float64).view(2, 3)).sum().backward()
    assert torch.equal(ours_field.a.grad, peer_field.a.grad) and torch.equal(ours_z0.grad, peer_z0.grad)


def test_torchdiffeq_adjoint_without_trainable_parameters_is_backpropagation():
    import torchdiffeq

    field = Linear(-0.9).requires_grad_(False)
    z0 = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    solve = ODESolve("dopri5", sensitivity=Adjoint(adjoint_atol=1e-2, adjoint_rtol=1e-2), atol=1e-4, rtol=1e-4,
                     ode_backend="torchdiffeq")
    ours, _ = solve(z0, field, list(field.parameters()), 0.0, 1.0)
    ours.sum().backward()
    peer_z0 = z0.detach().clone().requires_grad_()
    peer = torchdiffeq.odeint(field, peer_z0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="dopri5",
                              atol=1e-4, rtol=1e-4)[-1]
    peer.sum().backward()
    assert torch.equal(ours, peer) and torch.equal(z0.grad, peer_z0.grad)


def test_a_tableau_solver_steps_truncated_and_on_a_kept_grid():
    """Heun (an `ExplicitRK` tableau, no error row) where bertode steps it itself (``backprop=k``)
    and where torchdyn keeps its grid (the interpolated adjoint): the closed form (1 + ah + (ah)^2/2)^n."""
    from bertode.solve.ode_sensitivities import InterpolatedAdjoint

    a = torch.nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))
    z0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    expected = z0.detach() * (1 - 0.25 + 0.25 ** 2 / 2) ** 4
    truncated, _ = ODESolve("heun", steps=4)(z0, lambda t, z: a * z, [a], 0.0, 1.0, backprop=2)
    kept, _ = ODESolve("heun", sensitivity=InterpolatedAdjoint(), steps=4)(z0, lambda t, z: a * z, [a], 0.0, 1.0)
    torch.testing.assert_close(truncated, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(kept, expected, rtol=1e-14, atol=1e-14)
