"""The fixed-point-solver registry: ``deq.solver=<name>`` (and ``deq.backward_solver``) resolve here.

A fixed-point solver is a function ``solver(f, z0, *, max_iter, tol, stop_mode, damping,
memory, name) -> (z, SolveInfo)`` on batched flat states (batch, dim); register your own
with ``@bertode.register_fixed_point_solver("name")`` and use `FixedPointTracker` for the
best-iterate bookkeeping, the stopping test and the non-finite check.

Each solver tracks, per sample, the iterate with the lowest residual and returns that
iterate (not its image f(z), unlike torchdeq's Anderson). It stops once every sample's
residual is below ``tol``, or after ``max_iter`` evaluations of f, and raises
`DEQSolveError` as soon as f produces a non-finite value. Residuals are
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
    iterations: int
    abs_residual: torch.Tensor  # (batch,) of the returned iterate
    rel_residual: torch.Tensor
    converged: torch.Tensor  # (batch,) bool
    history: list  # worst-sample residual (in the stopping norm) after each evaluation of f


def damped(z, fz, damping: float):
    """The damped fixed-point step (1 - tau) z + tau f(z) (tau = 1: plain iteration)."""
    return fz if damping == 1.0 else (1 - damping) * z + damping * fz


_REPORT: contextvars.ContextVar = contextvars.ContextVar("bertode_fixed_point_report", default=None)


@contextlib.contextmanager
def reporting(hook: Callable | None):
    """Inside the block, every `FixedPointTracker` created calls ``hook(n, best)`` after its n-th
    evaluation of f, with the iterate a solve stopped there would return (the per-iterate curve)."""
    token = _REPORT.set(hook)
    try:
        yield
    finally:
        _REPORT.reset(token)


class FixedPointTracker:
    """Best iterate per sample, the stopping test, and the non-finite check: call
    ``observe(z, f(z))`` after every evaluation; it returns True once every sample is
    below ``tol``; ``best`` is the lowest-residual iterate, ``info()`` the `SolveInfo`."""

    def __init__(self, z0, tol, stop_mode, name):
        batch = z0.shape[0]
        self.best = z0.clone()
        self.best_abs = torch.full((batch,), float("inf"), device=z0.device, dtype=z0.dtype)
        self.best_rel = self.best_abs.clone()
        self.tol, self.stop_mode, self.name = tol, stop_mode, name
        self.iterations = 0
        self.history: list[float] = []
        self.report = _REPORT.get()

    def observe(self, z, fz) -> bool:
        """Record f(z) for z; return True when every sample is below tolerance."""
        self.iterations += 1
        difference = (fz - z).norm(dim=1)
        relative = difference / (fz.norm(dim=1) + 1e-9)
        residual = relative if self.stop_mode == "rel" else difference
        current = self.best_rel if self.stop_mode == "rel" else self.best_abs
        better = residual < current
        done = (torch.where(better, residual, current) < self.tol).all()
        # One device-to-host transfer per iteration: finiteness, worst residual, stop test.
        finite, worst, stop = torch.stack([torch.isfinite(fz).all(), residual.max(), done]).tolist()
        if not finite:
            best = self.best_rel.max().item() if self.iterations > 1 else float("nan")
            raise DEQSolveError(
                f"{self.name}: non-finite value in f(z) at iteration {self.iterations} "
                f"(best relative residual so far {best:.3e})"
            )
        self.history.append(worst)
        self.best = torch.where(better[:, None], z, self.best)
        self.best_abs = torch.where(better, difference, self.best_abs)
        self.best_rel = torch.where(better, relative, self.best_rel)
        if self.report is not None:
            self.report(self.iterations, self.best)
        return bool(stop)

    def info(self) -> SolveInfo:
        residual = self.best_rel if self.stop_mode == "rel" else self.best_abs
        return SolveInfo(self.iterations, self.best_abs, self.best_rel, residual < self.tol, self.history)


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
def fixed_point(f: Map, z0, max_iter, tol, stop_mode="rel", damping=1.0, memory=None, name="deq"):
    track = FixedPointTracker(z0, tol, stop_mode, name)
    z = z0
    for _ in range(max_iter):
        fz = f(z)
        if track.observe(z, fz):
            break
        z = damped(z, fz, damping)
    return track.best, track.info()


@register_fixed_point_solver("anderson", default=True)
def anderson(f: Map, z0, max_iter, tol, stop_mode="rel", damping=1.0, memory=5, name="deq", lam=1e-4):
    track = FixedPointTracker(z0, tol, stop_mode, name)
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
        weights = torch.linalg.solve(system, rhs)[:, 1:, 0]  # (batch, n)
        mixed_images = (weights[:, :, None] * fs[:, :n]).sum(1)
        mixed_points = (weights[:, :, None] * xs[:, :n]).sum(1)
        z = damped(mixed_points, mixed_images, damping)
    return track.best, track.info()


@register_fixed_point_solver("broyden")
def broyden(f: Map, z0, max_iter, tol, stop_mode="rel", damping=1.0, memory=30, name="deq"):
    track = FixedPointTracker(z0, tol, stop_mode, name)
    us, vs = [], []  # inverse Jacobian estimate B = -I + sum_i u_i v_i^T

    def apply(x):  # B x
        out = -x
        for u, v in zip(us, vs):
            out = out + u * (v * x).sum(1, keepdim=True)
        return out

    def apply_transposed(x):  # B^T x
        out = -x
        for u, v in zip(us, vs):
            out = out + v * (u * x).sum(1, keepdim=True)
        return out

    z = z0
    fz = f(z)
    if track.observe(z, fz):
        return track.best, track.info()
    g = fz - z
    step = damping * g  # B = -I at first: a (damped) fixed-point step
    while track.iterations < max_iter:
        # A step far longer than the state (or non-finite), or a residual that jumps 1000x,
        # means the low-rank inverse-Jacobian model went bad.
        step_norm = step.norm(dim=1)
        diverging = not bool(torch.isfinite(step_norm).all()) or bool((step_norm > 10 * (z.norm(dim=1) + g.norm(dim=1) + 1)).any())
        if not diverging:
            z_new = z + step
            fz_new = f(z_new)
            if track.observe(z_new, fz_new):
                break
            g_new = fz_new - z_new
            diverging = bool((g_new.norm(dim=1) > 1e3 * g.norm(dim=1).clamp_min(1e-12)).any())
        if diverging:  # restart from the best iterate: a damped fixed-point step, empty memory
            us.clear()
            vs.clear()
            z = track.best
            fz = f(z)
            if track.observe(z, fz):
                break
            g = fz - z
            step = damping * g
            continue
        dz, dg = step, g_new - g
        b_dg = apply(dg)
        denominator = (dz * b_dg).sum(1, keepdim=True)
        # Skip the update where dz and B dg are nearly orthogonal (a near-singular update).
        safe = denominator.abs() > 1e-8 * dz.norm(dim=1, keepdim=True) * b_dg.norm(dim=1, keepdim=True)
        u = torch.where(safe, (dz - b_dg) / torch.where(safe, denominator, torch.ones_like(denominator)), torch.zeros_like(dz))
        us.append(u)
        vs.append(apply_transposed(dz))
        if len(us) > memory:
            us.pop(0)
            vs.pop(0)
        z, g = z_new, g_new
        step = -apply(g)
    return track.best, track.info()

