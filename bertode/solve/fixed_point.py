"""The fixed-point-solver registry: ``deq.solver=<name>`` (and ``deq.backward_solver``) resolve here.

A fixed-point solver is a function ``solver(f, z0, *, max_iter, tol, stop_mode, damping,
memory, name) -> (z, SolveInfo)`` (the built-ins also take ``check_every``) on batched flat states (batch, dim); register your own
with ``@bertode.register_fixed_point_solver("name")`` and use `FixedPointTracker` for the
best-iterate bookkeeping, the stopping test and the non-finite check.

Each solver tracks, per sample, the iterate with the lowest residual and returns that
iterate (not its image f(z), unlike torchdeq's Anderson). It stops once every sample's
residual is below ``tol``, or after ``max_iter`` evaluations of f, and raises
`DEQSolveError` when f produces a non-finite value. Both tests are read back to the host
once every ``check_every`` evaluations (`checking_every`, ``deq_check_every``; one host
sync per check), so a solve may run up to ``check_every - 1`` evaluations past either. Residuals are
``|f(z) - z|`` (``abs``) or ``|f(z) - z| / |f(z)|`` (``rel``), per sample.

* ``fixed_point``: z <- (1 - tau) z + tau f(z).
* ``anderson``: Anderson acceleration with a history of ``memory`` iterates: mix past
  images with weights a (sum a = 1) minimising |sum a_i (f(z_i) - z_i)|^2 + lam |a|^2.
* ``broyden``: Broyden's "good" method on g(z) = f(z) - z, with the inverse Jacobian kept
  as -I plus a low-rank sum of the last ``memory`` updates.

torchdeq is the oracle these are tested against (tests/test_deq.py).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable

import torch

from ..registry import Registry

Map = Callable[[torch.Tensor], torch.Tensor]


class DEQSolveError(FloatingPointError):
    """A non-finite value appeared in a fixed-point solve."""


@dataclass
class SolveInfo:
    iterations: int  # evaluations of f actually run (up to check_every - 1 past convergence)
    abs_residual: torch.Tensor  # (batch,) of the returned iterate
    rel_residual: torch.Tensor
    converged: torch.Tensor  # (batch,) bool
    history: list  # worst-sample residual (in the stopping norm) after each evaluation of f
    converged_at: int | None = None  # the first evaluation after which every sample was below tol
    # Host copies of the summaries the DEQ reports, fetched with the history (no extra transfer).
    worst_abs_residual: float = float("nan")
    worst_rel_residual: float = float("nan")
    converged_fraction: float = float("nan")


def damped(z, fz, damping: float):
    """The damped fixed-point step (1 - tau) z + tau f(z) (tau = 1: plain iteration)."""
    return fz if damping == 1.0 else (1 - damping) * z + damping * fz


_REPORT: contextvars.ContextVar = contextvars.ContextVar("bertode_fixed_point_report", default=None)
_CHECK_EVERY: contextvars.ContextVar = contextvars.ContextVar("bertode_fixed_point_check_every", default=1)


@contextlib.contextmanager
def reporting(hook: Callable | None):
    """Inside the block, every `FixedPointTracker` created calls ``hook(n, best)`` after its n-th
    evaluation of f, with the iterate a solve stopped there would return (the per-iterate curve)."""
    token = _REPORT.set(hook)
    try:
        yield
    finally:
        _REPORT.reset(token)


@contextlib.contextmanager
def checking_every(iterations: int):
    """Inside the block, every `FixedPointTracker` created without its own ``check_every`` reads
    its stopping test back to the host once per ``iterations`` evaluations (``deq_check_every``)."""
    token = _CHECK_EVERY.set(iterations)
    try:
        yield
    finally:
        _CHECK_EVERY.reset(token)


class FixedPointTracker:
    """Best iterate per sample, the stopping test, and the non-finite check: call
    ``observe(z, f(z))`` after every evaluation; it returns True once every sample is
    below ``tol``; ``best`` is the lowest-residual iterate, ``info()`` the `SolveInfo`.

    The bookkeeping stays on the device. Every ``check_every`` evaluations (default: the
    enclosing `checking_every`, else 1) one transfer brings the window's finiteness flags,
    worst residuals and stop flags to the host; ``observe`` returns True at the first check
    after convergence, so a solve runs up to ``check_every - 1`` evaluations past it (its
    ``best`` is then equal or better: it is the best over every evaluation run), and a
    non-finite f(z) raises `DEQSolveError` at the check that sees it (naming the evaluation
    where it appeared). Give ``max_iter`` to skip the check at the last evaluation, which
    ``info()`` makes anyway: a solve of n evaluations then makes ceil(n / check_every)
    transfers in all (``info()``'s included)."""

    def __init__(self, z0, tol, stop_mode, name, check_every: int | None = None, max_iter: int | None = None):
        batch = z0.shape[0]
        self.best = z0.clone()
        self.best_abs = torch.full((batch,), float("inf"), device=z0.device, dtype=z0.dtype)
        self.best_rel = self.best_abs.clone()
        self.tol, self.stop_mode, self.name = tol, stop_mode, name
        self.check_every = _CHECK_EVERY.get() if check_every is None else check_every
        self.max_iter = max_iter
        self.iterations = 0
        self.history: list[float] = []  # host copy of the checked evaluations' worst residuals
        self.converged_at: int | None = None
        self._pending: list[torch.Tensor] = []  # (finite, worst, done) of evaluations not yet on the host
        self.report = _REPORT.get()

    def observe(self, z, fz) -> bool:
        """Record f(z) for z; return True when every sample is below tolerance (seen at a check)."""
        self.iterations += 1
        difference = (fz - z).norm(dim=1)
        relative = difference / (fz.norm(dim=1) + 1e-9)
        residual = relative if self.stop_mode == "rel" else difference
        current = self.best_rel if self.stop_mode == "rel" else self.best_abs
        better = residual < current  # False where f(z) is non-finite: the best stays finite
        done = (torch.where(better, residual, current) < self.tol).all()
        self._pending.append(torch.stack([torch.isfinite(fz).all().to(residual.dtype), residual.max(),
                                          done.to(residual.dtype)]))
        self.best = torch.where(better[:, None], z, self.best)
        self.best_abs = torch.where(better, difference, self.best_abs)
        self.best_rel = torch.where(better, relative, self.best_rel)
        if self.report is not None:
            self.report(self.iterations, self.best)
        if self.max_iter is not None and self.iterations >= self.max_iter:
            return False  # the last evaluation: info() transfers the rest
        if self.iterations % self.check_every:
            return False
        return self._check(self._pending_rows())

    def transfer(self, *values: torch.Tensor) -> tuple[bool, list[float]]:
        """For a solver that needs values of its own on the host: bring ``values`` (one-element tensors)
        and the pending checks in one transfer; returns (stop, the values as floats)."""
        *rows, extra = self._pending_rows(torch.stack([v.reshape(()).to(self.best_abs.dtype) for v in values]))
        return self._check(rows), extra

    def _pending_rows(self, *extra: torch.Tensor) -> list[list[float]]:
        """The pending (finite, worst, done) rows, and ``extra`` values as a last row, in one transfer."""
        rows = torch.stack(self._pending).reshape(-1) if self._pending else self.best_abs.new_zeros(0)
        values = torch.cat([rows, *(e.reshape(-1).to(rows.dtype) for e in extra)]).tolist()
        count = len(self._pending)
        self._pending = []
        table = [values[3 * i:3 * i + 3] for i in range(count)]
        return table + ([values[3 * count:]] if extra else [])

    def _check(self, rows) -> bool:
        """Append the rows to the history; raise at the first non-finite evaluation unless convergence came
        first (a solve checking every evaluation would have stopped there and never seen it)."""
        first = self.iterations - len(rows) + 1
        for offset, (finite, worst, done) in enumerate(rows):
            if not finite and self.converged_at is None:
                best = self.best_rel.max().item() if first + offset > 1 else float("nan")
                raise DEQSolveError(
                    f"{self.name}: non-finite value in f(z) at iteration {first + offset} "
                    f"(best relative residual so far {best:.3e})"
                )
            self.history.append(worst)
            if done and self.converged_at is None:
                self.converged_at = first + offset
        return self.converged_at is not None

    def info(self) -> SolveInfo:
        """The solve's `SolveInfo` (the last transfer: unchecked evaluations and the summaries)."""
        residual = self.best_rel if self.stop_mode == "rel" else self.best_abs
        converged = residual < self.tol
        summaries = torch.stack([self.best_abs.max(), self.best_rel.max(), converged.to(residual.dtype).mean()])
        *rows, (worst_abs, worst_rel, fraction) = self._pending_rows(summaries)
        self._check(rows)
        return SolveInfo(self.iterations, self.best_abs, self.best_rel, converged, self.history,
                         self.converged_at, worst_abs, worst_rel, fraction)


FIXED_POINT_SOLVERS = Registry("fixed-point solver", "deq_solver")


def register_fixed_point_solver(name: str, *, default: bool = False):
    """Function decorator: make a fixed-point solver selectable as ``deq.solver=name``."""

    def decorate(function):
        if not callable(function):
            raise TypeError(f"register_fixed_point_solver({name!r}) needs a function, got {function!r}")
        FIXED_POINT_SOLVERS.register(name, function, default=default)
        return function

    return decorate


def available_fixed_point_solvers() -> tuple[str, ...]:
    return FIXED_POINT_SOLVERS.names()


def get_fixed_point_solver(name: str):
    return FIXED_POINT_SOLVERS[name]


@register_fixed_point_solver("fixed_point")
def fixed_point(f: Map, z0, max_iter, tol, stop_mode="rel", damping=1.0, memory=None, name="deq", check_every=None):
    track = FixedPointTracker(z0, tol, stop_mode, name, check_every, max_iter)
    z = z0
    for _ in range(max_iter):
        fz = f(z)
        if track.observe(z, fz):
            break
        z = damped(z, fz, damping)
    return track.best, track.info()


@register_fixed_point_solver("anderson", default=True)
def anderson(f: Map, z0, max_iter, tol, stop_mode="rel", damping=1.0, memory=5, name="deq", lam=1e-4,
             check_every=None):
    track = FixedPointTracker(z0, tol, stop_mode, name, check_every, max_iter)
    batch, dim = z0.shape
    m = max(memory, 2)
    xs = z0.new_zeros(batch, m, dim)
    fs = z0.new_zeros(batch, m, dim)
    z = z0
    for k in range(max_iter):
        fz = f(z)
        if track.observe(z, fz):
            break
        xs[:, k % m], fs[:, k % m] = z, fz
        n = min(k + 1, m)
        residuals = fs[:, :n] - xs[:, :n]  # (batch, n, dim)
        # Bordered normal equations of min |R^T a|^2 + lam |a|^2 subject to sum(a) = 1.
        system = z0.new_zeros(batch, n + 1, n + 1)
        system[:, 0, 1:] = system[:, 1:, 0] = 1
        gram = residuals @ residuals.transpose(1, 2)
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)[:, None, None]
        system[:, 1:, 1:] = gram / scale + lam * torch.eye(n, dtype=z0.dtype, device=z0.device)
        rhs = z0.new_zeros(batch, n + 1, 1)
        rhs[:, 0] = 1
        # solve_ex: no error check (a host sync per call); a singular system gives non-finite
        # weights, hence a non-finite f(z) next, which the tracker reports.
        weights = torch.linalg.solve_ex(system, rhs)[0][:, 1:, 0]  # (batch, n)
        mixed_images = (weights[:, :, None] * fs[:, :n]).sum(1)
        mixed_points = (weights[:, :, None] * xs[:, :n]).sum(1)
        z = damped(mixed_points, mixed_images, damping)
    return track.best, track.info()


@register_fixed_point_solver("broyden")
def broyden(f: Map, z0, max_iter, tol, stop_mode="rel", damping=1.0, memory=30, name="deq", check_every=None):
    """The safeguard (restart on a bad inverse-Jacobian model) decides on the host: one transfer per
    iteration brings this step's residual-jump test, the next step's length test and the tracker's
    stopping test, so Broyden stops at convergence whatever ``check_every``."""
    track = FixedPointTracker(z0, tol, stop_mode, name, max_iter + 1, max_iter)  # checks ride on `transfer`
    us, vs = [], []  # inverse Jacobian estimate B = -I + sum_i u_i v_i^T

    def apply(x, us, vs):  # B x
        out = -x
        for u, v in zip(us, vs):
            out = out + u * (v * x).sum(1, keepdim=True)
        return out

    def apply_transposed(x):  # B^T x
        out = -x
        for u, v in zip(us, vs):
            out = out + v * (u * x).sum(1, keepdim=True)
        return out

    def too_long(step, z, g):
        # A step far longer than the state (or non-finite) means the model went bad.
        step_norm = step.norm(dim=1)
        return ~torch.isfinite(step_norm).all() | (step_norm > 10 * (z.norm(dim=1) + g.norm(dim=1) + 1)).any()

    z = z0
    fz = f(z)
    track.observe(z, fz)
    g = fz - z
    step = damping * g  # B = -I at first: a (damped) fixed-point step
    step_too_long = None  # known from the last transfer, or None: test it now
    while track.iterations < max_iter:
        if step_too_long is None:  # after a restart
            stop, (step_too_long,) = track.transfer(too_long(step, z, g))
            if stop:
                break
        diverging, step_too_long = step_too_long, None
        if not diverging:
            z_new = z + step
            fz_new = f(z_new)
            track.observe(z_new, fz_new)
            g_new = fz_new - z_new
            # A residual that jumps 1000x also means the model went bad. The update and the next
            # step are computed before knowing, so that both tests come back in one transfer.
            jumped = (g_new.norm(dim=1) > 1e3 * g.norm(dim=1).clamp_min(1e-12)).any()
            dz, dg = step, g_new - g
            b_dg = apply(dg, us, vs)
            denominator = (dz * b_dg).sum(1, keepdim=True)
            # Skip the update where dz and B dg are nearly orthogonal (a near-singular update).
            safe = denominator.abs() > 1e-8 * dz.norm(dim=1, keepdim=True) * b_dg.norm(dim=1, keepdim=True)
            u = torch.where(safe, (dz - b_dg) / torch.where(safe, denominator, torch.ones_like(denominator)),
                            torch.zeros_like(dz))
            keep = slice(-memory, None) if memory > 0 else slice(0, 0)  # the last `memory` updates
            new_us, new_vs = (us + [u])[keep], (vs + [apply_transposed(dz)])[keep]
            next_step = -apply(g_new, new_us, new_vs)
            stop, (diverging, step_too_long) = track.transfer(jumped, too_long(next_step, z_new, g_new))
            if stop:
                break
        if diverging:  # restart from the best iterate: a damped fixed-point step, empty memory
            step_too_long = None
            us.clear()
            vs.clear()
            z = track.best
            fz = f(z)
            track.observe(z, fz)
            g = fz - z
            step = damping * g
            continue
        us[:], vs[:] = new_us, new_vs
        z, g = z_new, g_new
        step = next_step
    return track.best, track.info()
