"""Oracles for the solve numerics, step by step (issue 29, item 2): every fixed-step solver on a
non-autonomous field against explicit Runge-Kutta written here from its tableau, a closed form and
torchdiffeq's peer method; the adjoints against autograd for the fields that use the norm; Anderson
iterate by iterate against a reference written here; where ``rel`` and ``abs`` stop by closed form.

All in float64 on tiny states; each test catches a planted bug the older suite let through (the
stage time t + c_i instead of t + c_i h; the adjoint without the LayerNorm's parameters; Anderson's
history without its newest iterate)."""

import math

import pytest
import torch

import bertode
from bertode.solve.fixed_point import FIXED_POINT_SOLVERS
from bertode.solve.ode import ODESolve
from bertode.solve.solvers import ButcherTableau, available_solvers, get_solver, solver_spec
from bertode.layers.vector_fields import VECTOR_FIELDS
from conftest import projection_loss, tiny_ode_config

# --- explicit Runge-Kutta, written from the textbook tableaus (not read from torchdyn) ----------------------
TABLEAUS = {
    "euler": ButcherTableau(c=[0.0], a=[[]], b=[1.0], order=1),
    "midpoint": ButcherTableau(c=[0.0, 1 / 2], a=[[], [1 / 2]], b=[0.0, 1.0], order=2),
    "rk4": ButcherTableau(c=[0.0, 1 / 2, 1 / 2, 1.0], a=[[], [1 / 2], [0.0, 1 / 2], [0.0, 0.0, 1.0]],
                          b=[1 / 6, 1 / 3, 1 / 3, 1 / 6], order=4),  # the classical method (torchdyn's)
    "heun": ButcherTableau(c=[0.0, 1.0], a=[[], [1.0]], b=[1 / 2, 1 / 2], order=2),
}
RK4_THREE_EIGHTHS = ButcherTableau(c=[0.0, 1 / 3, 2 / 3, 1.0], a=[[], [1 / 3], [-1 / 3, 1.0], [1.0, -1.0, 1.0]],
                                   b=[1 / 8, 3 / 8, 3 / 8, 1 / 8], order=4)  # torchdiffeq's "rk4"
# A user's method, through the same path as ``register_solver`` (unregistered: no global state).
USER = ButcherTableau(c=[0.0, 1 / 2, 3 / 4], a=[[], [1 / 2], [0.0, 3 / 4]], b=[2 / 9, 1 / 3, 4 / 9], order=3)
# The torchdiffeq method whose tableau is each solver's (rk4 has none: torchdiffeq's is the 3/8 rule).
TORCHDIFFEQ_TABLEAU = {"euler": TABLEAUS["euler"], "midpoint": TABLEAUS["midpoint"], "heun": TABLEAUS["heun"],
                       "rk4": RK4_THREE_EIGHTHS}


def reference_rk(f, tableau: ButcherTableau, z0, t0: float, t1: float, steps: int):
    """``steps`` steps of the explicit RK method: k_i = f(t + c_i h, z + h sum_j a_ij k_j), z += h sum b_i k_i."""
    h, z = (t1 - t0) / steps, z0
    for n in range(steps):
        t = t0 + n * h
        ks = []
        for c_i, row in zip(tableau.c, tableau.a):
            stage = z + h * sum((a_ij * k for a_ij, k in zip(row, ks)), torch.zeros_like(z))
            ks.append(f(torch.tensor(t + c_i * h, dtype=torch.float64), stage))
        z = z + h * sum(b_i * k for b_i, k in zip(tableau.b, ks))
    return z


def test_every_fixed_step_solver_has_an_oracle_here():
    """A newly registered fixed-step solver needs its tableau in TABLEAUS (a tableau-given one has its own)."""
    fixed = [name for name in available_solvers() if not get_solver(name).adaptive]
    missing = [n for n in fixed if n not in TABLEAUS and not isinstance(get_solver(n).source, ButcherTableau)]
    assert not missing, f"fixed-step solvers without an oracle in this file: {missing}"


def _spec(name):
    return solver_spec("user_ralston3", USER) if name == "user" else get_solver(name)


def _tableau(name):
    return USER if name == "user" else TABLEAUS.get(name, getattr(get_solver(name), "source", None))


FIXED = ["euler", "midpoint", "rk4", "heun", "user"]


# --- 1. a non-autonomous field through every fixed-step solver at steps > 1 ------------------------------------
@pytest.mark.parametrize("loop", ["direct", "neural_ode"])
@pytest.mark.parametrize("name", FIXED)
def test_fixed_step_solvers_on_cos_t_z_match_their_tableau_and_the_closed_form(name, loop):
    """dz/dt = cos(t) z on [0.4, 2.2]: z(t1) = z0 exp(sin t1 - sin t0). The solve equals its tableau's
    RK steps to 1e-13 (3 steps, then 10 and 20), and its error to the closed form shrinks with its order."""
    t0, t1 = 0.4, 2.2
    z0 = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64).view(2, 1, 3)
    field = lambda t, z: torch.cos(t) * z  # noqa: E731
    exact = z0 * math.exp(math.sin(t1) - math.sin(t0))
    order, errors = _spec(name).order, []
    for steps in (3, 10, 20):
        ours, _ = ODESolve(_spec(name), steps=steps, fixed_step_loop=loop)(z0, field, [], t0, t1)
        reference = reference_rk(field, _tableau(name), z0, t0, t1, steps)
        assert (ours - reference).abs().max() <= 1e-13, (name, steps)
        errors.append((ours - exact).abs().max().item())
    # halving h divides the error by about 2^order (10 -> 20 steps: measured 0.78 (midpoint) to 1.13 times it)
    assert errors[1] / errors[2] >= 0.6 * 2 ** order, (name, errors)


def _time_model(vector_field, **config):
    """Two layers (the second integrates over [1, 2]) whose time dependence is switched on."""
    torch.manual_seed(0)
    model = bertode.BertODEModel(tiny_ode_config(vector_field=vector_field, **config)).double().eval()
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if name.endswith(("time_proj.weight", "generator.weight")):  # zero at init: t would not matter
                p.copy_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    return model


IDS = torch.randint(5, 64, (2, 7), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("vector_field", ["time_residual", "time_weights"])
def test_time_fields_solve_as_their_tableau_and_as_torchdiffeq(vector_field):
    """The real depth-dependent fields (time weights perturbed away from zero): a site's solve over
    [1, 2] equals its tableau's RK steps, and the whole model equals ``ode_backend=torchdiffeq`` at the
    same grid, for every fixed-step solver with a torchdiffeq peer (rk4's peer is the 3/8 rule)."""
    model = _time_model(vector_field, solver="euler", steps=4)
    site = model.encoder.layer[1].feed_forward
    x = torch.randn(2, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def dynamics(t, z):
        return site.field(t, z, lambda h: site.branch(h, None), site.norm)

    moved = (dynamics(torch.tensor(1.0, dtype=torch.float64), x) - dynamics(torch.tensor(1.5, dtype=torch.float64), x))
    assert moved.abs().max() > 1e-2  # the field does depend on t
    for name in FIXED:
        with torch.no_grad():
            ours, _ = ODESolve(_spec(name), steps=4)(x, dynamics, [], 1.0, 2.0)
            reference = reference_rk(dynamics, _tableau(name), x, 1.0, 2.0, 4)
        assert (ours - reference).abs().max() <= 1e-10, name
    for name in ("euler", "midpoint", "heun"):
        outputs = {}
        for backend in ("torchdyn", "torchdiffeq"):
            for layer in model.encoder.layer:
                for s in (layer.attention, layer.feed_forward):
                    s.solve = ODESolve(name, steps=4, ode_backend=backend)
            with torch.no_grad():
                outputs[backend] = model(IDS).last_hidden_state
        gap = (outputs["torchdyn"] - outputs["torchdiffeq"]).abs().max().item()
        assert gap <= 1e-10, (name, gap)
    # rk4 has no peer: torchdiffeq's "rk4" (ode_backend=torchdiffeq, solver=rk4) is the 3/8 rule, step for step
    with torch.no_grad():
        ours, _ = ODESolve("rk4", steps=4, ode_backend="torchdiffeq")(x, dynamics, [], 1.0, 2.0)
        reference = reference_rk(dynamics, TORCHDIFFEQ_TABLEAU["rk4"], x, 1.0, 2.0, 4)
    assert (ours - reference).abs().max() <= 1e-10


# --- 2. the adjoints against autograd for every field whose dynamics use the norm ------------------------------
NORM_FIELDS = [dict(vector_field=name) for name, cls in VECTOR_FIELDS.items()
               if cls.uses_norm and cls.__module__.startswith("bertode.")]  # built in: add_norm
NORM_FIELDS.append(dict(vector_field="residual", norm_position="pre"))  # pre-LN: the norm is inside the branch
GRADIENT_METHODS = [dict(sensitivity="adjoint"), dict(sensitivity="interpolated_adjoint"),
                    dict(sensitivity="adjoint", ode_backend="torchdiffeq")]
ADJOINT_TOL = 1e-9
# Gradient error allowed, relative: the adjoints' at tolerance 1e-9 (measured <= 2e-8); the interpolated
# adjoint's is its spline's on dopri5's steps (measured <= 6e-6), not the tolerance's.
GRADIENT_BOUND = {"adjoint": 1e-7, "interpolated_adjoint": 5e-5}


def _gradients(**config):
    torch.manual_seed(0)
    model = bertode.BertODEModel(tiny_ode_config(
        num_hidden_layers=1, solver="dopri5", atol=ADJOINT_TOL, rtol=ADJOINT_TOL, adjoint_atol=ADJOINT_TOL,
        adjoint_rtol=ADJOINT_TOL, **config)).double()
    with torch.no_grad():  # the norm's affine away from (1, 0), and a branch far from zero
        for name, p in model.encoder.named_parameters():
            if "norm" in name:
                p.add_(0.5 * torch.randn(p.shape, dtype=p.dtype))
            elif p.dim() == 2:
                p.mul_(5.0)
    projection_loss(model(IDS).last_hidden_state).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", GRADIENT_METHODS, ids=lambda m: "-".join(m.values()))
@pytest.mark.parametrize("field", NORM_FIELDS, ids=lambda f: "-".join(f.values()))
def test_adjoint_gradients_of_norm_using_fields_equal_autograd(field, method):
    """Every parameter's gradient (the sites' LayerNorm weight and bias included) by the adjoint equals
    autograd's through the same dopri5 solve, to a bound set by the solver tolerance (`GRADIENT_BOUND`)."""
    backend = dict(ode_backend=method["ode_backend"]) if "ode_backend" in method else {}
    exact = _gradients(sensitivity="autograd", **backend, **field)
    adjoint = _gradients(**method, **field)
    norms = [n for n in exact if n.startswith("encoder.") and ".norm." in n]
    assert len(norms) == 4, norms  # weight and bias of both sites' norms reach the loss
    assert set(adjoint) == set(exact), set(exact) ^ set(adjoint)
    bound, scale = GRADIENT_BOUND[method["sensitivity"]], max(g.abs().max().item() for g in exact.values())
    for name, g in exact.items():  # each entry, against the largest gradient
        assert (adjoint[name] - g).abs().max().item() <= bound * scale, name
    for name in norms:  # and each norm's gradient against its own size
        assert (adjoint[name] - exact[name]).norm() <= bound * exact[name].norm(), name


# --- 3. Anderson, iterate by iterate, against a reference written from its equations ---------------------------
def reference_anderson(f, z, iterations: int, memory: int, lam: float, damping: float) -> list:
    """The points one sample's solve evaluates ``f`` at (``z``: (dim,)). Type II Anderson over the last
    m = max(memory, 2) pairs (x_i, f_i), r_i = f_i - x_i: a = argmin |sum a_i r_i|^2 + lam s |a|^2 subject to
    sum a = 1, s the mean of |r_i|^2 (bertode scales lam by it: the same regularisation at any residual
    size), i.e. a = (G + lam s I)^-1 1 normalised to sum 1, G_ij = r_i . r_j; the next point is
    (1 - damping) sum a_i x_i + damping sum a_i f_i (damping 1: the mixed images, torchdeq's beta = 1)."""
    history, points = [], []
    for _ in range(iterations):
        points.append(z)
        history = (history + [(z, f(z))])[-max(memory, 2):]
        xs, fs = torch.stack([x for x, _ in history]), torch.stack([y for _, y in history])
        gram = (fs - xs) @ (fs - xs).T
        ones = torch.ones(len(history), dtype=z.dtype)
        a = torch.linalg.solve(gram + lam * gram.diagonal().mean() * torch.eye(len(history), dtype=z.dtype), ones)
        a = a / a.sum()
        z = (1 - damping) * (a @ xs) + damping * (a @ fs)
    return points


def _linear_contraction(dim: int, batch: int, rate: float):
    """A (spectral norm ``rate``, non-normal: Anderson needs its history), b (one per sample) and z0."""
    generator = torch.Generator().manual_seed(7)
    matrix = torch.randn(dim, dim, dtype=torch.float64, generator=generator)
    matrix = rate * matrix / torch.linalg.matrix_norm(matrix, ord=2)
    shift = torch.randn(batch, dim, dtype=torch.float64, generator=generator)
    return matrix, shift, torch.randn(batch, dim, dtype=torch.float64, generator=generator)


@pytest.mark.parametrize("damping", [1.0, 0.6])
@pytest.mark.parametrize("check_every", [1, 4])
def test_anderson_iterates_equal_the_reference(damping, check_every):
    """On z = A z + b (dimension 9 > memory 3, two samples), 14 evaluations: every point bertode's Anderson
    evaluates f at equals the reference's to 1e-10 (float64), whatever the stop rule's check period."""
    dim, batch, memory, iterations = 9, 2, 3, 14
    matrix, shift, z0 = _linear_contraction(dim, batch, 0.95)
    seen = []

    def f(z):
        seen.append(z.clone())
        return z @ matrix.T + shift

    _, info = FIXED_POINT_SOLVERS["anderson"](f, z0, max_iter=iterations, tol=0.0, damping=damping, memory=memory,
                                              check_every=check_every)
    assert info.iterations == len(seen) == iterations
    expected = [reference_anderson(lambda z, i=i: matrix @ z + shift[i], z0[i], iterations, memory, 1e-4, damping)
                for i in range(batch)]
    for n in range(iterations):
        assert (seen[n] - torch.stack([expected[i][n] for i in range(batch)])).abs().max() <= 1e-10, n
    assert (seen[-1] - seen[-2]).abs().max() > 1e-6  # not converged: the last iterates still test the mixing


# --- 4. where the rel and abs stop rules stop, by closed form ----------------------------------------------------
def test_rel_and_abs_stop_modes_stop_where_their_rules_say():
    """f(z) = c + rho (z - c) from z0 = c + d, d orthogonal to c: the n-th evaluation (at c + rho^(n-1) d) has
    |f(z) - z| = (1 - rho) rho^(n-1) |d| and |f(z)| = sqrt(|c|^2 + rho^(2n) |d|^2). With |c| = 10 the relative
    rule is met three evaluations before the absolute one (rho = 1/2, tol 1e-3: at 9 and 12 for the slower
    sample, |d| = 4); each stops at the first evaluation where every sample is below tol (check_every=1),
    and with check_every=5 at the next check, having noted where it converged."""
    rho, tol, dim = 0.5, 1e-3, 6
    c = torch.zeros(2, dim, dtype=torch.float64)
    c[:, 0] = 10.0
    d = torch.zeros(2, dim, dtype=torch.float64)
    d[0, 1], d[1, 2] = 1.0, 4.0
    f = lambda z: c + rho * (z - c)  # noqa: E731
    n = torch.arange(1, 40, dtype=torch.float64)[:, None]
    absolute = (1 - rho) * rho ** (n - 1) * d.norm(dim=1)  # (evaluation, sample)
    relative = absolute / ((c.norm(dim=1) ** 2 + rho ** (2 * n) * d.norm(dim=1) ** 2).sqrt() + 1e-9)
    first_below = {mode: int((worst.max(dim=1).values < tol).nonzero()[0]) + 1
                   for mode, worst in (("abs", absolute), ("rel", relative))}
    assert first_below == {"abs": 12, "rel": 9}  # no near tie: the rules differ by three evaluations
    for mode, worst in (("abs", absolute), ("rel", relative)):
        stop = first_below[mode]
        _, info = FIXED_POINT_SOLVERS["fixed_point"](f, c + d, max_iter=30, tol=tol, stop_mode=mode, check_every=1)
        assert (info.iterations, info.converged_at) == (stop, stop), mode
        history = torch.tensor(info.history, dtype=torch.float64)  # the worst sample's residual per evaluation
        assert torch.allclose(history, worst.max(dim=1).values[:stop], rtol=1e-12, atol=0), mode
        _, info = FIXED_POINT_SOLVERS["fixed_point"](f, c + d, max_iter=30, tol=tol, stop_mode=mode, check_every=5)
        assert (info.iterations, info.converged_at) == (5 * math.ceil(stop / 5), stop), mode
