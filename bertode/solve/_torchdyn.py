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
        RungeKutta4,
        SolverTemplate,
        Tsitouras45,
    )
    from torchdyn.numerics.solvers.templates import DiffEqSolver
except ImportError as error:  # pragma: no cover - only without torchdyn
    raise ImportError(
        f"bertode needs torchdyn 1.0.6 ({error}); install it without its declared dependencies: "
        "pip install --no-deps torchdyn==1.0.6   (scripts/install.sh does this)"
    ) from error

__all__ = ["NeuralODE", "DiffEqSolver", "SolverTemplate", "Euler", "Midpoint", "RungeKutta4", "DormandPrince45",
           "Tsitouras45"]
