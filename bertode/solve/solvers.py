"""The ODE-solver registry: ``solver=<name>`` resolves here, and only here.

An entry is an `ODESolverSpec`: how to build the torchdyn solver for a dtype, whether it
is adaptive, its order, and the names of the same method in the peer backends torchdiffeq
and torchode (``None`` when the library has no such method). Register a solver with

* a torchdyn solver class (a ``DiffEqSolver``/``SolverTemplate`` subclass whose
  constructor takes ``dtype``), used as a decorator::

      @bertode.register_solver("my_rk", torchdiffeq="rk4")
      class MyRK(DiffEqSolver): ...

* or an explicit Runge-Kutta method given by its Butcher tableau::

      bertode.register_solver("ralston3", bertode.ButcherTableau(
          c=[0, 1/2, 3/4], a=[[], [1/2], [0, 3/4]], b=[2/9, 1/3, 4/9], order=3))

Built in: torchdyn's ``euler``, ``midpoint``, ``rk4`` (fixed step), ``dopri5``,
``tsit5`` (adaptive), and ``heun`` (explicit trapezoid, from its tableau; one step of it
is the ODE-Transformer's RK2 block).

Backends (``ode_backend``, `ODE_BACKENDS`): ``torchdyn`` (default) and the peers
``torchdiffeq`` share one step size over the batch; ``torchode`` (the peer) and
``bertode`` (`per_sequence.py`: any adaptive solver whose torchdyn tableau carries an error
estimate) take one step size per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..registry import Registry
from ._torchdyn import DiffEqSolver, DormandPrince45, Euler, Midpoint, RungeKutta4, Tsitouras45

# torchdyn's names for its two stepping classes, read off its own solvers
FIXED_STEPPING, ADAPTIVE_STEPPING = Euler().stepping_class, DormandPrince45().stepping_class


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method: stages k_i = f(t + c_i h, x + h sum_j a_ij k_j),
    step x' = x + h sum_i b_i k_i. ``a`` is lower-triangular, given row by row (row i has
    i entries); ``order`` is the method's classical order (reported, not checked)."""

    c: Sequence[float]
    a: Sequence[Sequence[float]]
    b: Sequence[float]
    order: int

    def __post_init__(self):
        stages = len(self.b)
        if stages < 1 or len(self.c) != stages or len(self.a) != stages:
            raise ValueError(f"ButcherTableau: c, a and b need one entry per stage; got {len(self.c)}, {len(self.a)}, {stages}")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(f"ButcherTableau.a row {i} has {len(row)} entries; allowed: {i} (explicit methods)")
        if abs(sum(self.b) - 1) > 1e-12:
            raise ValueError(f"ButcherTableau.b sums to {sum(self.b)!r}; allowed: weights summing to 1 (consistency)")


class ExplicitRK(DiffEqSolver):
    """A fixed-step torchdyn solver for any `ButcherTableau` (tableau held in ``self.tableau``
    in torchdyn's (c, a, b, None) form, so torchdyn and `SubSteps` move it to the state)."""

    def __init__(self, tableau: ButcherTableau, dtype=torch.float32):
        super().__init__(order=tableau.order, stepping_class=FIXED_STEPPING)
        self.dtype = dtype
        c = torch.tensor(list(tableau.c), dtype=dtype)
        a = [torch.tensor(list(row), dtype=dtype) for row in tableau.a]
        self.tableau = (c, a, torch.tensor(list(tableau.b), dtype=dtype), None)
        self._weights = (list(map(float, tableau.c)), [list(map(float, row)) for row in tableau.a],
                         list(map(float, tableau.b)))

    def step(self, f, x, t, dt, k1=None, args=None):
        # Python-float weights: no device tensors are read, and zero entries are skipped.
        c, a, b = self._weights
        stages = []
        for i in range(len(b)):
            if i == 0 and k1 is not None:
                stages.append(k1)
                continue
            state = x
            for weight, k in zip(a[i], stages):
                if weight != 0.0:
                    state = state + (dt * weight) * k
            stages.append(f(t + c[i] * dt, state))
        increment = sum(weight * k for weight, k in zip(b, stages) if weight != 0.0)
        return None, x + dt * increment, None

    def sync_device_dtype(self, x, t_span):
        """torchdyn's, for a tableau without an error row (torchdyn's own calls ``None.to``): a
        solve that steps this solver itself (truncated backprop, a kept grid) calls it."""
        c, a, b, _ = self.tableau
        self.tableau = None
        x, t_span = super().sync_device_dtype(x, t_span)
        self.tableau = (c.to(x), [row.to(x) for row in a], b.to(x), None)
        return x, t_span


@dataclass(frozen=True)
class ODESolverSpec:
    """A registered ODE solver: ``build(dtype)`` gives a fresh torchdyn solver."""

    name: str
    build: Callable[[torch.dtype], DiffEqSolver]
    adaptive: bool
    order: int
    torchdiffeq: str | None = None
    source: object = None  # the class or tableau it was registered with
    torchode: str | None = None  # the torchode step method's class name (``Dopri5``), for ode_backend="torchode"

    def same_as(self, other) -> bool:
        return isinstance(other, ODESolverSpec) and (self.name, self.adaptive, self.torchdiffeq, self.torchode) == (
            other.name, other.adaptive, other.torchdiffeq, other.torchode) and _same_source(self.source, other.source)


def _same_source(a, b) -> bool:
    if isinstance(a, ButcherTableau) or isinstance(b, ButcherTableau):
        return a == b
    return (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == (
        getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def solver_spec(name: str, source, torchdiffeq: str | None = None, torchode: str | None = None) -> ODESolverSpec:
    """The spec of a torchdyn solver class or a `ButcherTableau` (registered or not)."""
    if isinstance(source, ButcherTableau):
        return ODESolverSpec(name, lambda dtype: ExplicitRK(source, dtype), False, source.order, torchdiffeq, source,
                             torchode)
    if isinstance(source, type) and issubclass(source, torch.nn.Module) and hasattr(source, "step"):
        probe = source(torch.float32)
        stepping = getattr(probe, "stepping_class", None)
        if stepping not in (FIXED_STEPPING, ADAPTIVE_STEPPING):
            raise TypeError(f"register_solver({name!r}): {source.__qualname__}.stepping_class={stepping!r} is invalid; "
                            f"allowed: {FIXED_STEPPING!r}, {ADAPTIVE_STEPPING!r}")
        return ODESolverSpec(name, source, stepping == ADAPTIVE_STEPPING, int(getattr(probe, "order", 0)), torchdiffeq, source,
                             torchode)
    raise TypeError(f"register_solver({name!r}) needs a torchdyn solver class (DiffEqSolver or SolverTemplate "
                    f"subclass taking dtype) or a bertode.ButcherTableau, got {source!r}")


SOLVERS = Registry("ODE solver", "solver")
# Where a solve runs (the first is the default); a spec names its torchdiffeq and torchode methods.
ODE_BACKENDS = ("torchdyn", "torchdiffeq", "torchode", "bertode")
SHARED_STEP_BACKENDS = ("torchdyn", "torchdiffeq")  # one step size for the whole batch
PER_SEQUENCE_BACKENDS = ("torchode", "bertode")  # one step size per sequence (batch row)


def register_solver(name: str, solver=None, *, torchdiffeq: str | None = None, torchode: str | None = None,
                    default: bool = False):
    """Make a torchdyn solver class or a `ButcherTableau` selectable as ``solver=name``.

    ``torchdiffeq`` names the same method in torchdiffeq, for ``ode_backend="torchdiffeq"``;
    ``torchode`` the class of torchode's, for ``ode_backend="torchode"``.
    Works as a class decorator (``solver`` omitted) or called with the solver."""

    def decorate(source):
        SOLVERS.register(name, solver_spec(name, source, torchdiffeq, torchode), default=default)
        return source

    return decorate if solver is None else decorate(solver)


def available_solvers() -> tuple[str, ...]:
    return SOLVERS.names()


def get_solver(name: str) -> ODESolverSpec:
    return SOLVERS[name]


register_solver("euler", Euler, torchdiffeq="euler", torchode="Euler", default=True)
register_solver("midpoint", Midpoint, torchdiffeq="midpoint")  # torchode 1.0.1 has no midpoint or rk4
register_solver("rk4", RungeKutta4, torchdiffeq="rk4")
register_solver("dopri5", DormandPrince45, torchdiffeq="dopri5", torchode="Dopri5")
register_solver("tsit5", Tsitouras45, torchode="Tsit5")  # torchdiffeq 0.2.5 has no tsit5
HEUN = ButcherTableau(c=[0.0, 1.0], a=[[], [1.0]], b=[0.5, 0.5], order=2)
register_solver("heun", HEUN, torchdiffeq="heun2", torchode="Heun")
