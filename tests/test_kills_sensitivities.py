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


# --- the DEQ's methods on a linear contraction f(z) = z A^T + b (flat (batch, dim) states, float64) ----------

from bertode.solve.deq_sensitivities import FixedPointProblem, UnrolledGradient  # noqa: E402
from bertode.solve.fixed_point import DEQSolveError  # noqa: E402
from bertode.solve.stats import FixedPointRecord  # noqa: E402

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
