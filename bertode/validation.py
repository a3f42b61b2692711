"""The checks `BertODEConfig` runs on its fields (each field on its own, on construction;
the pairings in `BertODEConfig.validate_ode`): one-line ValueErrors naming the field, the
bad value and what is allowed (and, for a pairing, the field it conflicts with)."""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from typing import Any

from huggingface_hub.errors import StrictDataclassError

DEQ_STOP_MODES = ("rel", "abs")
DEQ_INJECTIONS = ("add", "qkv")
DEQ_ON_NONFINITE = ("raise", "skip")
POSITION_SCHEMES = ("absolute", "after_padding", "rotary", "transformer_xl", "deberta")  # relative: layers/positions.py
# position_scheme="deberta"'s fields and their defaults (layers/disentangled.py)
DEBERTA_FIELDS = {"max_relative_positions": -1, "position_buckets": -1, "pos_att_type": None, "share_att_key": False,
                  "norm_rel_ebd": None, "position_biased_input": False}
LM_HEAD_TYPES = ("bert", "linear", "adaptive")
# Upper bounds of the sizes: far beyond any model built with bertode (BERT-large: 24 layers,
# 1024 wide, 512 positions, 30522 tokens; the largest vocabularies ~256k), so that a typo
# (``max_position_embeddings=1e11``) is refused instead of allocating terabytes.
SIZE_LIMITS = {"num_hidden_layers": 4096, "hidden_size": 2**16, "num_attention_heads": 2**16,
               "intermediate_size": 2**18, "max_position_embeddings": 2**20, "vocab_size": 2**24}


def fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"BertODEConfig.{field}={value!r} is invalid; allowed: {allowed}")


def wrong_mode(field: str, value: Any, mode: str, allowed: str) -> None:
    raise ValueError(f"BertODEConfig.{field}={value!r} is invalid with BertODEConfig.mode={mode!r}; allowed: {allowed}")


def check_choice(field: str, value: Any, choices) -> None:
    if value not in choices:
        fail(field, value, ", ".join(repr(c) for c in choices))


def is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_positive(field: str, value: Any) -> None:
    if not is_number(value) or value <= 0:
        fail(field, value, "a finite number > 0")


def check_int(field: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        fail(field, value, f"an integer >= {minimum}" + (f" and <= {maximum:,}" if maximum is not None else ""))


@contextlib.contextmanager
def type_errors(field: str, value: Any):
    """transformers' type check of a field (a multi-line ``StrictDataclassError``, not a
    ValueError: a traceback) as one of ours: ``max_position_embeddings=1e11``."""
    try:
        yield
    except StrictDataclassError as error:
        match = re.search(r"expected (.+?), got", str(error.__cause__ or error))
        names = {"int": "an integer", "float": "a number", "str": "a string", "bool": "True or False"}
        fail(field, value, names.get(match.group(1), f"a value of type {match.group(1)}") if match
             else str(error).splitlines()[-1].strip())


def check_kwargs(field: str, value: Any) -> None:
    if value is not None and not isinstance(value, dict):
        fail(field, value, "a dict or None")


def check_constructor(field: str, kwargs: dict | None, owner: str, cls: type, skip: int) -> None:
    """``kwargs`` must be keyword arguments of ``cls``'s constructor (after its ``skip``
    leading positional ones: the config for fields and blocks; the ``config_fields`` of a
    sensitivity method are passed by bertode and are not the user's to give)."""
    parameters = list(inspect.signature(cls).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.name not in getattr(cls, "config_fields", {})]
    if set(kwargs or {}) - set(accepted):
        fail(field, kwargs, f"keyword arguments of {owner}: {', '.join(accepted) or '(it takes no keyword arguments)'}")


def check_deq_numbers(config) -> None:
    """The DEQ's numbers and switches."""
    check_choice("deq_stop_mode", config.deq_stop_mode, DEQ_STOP_MODES)
    check_choice("deq_injection", config.deq_injection, DEQ_INJECTIONS)
    check_choice("deq_on_nonfinite", config.deq_on_nonfinite, DEQ_ON_NONFINITE)
    for name in ("deq_max_iter", "deq_memory", "deq_phantom_steps", "deq_backward_max_iter", "deq_pretrain_depth",
                 "deq_check_every"):
        check_int(name, getattr(config, name), 1)
    check_int("deq_pretrain_steps", config.deq_pretrain_steps, 0)
    for name in ("deq_tol", "deq_backward_tol"):
        check_positive(name, getattr(config, name))
    if not is_number(config.deq_damping) or not 0 < config.deq_damping <= 1:
        fail("deq_damping", config.deq_damping, "a number in (0, 1]")
    if not is_number(config.jac_reg_weight) or config.jac_reg_weight < 0:
        fail("jac_reg_weight", config.jac_reg_weight, "a number >= 0")
    if not is_number(config.jac_reg_freq) or not 0 <= config.jac_reg_freq <= 1:
        fail("jac_reg_freq", config.jac_reg_freq, "a number in [0, 1]")
    check_int("jac_reg_increment_every", config.jac_reg_increment_every, 0)
    for name in ("deq_weight_norm", "deq_spectral_radius"):
        if not isinstance(getattr(config, name), bool):
            fail(name, getattr(config, name), "True or False")


def check_cross_attention(config, sensitivities) -> None:
    """A decoder's cross-attention (``add_cross_attention``): a decoder, a mode whose sites take a second input,
    and a gradient method that differentiates through the encoder's states (``sensitivities``: the registry)."""
    if not config.is_decoder:  # HF's BertLayer raises too
        raise ValueError("BertODEConfig.add_cross_attention=True is invalid with is_decoder=False; allowed: "
                         "is_decoder=True (cross-attention is a decoder's)")
    if config.mode == "deq":
        wrong_mode("add_cross_attention", True, config.mode, "False (a DEQ map has no cross-attention; use "
                   "mode='ode' or 'discrete' for the decoder)")
    if config.mode == "ode" and sensitivities[config.sensitivity].reevaluates_field:
        fail("sensitivity", config.sensitivity, "a method that backpropagates through the solve (autograd) with "
             "add_cross_attention=True (an adjoint would not return the encoder states' gradients)")


def check_position_pairing(config) -> None:
    """``rope_theta`` is RoPE's: another value with another scheme is refused (a pairing)."""
    if config.rope_theta != 10000.0 and config.position_scheme != "rotary":
        fail("rope_theta", config.rope_theta, f"10000.0 with position_scheme={config.position_scheme!r} (it is the "
             "base of position_scheme='rotary')")
    for name, default in DEBERTA_FIELDS.items():  # DeBERTa's, likewise
        if config.position_scheme != "deberta" and getattr(config, name, default) != default:
            fail(name, getattr(config, name), f"{default!r} with position_scheme={config.position_scheme!r} (a field "
                 "of position_scheme='deberta')")


def check_disentangled(config) -> None:
    """Each of DeBERTa's fields on its own."""
    check_int("max_relative_positions", config.max_relative_positions, -1, SIZE_LIMITS["max_position_embeddings"])
    check_int("position_buckets", config.position_buckets, -1, SIZE_LIMITS["max_position_embeddings"])
    if config.position_buckets == 1:  # log buckets divide by buckets // 2 (DeBERTa-v2 fails there too)
        fail("position_buckets", 1, "-1 or 0 (no buckets), or an integer >= 2")
    terms = config.pos_att_type
    if terms is not None and (not isinstance(terms, (list, tuple)) or len(set(terms)) != len(terms)
                              or any(term not in ("c2p", "p2c") for term in terms)):
        fail("pos_att_type", terms, "None (both), or a list of distinct 'c2p', 'p2c'")
    for name in ("share_att_key", "position_biased_input"):
        if not isinstance(getattr(config, name), bool):
            fail(name, getattr(config, name), "True or False")
    check_choice("norm_rel_ebd", config.norm_rel_ebd, (None, "layer_norm"))


def check_architecture(config) -> None:
    """Sizes, and the BERT-family choices of the embeddings and heads."""
    from transformers.activations import ACT2FN

    for name, maximum in SIZE_LIMITS.items():
        check_int(name, getattr(config, name), 1, maximum)
    check_int("type_vocab_size", config.type_vocab_size, 0, 2**16)
    if config.embedding_size is not None:
        check_int("embedding_size", config.embedding_size, 1, SIZE_LIMITS["hidden_size"])
    projection = config.embedding_projection
    if not (projection is None or isinstance(projection, bool) or projection == "before_norm"):
        fail("embedding_projection", config.embedding_projection, "None, True, False or 'before_norm' (DeBERTa's "
             "embed_proj: no bias, before the LayerNorm)")
    if not is_number(config.layer_norm_eps) or config.layer_norm_eps <= 0:
        fail("layer_norm_eps", config.layer_norm_eps, "a finite number > 0")
    check_choice("position_scheme", config.position_scheme, POSITION_SCHEMES)
    check_positive("rope_theta", config.rope_theta)
    check_disentangled(config)
    if not isinstance(config.embedding_norm, bool):
        fail("embedding_norm", config.embedding_norm, "True or False")
    check_choice("lm_head_type", config.lm_head_type, LM_HEAD_TYPES)
    check_adaptive(config)
    for name in ("hidden_act", "head_hidden_act", "pooler_hidden_act"):
        value = getattr(config, name)
        if (value is not None or name != "head_hidden_act") and isinstance(value, str) and value not in ACT2FN:
            fail(name, value, f"an activation name of transformers' ACT2FN ({', '.join(sorted(ACT2FN)[:6])}, ...)")


def check_adaptive(config) -> None:
    """``lm_head_type="adaptive"``'s cutoffs (increasing ids in (0, vocab_size)), ``adaptive_div_value`` (every
    cluster at least 1 wide) and an embedding as wide as the hidden states (the projections tie across them)."""
    cutoffs, div = config.adaptive_cutoffs, config.adaptive_div_value
    if not is_number(div) or div < 1:
        fail("adaptive_div_value", div, "a number >= 1 (cluster j is embedding width // div_value**j wide)")
    if config.lm_head_type != "adaptive":
        if cutoffs is not None:
            fail("adaptive_cutoffs", cutoffs, f"None with lm_head_type={config.lm_head_type!r} (they cut "
                 "lm_head_type='adaptive''s vocabulary)")
        return
    allowed = ("a list of increasing integers in (0, vocab_size), "
               "the first ids of the tail clusters (Transformer-XL's for WikiText-103: [20000, 40000, 200000])")
    if cutoffs is None:
        raise ValueError(f"BertODEConfig.adaptive_cutoffs=None is invalid with BertODEConfig.lm_head_type='adaptive'; "
                         f"allowed: {allowed}")
    if not isinstance(cutoffs, (list, tuple)) or not cutoffs or any(isinstance(c, bool) or not isinstance(c, int)
                                                                   for c in cutoffs):
        fail("adaptive_cutoffs", cutoffs, allowed)
    if list(cutoffs) != sorted(set(cutoffs)) or cutoffs[0] <= 0:
        fail("adaptive_cutoffs", list(cutoffs), allowed)
    if cutoffs[-1] >= config.vocab_size:
        raise ValueError(f"BertODEConfig.adaptive_cutoffs={list(cutoffs)!r} is invalid with BertODEConfig.vocab_size="
                         f"{config.vocab_size}; allowed: {allowed}")
    if config.embedding_size not in (None, config.hidden_size):
        fail("embedding_size", config.embedding_size, f"None or hidden_size={config.hidden_size} with "
             "lm_head_type='adaptive' (the softmax's projections are the embedding's, transposed)")
    if int(config.hidden_size // div ** len(cutoffs)) < 1:
        fail("adaptive_div_value", div, f"a value that leaves the last of {len(cutoffs) + 1} clusters at least "
             f"1 wide (hidden_size={config.hidden_size} // div_value**{len(cutoffs)})")


def check_per_sequence(self) -> None:
    """A per-sequence backend: a solver it can step, and a field that takes one time per sequence."""
    from .layers.vector_fields import VECTOR_FIELDS
    from .solve.per_sequence import embedded_tableau
    from .solve.solvers import SOLVERS
    spec, backend = SOLVERS[self.solver], self.ode_backend
    if backend == "torchode" and spec.torchode is None:
        fail("solver", self.solver, f"{', '.join(repr(n) for n, s in SOLVERS.items() if s.torchode)} with "
             "ode_backend='torchode'")
    if backend == "bertode" and spec.adaptive and embedded_tableau(spec) is None:
        fail("solver", self.solver, "a fixed-step solver or an adaptive one with an embedded error estimate "
             "(dopri5, tsit5) with ode_backend='bertode'")
    if (spec.adaptive or backend == "torchode") and not VECTOR_FIELDS[self.vector_field].per_sequence_time:
        fields = [n for n, cls in VECTOR_FIELDS.items() if cls.per_sequence_time]
        fail("vector_field", self.vector_field, f"a field whose forward takes t of shape (batch, 1, 1) "
             f"(per_sequence_time=True: {', '.join(map(repr, fields))}) with ode_backend={backend!r}")


def check_sensitivity(self, family) -> None:
    """The gradient method against the mode's family (``family``: 'ode', 'deq' or None), the backend, the block and
    dropout; then the method's own `validate`."""
    from .layers.blocks import BLOCKS
    from .solve.sensitivities import SENSITIVITIES, available_sensitivities
    if family is None:
        if self.sensitivity is not None:
            wrong_mode("sensitivity", self.sensitivity, self.mode, "None (a discrete model is trained by backpropagation)")
        return
    method = SENSITIVITIES[self.sensitivity]
    if method.family != family:
        wrong_mode("sensitivity", self.sensitivity, self.mode, ", ".join(map(repr, available_sensitivities(family))))
    if self.adjoint_solver is not None and "adjoint_solver" not in method.config_fields.values():
        fail("adjoint_solver", self.adjoint_solver, f"None with sensitivity={self.sensitivity!r} (it configures an adjoint)")
    check_constructor("sensitivity_kwargs", self.sensitivity_kwargs, f"sensitivity={self.sensitivity!r}", method, 0)
    if family == "ode":
        if self.ode_backend not in method.backends:
            supported = [n for n in available_sensitivities("ode") if self.ode_backend in SENSITIVITIES[n].backends]
            fail("sensitivity", self.sensitivity, f"one supporting ode_backend={self.ode_backend!r} ({', '.join(supported)})")
        if method.reevaluates_field and not BLOCKS[self.block].is_plain:
            fail("sensitivity", self.sensitivity, f"one that does not re-evaluate the field with block={self.block!r} "
                 "(a block is one discrete step, trained by backpropagation)")
        if method.reevaluates_field and self.attention_probs_dropout_prob > 0:
            # The adjoint re-evaluates the field backwards in time; attention dropout
            # would draw new masks there (hidden dropout keeps one mask per solve).
            fail("attention_probs_dropout_prob", self.attention_probs_dropout_prob,
                 f"0.0 with sensitivity={self.sensitivity!r} (the backward pass re-evaluates the field)")
    method.from_config(self).validate(self)


def check_memory(config) -> None:
    """A segment memory (``mem_len`` > 0, `layers/segment_memory.py`): a causal decoder with relative positions whose
    attention's keys and values come from the remembered states alone, trained without re-evaluating the field."""
    from .layers.segment_memory import refusal
    from .solve.sensitivities import SENSITIVITIES

    if not config.mem_len:
        return
    reason = refusal(config)
    method = SENSITIVITIES[config.sensitivity] if config.sensitivity in SENSITIVITIES else None
    if reason is None and config.mode == "ode" and method is not None and method.reevaluates_field:
        reason = f"sensitivity={config.sensitivity!r} (its backward re-evaluates attention without the memory)"
    if reason is not None:
        raise ValueError(f"BertODEConfig.mem_len={config.mem_len} is invalid with {reason}; allowed: 0")
