"""`ODESolve`: one residual's ODE, solved by torchdyn's `NeuralODE` (or torchdiffeq, the peer).

The solve knows neither the vector field nor the model: it gets a ``dynamics(t, z)``
callable, the parameters that callable uses, and an interval. It handles the torchdyn
1.0.6 traps at this one place:

* ``args`` never reaches the field, so context (attention mask, dropout mask) lives in
  the ``dynamics`` closure, bound to a small adapter module before each solve and bound
  again by a gradient hook just before an adjoint's backward solve, so interleaved
  forwards (gradient accumulation) cannot hand one batch's mask to another's backward.
* the adjoint differentiates the field's own parameters and fails on frozen or unused
  ones: the adapter owns exactly the *trainable* parameters of the dynamics, rebound at
  every solve, so freezing parts of a model works.
* ``interpolated_adjoint`` assumes 2-D states: the state is flattened to (batch, -1).
* a bf16 call converts the shared solver tableau for good: solvers are built per
  (dtype, device), and the state keeps the dtype of the hidden states (fp32 under
  autocast; the field's bf16 output is cast back to it).
* ``vf.nfe`` mixes forward and backward and never resets: evaluations are counted per
  solve in a `SolveRecord` instead.
* the fixed-step loop tests the device-side ``t`` at every step (a host synchronisation)
  and the adjoint saves the solution at every grid point (memory linear in the steps):
  fixed-step solves hand torchdyn [t0, t1] on the host and a `SubSteps` solver whose one
  step is all N steps, except for the interpolated adjoint, whose spline needs the grid.
* ``copy.deepcopy`` of a NeuralODE fails while ``vf_params`` holds a graph: it is cleared
  after every solve, and the cached NeuralODE is not part of the pickled state.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ._torchdyn import SOLVER_DICT, NeuralODE
from .configuration import ADAPTIVE_SOLVERS, TORCHDIFFEQ_METHODS
from .schemes import BLOCK_SCHEMES
from .stats import SolveRecord
from .substeps import SubSteps

Dynamics = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_RECORDING_CLASSES: dict[type, type] = {}


def recording_solver_class(base: type) -> type:
    """A subclass of a torchdyn solver that notes the t of every step it attempts."""
    if base not in _RECORDING_CLASSES:

        def step(self, f, x, t, dt, k1=None, args=None):
            record = self.record
            if record is not None and record.phase == "forward":
                record.step_times.append(t)
            return base.step(self, f, x, t, dt, k1=k1, args=args)

        _RECORDING_CLASSES[base] = type(f"Recording{base.__name__}", (base,), {"step": step, "record": None})
    return _RECORDING_CLASSES[base]


class FieldAdapter(nn.Module):
    """The module torchdyn integrates: f(t, x) on the flattened state.

    Its parameters are bound per solve (`bind`) to the trainable parameters of the
    dynamics; it registers no submodules, so torchdyn's per-call module walk is cheap.
    """

    def __init__(self):
        super().__init__()
        self.dynamics: Dynamics | None = None
        self.state_shape: torch.Size | None = None
        self.record: SolveRecord | None = None

    def bind(self, dynamics: Dynamics, state_shape, state_dtype, parameters: list, record: SolveRecord) -> None:
        self.dynamics, self.state_shape, self.record = dynamics, state_shape, record
        self.state_dtype = state_dtype
        self._parameters.clear()
        for index, parameter in enumerate(parameters):
            self._parameters[f"p{index}"] = parameter

    def forward(self, t, x, args=None):
        self.record.count_evaluation()
        if t.device != x.device:
            # torchdyn's adjoint evaluates the field at the host-side ends of t_span; a
            # blocking copy would wait for the GPU, a fill kernel does not.
            t = torch.full((), float(t), dtype=t.dtype, device=x.device)
        # torchdyn's fp32 t_span promotes a half/bf16 state inside adaptive steps: hand the
        # field the state's own dtype, and give torchdyn back the dtype it integrates in.
        dz = self.dynamics(t, x.view(self.state_shape).to(self.state_dtype))
        return dz.reshape(x.shape).to(x.dtype)


def _time_dtype(state: torch.Tensor) -> torch.dtype:
    return torch.float64 if state.dtype == torch.float64 else torch.float32


class ODESolve:
    """Integrates ``dz/dt = dynamics(t, z)`` from ``t0`` to ``t1`` with fixed options.

    ``solver`` names a torchdyn solver (euler, midpoint, rk4, dopri5, tsit5) or an
    ODE-Transformer block scheme (rk2, rk2_gated; see `schemes.py`). ``scheme_state``
    given to a call is set on the solver first (the gated scheme's gate). ``loop``
    (``direct`` or ``neural_ode``) says whether a fixed-step solve with autograd calls the
    `SubSteps` solver itself or goes through ``NeuralODE``; adjoint and adaptive solves
    always go through ``NeuralODE``.
    """

    def __init__(
        self,
        solver,
        steps: int = 1,
        atol: float = 1e-3,
        rtol: float = 1e-3,
        sensitivity: str = "autograd",
        adjoint_solver: str | None = None,
        adjoint_atol: float = 1e-4,
        adjoint_rtol: float = 1e-4,
        backend: str = "torchdyn",
        adaptive: bool = False,
        loop: str = "direct",
    ):
        self.solver, self.steps, self.atol, self.rtol = solver, steps, atol, rtol
        self.sensitivity, self.backend, self.adaptive = sensitivity, backend, adaptive
        self.loop = loop
        self.adjoint_solver = adjoint_solver or solver
        self.adjoint_atol, self.adjoint_rtol = adjoint_atol, adjoint_rtol
        self._reset_cache()

    @classmethod
    def from_config(cls, config) -> "ODESolve":
        return cls(
            solver=config.solver,
            steps=config.steps,
            atol=config.atol,
            rtol=config.rtol,
            sensitivity=config.sensitivity,
            adjoint_solver=config.adjoint_solver,
            adjoint_atol=config.adjoint_atol,
            adjoint_rtol=config.adjoint_rtol,
            backend=config.ode_backend,
            adaptive=config.adaptive,
            loop=config.fixed_step_loop,
        )

    # --- cached torchdyn objects: rebuilt lazily, never pickled or deep-copied ---------
    def _reset_cache(self) -> None:
        self._adapter = FieldAdapter()
        self._node = None
        self._solvers: dict = {}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_adapter", "_node", "_solvers")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset_cache()

    @property
    def sub_stepped(self) -> bool:
        """Fixed-step solves run as one torchdyn step over [t0, t1] (`substeps.py`); the
        interpolated adjoint keeps torchdyn's grid because its spline needs every step."""
        return not self.adaptive and self.sensitivity != "interpolated_adjoint"

    def _build_solver(self, solver: str, dtype):
        if solver in ADAPTIVE_SOLVERS:  # only adaptive steps need recording (accepted/rejected)
            return recording_solver_class(SOLVER_DICT[solver])(dtype)
        built = BLOCK_SCHEMES[solver](dtype) if solver in BLOCK_SCHEMES else SOLVER_DICT[solver](dtype)
        return SubSteps(built, self.steps) if self.sub_stepped else built

    def _solver_pair(self, dtype, device):
        key = (dtype, device, self.sub_stepped)
        if key not in self._solvers:
            forward = self._build_solver(self.solver, dtype)
            backward = self._build_solver(self.adjoint_solver, dtype)
            like = torch.empty(0, dtype=dtype, device=device)
            for solver in (forward, backward):  # the tableau on the state's device, once
                solver.sync_device_dtype(like, torch.zeros(2))
            self._solvers[key] = (forward, backward)
        return self._solvers[key]

    def _neural_ode(self, forward_solver) -> NeuralODE:
        if self._node is None:
            # torchdyn warns when tolerances are set on fixed-step solvers: pass its defaults then.
            atol, rtol = (self.atol, self.rtol) if self.adaptive else (1e-3, 1e-3)
            adjoint_adaptive = self.adjoint_solver in ADAPTIVE_SOLVERS
            atol_adjoint, rtol_adjoint = (self.adjoint_atol, self.adjoint_rtol) if adjoint_adaptive else (1e-3, 1e-3)
            self._node = NeuralODE(
                self._adapter, solver=forward_solver, sensitivity="autograd", atol=atol, rtol=rtol,
                atol_adjoint=atol_adjoint, rtol_adjoint=rtol_adjoint, return_t_eval=False,
            )
            # With no trainable parameters bound at construction torchdyn registers a CPU
            # dummy parameter for good; bertode binds parameters per solve instead.
            self._node.vf._parameters.pop("dummy_parameter", None)
        return self._node

    def t_span(self, t0: float, t1: float, device, dtype) -> torch.Tensor:
        """The grid handed to torchdyn: the endpoints, on the host for sub-stepped solves."""
        if self.sub_stepped and self.backend == "torchdyn":
            return torch.tensor([t0, t1], dtype=dtype)
        points = 2 if self.adaptive else self.steps + 1
        return torch.linspace(t0, t1, points, device=device, dtype=dtype)

    # --- the solve ---------------------------------------------------------------------
    def __call__(self, z0: torch.Tensor, dynamics: Dynamics, parameters: Iterable[nn.Parameter],
                 t0: float, t1: float, record: SolveRecord, scheme_state: dict | None = None) -> torch.Tensor:
        trainable = [p for p in parameters if p.requires_grad]
        adjoint = self.sensitivity != "autograd" and torch.is_grad_enabled() and bool(trainable)
        if self.backend == "torchdyn":
            forward_solver, backward_solver = self._prepared_solvers(z0, record, scheme_state)
            if not adjoint and self.loop == "direct" and isinstance(forward_solver, SubSteps):
                return self._direct(z0, dynamics, t0, t1, record, forward_solver)

        adapter = self._adapter
        adapter.bind(dynamics, z0.shape, z0.dtype, trainable, record)
        x0 = z0.reshape(z0.shape[0], -1)
        t_span = self.t_span(t0, t1, z0.device, _time_dtype(z0))
        if self.backend == "torchdyn":
            node = self._neural_ode(forward_solver)
            node.solver, node.solver_adjoint = forward_solver, backward_solver
            node.sensalg = self.sensitivity if adjoint else "autograd"
            try:
                trajectory = node(x0, t_span)
            finally:
                node.vf_params = None
        else:
            trajectory = self._torchdiffeq(x0, t_span, adjoint, trainable)
        x1 = trajectory[-1]

        if adjoint and x1.requires_grad:
            def rebind_for_backward(grad):
                adapter.bind(dynamics, z0.shape, z0.dtype, trainable, record)
                record.phase = "backward"
                return grad

            x1.register_hook(rebind_for_backward)
        return x1.view(z0.shape).to(z0.dtype)

    def _prepared_solvers(self, z0, record, scheme_state):
        """The (forward, backward) torchdyn solvers for this state, set up for this solve."""
        forward_solver, backward_solver = self._solver_pair(z0.dtype, z0.device)
        if self.adaptive:
            forward_solver.record = record
        for solver in (forward_solver, backward_solver):
            if isinstance(solver, SubSteps) and solver.n != self.steps:
                solver.n = self.steps  # `steps` was changed after the solver was built
        scheme_target = forward_solver.base if isinstance(forward_solver, SubSteps) else forward_solver
        for key, value in (scheme_state or {}).items():
            setattr(scheme_target, key, value)
        return forward_solver, backward_solver

    @staticmethod
    def _direct(z0, dynamics, t0, t1, record, solver: SubSteps) -> torch.Tensor:
        """torchdyn's solver steps, called from here: what `NeuralODE` computes on [t0, t1]
        with a `SubSteps` solver, without its per-solve checks (``loop="direct"``)."""

        def field(t, z):
            record.count_evaluation()
            # Under autocast the branch returns bf16: keep integrating in the state's dtype.
            return dynamics(t, z).to(z.dtype)

        return solver.integrate(field, z0, t0, t1, _time_dtype(z0))

    def _torchdiffeq(self, x0, t_span, adjoint, trainable):
        import torchdiffeq

        options = dict(method=TORCHDIFFEQ_METHODS[self.solver], atol=self.atol, rtol=self.rtol)
        if not adjoint:
            return torchdiffeq.odeint(self._adapter, x0, t_span, **options)
        return torchdiffeq.odeint_adjoint(
            self._adapter, x0, t_span, adjoint_params=tuple(trainable),
            adjoint_method=TORCHDIFFEQ_METHODS[self.adjoint_solver], adjoint_atol=self.adjoint_atol,
            adjoint_rtol=self.adjoint_rtol, **options,
        )
