"""Oracle tests written to kill the mutation-testing survivors (issue 29) of the gradient-method
axis: `solve/sensitivities.py` (the registry), `ode_sensitivities.py`, `deq_sensitivities.py`,
and the per-sequence solve (`solve/per_sequence.py`); docs/testing.md, "Mutation testing".

Oracles: the registry through the public decorator (on a scratch copy); the adjoint's backward
solver as its stability polynomial on dz/dt = a z; the DEQ's methods on a linear contraction
f(z) = z A^T + b in float64 (autograd through (I - A)^-1 b, damped steps written out); the
per-sequence stepper against torchdiffeq's tableaus and a one-row reference written from its
docstring (Hairer's first step, the I controller, FSAL), row by row, with gradients."""

import math
import types

import pytest
import torch

import bertode
from bertode.solve import per_sequence, sensitivities
from bertode.solve.deq_sensitivities import FixedPointProblem, ImplicitGradient, PhantomGradient, UnrolledGradient
from bertode.solve.fixed_point import DEQSolveError
from bertode.solve.ode import ODESolve
from bertode.solve.ode_sensitivities import Adjoint, Autograd
from bertode.solve.per_sequence import EmbeddedTableau, PerSequenceSolve, embedded_tableau
from bertode.solve.solvers import get_solver
from bertode.solve.stats import FixedPointRecord


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
    a = torch.nn.Parameter(torch.tensor(-1.5, dtype=torch.float64))
    z0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    solve = ODESolve("euler", sensitivity=Adjoint(adjoint_solver=adjoint_solver), steps=4)
    z1, _ = solve(z0, lambda t, z: a * z, [a], 0.0, 1.0)
    torch.testing.assert_close(z1, z0.detach() * (1 - 1.5 * 0.25) ** 4, rtol=1e-14, atol=1e-14)
    z1.sum().backward()
    torch.testing.assert_close(z0.grad, torch.full_like(z0, stage_sum(-1.5 * 0.25) ** 4), rtol=1e-12, atol=1e-12)


# --- the DEQ's methods on a linear contraction f(z) = z A^T + b (flat (batch, dim) states, float64) ----------


DIM = 3
A0 = torch.tensor([[0.3, -0.2, 0.1], [0.05, 0.4, -0.1], [-0.15, 0.1, 0.2]], dtype=torch.float64)
B0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
Z0 = torch.tensor([[0.5, 0.0, -1.0], [2.0, 1.0, 0.25]], dtype=torch.float64)
W = torch.tensor([[1.0, -0.5, 2.0], [0.25, 3.0, -1.0]], dtype=torch.float64)  # the loss sum(W * z)


def _linear_problem(damping=1.0, tol=1e-13, max_iter=60, backprop=None, forward=None, on_iterate=None):
    """The problem, its parameters (A, b), and a log of the backward solve's calls. ``forward``: what
    solve_forward returns (default: the exact z* = (I - A)^-1 b per row, by a linear solve)."""
    A, b = A0.clone().requires_grad_(), B0.clone().requires_grad_()

    def f(z):
        return z @ A.T + b

    f.eager = f
    calls = []

    def solve_forward():
        with torch.no_grad():
            return forward.clone() if forward is not None else _z_star(A, b).expand(len(Z0), DIM).clone()

    def solve_backward(h, g0, solver, iterations, tolerance):
        calls.append((solver, iterations, tolerance, g0.clone()))
        g = g0
        for _ in range(200):  # plain iteration of g = h(g) (a contraction: J = A)
            g = h(g)
        return g

    problem = FixedPointProblem(f, Z0.clone(), damping, tol, max_iter, solve_forward, solve_backward,
                                FixedPointRecord("probe"), backprop=backprop, on_iterate=on_iterate)
    return problem, A, b, calls


def _z_star(A, b):
    return torch.linalg.solve(torch.eye(DIM, dtype=A.dtype) - A, b)


def _damped_steps(z, A, b, damping, steps):
    for _ in range(steps):
        z = (1 - damping) * z + damping * (z @ A.T + b)
    return z


def test_ift_is_the_gradient_of_the_exact_fixed_point():
    problem, A, b, calls = _linear_problem()
    method = ImplicitGradient(backward_solver="broyden", backward_max_iter=17, backward_tol=1e-7)
    z = method(problem)
    torch.testing.assert_close(z, _z_star(A0, B0).expand(2, DIM), rtol=1e-14, atol=1e-14)
    (W * z).sum().backward()
    # the oracle: autograd through the linear solve z* = (I - A)^-1 b, in float64
    A_ref, b_ref = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    (W * _z_star(A_ref, b_ref)).sum().backward()
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A.grad, A_ref.grad, rtol=1e-12, atol=1e-12)
    assert len(calls) == 1 and calls[0][:3] == ("broyden", 17, 1e-7) and torch.equal(calls[0][3], torch.zeros_like(W))


def test_ift_without_a_graph_returns_the_forward_solution_itself():
    problem, *_ = _linear_problem(forward=Z0)
    with torch.no_grad():
        z = ImplicitGradient()(problem)
    assert torch.equal(z, Z0) and not z.requires_grad
    assert (ImplicitGradient().backward_solver, ImplicitGradient().backward_max_iter,
            ImplicitGradient().backward_tol) == (None, 30, 1e-5)


@pytest.mark.parametrize("steps, backprop, damping", [(1, None, 1.0), (3, None, 0.7), (3, 2, 0.7)])
def test_phantom_takes_its_damped_steps_from_the_forward_solution(steps, backprop, damping):
    """From a forward solution that is not the fixed point (Z0), the output is k damped steps
    z <- (1 - tau) z + tau f(z) (k = backprop when given, else ``steps``), and so is its gradient."""
    problem, A, b, _ = _linear_problem(damping=damping, backprop=backprop, forward=Z0)
    z = PhantomGradient(steps)(problem)
    k = steps if backprop is None else backprop
    A_ref, b_ref = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    expected = _damped_steps(Z0, A_ref, b_ref, damping, k)
    torch.testing.assert_close(z, expected, rtol=1e-14, atol=1e-14)
    (W * z).sum().backward()
    (W * expected).sum().backward()
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(A.grad, A_ref.grad, rtol=1e-13, atol=1e-13)
    with torch.no_grad():
        assert torch.equal(PhantomGradient(steps)(_linear_problem(forward=Z0)[0]), Z0)  # no graph: no steps
    assert PhantomGradient().steps == 1


def _unrolled_reference(damping, tol, max_iter):
    """The damped iterates from Z0 until the worst row's relative residual |f(z) - z| / (|f(z)| + 1e-9)
    falls below tol: (iterates z_1..z_n, the residual before each step)."""
    z, iterates, residuals = Z0, [], []
    for _ in range(max_iter):
        fz = z @ A0.T + B0
        residuals.append(((fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-9)).max().item())
        z = (1 - damping) * z + damping * fz
        iterates.append(z)
        if residuals[-1] < tol:
            break
    return iterates, residuals


@pytest.mark.parametrize("damping, tol, max_iter, backprop", [
    (1.0, 1e-3, 50, None),  # stops at the tolerance
    (0.8, 1e-30, 7, 3),  # runs to max_iter; the last 3 iterations differentiated
    (0.8, 1e-30, 4, 9),  # backprop above max_iter: every iteration
])
def test_unrolled_iterates_report_and_differentiate_as_written(damping, tol, max_iter, backprop):
    seen = []
    problem, A, b, _ = _linear_problem(damping=damping, tol=tol, max_iter=max_iter, backprop=backprop,
                                       on_iterate=lambda n, z: seen.append((n, z.detach().clone())))
    z = UnrolledGradient()(problem)
    iterates, residuals = _unrolled_reference(damping, tol, max_iter)
    n = len(iterates)
    assert n == (max_iter if tol < 1e-20 else n) and (tol < 1e-20 or 1 < n < max_iter)
    torch.testing.assert_close(z, iterates[-1], rtol=1e-13, atol=1e-13)
    assert [i for i, _ in seen] == list(range(1, n + 1))
    for (_, got), want in zip(seen, iterates):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    assert problem.record.nfe_forward == n and problem.record.extra["forward_iterations"] == n
    assert problem.record.extra["forward_rel_residual"] == pytest.approx(residuals[-1], rel=1e-9)
    # the gradient: the last min(backprop, max_iter) iterations, from the iterate before them as a constant
    k = n if backprop is None else min(backprop, n)
    start = Z0 if k == n else iterates[n - k - 1]
    A_ref, b_ref = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    (W * _damped_steps(start, A_ref, b_ref, damping, k)).sum().backward()
    (W * z).sum().backward()
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A.grad, A_ref.grad, rtol=1e-12, atol=1e-12)


def test_unrolled_without_a_graph_and_on_a_non_finite_map():
    problem, *_ = _linear_problem(tol=1e-30, max_iter=3)
    with torch.no_grad():
        z = UnrolledGradient()(problem)
    assert not z.requires_grad
    torch.testing.assert_close(z, _damped_steps(Z0, A0, B0, 1.0, 3), rtol=1e-14, atol=1e-14)
    problem, A, _, _ = _linear_problem(tol=1e-30, max_iter=5)
    calls = []

    def blows_up(z):
        calls.append(1)
        return z @ A.T + (B0 if len(calls) < 3 else float("inf"))

    problem.f = blows_up
    _, residuals = _unrolled_reference(1.0, 1e-30, 2)
    with pytest.raises(DEQSolveError) as error:
        UnrolledGradient()(problem)
    assert str(error.value) == ("DEQ unrolled solve: non-finite value in f(z) at iteration 3 (relative residual "
                                f"before it {residuals[-1]:.3e})")


def test_unrolled_stops_strictly_below_the_tolerance_and_guards_a_zero_image():
    _, residuals = _unrolled_reference(1.0, 1e-30, 8)
    problem, *_ = _linear_problem(tol=residuals[4], max_iter=8)  # the 5th residual equals tol: not below it
    UnrolledGradient()(problem)
    assert problem.record.nfe_forward == 6 and problem.record.extra["forward_rel_residual"] == residuals[5]
    # f = 0: the first residual is |z0| / (0 + 1e-9), huge; the second 0 / 1e-9 = 0
    problem, A, b, _ = _linear_problem(tol=1e-6, max_iter=8)
    with torch.no_grad():
        A.zero_(), b.zero_()
    UnrolledGradient()(problem)
    assert problem.record.nfe_forward == 2 and problem.record.extra["forward_rel_residual"] == 0.0


# --- the per-sequence stepper (`per_sequence.py`) against a one-row reference written from its docstring ---------


def _spec(tableau, order, adaptive=True):
    """A stand-in solver spec whose torchdyn solver carries ``tableau`` (c of stages 2.., a's rows, b, e)."""
    return types.SimpleNamespace(adaptive=adaptive, order=order,
                                 build=lambda dtype: types.SimpleNamespace(tableau=tableau))


def _torchdiffeq_tableau(name):
    """torchdiffeq's tableau of ``name`` as floats: (c of stages 2.., a's rows, b, e)."""
    from torchdiffeq._impl import adaptive_heun, bosh3, dopri5
    table = dict(dopri5=dopri5._DORMAND_PRINCE_SHAMPINE_TABLEAU, bosh3=bosh3._BOGACKI_SHAMPINE_TABLEAU,
                 adaptive_heun=adaptive_heun._ADAPTIVE_HEUN_TABLEAU)[name]
    return (table.alpha.tolist(), [row.tolist() for row in table.beta], table.c_sol.tolist(), table.c_error.tolist())


def _close(xs, ys):
    return len(xs) == len(ys) and all(abs(x - y) <= 1e-15 for x, y in zip(xs, ys))


def test_the_embedded_tableau_is_torchdiffeqs_and_fsal_is_detected():
    ours = embedded_tableau(get_solver("dopri5"))
    c, a, b, e = _torchdiffeq_tableau("dopri5")
    assert _close(ours.c, [0.0] + c) and all(_close(x, y) for x, y in zip(ours.a[1:], a)) and ours.a[0] == ()
    assert _close(ours.b, b) and (_close(ours.e, e) or _close(ours.e, [-x for x in e]))  # the sign is the norm's
    assert (ours.order, ours.fsal, len(ours.a)) == (5, True, 7)
    c, a, b, e = _torchdiffeq_tableau("bosh3")
    bosh3 = embedded_tableau(_spec((c, a, b[:3], e), 3))  # b without its last zero: padded
    assert bosh3 == EmbeddedTableau((0.0, *c), ((),) + tuple(map(tuple, a)), tuple(b), tuple(e), 3, True)
    heun = embedded_tableau(_spec(_torchdiffeq_tableau("adaptive_heun"), 2))
    assert heun.fsal is False and heun.b == (0.5, 0.5) and heun.c == (0.0, 1.0)
    assert embedded_tableau(_spec((c, a, b, e), 3, adaptive=False)) is None
    assert embedded_tableau(get_solver("rk4")) is None
    no_tableau = types.SimpleNamespace(adaptive=True, order=3, build=lambda dtype: object())
    assert embedded_tableau(no_tableau) is None
    for wrong in [(c, a, b, None), (c, a, b), [c, a, b, e], None, (c[:2], a, b, e), (c, a[:2], b, e),
                  (c, a, b + [0.0], e)]:
        assert embedded_tableau(_spec(wrong, 3)) is None, wrong
    bertode_solve = ODESolve("dopri5", ode_backend="bertode")
    assert bertode_solve.tableau == ours


def _rms(x):
    return x.pow(2).mean().sqrt().item()


def _one_row(f, z0, t0, t1, tab, atol, rtol):
    """One sequence alone, in Python floats for t and h (the rules of per_sequence.py's docstring):
    (z1, accepted, rejected, evaluations, t after each attempt)."""
    scale = atol + rtol * z0.abs()
    f0 = f(t0, z0)
    d0, d1 = _rms(z0 / scale), _rms(f0 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = f(t0 + h0, z0 + h0 * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    largest = max(d1, d2)
    h1 = max(h0 * 1e-3, 1e-6) if largest <= 1e-15 else (0.01 / largest) ** (1 / (tab.order + 1))
    dt = min(100 * h0, h1, t1 - t0)
    t, z, k1, accepted, rejected, nfe, times = t0, z0, f0, 0, 0, 2, []
    while True:
        last = dt >= t1 - t
        h = t1 - t if last else dt
        ks = [k1]
        for i in range(1, len(tab.c)):
            stage = z + h * sum(w * k for w, k in zip(tab.a[i], ks))
            ks.append(f(t + tab.c[i] * h, stage))
        nfe += len(tab.c) - 1
        z_new = z + h * sum(w * k for w, k in zip(tab.b, ks))
        error = h * sum(w * k for w, k in zip(tab.e, ks))
        ratio = _rms(error.detach() / (atol + rtol * torch.maximum(z.abs(), z_new.abs()).detach()))
        good = ratio <= 1.0
        factor = 10.0 if ratio == 0 else min(max(0.9 * ratio ** (-1 / tab.order), 0.2), 10.0)
        dt = h * (factor if good else min(factor, 1.0))
        if good:
            accepted, t, z = accepted + 1, (t1 if last else t + h), z_new
            if tab.fsal:
                k1 = ks[-1]
            else:
                k1, nfe = f(t, z), nfe + 1
        else:
            rejected += 1
        times.append(t)
        if good and last:
            return z, accepted, rejected, nfe, times


# per row: dz/dt = lam z + mu cos(3 t) on (2,)-vectors; row 1 stiff, row 2 f = 0 (the flat-field initial step),
# row 3 from z0 = 0 (d0 = 0), row 4 from z0 below atol (d0 ~ 0.5), row 5 slow (d1 ~ 0.1, largest < 1), row 6 flat
# at t0 and its probe, then driven from t = 0.26 (+ nu relu(t - 0.26): the flat-start first step, then real steps)
LAM = torch.tensor([-1.0, -30.0, 0.0, -2.0, -1.0, -1e-6, 0.0], dtype=torch.float64).view(7, 1, 1)
MU = torch.tensor([1.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64).view(7, 1, 1)
NU = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64).view(7, 1, 1)
ZS = torch.tensor([[[1.0, -0.5]], [[2.0, 1.0]], [[0.3, -0.7]], [[0.0, 0.0]], [[5e-7, -2e-7]], [[1.0, -0.5]],
                   [[0.4, 0.1]]], dtype=torch.float64)
# adaptive Heun with its first stage evaluated twice (an all-zero row of a): the same solution, one more evaluation
HEUN_TWICE = ([0.0, 1.0], [[0.0], [1.0, 0.0]], [0.5, 0.0, 0.5], [0.5, 0.0, -0.5])


def _field(lam, mu, nu=0.0):
    def f(t, z):
        # the reference's Python float t as the stepper's (batch, 1, 1) float64 tensor: the same dtype promotions
        t = t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float64).view(1, 1, 1)
        return lam * z + mu * torch.cos(3 * t) + nu * torch.relu(t - 0.26)
    return f


@pytest.mark.parametrize("name, atol, rtol", [
    ("dopri5", 1e-6, 1e-5), ("bosh3", 1e-5, 1e-4), ("adaptive_heun", 1e-3, 1e-3), ("heun_twice", 1e-3, 1e-3)])
def test_each_row_steps_as_the_one_row_reference(name, atol, rtol):
    if name == "dopri5":
        tab = embedded_tableau(get_solver(name))
    elif name == "heun_twice":
        tab = embedded_tableau(_spec(HEUN_TWICE, 2))
    else:
        tab = embedded_tableau(_spec(_torchdiffeq_tableau(name), dict(bosh3=3, adaptive_heun=2)[name]))
    t0, t1 = 0.25, 1.5
    lam = LAM.clone().requires_grad_()
    z0 = ZS.clone().requires_grad_()
    stepper = PerSequenceSolve(tab, atol, rtol, name="probe")
    z1 = stepper(_field(lam, MU, NU), z0, t0, t1, torch.float64)
    weights = torch.linspace(-1.0, 2.0, z1.numel(), dtype=torch.float64).view_as(z1)
    (weights * z1).sum().backward()
    for row in range(len(ZS)):
        lam_row = LAM[row:row + 1].clone().requires_grad_()
        z0_row = ZS[row:row + 1].clone().requires_grad_()
        field = _field(lam_row, MU[row:row + 1], NU[row:row + 1])
        z, accepted, rejected, nfe, _ = _one_row(field, z0_row, t0, t1, tab, atol, rtol)
        torch.testing.assert_close(z1[row:row + 1], z, rtol=1e-12, atol=1e-14)
        assert (stepper.accepted[row].item(), stepper.rejected[row].item(), stepper.nfe[row].item()) == (
            accepted, rejected, nfe), row
        (weights[row:row + 1] * z).sum().backward()
        torch.testing.assert_close(z0.grad[row:row + 1], z0_row.grad, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(lam.grad[row:row + 1], lam_row.grad, rtol=1e-10, atol=1e-14)
    assert stepper.rejected[1] > 0 and stepper.accepted[1] > stepper.accepted[0]  # the stiff row
    assert stepper.accepted.dtype == torch.long and stepper.nfe.shape == (len(ZS),)


def test_a_step_reaching_t1_exactly_is_the_last_and_a_half_precision_state_keeps_its_dtype():
    """dz/dt = -1e-5 z at loose tolerances from t0 < 0: the first step is the whole span (h1 > 1), taken once."""
    tab = embedded_tableau(get_solver("dopri5"))
    stepper = PerSequenceSolve(tab, 1e-2, 1e-2)
    assert stepper.accepted is None and stepper.rejected is None and stepper.nfe is None
    with torch.no_grad():
        z1 = stepper(lambda t, z: -1e-5 * z, ZS[:1], -0.5, 0.5, torch.float64)
    assert (stepper.accepted.tolist(), stepper.rejected.tolist(), stepper.nfe.tolist()) == ([1], [0], [8])
    torch.testing.assert_close(z1, ZS[:1] * math.exp(-1e-5), rtol=1e-12, atol=0)
    seen = []

    def spy(t, z):  # a bf16 state: the field sees it in bf16, and time in float32
        seen.append((t.dtype, z.dtype))
        return -z
    z1 = PerSequenceSolve(tab, 1e-2, 1e-2)(spy, ZS.to(torch.bfloat16), 0.0, 1.0, torch.float32)
    assert z1.dtype == torch.bfloat16 and set(seen) == {(torch.float32, torch.bfloat16)}
    torch.testing.assert_close(z1.double(), ZS * math.exp(-1.0), rtol=6e-2, atol=2e-2)  # bf16 steps


def test_the_step_bound_and_a_non_finite_error_name_the_sequences():
    tab = embedded_tableau(get_solver("dopri5"))
    _, _, _, _, times = _one_row(_field(LAM[:1], MU[:1]), ZS[:1], 0.0, 1.0, tab, 1e-9, 1e-9)
    with pytest.raises(RuntimeError) as error, torch.no_grad():
        PerSequenceSolve(tab, 1e-9, 1e-9, max_steps=3, name="probe")(_field(LAM[:2], MU[:2]), ZS[:2], 0.0, 1.0,
                                                                      torch.float64)
    message = str(error.value)
    assert message.startswith("per-sequence solve 'probe' took 3 steps on sequence(s) [0, 1] without reaching "
                              "t1=1.0 (t=[")
    assert message.endswith("]); allowed: at most MAX_STEPS=3 steps per sequence (loosen atol/rtol)")
    assert float(message.split("(t=[")[1].split(",")[0]) == pytest.approx(times[2], rel=1e-12)
    assert per_sequence.MAX_STEPS == 10_000 and PerSequenceSolve(tab, 1e-6, 1e-6).max_steps == 10_000
    with pytest.raises(RuntimeError, match=r"^per-sequence solve 'solve' took 2 steps"), torch.no_grad():
        PerSequenceSolve(tab, 1e-9, 1e-9, max_steps=2)(_field(LAM[:1], MU[:1]), ZS[:1], 0.0, 1.0, torch.float64)

    def blows_up(t, z):  # row 1 turns non-finite after t = 0.5
        bad = (t > 0.5) & (torch.arange(2).view(2, 1, 1) == 1)
        return torch.where(bad, torch.full_like(z, math.nan), -z)

    with pytest.raises(FloatingPointError) as error, torch.no_grad():
        PerSequenceSolve(tab, 1e-6, 1e-6, name="probe")(blows_up, ZS[:2], 0.0, 1.0, torch.float64)
    assert str(error.value) == ("per-sequence solve 'probe': the error norm is not finite on sequence(s) [1]; allowed: "
                                "finite dynamics (lower the learning rate or the weights' scale)")


@pytest.mark.parametrize("row", [0, 1])
def test_a_float32_state_is_controlled_in_the_time_dtype(row):
    """A float32 state with float64 time: the initial step and the controller work in float64 (as the
    one-row reference, whose t and h are Python floats), so the field is evaluated at the same times."""
    tab = embedded_tableau(get_solver("dopri5"))
    ours, reference = [], []

    def spy(times, lam, mu):
        field = _field(lam, mu)

        def f(t, z):
            times.append(float(t.flatten()[0]) if isinstance(t, torch.Tensor) else t)
            return field(t, z).to(z.dtype)
        return f

    z0 = ZS[row:row + 1].float()
    with torch.no_grad():
        z1 = PerSequenceSolve(tab, 1e-5, 1e-4)(spy(ours, LAM[row].float(), MU[row].float()), z0, 0.25, 1.5,
                                              torch.float64)
        z, *_ = _one_row(spy(reference, LAM[row].float(), MU[row].float()), z0, 0.25, 1.5, tab, 1e-5, 1e-4)
    assert z1.dtype == torch.float32 and len(ours) == len(reference) > 10
    assert max(abs(x - y) for x, y in zip(ours, reference)) <= 1e-13
    torch.testing.assert_close(z1, z, rtol=1e-6, atol=1e-7)
