"""The built-in ODE sensitivity methods: backprop through the solver, and torchdyn's adjoints.

* ``autograd``: backpropagate through every operation of the solver (exact gradient of
  the discrete solution; memory grows with the steps).
* ``adjoint``: solve the adjoint ODE backwards in time (``adjoint_solver``,
  ``adjoint_atol``, ``adjoint_rtol``); memory flat in the steps. With fixed-step solvers
  it is the continuous adjoint discretised on the step grid: it approaches autograd's
  gradient as ``steps`` grows.
* ``interpolated_adjoint``: the adjoint on a cubic spline of the forward trajectory
  (torchdyn only; it keeps every step, and uses the forward solver and tolerances).

The adjoints pass torchdyn its ``sensitivity`` argument (``torchdyn_sensitivity``; torchdyn
stores it as ``NeuralODE.sensalg``), which is the name they are registered under here.
"""

from __future__ import annotations

from .sensitivities import ODESensitivity, register_sensitivity
from .solvers import ODE_BACKENDS, SHARED_STEP_BACKENDS


@register_sensitivity("autograd", default=True)
class Autograd(ODESensitivity):
    traceable = True
    takes_backprop = True  # the depth dial's k: the last k fixed steps keep a graph (`ODEProblem._truncated`)
    backends = ODE_BACKENDS

    def __call__(self, problem):
        return problem.autograd()


@register_sensitivity("adjoint")
class Adjoint(ODESensitivity):
    reevaluates_field = True
    backends = SHARED_STEP_BACKENDS  # torchdyn's and torchdiffeq's adjoints; per-sequence solves backpropagate
    config_fields = {"adjoint_solver": "adjoint_solver", "adjoint_atol": "adjoint_atol", "adjoint_rtol": "adjoint_rtol"}

    def __init__(self, adjoint_solver: str | None = None, adjoint_atol: float = 1e-4, adjoint_rtol: float = 1e-4):
        self.adjoint_solver, self.adjoint_atol, self.adjoint_rtol = adjoint_solver, adjoint_atol, adjoint_rtol

    def __call__(self, problem):
        return problem.adjoint(self.torchdyn_sensitivity, self.adjoint_solver, self.adjoint_atol, self.adjoint_rtol)


@register_sensitivity("interpolated_adjoint")
class InterpolatedAdjoint(Adjoint):
    backends = ODE_BACKENDS[:1]
    config_fields = {}  # torchdyn's interpolated adjoint uses the forward solver and tolerances

    def __init__(self):
        super().__init__()

    def __call__(self, problem):
        # torchdyn's interpolated adjoint ignores the adjoint solver and tolerances.
        return problem.adjoint(self.torchdyn_sensitivity, keep_grid=True)


# torchdyn's names for the adjoints (its ``sensitivity=`` argument, stored as ``NeuralODE.sensalg``)
# are the registered ones; a registered subclass keeps its base's.
Adjoint.torchdyn_sensitivity = Adjoint.registry_name
InterpolatedAdjoint.torchdyn_sensitivity = InterpolatedAdjoint.registry_name
