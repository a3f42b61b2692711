"""`ODESolve` and `ODEProblem`: one residual's ODE, solved by torchdyn (or a peer: torchdiffeq,
torchode; or bertode's own per-sequence stepper, `per_sequence.py`).

`ODESolve` holds the choices fixed at construction: a registered solver
(`solvers.py`), a sensitivity method (`ode_sensitivities.py`), steps, tolerances, backend and
fixed-step loop. Each call builds an `ODEProblem` (the state, the dynamics, the interval,
a fresh `SolveRecord`) and hands it to the sensitivity method, which decides how the
solution is differentiated by calling the problem's building blocks: `step`, `grid`,
`autograd` or `adjoint`. The call returns ``(z1, record)``: statistics are returned, not
written into a sink.

The solve knows neither the vector field nor the model: it gets a ``dynamics(t, z)``
callable and the parameters that callable uses. It handles the torchdyn 1.0.6 traps at
this one place (docs/solve.md has the table, with the test that pins each):

* ``args`` never reaches the field, so context (attention mask, dropout mask) lives in
  the ``dynamics`` closure, bound to a small adapter module before each solve and bound
  again by a gradient hook just before an adjoint's backward solve;
* the adjoint differentiates the field's own parameters and fails on frozen or unused
  ones: the adapter owns exactly the *trainable* parameters, rebound at every solve;
* ``interpolated_adjoint`` assumes 2-D states: the state is flattened to (batch, -1);
* a bf16 call converts a shared solver tableau for good: solvers are built per (dtype,
  device), and the state keeps the dtype of the hidden states;
* ``vf.nfe`` mixes forward and backward and never resets: each solve counts in its record;
* the fixed-step loop tests the device-side ``t`` at every step and the adjoint saves
  every grid point: fixed-step solves hand torchdyn [t0, t1] on the host and a
  `SubSteps` solver whose one step is all N steps (except on request, for a spline);
* ``copy.deepcopy`` of a NeuralODE fails while ``vf_params`` holds a graph: it is cleared
  after every solve, and the cached NeuralODE is not part of the pickled state.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from . import observe
from ._torchdyn import NeuralODE
from .per_sequence import MAX_STEPS, PerSequenceSolve, embedded_tableau
from .solvers import ODESolverSpec, get_solver
from .stats import SolveRecord
from .substeps import SubSteps

Dynamics = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FIXED_STEP_LOOPS = ("direct", "neural_ode")
_RECORDING_CLASSES: dict[type, type] = {}


def recording_solver_class(base: type) -> type:
    """A subclass of an adaptive torchdyn solver that notes the t of every step it attempts."""
    if base not in _RECORDING_CLASSES:

        def step(self, f, x, t, dt, k1=None, args=None):
            record = self.record
            if record is not None and record.phase == "forward":
                record.step_times.append(t)
                observer = observe.active()
                if observer is not None:  # output_trajectory: each accepted step starts where one ended
                    observer.note(t, x)
            return base.step(self, f, x, t, dt, k1=k1, args=args)

        _RECORDING_CLASSES[base] = type(f"Recording{base.__name__}", (base,), {"step": step, "record": None})
    return _RECORDING_CLASSES[base]


class FieldAdapter(nn.Module):
    """The module torchdyn integrates: f(t, x) on the flattened state, with the trainable
    parameters of the dynamics bound per solve (no submodules: torchdyn's walk is cheap)."""

    def __init__(self):
        super().__init__()
        self.dynamics: Dynamics | None = None
        self.state_shape = self.state_dtype = self.record = None

    def bind(self, dynamics: Dynamics, state_shape, state_dtype, parameters: list, record: SolveRecord) -> None:
        self.dynamics, self.state_shape, self.state_dtype, self.record = dynamics, state_shape, state_dtype, record
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


def time_dtype(state: torch.Tensor) -> torch.dtype:
    return torch.float64 if state.dtype == torch.float64 else torch.float32


class ODESolve:
    """Integrates ``dz/dt = dynamics(t, z)`` from ``t0`` to ``t1`` with fixed options.

    ``solver`` is a registered solver name or `ODESolverSpec`; ``sensitivity`` an
    `ODESensitivity` (``None``: backpropagate through the solver). ``fixed_step_loop``
    (``direct`` or ``neural_ode``) says whether a fixed-step autograd solve calls the
    `SubSteps` solver itself or goes through ``NeuralODE``.
    """

    def __init__(self, solver, sensitivity=None, steps: int = 1, atol: float = 1e-3, rtol: float = 1e-3,
                 ode_backend: str = "torchdyn", fixed_step_loop: str = "direct", max_steps: int = MAX_STEPS):
        from .ode_sensitivities import Autograd  # the sensitivity methods build on this module

        self.spec: ODESolverSpec = solver if isinstance(solver, ODESolverSpec) else get_solver(solver)
        self.sensitivity = sensitivity if sensitivity is not None else Autograd()
        self.steps, self.atol, self.rtol = steps, atol, rtol
        self.ode_backend, self.fixed_step_loop = ode_backend, fixed_step_loop
        self.max_steps = max_steps  # per-sequence backends: attempted steps per sequence before raising
        # bertode's per-sequence stepper: the method's coefficients as host floats, read once here
        self.tableau = embedded_tableau(self.spec) if ode_backend == "bertode" else None
        self._reset_cache()

    @property
    def adaptive(self) -> bool:
        return self.spec.adaptive

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

    def solver(self, spec: ODESolverSpec, dtype, device, sub_stepped: bool, steps: int | None = None):
        """The torchdyn solver of ``spec`` for this state, built once per (dtype, device); a
        sub-stepped one takes ``steps`` steps (None: this solve's ``steps``)."""
        key = (spec.name, dtype, device, sub_stepped and not spec.adaptive)
        if key not in self._solvers:
            if spec.adaptive:  # only adaptive steps need recording (accepted/rejected)
                built = recording_solver_class(type(spec.build(dtype)))(dtype)
            else:
                built = spec.build(dtype)
                built = SubSteps(built, self.steps) if key[3] else built
            like = torch.empty(0, dtype=dtype, device=device)
            built.sync_device_dtype(like, torch.zeros(2))  # the tableau on the state's device, once
            self._solvers[key] = built
        solver = self._solvers[key]
        steps = self.steps if steps is None else steps
        if isinstance(solver, SubSteps) and solver.n != steps:
            solver.n = steps  # another step count (changed `steps`, or a dialled depth)
        return solver

    def neural_ode(self) -> NeuralODE:
        if self._node is None:
            self._node = NeuralODE(self._adapter, return_t_eval=False)
            self._backprop = self._node.sensalg  # torchdyn's name for backprop through the solver
            # With no trainable parameters bound at construction torchdyn registers a CPU
            # dummy parameter for good; bertode binds parameters per solve instead.
            self._node.vf._parameters.pop("dummy_parameter", None)
        return self._node

    # --- the solve ---------------------------------------------------------------------
    def __call__(self, z0: torch.Tensor, dynamics: Dynamics, parameters: Iterable[nn.Parameter],
                 t0: float, t1: float, name: str = "solve", steps: int | None = None,
                 backprop: int | None = None) -> tuple[torch.Tensor, SolveRecord]:
        """z(t1) and this solve's record (``parameters``: the dynamics' parameters, or a callable giving them). ``steps`` replaces a fixed-step solver's step count for
        this call (the depth dial); ``backprop`` = k differentiates the last k steps only."""
        steps = None if self.adaptive else (self.steps if steps is None else steps)
        record = SolveRecord(name=name, fixed_steps=steps)
        problem = ODEProblem(self, z0, dynamics, parameters, t0, t1, record, steps=steps, backprop=backprop)
        z1 = self.sensitivity(problem)
        return z1.to(z0.dtype), record


def straight_through(start: torch.Tensor, reached: torch.Tensor) -> torch.Tensor:
    """``reached`` (computed without a graph from ``start``) with the identity as its Jacobian:
    the backward pass hands ``start`` the gradient unchanged (Jacobian-free, as the DEQ's JFB)."""
    if not (torch.is_grad_enabled() and start.requires_grad):
        return reached
    return start + (reached - start).detach()


class ODEProblem:
    """One solve, as a sensitivity method sees it: the initial state ``z0`` (batch, seq,
    hidden), the interval ``[t0, t1]``, the counted ``field(t, z)``, the ``trainable``
    parameters of the dynamics, and the building blocks below."""

    def __init__(self, solve: ODESolve, z0, dynamics: Dynamics, parameters, t0: float, t1: float, record: SolveRecord,
                 steps: int | None = None, backprop: int | None = None):
        self.solve, self.z0, self.dynamics, self.t0, self.t1, self.record = solve, z0, dynamics, t0, t1, record
        self._parameters, self._trainable = parameters, None
        self.adaptive, self.ode_backend = solve.adaptive, solve.ode_backend
        self.steps = None if solve.adaptive else (solve.steps if steps is None else steps)
        self.backprop = backprop  # k: `autograd` differentiates the last k fixed steps only (None: all)
        if self.adaptive:
            solve.solver(solve.spec, z0.dtype, z0.device, False).record = record

    def field(self, t, z):
        """dz/dt, counted as one evaluation, in the state's dtype (autocast returns bf16)."""
        self.record.count_evaluation()
        return self.dynamics(t, z).to(z.dtype)

    @property
    def trainable(self) -> list:
        """The dynamics' parameters that require grad, gathered on first use (autograd never asks: walking
        every module's parameters at each solve cost a tiny model 6 % of its forward). ``parameters``
        may be a callable returning them."""
        if self._trainable is None:
            parameters = self._parameters() if callable(self._parameters) else self._parameters
            self._trainable = [p for p in parameters if p.requires_grad]
        return self._trainable

    def grid(self) -> list[float]:
        """The fixed-step grid t0, t0 + h, ..., t1 as host floats (ValueError for adaptive solvers)."""
        if self.steps is None:
            raise ValueError(f"solver={self.solve.spec.name!r} is adaptive: it has no fixed grid")
        h = (self.t1 - self.t0) / self.steps
        return [self.t0 + i * h for i in range(self.steps)] + [self.t1]

    def step(self, z, t: float, h: float):
        """One step of the configured fixed-step solver from (t, z) with step size h."""
        base = self.solve.solver(self.solve.spec, z.dtype, z.device, False)
        t_here = torch.full((), t, dtype=time_dtype(z), device=z.device)
        return base.step(self.field, z, t_here, h)[1]

    def autograd(self):
        """z(t1), differentiated by backpropagating through the solver's operations."""
        solve = self.solve
        if self.truncates():
            return self._truncated()
        if solve.ode_backend == "torchdiffeq":
            return self._torchdiffeq(adjoint=None)
        if solve.ode_backend == "torchode":
            return self._torchode()
        if solve.ode_backend == "bertode" and self.adaptive:  # fixed steps: the same direct loop as torchdyn
            return self._per_sequence()
        if not self.adaptive and solve.fixed_step_loop == "direct":
            # torchdyn's solver steps called from here: what NeuralODE computes on [t0, t1]
            # with a SubSteps solver, without its per-solve checks (loop="direct").
            solver = solve.solver(solve.spec, self.z0.dtype, self.z0.device, True, self.steps)
            return solver.integrate(self.field, self.z0, self.t0, self.t1, time_dtype(self.z0))
        return self._neural_ode(None, keep_grid=False)

    def truncates(self) -> bool:
        """Whether ``backprop`` leaves some fixed steps of this solve without a graph."""
        return (self.backprop is not None and self.steps is not None and self.backprop < self.steps
                and torch.is_grad_enabled())

    def _truncated(self):
        """Truncated backpropagation: the first ``steps - backprop`` steps without a graph, the
        last ``backprop`` with one (the same solver steps `autograd`'s direct loop takes). The
        skipped steps count as the identity in the backward pass (`straight_through`), so the
        solve's input, and every layer before it, still gets a gradient."""
        if self.ode_backend != "torchdyn":
            raise ValueError(f"depth backprop={self.backprop} is invalid with ode_backend={self.ode_backend!r}: the "
                             "truncated solve steps with torchdyn's solvers; allowed: ode_backend='torchdyn'")
        h = (self.t1 - self.t0) / self.steps
        z, first_with_graph = self.z0, self.steps - self.backprop
        for index in range(self.steps):
            if index == first_with_graph:
                z = straight_through(self.z0, z)
            with torch.set_grad_enabled(index >= first_with_graph):
                z = self.step(z, self.t0 + index * h, h)
        return z

    def adjoint(self, torchdyn_sensitivity: str, solver=None, atol: float = 1e-4, rtol: float = 1e-4,
                keep_grid: bool = False):
        """z(t1), differentiated by torchdyn's (or torchdiffeq's) continuous adjoint.

        ``torchdyn_sensitivity`` names the adjoint as torchdyn does (its ``sensitivity=``
        argument, which torchdyn calls sensalg); ``solver`` (a registered name, None = the
        forward solver), ``atol``, ``rtol`` configure the backward solve; ``keep_grid``
        keeps every step on torchdyn's grid (the interpolated adjoint's spline needs it).
        Without a graph to build (no_grad, or nothing trainable) this is `autograd`."""
        if not (torch.is_grad_enabled() and self.trainable):
            return self.autograd()
        backward = get_solver(solver) if solver is not None else self.solve.spec
        options = dict(sensitivity=torchdyn_sensitivity, backward=backward, atol=atol, rtol=rtol)
        if self.solve.ode_backend == "torchdiffeq":
            return self._torchdiffeq(adjoint=options)
        return self._neural_ode(options, keep_grid)

    # --- backends ----------------------------------------------------------------------
    def _t_span(self, keep_grid: bool, on_host: bool):
        z0, t0, t1 = self.z0, self.t0, self.t1
        if on_host:
            return torch.tensor([t0, t1], dtype=time_dtype(z0))
        points = 2 if self.adaptive else self.steps + 1
        return torch.linspace(t0, t1, points, device=z0.device, dtype=time_dtype(z0))

    def _neural_ode(self, adjoint: dict | None, keep_grid: bool):
        solve, z0, record = self.solve, self.z0, self.record
        sub_stepped = not self.adaptive and not keep_grid
        forward = solve.solver(solve.spec, z0.dtype, z0.device, sub_stepped, self.steps)
        adapter = solve._adapter
        adapter.bind(self.dynamics, z0.shape, z0.dtype, self.trainable, record)
        node = solve.neural_ode()  # after binding: torchdyn inspects the parameters once
        node.solver, node.sensalg = forward, solve._backprop
        # torchdyn warns when tolerances are set on fixed-step solvers: its defaults then.
        node.atol, node.rtol = (solve.atol, solve.rtol) if self.adaptive else (1e-3, 1e-3)
        if adjoint is not None:
            backward = adjoint["backward"]
            node.solver_adjoint = solve.solver(backward, z0.dtype, z0.device, sub_stepped, self.steps)
            node.sensalg = adjoint["sensitivity"]
            node.atol_adjoint, node.rtol_adjoint = (adjoint["atol"], adjoint["rtol"]) if backward.adaptive else (1e-3, 1e-3)
        t_span = self._t_span(keep_grid, on_host=sub_stepped)
        try:
            x1 = node(z0.reshape(z0.shape[0], -1), t_span)[-1]
        finally:
            node.vf_params = None
        if adjoint is not None:
            self._rebind_before_backward(x1)
        return x1.view(z0.shape)

    def _rebind_before_backward(self, x1):
        """An adjoint's backward solve evaluates the adapter: give it this solve's closure
        again (interleaved forwards, e.g. gradient accumulation, rebound it meanwhile)."""
        if not x1.requires_grad:
            return
        adapter, z0, record = self.solve._adapter, self.z0, self.record

        def rebind(grad):
            adapter.bind(self.dynamics, z0.shape, z0.dtype, self.trainable, record)
            record.phase = "backward"
            return grad

        x1.register_hook(rebind)

    def _torchdiffeq(self, adjoint: dict | None):
        import torchdiffeq

        solve, z0 = self.solve, self.z0
        adapter = solve._adapter
        adapter.bind(self.dynamics, z0.shape, z0.dtype, self.trainable, self.record)
        x0, t_span = z0.reshape(z0.shape[0], -1), self._t_span(True, on_host=False)
        options = dict(method=solve.spec.torchdiffeq, atol=solve.atol, rtol=solve.rtol)
        if adjoint is None:
            x1 = torchdiffeq.odeint(adapter, x0, t_span, **options)[-1]
        else:
            x1 = torchdiffeq.odeint_adjoint(
                adapter, x0, t_span, adjoint_params=tuple(self.trainable), adjoint_method=adjoint["backward"].torchdiffeq,
                adjoint_atol=adjoint["atol"], adjoint_rtol=adjoint["rtol"], **options)[-1]
            self._rebind_before_backward(x1)
        return x1.view(z0.shape)

    def _per_sequence(self):
        """bertode's stepper: one step size, error norm and decision per sequence (`per_sequence.py`)."""
        spec, tableau = self.solve.spec, self.solve.tableau
        if tableau is None:
            raise ValueError(f"solver={spec.name!r} is invalid with ode_backend='bertode': its torchdyn solver has no "
                             "embedded error estimate; allowed: dopri5, tsit5 or a fixed-step solver")
        stepper = PerSequenceSolve(tableau, self.solve.atol, self.solve.rtol, self.solve.max_steps, self.record.name)
        z1 = stepper(self.field, self.z0, self.t0, self.t1, time_dtype(self.z0))
        self.record.per_sequence = dict(accepted=stepper.accepted, rejected=stepper.rejected, nfe=stepper.nfe)
        return z1

    def _torchode(self):
        """torchode's solve (the per-sequence peer): its step method, an integral controller at
        this solve's tolerances (fixed steps: its fixed-step controller), backpropagation through
        its steps (step-size control outside the graph, as bertode's stepper)."""
        import torchode

        spec, z0, batch = self.solve.spec, self.z0, self.z0.shape[0]
        if spec.torchode is None:
            raise ValueError(f"solver={spec.name!r} is invalid with ode_backend='torchode'; allowed: a solver torchode "
                             "has (dopri5, tsit5, euler, heun)")
        column = (batch,) + (1,) * (z0.dim() - 1)

        def dynamics(t, x):  # torchode: t (batch,), x (batch, features)
            return self.field(t.view(column), x.view(z0.shape)).reshape(batch, -1)

        term = torchode.ODETerm(dynamics, with_stats=False)
        method = getattr(torchode, spec.torchode)(term=term)
        tdt = time_dtype(z0)
        if self.adaptive:
            controller, dt0 = torchode.IntegralController(atol=self.solve.atol, rtol=self.solve.rtol, term=term), None
        else:
            controller = torchode.FixedStepController()
            dt0 = torch.full((batch,), (self.t1 - self.t0) / self.steps, dtype=tdt, device=z0.device)
        solver = torchode.AutoDiffAdjoint(method, controller, max_steps=self.solve.max_steps,
                                          backprop_through_step_size_control=False)
        problem = torchode.InitialValueProblem(
            y0=z0.reshape(batch, -1), t_start=torch.full((batch,), self.t0, dtype=tdt, device=z0.device),
            t_end=torch.full((batch,), self.t1, dtype=tdt, device=z0.device))
        solution = solver.solve(problem, term=term, dt0=dt0)
        failed = torch.nonzero(solution.status != torchode.Status.SUCCESS.value).flatten().tolist()  # one sync
        if failed:
            codes = [torchode.Status(int(solution.status[i])).name for i in failed]
            raise RuntimeError(f"torchode solve {self.record.name!r} failed on sequence(s) {failed} ({', '.join(codes)}); "
                               f"allowed: at most max_steps={self.solve.max_steps} steps per sequence, finite dynamics")
        steps, accepted = solution.stats["n_steps"], solution.stats["n_accepted"]
        self.record.per_sequence = dict(accepted=accepted, rejected=steps - accepted, nfe=None)
        return solution.ys[:, -1].view(z0.shape)
