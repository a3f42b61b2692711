"""`SubSteps`: a fixed-step solve of N steps taken as ONE torchdyn step over [t0, t1].

torchdyn 1.0.6's fixed-step loop and its backsolve adjoint are built around the
``t_span`` grid: every grid point is a step, the loop tests ``torch.isclose(t, save_at)``
at each one (a device-to-host synchronisation per step when ``t`` lives on the GPU), and
the adjoint saves the solution at every grid point, so its memory grows by one state per
step. Handing torchdyn the two endpoints and a solver whose single step is N sub-steps of
size (t1 - t0) / N computes the same numbers while

* the adjoint saves two states whatever N is (its backward solve uses the same wrapper,
  so it still takes N steps of the adjoint solver);
* ``t_span`` stays on the host: every test torchdyn makes on it is a CPU operation, and
  the times the vector field sees are built on the state's device by a fill kernel (no
  host-to-device copy, no synchronisation).

The interpolated adjoint needs the solution at every step for its spline, so bertode
does not use this wrapper there (see `ode.py`).
"""

from __future__ import annotations

import torch

from . import observe
from ._torchdyn import DiffEqSolver
from .solvers import FIXED_STEPPING


class SubSteps(DiffEqSolver):
    """Wraps a fixed-step torchdyn solver ``base``: one call to `step` is ``n`` base steps."""

    def __init__(self, base: DiffEqSolver, n: int):
        if base.stepping_class != FIXED_STEPPING:
            raise ValueError(f"SubSteps needs a fixed-step solver, got {type(base).__name__} ({base.stepping_class})")
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"SubSteps n={n!r} is invalid; allowed: an integer >= 1")
        super().__init__(order=base.order, stepping_class=FIXED_STEPPING)
        self.base, self.n = base, n
        self.dtype = getattr(base, "dtype", torch.float32)

    def sync_device_dtype(self, x, t_span):
        """Moves the base solver's tableau to the state; leaves ``t_span`` where it is (the host).

        The base solver's own method would copy ``t_span`` to the device, and a blocking
        host-to-device copy waits for the GPU: only the tableau moves, and only once."""
        tableau = self.base.tableau
        if tableau is not None:
            c, a, bsol, berr = tableau
            self.base.tableau = (c.to(x), [row.to(x) for row in a], bsol.to(x),
                                 berr.to(x) if berr is not None else None)
        return x, t_span

    def step(self, f, x, t, dt, k1=None, args=None):
        # t and dt are host tensors (see `sync_device_dtype`): reading them does not synchronise.
        return None, self.integrate(f, x, float(t), float(t) + float(dt), t.dtype, args), None

    def integrate(self, f, x, t0: float, t1: float, time_dtype=torch.float32, args=None):
        """``n`` base steps from ``t0`` to ``t1``; each time is filled on the state's device."""
        h = (t1 - t0) / self.n
        observer = observe.active()  # output_trajectory: the state after every inner step
        for index in range(self.n):
            t_here = torch.full((), t0 + index * h, dtype=time_dtype, device=x.device)
            _, x, _ = self.base.step(f, x, t_here, h, args=args)
            if observer is not None and index + 1 < self.n:
                observer.note(t0 + (index + 1) * h, x)
        return x
