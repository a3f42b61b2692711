"""`bertode/solve/ode.py`'s surviving mutants killed against oracles (issue 29; docs/testing.md,
"Mutation testing"): tiny float64 solves called directly, each against a closed form, a
recursion written out here, or torchdyn / torchdiffeq / torchode called with the same options.

* the depth dial (``steps=`` per call) on every loop, the adjoint's backward solve included;
* torchdyn's fixed-step adjoint as Euler's recursion of the augmented state (x, lambda, mu)
  backwards over N sub-steps, and its adaptive adjoints bit for bit against ``NeuralODE``;
* no tolerance warnings from torchdyn on fixed-step solves, the ``direct`` loop without a
  ``NeuralODE``, the ``neural_ode`` loop's inner states handed to the observer;
* times and tableaux in float64 for float64 states, pickling after a solve, the record;
* torchode's and torchdiffeq's options bit for bit against the libraries called directly.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from bertode.solve import observe, ode
from bertode.solve.ode import ODEProblem, ODESolve, straight_through
from bertode.solve.ode_sensitivities import Adjoint, InterpolatedAdjoint
from bertode.solve.solvers import ODESolverSpec, get_solver
from bertode.solve.stats import SolveRecord

F64 = torch.float64


class Field(nn.Module):
    """dz/dt = a z + t (``nonlinear``: a tanh(z) + t), elementwise on any state shape."""

    def __init__(self, a: float, nonlinear: bool = False):
        super().__init__()
        self.a, self.nonlinear = nn.Parameter(torch.tensor(a, dtype=F64)), nonlinear

    def forward(self, t, z, args=None):  # torchdyn's DEFunc passes ``args``
        return self.a * (torch.tanh(z) if self.nonlinear else z) + t


def _euler(z0, a, t0, t1, steps):
    """Euler's states z_0..z_n on dz/dt = a z + t, in float64."""
    h, states = (t1 - t0) / steps, [z0]
    for k in range(steps):
        states.append(states[-1] + h * (a * states[-1] + (t0 + k * h)))
    return states


def _z0(requires_grad=False):
    return torch.tensor([[[0.5, -1.0, 2.0]], [[1.5, 0.25, -0.75]]], dtype=F64, requires_grad=requires_grad)


def test_straight_through_without_a_graph_is_the_reached_state_itself():
    start, reached = torch.tensor([1e20], requires_grad=True), torch.tensor([1.0])
    with torch.no_grad():
        assert straight_through(start, reached) is reached  # start + (reached - start) would be 0 here
    assert straight_through(start.detach(), reached) is reached


def test_time_dtype_is_float64_only_for_float64_states():
    assert ode.time_dtype(torch.zeros(1, dtype=F64)) == F64
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert ode.time_dtype(torch.zeros(1, dtype=dtype)) == torch.float32


def test_the_field_is_counted_and_in_the_states_dtype():
    record = SolveRecord(name="probe")
    problem = ODEProblem(ODESolve("euler"), _z0(), lambda t, z: z.float(), [], 0.0, 1.0, record)
    out = problem.field(torch.tensor(0.0), _z0())
    assert out.dtype == F64 and record.nfe_forward == 1


def test_a_step_is_classical_rk4_with_float64_times_and_coefficients():
    """One rk4 step from t = 0.1 (not a float32 number) on dz/dt = -0.7 z + t z^2, written out; the
    state's zero stays zero at every stage (a tableau zero times a stage, never divided by one)."""
    z0, t, h = torch.tensor([[0.5, -1.0, 0.0]], dtype=F64), 0.1, 0.3
    problem = ODEProblem(ODESolve("rk4"), z0, None, [], 0.0, 1.0, SolveRecord(name="probe"))
    seen = []

    def f(t, z):
        return -0.7 * z + t * z * z

    def counted(t, z):
        seen.append(t.dtype)
        return f(t, z)

    problem.dynamics = counted
    with torch.no_grad():
        got = problem.step(z0, t, h)
    k1 = f(t, z0)
    k2 = f(t + h / 2, z0 + h / 2 * k1)
    k3 = f(t + h / 2, z0 + h / 2 * k2)
    k4 = f(t + h, z0 + h * k3)
    assert got[0, 2] == 0
    torch.testing.assert_close(got, z0 + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), rtol=1e-15, atol=1e-15)
    assert seen == [F64] * 4


@pytest.mark.parametrize("loop", ["direct", "neural_ode"])
def test_the_depth_dial_replaces_the_step_count_for_one_call(loop):
    field, z0 = Field(-0.6), _z0()
    solve = ODESolve("euler", steps=4, fixed_step_loop=loop)
    with torch.no_grad():
        for steps in (2, None, 3):
            z1, record = solve(z0, field, [], 0.5, 1.5, steps=steps)
            n = 4 if steps is None else steps
            torch.testing.assert_close(z1, _euler(z0, -0.6, 0.5, 1.5, n)[-1], rtol=1e-14, atol=1e-14)
            assert record.fixed_steps == n and record.nfe_forward == n


def test_the_default_solve_is_one_step_named_solve():
    field, z0 = Field(-0.6), _z0()
    with torch.no_grad():
        z1, record = ODESolve("euler")(z0, field, [], 0.0, 1.0)
    torch.testing.assert_close(z1, _euler(z0, -0.6, 0.0, 1.0, 1)[-1], rtol=1e-15, atol=1e-15)
    assert record.name == "solve" and record.fixed_steps == 1


def test_the_direct_loop_builds_no_neural_ode_and_both_loops_note_the_inner_states():
    field, z0 = Field(-0.6), _z0()
    expected = _euler(z0, -0.6, 0.5, 1.5, 4)
    for loop in ("direct", "neural_ode"):

        class Notes:
            seen = []

            def note(self, t, x):
                self.seen.append((float(t), x.detach().clone()))

        solve = ODESolve("euler", steps=4, fixed_step_loop=loop, atol=1e-6, rtol=1e-6) if loop != "direct" \
            else ODESolve("euler", steps=4)  # the default loop is "direct"
        with torch.no_grad(), observe.observing(Notes()) as notes, warnings.catch_warnings():
            warnings.simplefilter("error")  # torchdyn warns when tolerances reach a fixed-step solver
            z1, _ = solve(z0, field, [], 0.5, 1.5)
        assert (solve._node is None) == (loop == "direct")
        torch.testing.assert_close(z1, expected[-1], rtol=1e-14, atol=1e-14)
        assert [t for t, _ in notes.seen] == [0.75, 1.0, 1.25]
        for (_, x), want in zip(notes.seen, expected[1:4]):
            torch.testing.assert_close(x.view(z0.shape), want, rtol=1e-14, atol=1e-14)


def _adjoint_recursion(z0, a, w, t0, t1, n):
    """torchdyn's adjoint of dz/dt = a z with Euler: the forward solve, then Euler on the
    augmented state backwards (x' = a x, lambda' = -a lambda, mu' = -lambda . x) over n steps."""
    h = (t1 - t0) / n
    x = z0 * (1 + h * a) ** n
    lam, mu = w.clone(), torch.zeros((), dtype=F64)
    for _ in range(n):
        x, lam, mu = x - h * a * x, lam + h * a * lam, mu + h * (lam * x).sum()
    return lam, mu


@pytest.mark.parametrize("dial", [None, 2])
def test_torchdyns_fixed_step_adjoint_is_eulers_recursion_backwards_over_the_sub_steps(dial):
    a = nn.Parameter(torch.tensor(-0.8, dtype=F64))
    z0, w = _z0(requires_grad=True), torch.arange(1.0, 7.0, dtype=F64).view(2, 1, 3) / 7
    sensitivity = Adjoint(adjoint_atol=1e-2, adjoint_rtol=1e-2)  # not torchdyn's defaults: a fixed step warns
    solve = ODESolve("euler", sensitivity=sensitivity, steps=4, atol=1e-6, rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z1, record = solve(z0, lambda t, z: a * z, [a], 0.5, 1.5, steps=dial)
        (z1 * w).sum().backward()
    n = dial or 4
    torch.testing.assert_close(z1, z0.detach() * (1 - 0.8 / n) ** n, rtol=1e-15, atol=1e-15)
    lam, mu = _adjoint_recursion(z0.detach(), -0.8, w, 0.5, 1.5, n)
    torch.testing.assert_close(z0.grad, lam, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(a.grad, mu, rtol=1e-14, atol=1e-14)
    # the sub-stepped solve hands torchdyn t_span = [t0, t1]: the n backward steps and one evaluation at each end
    # (torchdyn's adjoint evaluates the field at every point of t_span: a grid of n + 1 points would cost 2n + 1)
    assert record.phase == "backward" and record.nfe_forward == n and record.nfe_backward == n + 2


def _torchdyn_peer(field, sensitivity, atol, rtol, atol_adjoint, rtol_adjoint):
    from torchdyn.core import NeuralODE
    from torchdyn.numerics.solvers.ode import DormandPrince45

    node = NeuralODE(field, solver=DormandPrince45(F64), sensitivity=sensitivity, atol=atol, rtol=rtol,
                     atol_adjoint=atol_adjoint, rtol_adjoint=rtol_adjoint, return_t_eval=False)
    node.solver_adjoint = DormandPrince45(F64)  # torchdyn 1.0.6 takes only a name there (str_to_solver)
    return node


@pytest.mark.parametrize("sensitivity", ["adjoint", "interpolated_adjoint"])
def test_torchdyns_adaptive_adjoints_are_neural_ode_with_the_same_options(sensitivity):
    """dopri5 both ways, in float64 tableaux, at ODESolve's default tolerances 1e-3 (forward) and the
    adjoint's own (the interpolated adjoint: torchdyn's forward solver and tolerances)."""
    ours_field, peer_field = Field(-0.9, nonlinear=True), Field(-0.9, nonlinear=True)
    ours_z0, peer_z0 = _z0(requires_grad=True), _z0(requires_grad=True)
    method = Adjoint(adjoint_atol=1e-2, adjoint_rtol=1e-2) if sensitivity == "adjoint" else InterpolatedAdjoint()
    ours, record = ODESolve("dopri5", sensitivity=method)(ours_z0, ours_field, list(ours_field.parameters()), 0.0, 2.0)
    peer = _torchdyn_peer(peer_field, sensitivity, 1e-3, 1e-3, 1e-2, 1e-2)(peer_z0.reshape(2, -1),
                                                                          torch.tensor([0.0, 2.0], dtype=F64))[-1]
    assert torch.equal(ours.reshape(2, -1), peer)
    w = torch.arange(6.0, dtype=F64)
    (ours.reshape(-1) * w).sum().backward()
    (peer.reshape(-1) * w).sum().backward()
    assert torch.equal(ours_field.a.grad, peer_field.a.grad) and torch.equal(ours_z0.grad, peer_z0.grad)
    assert record.phase == "backward"


def test_a_solve_pickles_and_deep_copies_without_its_cached_torchdyn_objects():
    a = nn.Parameter(torch.tensor(-0.5, dtype=F64))
    solve = ODESolve("dopri5", sensitivity=Adjoint(), atol=1e-6, rtol=1e-6)
    z0 = _z0()
    first, _ = solve(z0, lambda t, z: a * z, [a], 0.0, 1.0)  # caches a recording solver class, a closure
    for other in (pickle.loads(pickle.dumps(solve)), copy.deepcopy(solve)):
        assert other._node is None and other._solvers == {} and other._adapter is not solve._adapter
        assert (other.spec.name, other.atol, other.steps) == ("dopri5", 1e-6, 1)
        again, _ = other(z0, lambda t, z: a * z, [a], 0.0, 1.0)
        assert torch.equal(again, first)


@pytest.mark.parametrize("backprop", [3, 5])
def test_backprop_of_every_step_is_no_truncation(backprop):
    """k >= steps keeps every step's graph: any backend, the full solve's value and gradient."""
    field, z0 = Field(-0.6), _z0(requires_grad=True)
    z1, _ = ODESolve("rk4", steps=3, ode_backend="torchdiffeq")(z0, field, [field.a], 0.0, 1.0, backprop=backprop)
    z1.sum().backward()
    full_z0 = _z0(requires_grad=True)
    full, _ = ODESolve("rk4", steps=3, ode_backend="torchdiffeq")(full_z0, field, [field.a], 0.0, 1.0)
    full.sum().backward()
    assert torch.equal(z1, full) and torch.equal(z0.grad, full_z0.grad)


def test_truncated_backprop_steps_from_t0_on_a_shifted_interval():
    field, z0 = Field(-0.7), _z0(requires_grad=True)
    z1, _ = ODESolve("euler", steps=4)(z0, field, [field.a], 0.5, 1.5, backprop=1)
    torch.testing.assert_close(z1, _euler(z0.detach(), -0.7, 0.5, 1.5, 4)[-1], rtol=1e-14, atol=1e-14)


def test_torchdiffeq_adjoint_reads_its_own_adaptive_tolerances():
    import torchdiffeq

    sensitivity = Adjoint(adjoint_atol=1e-2, adjoint_rtol=1e-2)
    solve = ODESolve("dopri5", sensitivity=sensitivity, atol=1e-7, rtol=1e-7, ode_backend="torchdiffeq")
    ours_field, peer_field = Field(-0.9, nonlinear=True), Field(-0.9, nonlinear=True)
    ours_z0, peer_z0 = _z0(requires_grad=True), _z0(requires_grad=True)
    ours, _ = solve(ours_z0, ours_field, list(ours_field.parameters()), 0.0, 2.0)
    peer = torchdiffeq.odeint_adjoint(
        peer_field, peer_z0.reshape(2, -1), torch.tensor([0.0, 2.0], dtype=F64), method="dopri5", atol=1e-7,
        rtol=1e-7, adjoint_params=(peer_field.a,), adjoint_method="dopri5", adjoint_atol=1e-2, adjoint_rtol=1e-2)[-1]
    assert torch.equal(ours.reshape(2, -1), peer)
    ours.sum().backward()
    peer.sum().backward()
    assert torch.equal(ours_field.a.grad, peer_field.a.grad) and torch.equal(ours_z0.grad, peer_z0.grad)


def _torchode_peer(field, z0, t0, t1, adaptive, steps=None):
    """torchode called as the docs of `ODEProblem._torchode` say: an integral controller at the
    solve's tolerances (fixed: dt0 = (t1 - t0) / steps), no backpropagation through step-size control."""
    import torchode

    batch, column = z0.shape[0], (z0.shape[0],) + (1,) * (z0.dim() - 1)
    term = torchode.ODETerm(lambda t, x: field(t.view(column), x.view(z0.shape)).reshape(batch, -1))
    method = (torchode.Dopri5 if adaptive else torchode.Euler)(term=term)
    if adaptive:
        controller, dt0 = torchode.IntegralController(atol=1e-6, rtol=1e-6, term=term), None
    else:
        controller, dt0 = torchode.FixedStepController(), torch.full((batch,), (t1 - t0) / steps, dtype=F64)
    solver = torchode.AutoDiffAdjoint(method, controller, backprop_through_step_size_control=False)
    problem = torchode.InitialValueProblem(y0=z0.reshape(batch, -1), t_start=torch.full((batch,), t0, dtype=F64),
                                           t_end=torch.full((batch,), t1, dtype=F64))
    return solver.solve(problem, term=term, dt0=dt0).ys[:, -1].view(z0.shape)


@pytest.mark.parametrize("solver", ["euler", "dopri5"])
def test_torchode_is_the_library_with_the_documented_options(solver):
    adaptive = solver == "dopri5"
    ours_field, peer_field = Field(-0.9, nonlinear=True), Field(-0.9, nonlinear=True)
    ours_z0, peer_z0 = _z0(requires_grad=True), _z0(requires_grad=True)
    ours, record = ODESolve(solver, steps=5, atol=1e-6, rtol=1e-6, ode_backend="torchode")(
        ours_z0, ours_field, list(ours_field.parameters()), 0.5, 1.7)
    peer = _torchode_peer(peer_field, peer_z0, 0.5, 1.7, adaptive, steps=5)
    assert torch.equal(ours, peer)
    assert sorted(record.per_sequence) == ["accepted", "nfe", "rejected"] and record.per_sequence["nfe"] is None
    ours.sum().backward()
    peer.sum().backward()
    assert torch.equal(ours_field.a.grad, peer_field.a.grad) and torch.equal(ours_z0.grad, peer_z0.grad)


def test_torchode_names_every_failed_sequence_and_its_status():
    import torchode

    solve = ODESolve("dopri5", ode_backend="torchode", atol=1e-12, rtol=1e-12, max_steps=3)
    with pytest.raises(RuntimeError) as error, torch.no_grad():
        solve(_z0(), Field(-0.4), [], 0.0, 2.0, name="probe")
    code = torchode.Status.REACHED_MAX_STEPS.name
    assert str(error.value) == (f"torchode solve 'probe' failed on sequence(s) [0, 1] ({code}, {code}); allowed: at "
                                "most max_steps=3 steps per sequence, finite dynamics")


def test_the_per_sequence_stepper_names_its_solve_and_steps_in_float64_time():
    seen = []

    def field(t, z):
        seen.append(t.dtype)
        return -0.4 * z + t

    with torch.no_grad():
        ODESolve("dopri5", ode_backend="bertode", atol=1e-6, rtol=1e-6)(_z0(), field, [], 0.0, 1.0)
        assert set(seen) == {F64}
        with pytest.raises(RuntimeError) as error:
            ODESolve("dopri5", ode_backend="bertode", atol=1e-12, rtol=1e-12, max_steps=2)(
                _z0(), field, [], 0.0, 2.0, name="probe")
    assert str(error.value).startswith("per-sequence solve 'probe' took 2 steps on sequence(s) [0, 1]")


def test_the_per_sequence_stepper_refuses_a_solver_without_an_error_estimate_in_one_line():
    spec = get_solver("dopri5")
    plain = ODESolverSpec("plain45", lambda dtype: get_solver("euler").build(dtype), adaptive=True, order=5)
    solve = ODESolve(plain, ode_backend="bertode")
    assert solve.tableau is None and ODESolve(spec, ode_backend="bertode").tableau is not None
    with pytest.raises(ValueError) as error:
        solve(_z0(), Field(-0.4), [], 0.0, 1.0)
    assert str(error.value) == ("solver='plain45' is invalid with ode_backend='bertode': its torchdyn solver has no "
                                "embedded error estimate; allowed: dopri5, tsit5 or a fixed-step solver")


@pytest.mark.parametrize("backend", ["torchdyn", "torchdiffeq"])
def test_an_adjoints_backward_solve_hands_the_field_a_bf16_state_as_bf16(backend):
    """torchdyn's and torchdiffeq's adjoints integrate the backward pass of a bf16 state in float32;
    the field (rebound before the backward solve) still gets the state's dtype."""
    a = nn.Parameter(torch.tensor(-0.5))
    seen = []

    def dynamics(t, z):
        seen.append(z.dtype)
        return a.to(z.dtype) * z

    z0 = _z0().to(torch.bfloat16).requires_grad_()
    z1, record = ODESolve("dopri5", sensitivity=Adjoint(), ode_backend=backend)(z0, dynamics, [a], 0.0, 1.0)
    forward = len(seen)
    z1.float().sum().backward()
    assert record.nfe_backward == len(seen) - forward > 0 and set(seen) == {torch.bfloat16}


def test_rk4_steps_from_a_given_first_stage():
    """`_torchdyn.RungeKutta4.step` with k1 given (as torchdyn's loops may pass): k1 is not recomputed."""
    from bertode.solve._torchdyn import RungeKutta4

    x, t, h = _z0()[0], torch.tensor(0.1, dtype=F64), 0.3
    f = lambda t, z: -0.7 * z + t  # noqa: E731
    k1 = torch.tensor([[0.25, -0.5, 0.0]], dtype=F64)  # not f(t, x); a zero stage is never divided by
    got = RungeKutta4(F64).step(f, x, t, h, k1=k1)
    k2 = f(t + h / 2, x + h / 2 * k1)
    k3 = f(t + h / 2, x + h / 2 * k2)
    k4 = f(t + h, x + h * k3)
    assert got[0] is None and got[2] is None
    torch.testing.assert_close(got[1], x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), rtol=1e-15, atol=1e-15)
