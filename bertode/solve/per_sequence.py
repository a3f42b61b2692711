"""Per-sequence adaptive steps (``ode_backend="bertode"``): one step size per batch row.

torchdyn's and torchdiffeq's adaptive solvers take one step size, one error norm and one
accept/reject decision for the whole batch, so one hard sequence sets the steps of all of
them. This stepper gives every sequence (batch row; the state is (batch, seq, hidden))
its own: the same embedded Runge-Kutta method (the tableau of the registered torchdyn
solver: dopri5, tsit5, or any adaptive one with an error estimate), then per row

* the error norm: RMS over the row of err / (atol + rtol max(|z|, |z_new|)), as torchdiffeq;
* the decision: accept where the norm is <= 1;
* the controller: an integral (I) controller, dt <- dt clamp(0.9 ratio^(-1/order), 0.2, 10)
  (never growing after a rejection);
* the initial step: Hairer's heuristic, per row (two evaluations);
* time: the field sees t as a (batch, 1, 1) tensor, each row at its own time; a field
  declares it can (``VectorField.per_sequence_time``; `configuration.py` refuses others).

A row that reached t1 is frozen (``torch.where``). Every stage evaluates the whole batch
(the field's attention and dropout masks keep their batch shape), but each row counts an
evaluation only while it is still running; FSAL methods reuse the last stage. A solve is
therefore the same, row by row, alone or in any batch.

Gradients: backpropagation through the accepted steps; the step-size control is outside
the graph (as torchdyn's), so the gradient is that of the discrete solution on the steps
taken. Adjoints are refused (`ode_sensitivities.py`: ``backends``).

Host syncs: exactly one per loop iteration (one ``.tolist()`` of two flags: any row still
running, any non-finite error norm), i.e. one per step attempted by the slowest row.
``MAX_STEPS`` bounds the steps (accepted and rejected) of every row: a solve still running
after that many iterations raises, naming the sequence. The loop counter is a host int, so
the bound costs no sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_STEPS = 10_000  # attempted steps per sequence before a solve gives up (RuntimeError)
SAFETY, FACTOR_MIN, FACTOR_MAX = 0.9, 0.2, 10.0


@dataclass(frozen=True)
class EmbeddedTableau:
    """An explicit RK method with an error estimate: stage i evaluates f(t + c_i h, z + h sum_j
    a_ij k_j); z_new = z + h sum_i b_i k_i; err = h sum_i e_i k_i. ``fsal``: the last stage is
    f(t + h, z_new), the next step's first."""

    c: tuple
    a: tuple
    b: tuple
    e: tuple
    order: int
    fsal: bool


def embedded_tableau(spec) -> EmbeddedTableau | None:
    """The tableau of a registered adaptive solver, read off its torchdyn solver's
    ``tableau`` = (c of stages 2.., rows of a for stages 2.., b, error weights); None when the
    solver has no such tableau (it cannot step per sequence)."""
    if not spec.adaptive:
        return None
    tableau = getattr(spec.build(torch.float64), "tableau", None)
    if not (isinstance(tableau, tuple) and len(tableau) == 4 and tableau[3] is not None):
        return None
    c, a, b, e = tableau
    stages = len(e)
    if len(c) != stages - 1 or len(a) != stages - 1 or len(b) > stages:
        return None
    c = (0.0, *map(float, c))
    a = ((),) + tuple(tuple(map(float, row)) for row in a)
    b = tuple(map(float, b)) + (0.0,) * (stages - len(b))
    e = tuple(map(float, e))
    fsal = c[-1] == 1.0 and all(abs(x - y) < 1e-15 for x, y in zip(a[-1] + (0.0,), b))
    return EmbeddedTableau(c, a, b, e, int(spec.order), fsal)


def _row_rms(x: torch.Tensor) -> torch.Tensor:
    """RMS over every dimension but the first: one number per sequence (batch,)."""
    return x.reshape(x.shape[0], -1).pow(2).mean(1).sqrt()


def _combine(weights, ks):
    """sum_i w_i k_i over the non-zero weights (None when all are zero)."""
    total = None
    for weight, k in zip(weights, ks):
        if weight != 0.0:
            total = weight * k if total is None else total + weight * k
    return total


class PerSequenceSolve:
    """z(t1) of dz/dt = field(t, z) with one step size per row; ``accepted``, ``rejected`` and
    ``nfe`` are (batch,) tensors afterwards (left on the state's device: no sync)."""

    def __init__(self, tableau: EmbeddedTableau, atol: float, rtol: float, max_steps: int = MAX_STEPS,
                 name: str = "solve"):
        self.tableau, self.atol, self.rtol, self.max_steps, self.name = tableau, atol, rtol, max_steps, name
        self.accepted = self.rejected = self.nfe = None

    def __call__(self, field, z0: torch.Tensor, t0: float, t1: float, time_dtype: torch.dtype) -> torch.Tensor:
        tab, batch = self.tableau, z0.shape[0]
        column = (batch,) + (1,) * (z0.dim() - 1)

        def evaluate(t, z):  # t: (batch,) -> the field's (batch, 1, 1)
            return field(t.view(column), z)

        def rows(v, like):  # a (batch,) tensor broadcast against the state
            return v.view(column).to(like.dtype)

        running = torch.ones(batch, dtype=torch.bool, device=z0.device)
        self.accepted = torch.zeros(batch, dtype=torch.long, device=z0.device)
        self.rejected = torch.zeros_like(self.accepted)
        self.nfe = torch.full_like(self.accepted, 2)  # f(t0) and the initial step's probe
        t = torch.full((batch,), t0, dtype=time_dtype, device=z0.device)
        t_end = torch.full_like(t, t1)
        z, k1 = z0, evaluate(t, z0)
        dt = self.initial_step(evaluate, z0, k1, t, t1 - t0)
        iterations = 0
        while True:
            iterations += 1
            if iterations > self.max_steps:
                self._too_many_steps(running, t, t1)
            remaining = t_end - t
            last = dt >= remaining  # this step would reach t1: take it exactly to t1
            h = torch.where(last, remaining, dt)
            ks = [k1]
            for i in range(1, len(tab.c)):
                increment = _combine(tab.a[i], ks)
                stage = z if increment is None else z + rows(h, z) * increment
                ks.append(evaluate(t + tab.c[i] * h, stage))
            self.nfe += running * (len(tab.c) - 1)
            z_new = z + rows(h, z) * _combine(tab.b, ks)
            with torch.no_grad():  # step-size control stays outside the graph
                error = rows(h, z) * _combine(tab.e, ks)
                scale = self.atol + self.rtol * torch.maximum(z.abs(), z_new.abs())
                ratio = _row_rms(error / scale).to(time_dtype)
                good = ratio <= 1.0
                accept, reject = good & running, ~good & running
                self.accepted += accept
                self.rejected += reject
                factor = (SAFETY * ratio.pow(-1.0 / tab.order)).clamp(FACTOR_MIN, FACTOR_MAX)
                factor = torch.where(good, factor, factor.clamp(max=1.0))
                factor = torch.nan_to_num(factor, nan=FACTOR_MIN)
                dt = torch.where(running, h * factor, dt)
                t = torch.where(accept, torch.where(last, t_end, t + h), t)
            z = torch.where(accept.view(column), z_new, z)
            if tab.fsal:
                k1 = torch.where(accept.view(column), ks[-1], k1)
            else:
                k1 = evaluate(t, z)
                self.nfe += accept
            running = running & ~(accept & last)
            flags = torch.stack([running.any(), (~torch.isfinite(ratio) & (accept | reject)).any()])
            still_running, non_finite = flags.tolist()  # the one host sync of this iteration
            if non_finite:
                raise FloatingPointError(f"per-sequence solve {self.name!r}: the error norm is not finite on sequence(s) "
                                         f"{torch.nonzero(~torch.isfinite(ratio)).flatten().tolist()}; allowed: finite "
                                         "dynamics (lower the learning rate or the weights' scale)")
            if not still_running:
                return z

    def initial_step(self, evaluate, z0, f0, t, span: float) -> torch.Tensor:
        """Hairer's initial step per row (Solving ODEs I, II.4), costing one evaluation."""
        with torch.no_grad():
            order = self.tableau.order
            scale = self.atol + self.rtol * z0.abs()
            d0, d1 = _row_rms(z0 / scale).to(t.dtype), _row_rms(f0 / scale).to(t.dtype)
            h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
            column = (z0.shape[0],) + (1,) * (z0.dim() - 1)
            f1 = evaluate(t + h0, z0 + h0.view(column).to(z0.dtype) * f0)
            d2 = _row_rms((f1 - f0) / scale).to(t.dtype) / h0
            largest = torch.maximum(d1, d2)
            h1 = torch.where(largest <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6),
                             (0.01 / largest).pow(1.0 / (order + 1)))
            return torch.minimum(torch.minimum(100 * h0, h1), torch.full_like(h0, span))

    def _too_many_steps(self, running, t, t1):
        stuck = torch.nonzero(running).flatten().tolist()
        raise RuntimeError(f"per-sequence solve {self.name!r} took {self.max_steps} steps on sequence(s) {stuck} "
                           f"without reaching t1={t1} (t={t[running].tolist()}); allowed: at most MAX_STEPS="
                           f"{self.max_steps} steps per sequence (loosen atol/rtol)")
