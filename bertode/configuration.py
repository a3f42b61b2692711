"""`BertODEConfig`: BERT's configuration plus the choices that make its encoder an ODE.

Every field added here is one orthogonal choice (the vector field, the solver, the
gradient method, the backend, weight tying, the ODE-Transformer block, the mode) and is
checked when the config is built: a bad value raises a one-line ValueError naming the
field, the value and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import BertConfig

MODES = ("ode", "discrete", "deq")
FIXED_STEP_SOLVERS = ("euler", "midpoint", "rk4")
ADAPTIVE_SOLVERS = ("dopri5", "tsit5")
SOLVERS = FIXED_STEP_SOLVERS + ADAPTIVE_SOLVERS
SENSITIVITIES = ("autograd", "adjoint", "interpolated_adjoint")
ODE_BACKENDS = ("torchdyn", "torchdiffeq")
FIXED_STEP_LOOPS = ("direct", "neural_ode")
BLOCKS = ("none", "rk2", "rk2_gated", "rk4")
DEQ_SOLVERS = ("anderson", "broyden", "fixed_point")
DEQ_GRADS = ("ift", "phantom", "unrolled")
DEQ_STOP_MODES = ("rel", "abs")
DEQ_INJECTIONS = ("add", "qkv")
DEQ_ON_NONFINITE = ("raise", "skip")
# torchdiffeq 0.2.5 names for our solvers; it has no tsit5.
TORCHDIFFEQ_METHODS = {"euler": "euler", "midpoint": "midpoint", "rk4": "rk4", "dopri5": "dopri5"}


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"BertODEConfig.{field}={value!r} is invalid; allowed: {allowed}")


def _check_choice(field: str, value: Any, choices) -> None:
    if value not in choices:
        _fail(field, value, ", ".join(repr(c) for c in choices))


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_positive(field: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        _fail(field, value, "a finite number > 0")


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field, value, f"an integer >= {minimum}")


class BertODEConfig(BertConfig):
    r"""Configuration of an ODE-BERT (``model_type="bertode"``).

    All of `transformers.BertConfig`'s fields, plus:

    mode: ``"ode"`` solves every Add & Norm residual as an ODE; ``"discrete"`` is plain
        BERT through the same code.
    vector_field: name in the vector-field registry (``residual``, ``add_norm``,
        ``time_residual`` or one registered with `bertode.register_vector_field`).
    vector_field_kwargs: extra keyword arguments for the vector field's constructor.
    solver: ``euler``, ``midpoint``, ``rk4`` (fixed step) or ``dopri5``, ``tsit5`` (adaptive).
    steps: number of steps of a fixed-step solver on ``[0, t_end]``.
    t_end: integration horizon of each residual; layer ``l`` integrates over
        ``[l * t_end, (l + 1) * t_end]`` (only time-dependent fields can tell).
    atol, rtol: tolerances of adaptive solvers.
    sensitivity: ``autograd`` (backprop through the solver), ``adjoint`` (backsolve
        adjoint) or ``interpolated_adjoint`` (adjoint on a cubic spline of the forward
        trajectory). With fixed-step solvers both adjoints are the continuous adjoint
        discretised on the step grid: they approach autograd's gradient only as
        ``steps`` grows.
    adjoint_solver, adjoint_atol, adjoint_rtol: the backward solve of the (backsolve)
        adjoint (``adjoint_solver=None`` reuses ``solver``). torchdyn's interpolated adjoint
        ignores them and uses ``solver``, ``atol``, ``rtol``; a fixed-step adjoint solver
        takes one backward step per forward interval (inaccurate after adaptive forwards).
    ode_backend: ``torchdyn`` (default, through ``NeuralODE``) or ``torchdiffeq`` (the peer).
    fixed_step_loop: how a fixed-step solve with ``sensitivity="autograd"`` runs torchdyn's
        solver: ``direct`` (default) calls its ``step`` from bertode; ``neural_ode`` goes
        through torchdyn's ``NeuralODE`` and its ``odeint`` loop. The numbers are the same;
        ``direct`` skips torchdyn's per-solve checks (about 0.5 ms of host time per solve)
        and its graph breaks under ``torch.compile``. Adjoint and adaptive solves always
        go through ``NeuralODE``.
    weight_tying: one layer's parameters reused ``num_hidden_layers`` times.
    block: ``none`` or an ODE-Transformer block (``rk2``, ``rk2_gated``, ``rk4``; Li et al.
        2021) taking one step of the whole layer's increment ``F(y) = Layer(y) - y``.

    DEQ mode (``mode="deq"``; the map f is the stack of ``num_hidden_layers`` layers, with
    the embedding output injected at every evaluation; see `deq.py`):

    deq_solver: ``anderson``, ``broyden`` or ``fixed_point`` (forward, no graph, fp32).
    deq_max_iter, deq_tol, deq_stop_mode: stop when every sample's residual
        ``|f(z) - z|`` (``abs``) or ``|f(z) - z| / |f(z)|`` (``rel``) is below ``deq_tol``.
    deq_damping: tau of fixed-point, phantom and unrolled steps z <- (1 - tau) z + tau f(z);
        Anderson's mixing beta.
    deq_memory: history length of Anderson and Broyden.
    deq_grad: ``ift`` (implicit function theorem), ``phantom`` (``deq_phantom_steps``
        damped steps from z*), ``unrolled`` (backprop through fixed-point iterations).
    deq_backward_solver, deq_backward_max_iter, deq_backward_tol: the IFT linear solve.
    deq_injection: ``add`` (f sees z + U e(x)) or ``qkv`` (U e(x) added to Q, K, V).
    jac_reg_weight, jac_reg_freq: Hutchinson Jacobian penalty weight and the probability
        of computing it on a training step.
    deq_weight_norm: weight-normalise the map's linear layers.
    deq_pretrain_steps, deq_pretrain_depth: first training forwards run the map unrolled
        ``deq_pretrain_depth`` times from z0 = 0 (with ordinary backprop).
    deq_on_nonfinite: ``raise`` a `DEQSolveError` naming the layer, iteration and residual,
        or ``skip`` the batch (zero loss, no gradients) and count it.
    deq_spectral_radius: estimate the spectral radius of J_f(z*) at eval (power iteration).
    """

    model_type = "bertode"

    mode: str = "ode"
    vector_field: str = "residual"
    vector_field_kwargs: dict | None = None
    solver: str = "euler"
    steps: int = 1
    t_end: float = 1.0
    atol: float = 1e-3
    rtol: float = 1e-3
    sensitivity: str = "autograd"
    adjoint_solver: str | None = None
    adjoint_atol: float = 1e-4
    adjoint_rtol: float = 1e-4
    ode_backend: str = "torchdyn"
    fixed_step_loop: str = "direct"
    weight_tying: bool = False
    block: str = "none"
    deq_solver: str = "anderson"
    deq_max_iter: int = 30
    deq_tol: float = 1e-3
    deq_stop_mode: str = "rel"
    deq_damping: float = 1.0
    deq_memory: int = 5
    deq_grad: str = "ift"
    deq_phantom_steps: int = 1
    deq_backward_solver: str = "anderson"
    deq_backward_max_iter: int = 30
    deq_backward_tol: float = 1e-5
    deq_injection: str = "add"
    jac_reg_weight: float = 0.0
    jac_reg_freq: float = 1.0
    deq_weight_norm: bool = False
    deq_pretrain_steps: int = 0
    deq_pretrain_depth: int = 4
    deq_on_nonfinite: str = "raise"
    deq_spectral_radius: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_ode()

    def validate_ode(self) -> None:
        """Raise ValueError naming the first invalid ODE field."""
        from .vector_fields import available_vector_fields

        _check_choice("mode", self.mode, MODES)
        _check_choice("vector_field", self.vector_field, available_vector_fields())
        if self.vector_field_kwargs is not None and not isinstance(self.vector_field_kwargs, dict):
            _fail("vector_field_kwargs", self.vector_field_kwargs, "a dict or None")
        _check_choice("solver", self.solver, SOLVERS)
        _check_int("steps", self.steps, 1)
        for name in ("t_end", "atol", "rtol", "adjoint_atol", "adjoint_rtol"):
            _check_positive(name, getattr(self, name))
        _check_choice("sensitivity", self.sensitivity, SENSITIVITIES)
        if self.adjoint_solver is not None:
            _check_choice("adjoint_solver", self.adjoint_solver, SOLVERS + (None,))
        _check_choice("ode_backend", self.ode_backend, ODE_BACKENDS)
        _check_choice("fixed_step_loop", self.fixed_step_loop, FIXED_STEP_LOOPS)
        if not isinstance(self.weight_tying, bool):
            _fail("weight_tying", self.weight_tying, "True or False")
        _check_choice("block", self.block, BLOCKS)
        _check_int("num_hidden_layers", self.num_hidden_layers, 1)
        if self.hidden_size % self.num_attention_heads != 0:
            _fail("num_attention_heads", self.num_attention_heads, f"a divisor of hidden_size={self.hidden_size}")

        _check_choice("deq_solver", self.deq_solver, DEQ_SOLVERS)
        _check_choice("deq_backward_solver", self.deq_backward_solver, DEQ_SOLVERS)
        _check_choice("deq_grad", self.deq_grad, DEQ_GRADS)
        _check_choice("deq_stop_mode", self.deq_stop_mode, DEQ_STOP_MODES)
        _check_choice("deq_injection", self.deq_injection, DEQ_INJECTIONS)
        _check_choice("deq_on_nonfinite", self.deq_on_nonfinite, DEQ_ON_NONFINITE)
        for name in ("deq_max_iter", "deq_memory", "deq_phantom_steps", "deq_backward_max_iter", "deq_pretrain_depth"):
            _check_int(name, getattr(self, name), 1)
        _check_int("deq_pretrain_steps", self.deq_pretrain_steps, 0)
        for name in ("deq_tol", "deq_backward_tol"):
            _check_positive(name, getattr(self, name))
        if not _is_number(self.deq_damping) or not 0 < self.deq_damping <= 1:
            _fail("deq_damping", self.deq_damping, "a number in (0, 1]")
        if not _is_number(self.jac_reg_weight) or self.jac_reg_weight < 0:
            _fail("jac_reg_weight", self.jac_reg_weight, "a number >= 0")
        if not _is_number(self.jac_reg_freq) or not 0 <= self.jac_reg_freq <= 1:
            _fail("jac_reg_freq", self.jac_reg_freq, "a number in [0, 1]")
        for name in ("deq_weight_norm", "deq_spectral_radius"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        if self.mode == "deq" and self.block != "none":
            _fail("block", self.block, "'none' with mode='deq'")

        if self.ode_backend == "torchdiffeq":
            if self.solver not in TORCHDIFFEQ_METHODS:
                _fail("solver", self.solver, f"{', '.join(map(repr, TORCHDIFFEQ_METHODS))} with ode_backend='torchdiffeq'")
            if self.adjoint_solver is not None and self.adjoint_solver not in TORCHDIFFEQ_METHODS:
                _fail("adjoint_solver", self.adjoint_solver, f"{', '.join(map(repr, TORCHDIFFEQ_METHODS))} or None with ode_backend='torchdiffeq'")
            if self.sensitivity == "interpolated_adjoint":
                _fail("sensitivity", self.sensitivity, "'autograd', 'adjoint' with ode_backend='torchdiffeq'")
        adjoint = self.sensitivity != "autograd"
        if adjoint and self.block != "none":
            _fail("sensitivity", self.sensitivity, "'autograd' when block is an ODE-Transformer block (one discrete step)")
        if adjoint and self.attention_probs_dropout_prob > 0:
            # The adjoint re-evaluates the field backwards in time; attention dropout
            # would draw new masks there (hidden dropout keeps one mask per solve).
            _fail(
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
                f"0.0 with sensitivity={self.sensitivity!r} (the adjoint re-evaluates the field)",
            )

    @property
    def adaptive(self) -> bool:
        """True when `solver` chooses its own steps from `atol`/`rtol`."""
        return self.solver in ADAPTIVE_SOLVERS


__all__ = ["BertODEConfig"]
