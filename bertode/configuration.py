"""`BertODEConfig`: BERT's configuration plus the choices that make its encoder an ODE.

Every field added here is one orthogonal choice (the vector field, the solver, the
sensitivity method, the backend, weight tying, the ODE-Transformer block, the mode). Each
field is checked on its own when the config is built, the pairings (a field against the
mode or another field) by `BertODEConfig.validate_ode` when a model is built (and by
``bertode.train`` before anything is written), so a config can be edited field by field as
transformers' configs are: a bad value or pairing raises a one-line ValueError naming the
field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses

from transformers import BertConfig

from .layers.blocks import BLOCKS
from .layers.regularizers import REGULARIZERS
from .solve.fixed_point import FIXED_POINT_SOLVERS
from .solve.sensitivities import SENSITIVITIES, default_sensitivity
from .solve.ode import FIXED_STEP_LOOPS
from .solve import ode_sensitivities  # noqa: F401  (registers the ODE sensitivity methods)
from .solve.solvers import ODE_BACKENDS, PER_SEQUENCE_BACKENDS, SOLVERS
from .validation import (
    check_architecture,
    check_choice,
    check_deq_numbers,
    check_constructor,
    check_cross_attention,
    check_int,
    check_kwargs,
    check_memory,
    check_position_pairing,
    check_per_sequence,
    check_positive,
    check_sensitivity,
    fail,
    is_number,
    type_errors,
    wrong_mode,
)
from .layers.vector_fields import VECTOR_FIELDS

MODES = ("ode", "discrete", "deq")
NORM_POSITIONS = ("post", "pre")
CORE_INJECTIONS = (None, "add")
SENSITIVITY_FAMILY = {"ode": "ode", "deq": "deq", "discrete": None}
# Name fields chosen from a registry, the mode they belong to (None: every mode) and the
# registry; None means "the registry's default" where the mode uses the field.
NAMED_CHOICES = {
    "vector_field": ("ode", VECTOR_FIELDS),
    "solver": ("ode", SOLVERS),
    "block": (None, BLOCKS),
    "regularizer": ("ode", REGULARIZERS),
    "deq_solver": ("deq", FIXED_POINT_SOLVERS),
    "deq_backward_solver": ("deq", FIXED_POINT_SOLVERS),
}
# Numeric and keyword fields each mode does not read: they must keep their defaults there.
ODE_ONLY = ("steps", "t_end", "atol", "rtol", "adjoint_solver", "adjoint_atol", "adjoint_rtol", "ode_backend",
            "fixed_step_loop", "vector_field_kwargs", "regularizer_weight")
DEQ_ONLY = ("deq_max_iter", "deq_tol", "deq_stop_mode", "deq_damping", "deq_memory", "deq_phantom_steps",
            "deq_backward_max_iter", "deq_backward_tol", "deq_injection", "jac_reg_weight", "jac_reg_freq", "jac_reg_increment_every",
            "deq_weight_norm", "deq_pretrain_steps", "deq_pretrain_depth", "deq_on_nonfinite", "deq_spectral_radius", "deq_check_every")
FOREIGN = {"ode": DEQ_ONLY, "deq": ODE_ONLY, "discrete": ODE_ONLY + DEQ_ONLY}


class BertODEConfig(BertConfig):
    r"""Configuration of an ODE-BERT (``model_type="bertode"``).

    All of `transformers.BertConfig`'s fields, plus one field per orthogonal choice. Name
    fields read their registry (``bertode.available()`` lists them); ``None`` means the
    registry's default for the mode. A choice that does not apply to the mode, set
    explicitly, is refused (e.g. ``solver`` with ``mode="discrete"``).

    mode: ``"ode"`` solves every Add & Norm residual as an ODE; ``"discrete"`` is plain
        BERT through the same code; ``"deq"`` the layer stack as a fixed-point map.
    vector_field, vector_field_kwargs: the field dz/dt (ODE mode) and its constructor arguments.
    solver: a registered ODE solver (ODE mode). steps: fixed-step solvers' steps on
        ``[0, t_end]``. t_end: each residual's horizon; layer ``l`` integrates over
        ``[l * t_end, (l + 1) * t_end]``. atol, rtol: adaptive solvers' tolerances.
    sensitivity, sensitivity_kwargs: the sensitivity method (registered; its family must be
        the mode's: ``autograd``, ``adjoint``, ``interpolated_adjoint`` for ODE mode;
        ``ift``, ``phantom``, ``unrolled`` for DEQ mode) and its constructor arguments.
    adjoint_solver, adjoint_atol, adjoint_rtol: the backward solve of ``adjoint``
        (``None``: the forward solver).
    ode_backend: where adaptive solves step: one step size for the whole batch with ``torchdyn``
        (default) or ``torchdiffeq`` (the peer); one per sequence with ``bertode`` (its own
        stepper, `per_sequence.py`) or ``torchode`` (the peer). Fixed-step solves are the same
        on every backend; the per-sequence ones backpropagate (no adjoint).
    fixed_step_loop: ``direct`` (torchdyn's solver steps called from bertode) or
        ``neural_ode`` (through torchdyn's ``NeuralODE``): same numbers.
    weight_tying: one layer's parameters reused ``num_hidden_layers`` times (a looped core: its
        loop count is the depth `bertode.dial` turns).
    prelude_layers, coda_layers: untied discrete layers before and after the core (the looped,
        ODE or DEQ layers), as Huginn's prelude/core/coda; they count in ``num_hidden_layers``.
    core_injection: None or ``add`` (a looped core only): each application of the tied layer
        sees z + U e, where e is the core's input, U starts as the identity and z starts at 0,
        so one application is the plain layer on e (the DEQ's ``add`` injection, unrolled).
    norm_position: ``post`` (BERT: x -> LN(x + G(x)); the ODE is the vector field's) or
        ``pre`` (GPT-2 and most modern layers: x -> x + G(LN(x)), one Euler step of
        dz/dt = G(LN(z)) for every vector field, solver and block, and a final LayerNorm;
        refused for the DEQ, whose map z + G(LN(z)) has no fixed point in general).
    block, block_kwargs: an ODE-Transformer block over each whole layer (``none``: no block).
    regularizer, regularizer_weight: a penalty on the dynamics integrated along every solve
        while training (``kinetic``, ``jacobian``, ``rnode``; `regularizers.py`) and its weight.

    DEQ mode (see `deq.py`): deq_solver and deq_backward_solver (registered fixed-point
    solvers for the forward solve and the IFT's linear solve), deq_max_iter, deq_tol,
    deq_stop_mode (``rel``/``abs``), deq_damping (tau of damped steps; Anderson's beta),
    deq_memory, deq_phantom_steps, deq_backward_max_iter, deq_backward_tol, deq_injection
    (``add``/``qkv``), jac_reg_weight and jac_reg_freq (Hutchinson Jacobian penalty; its
    weight grows by 0.1 every ``jac_reg_increment_every`` training forwards, 0: constant,
    locuslab/deq's ``--jac_incremental``),
    deq_weight_norm, deq_pretrain_steps and deq_pretrain_depth (unrolled warm-up),
    deq_on_nonfinite (``raise`` or ``skip`` and count), deq_spectral_radius (at eval),
    deq_check_every (the solves read their stopping test back to the host once per this many
    iterations, forward and backward: fewer host syncs, up to this many - 1 iterations past
    convergence, a non-finite value raised as late; the returned iterate is still the best seen).

    The BERT family (set by `from_bert` for RoBERTa, ELECTRA, ALBERT, DistilBERT; see
    `embeddings.py`): embedding_size (``None``: hidden_size) and embedding_projection
    (``None``: a Linear to hidden_size when the widths differ; ``"before_norm"``: DeBERTa's, bias-free, before the
    LayerNorm), position_scheme
    (``absolute`` or RoBERTa's ``after_padding``; for a new model also the relative ``rotary``, RoPE with
    base ``rope_theta``, ``transformer_xl``, or DeBERTa's ``deberta`` with max_relative_positions, position_buckets,
    pos_att_type, share_att_key, norm_rel_ebd, position_biased_input: `layers/positions.py`), ``type_vocab_size=0``
    (no token types),
    head_hidden_act (the MLM head's activation; ``None``: hidden_act), pooler_hidden_act.
    objective: the training objective's registered name (``bertode.train objective=``),
        saved with the model so that evaluation and fine-tuning read it (None: not trained
        by bertode; its head says which).
    GPT-2 (`from_bert` of a ``GPT2LMHeadModel``): ``embedding_norm=False`` (no LayerNorm
    after the embeddings) and ``lm_head_type="linear"`` (the tied decoder alone, no bias;
    ``"bert"``: BERT's dense, activation, LayerNorm, then the tied decoder and a bias; ``"adaptive"``: Transformer-XL's
    adaptive embedding and softmax over the clusters cut at ``adaptive_cutoffs``, ``adaptive_div_value``: `adaptive.py`).
    sparse_prediction: while training with ``labels``, heads that score positions (masked and causal LM,
        pre-training's MLM, token classification) run only at the positions whose label is not -100
        (cramming's sparse prediction), the LM heads' loss through `layers.losses` without the batch's fp32
        logits; ``logits`` then holds the scored positions' rows (n_targets, ...). False (HF's behaviour):
        every position. Evaluation and calls without labels always return every position's logits.
    """

    model_type = "bertode"
    keys_to_ignore_at_inference = ["solver_stats"]

    mode: str = "ode"
    vector_field: str | None = None
    vector_field_kwargs: dict | None = None
    solver: str | None = None
    steps: int = 1
    t_end: float = 1.0
    atol: float = 1e-3
    rtol: float = 1e-3
    sensitivity: str | None = None
    sensitivity_kwargs: dict | None = None
    adjoint_solver: str | None = None
    adjoint_atol: float = 1e-4
    adjoint_rtol: float = 1e-4
    ode_backend: str = "torchdyn"
    fixed_step_loop: str = "direct"
    weight_tying: bool = False
    prelude_layers: int = 0
    coda_layers: int = 0
    core_injection: str | None = None
    norm_position: str = "post"
    block: str | None = None
    block_kwargs: dict | None = None
    regularizer: str | None = None
    regularizer_weight: float = 0.01
    deq_solver: str | None = None
    deq_max_iter: int = 30
    deq_tol: float = 1e-3
    deq_stop_mode: str = "rel"
    deq_damping: float = 1.0
    deq_memory: int = 5
    deq_phantom_steps: int = 1
    deq_backward_solver: str | None = None
    deq_backward_max_iter: int = 30
    deq_backward_tol: float = 1e-5
    deq_injection: str = "add"
    jac_reg_weight: float = 0.0
    jac_reg_freq: float = 1.0
    jac_reg_increment_every: int = 0
    deq_weight_norm: bool = False
    deq_pretrain_steps: int = 0
    deq_pretrain_depth: int = 4
    deq_on_nonfinite: str = "raise"
    deq_spectral_radius: bool = False
    deq_check_every: int = 5
    embedding_size: int | None = None
    embedding_projection: bool | str | None = None
    position_scheme: str = "absolute"
    rope_theta: float = 10000.0
    # position_scheme="deberta" (DeBERTa's disentangled attention, HF's names; layers/disentangled.py)
    max_relative_positions: int = -1
    position_buckets: int = -1
    pos_att_type: list[str] | None = None
    share_att_key: bool = False
    norm_rel_ebd: str | None = None
    position_biased_input: bool = False
    head_hidden_act: str | None = None
    pooler_hidden_act: str = "tanh"
    embedding_norm: bool = True
    lm_head_type: str = "bert"
    adaptive_cutoffs: list[int] | None = None
    adaptive_div_value: float = 4.0
    objective: str | None = None
    sparse_prediction: bool = False
    mem_len: int = 0

    def __post_init__(self, **kwargs):
        legacy_deq_grad = kwargs.pop("deq_grad", None)  # configs saved before the sensitivity axis
        super().__post_init__(**kwargs)
        self._filled: set = set()
        if legacy_deq_grad is not None and self.mode == "deq":
            self.sensitivity = legacy_deq_grad
        if self.transformers_version is not None:  # a saved config: clear what its mode never read
            self._forget_unused()
        self._check_fields()  # the pairings: validate_ode, when a model is built

    def __setattr__(self, key, value):
        filled = self.__dict__.get("_filled")
        if filled is not None and key in filled:
            filled.discard(key)  # set by the user now: no longer the mode's default
        with type_errors(key, value):  # transformers' own type check of the field, in one line as ours
            super().__setattr__(key, value)

    def _forget_unused(self) -> None:
        """Saved configs (older ones carry every mode's values) load as the model they were."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for field, (mode, _) in NAMED_CHOICES.items():
            if mode is not None and mode != self.mode:
                setattr(self, field, None)
        for field in FOREIGN[self.mode]:
            setattr(self, field, defaults[field])
        method = SENSITIVITIES[self.sensitivity] if self.sensitivity in SENSITIVITIES else None
        if self.mode == "discrete" or (method is not None and method.family != SENSITIVITY_FAMILY[self.mode]):
            self.sensitivity = None
        if method is None or "adjoint_solver" not in method.config_fields.values():
            self.adjoint_solver = None

    def to_dict(self) -> dict:
        """Names filled in from the registries' defaults are saved as ``None``: a reloaded
        config (possibly given another ``mode``) fills them again."""
        output = super().to_dict()
        output.pop("_filled", None)
        for field in getattr(self, "_filled", ()):
            output[field] = None
        return output

    def validate_ode(self) -> None:
        """Every check: each field's own (`_check_fields`), then the pairings (`_check_pairings`).
        Building a model runs it (so does ``bertode.train``, before anything is written)."""
        self._check_fields()
        self._check_pairings()

    def _check_fields(self) -> None:
        """Each field on its own (a type, a range, a registered name), after filling unset name
        fields with the mode's defaults (again, if the mode changed): run on construction. The
        pairings are left to `validate_ode`, so that a config can be edited one field at a time
        (``config.mode = "deq"; config.deq_tol = ...``), as transformers' configs are."""
        check_choice("mode", self.mode, MODES)
        for field in list(getattr(self, "_filled", ())):
            setattr(self, field, None)
        self._filled = set()
        self._fill_names()
        for field in ("vector_field_kwargs", "sensitivity_kwargs", "block_kwargs"):
            check_kwargs(field, getattr(self, field))
        check_int("steps", self.steps, 1)
        for name in ("t_end", "atol", "rtol", "adjoint_atol", "adjoint_rtol"):
            check_positive(name, getattr(self, name))
        if self.adjoint_solver is not None and self.adjoint_solver not in SOLVERS:
            raise SOLVERS.invalid("adjoint_solver", self.adjoint_solver)
        check_choice("ode_backend", self.ode_backend, ODE_BACKENDS)
        check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        check_choice("fixed_step_loop", self.fixed_step_loop, FIXED_STEP_LOOPS)
        if self.objective is not None and (not isinstance(self.objective, str) or not self.objective.isidentifier()):
            fail("objective", self.objective, "None or a registered objective's name")
        for name in ("weight_tying", "sparse_prediction"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "True or False")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not is_number(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                fail(name, getattr(self, name), "a probability in [0, 1)")
        check_deq_numbers(self)
        check_architecture(self)
        check_int("mem_len", self.mem_len, 0)
        check_int("prelude_layers", self.prelude_layers, 0)
        check_int("coda_layers", self.coda_layers, 0)
        check_choice("core_injection", self.core_injection, CORE_INJECTIONS)
        if not is_number(self.regularizer_weight) or self.regularizer_weight < 0:
            fail("regularizer_weight", self.regularizer_weight, "a number >= 0")

    def _check_pairings(self) -> None:
        """The fields that must agree with each other (and with the mode): one line naming the
        first invalid field and the field it conflicts with."""
        self._check_names_by_mode()
        if self.norm_position == "pre" and self.mode == "deq":  # z* = z* + G(LN(z*)) needs G(LN(z*)) = 0
            raise ValueError("BertODEConfig.norm_position='pre' is invalid with mode='deq': a pre-LN map "
                             "z + G(LN(z)) has a fixed point only where G vanishes; allowed: 'post'")
        if self.hidden_size % self.num_attention_heads != 0:
            fail("num_attention_heads", self.num_attention_heads, f"a divisor of hidden_size={self.hidden_size}")
        check_position_pairing(self)
        check_memory(self)
        self._check_core()
        self._check_unused_by_mode()
        check_sensitivity(self, SENSITIVITY_FAMILY[self.mode])
        if self.mode == "deq" and not BLOCKS[self.block].is_plain:
            wrong_mode("block", self.block, self.mode, f"{BLOCKS.default!r} (a DEQ map has no block)")
        check_constructor("block_kwargs", self.block_kwargs, f"block={self.block!r}", BLOCKS[self.block], 1)
        if self.mode == "ode":
            check_constructor("vector_field_kwargs", self.vector_field_kwargs, f"vector_field={self.vector_field!r}",
                              VECTOR_FIELDS[self.vector_field], 1)
        if self.mode == "ode" and self.ode_backend == "torchdiffeq":
            methods = [name for name, spec in SOLVERS.items() if spec.torchdiffeq]
            for field in ("solver", "adjoint_solver"):
                name = getattr(self, field)
                if name is not None and SOLVERS[name].torchdiffeq is None:
                    fail(field, name, f"{', '.join(map(repr, methods))} with ode_backend='torchdiffeq'")
        if self.mode == "ode" and self.ode_backend in PER_SEQUENCE_BACKENDS:
            check_per_sequence(self)
        if getattr(self, "add_cross_attention", False):
            check_cross_attention(self, SENSITIVITIES)

    def _check_core(self) -> None:
        """The prelude, core and coda split, and the looped core's input injection."""
        layers = self.num_hidden_layers
        if isinstance(layers, int) and self.prelude_layers + self.coda_layers >= layers:
            raise ValueError(f"BertODEConfig.prelude_layers={self.prelude_layers} is invalid with coda_layers="
                             f"{self.coda_layers} and num_hidden_layers={layers}; allowed: prelude_layers + coda_layers "
                             f"< {layers} (the core keeps at least one layer)")
        if self.core_injection is not None and (self.mode == "deq" or not self.weight_tying):
            raise ValueError(f"BertODEConfig.core_injection={self.core_injection!r} is invalid with mode={self.mode!r}, "
                             f"weight_tying={self.weight_tying}; allowed: None (it applies to a looped core: "
                             "weight_tying=True, mode 'ode' or 'discrete'; the DEQ has deq_injection)")

    def _fill_names(self) -> None:
        """Registered names only; an unset one the mode reads gets the registry's default
        (the sensitivity: the mode's family's default)."""
        for field, (mode, registry) in NAMED_CHOICES.items():
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or value not in registry):
                raise registry.invalid(field, value)
            if value is None and mode in (None, self.mode):
                setattr(self, field, registry.default)
                self._filled.add(field)
        family = SENSITIVITY_FAMILY[self.mode]
        if self.sensitivity is None and family is not None:
            self.sensitivity = default_sensitivity(family)
            self._filled.add("sensitivity")
        if self.sensitivity is not None and self.sensitivity not in SENSITIVITIES:
            raise SENSITIVITIES.invalid("sensitivity", self.sensitivity)

    def _check_names_by_mode(self) -> None:
        for field, (mode, _) in NAMED_CHOICES.items():
            value = getattr(self, field)
            if mode is not None and mode != self.mode and value is not None:
                wrong_mode(field, value, self.mode, f"None (it applies to mode={mode!r})")

    def _check_unused_by_mode(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for field in FOREIGN[self.mode]:
            if getattr(self, field) != defaults[field]:
                used_by = "ode" if field in ODE_ONLY else "deq"
                wrong_mode(field, getattr(self, field), self.mode, f"{defaults[field]!r} (it applies to mode={used_by!r})")

    @property
    def adaptive(self) -> bool:
        """True when `solver` chooses its own steps from `atol`/`rtol`."""
        return self.solver is not None and SOLVERS[self.solver].adaptive


__all__ = ["BertODEConfig"]
