"""The one place bertode imports torchdyn, with an error that says how to install it.

torchdyn 1.0.6 declares heavy dependencies (torchvision, a CUDA torch, ...) that its
imports do not need; bertode installs it with ``--no-deps`` and declares what the
imports need itself (see setup.cfg and scripts/install.sh).
"""

try:
    from torchdyn.core import NeuralODE
    from torchdyn.numerics.solvers.ode import (
        DormandPrince45,
        Euler,
        Midpoint,
        RungeKutta4 as _TorchdynRungeKutta4,
        SolverTemplate,
        Tsitouras45,
    )
    from torchdyn.numerics.solvers.templates import DiffEqSolver
except ImportError as error:  # pragma: no cover - only without torchdyn
    raise ImportError(
        f"bertode needs torchdyn 1.0.6 ({error}); install it without its declared dependencies: "
        "pip install --no-deps torchdyn==1.0.6   (scripts/install.sh does this)"
    ) from error


class RungeKutta4(_TorchdynRungeKutta4):
    """torchdyn 1.0.6's classical RK4 with its stage times corrected. Its ``step`` reads c[0], c[1],
    c[2] for stages 2-4 from a ``c`` that starts with stage 1's 0, so it evaluates k2 at t (not
    t + h/2) and k4 at t + h/2 (not t + h): only a field that depends on t sees it (``time_residual``,
    ``time_weights``); the operations on the state are torchdyn's, so autonomous solves are unchanged.
    Pinned by tests/test_oracles_solve.py (the classical tableau, written there, and a closed form)."""

    def step(self, f, x, t, dt, k1=None, args=None):
        c, a, bsol, _ = self.tableau
        if k1 is None:
            k1 = f(t, x)
        k2 = f(t + c[1] * dt, x + dt * (a[0] * k1))
        k3 = f(t + c[2] * dt, x + dt * (a[1][0] * k1 + a[1][1] * k2))
        k4 = f(t + c[3] * dt, x + dt * (a[2][0] * k1 + a[2][1] * k2 + a[2][2] * k3))
        return None, x + dt * (bsol[0] * k1 + bsol[1] * k2 + bsol[2] * k3 + bsol[3] * k4), None


__all__ = ["NeuralODE", "DiffEqSolver", "SolverTemplate", "Euler", "Midpoint", "RungeKutta4", "DormandPrince45",
           "Tsitouras45"]
