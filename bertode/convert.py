"""`from_bert`: turn a transformers BERT-family model into the matching ODE-BERT, with all
weights: BERT (every head), RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, ALBERT, DistilBERT,
DeBERTa v1 and v2/v3 (``position_scheme="deberta"``), and GPT-2 (pre-LN, causal; `families.py` holds
each family's config translation and renaming table).

Parameter names follow HF BERT's except inside a layer, where each Add & Norm residual
is a site with a ``branch`` and a ``norm``. Parameters the source has no counterpart
for (a time embedding, an rk2 gate) keep their initialisation, which makes them neutral
(zero), so with ``solver="euler", steps=1`` the converted model computes exactly what
the source computes. Anything else (another ``model_type``, an architecture without a
bertode head) is refused in one line naming it and what is supported.

A target with ``prelude_layers``/``coda_layers`` takes the source's stack split in three
(`split_stack`): its first layers are the prelude, its last the coda, the middle the core
(``encoder.core.layer.*``; a weight-tied core's one layer: ``core_from``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, PreTrainedModel

from .configuration import BertODEConfig
from .families import FAMILIES, family_of, target_class
from .modeling import BertODEModel


def rename_key(key: str, family) -> str:
    """A source parameter name -> bertode's (the base-model prefix becomes ``bert.``)."""
    if key.startswith(family.prefix + "."):
        key = "bert." + key[len(family.prefix) + 1:]
    for pattern, replacement in family.renames:
        key = re.sub(pattern, replacement, key)
    return key


def rename_bert_key(key: str) -> str:
    return rename_key(key, FAMILIES["bert"])


def _load_source(path: str) -> PreTrainedModel:
    """The HF model saved in a directory, loaded with the class its config names."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"from_bert: {path!r} holds no readable config.json ({str(error).splitlines()[0]}); "
                         "allowed: a directory written by save_pretrained") from None
    family = family_of(config.model_type)
    architecture = (config.architectures or [family.class_prefix + "Model"])[0]
    target_class(family, architecture)  # refused here, before loading weights
    return getattr(transformers, architecture).from_pretrained(path)


def from_bert(model_or_path, core_from: str = "first", **overrides) -> BertODEModel:
    """Convert a BERT-family model (an instance or a local directory saved with
    `save_pretrained`) to the bertode class of the same kind (``BertForMaskedLM`` ->
    `BertODEForMaskedLM`, ``RobertaForSequenceClassification`` ->
    `BertODEForSequenceClassification`, ...); ``overrides`` set `BertODEConfig` fields
    (solver, steps, ...). ValueError naming the model type or architecture otherwise.

    With ``prelude_layers=p``, ``coda_layers=c`` the source's first p layers become the
    prelude, its last c the coda, the middle ones the core (`split_stack`): one to one, or,
    for a weight-tied core, its one layer from the first middle layer (``core_from="first"``)
    or the average of the middle layers' weights (``core_from="mean"``)."""
    source = _load_source(os.fspath(model_or_path)) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    if not isinstance(source, PreTrainedModel):
        raise TypeError(f"from_bert(model_or_path={type(source).__name__}) is not supported; allowed: a transformers "
                        f"BERT-family model ({', '.join(FAMILIES)}) or a directory holding one")
    family = family_of(source.config.model_type)
    model_class = target_class(family, type(source).__name__)
    pooled = family.base_pooler or model_class is not BertODEModel

    fields = family.config(source.config)
    _check_positions(fields, overrides)
    config = BertODEConfig(**{**fields, **overrides})
    weight_norm = config.mode == "deq" and config.deq_weight_norm
    config.deq_weight_norm = False  # load plain weights first, then reparametrise
    layers = source.config.num_hidden_layers  # DistilBERT's n_layers and GPT-2's n_layer too (attribute_map)
    split = bool(config.prelude_layers or config.coda_layers)
    _check_split(config, layers, core_from, split)
    if config.weight_tying and family.class_prefix != "Albert" and layers != 1 and not split:
        raise ValueError(
            f"from_bert(weight_tying=True) needs a 1-layer source, got num_hidden_layers={layers}; "
            "allowed: weight_tying=False for a multi-layer BERT"
        )
    if config.num_hidden_layers != layers and not config.weight_tying:
        raise ValueError(
            f"from_bert(num_hidden_layers={config.num_hidden_layers}) differs from the source's "
            f"{layers} layers; allowed: the source's count, or weight_tying=True with a 1-layer source"
        )
    target = model_class(config, add_pooling_layer=False) if not pooled else model_class(config)
    state = source.state_dict()
    state = family.adapt(state, source.config) if family.adapt else state
    state = {rename_key(k, family): v for k, v in state.items()}
    if split:
        state = split_stack(state, layers, config, core_from, shared=family.class_prefix == "Albert")
    # The MLM decoder's bias: one tensor in some families (ELECTRA, DistilBERT), two (tied
    # or, with tie_word_embeddings=False, not) in others; bertode's decoder applies its own.
    for one, other in (("cls.predictions.bias", "cls.predictions.decoder.bias"),
                       ("cls.predictions.decoder.bias", "cls.predictions.bias")):
        if one in state and other not in state:
            state[other] = state[one]
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a size mismatch, e.g. a head with another number of labels
        mismatch = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
        raise ValueError(f"from_bert: {mismatch}") from None
    if result.unexpected_keys:
        raise ValueError(f"from_bert: the source has parameters bertode cannot place: {result.unexpected_keys[:5]}")
    own = {name for name, _ in target.named_parameters()}
    missing = [k for k in result.missing_keys if k in own and not _is_bertode_only(k)]
    if missing:
        raise ValueError(f"from_bert: the source lacks parameters bertode needs: {missing[:5]}")
    frozen = {rename_key(k, family) for k, p in source.named_parameters() if not p.requires_grad}
    for name, parameter in target.named_parameters():  # e.g. DistilBERT's sinusoidal positions stay frozen
        if name in frozen:
            parameter.requires_grad_(False)
    if weight_norm:
        from .layers.deq import apply_weight_norm

        apply_weight_norm(target.base_model.encoder.layer)
        target.config.deq_weight_norm = True
    parameter = next(source.parameters())
    return target.to(device=parameter.device, dtype=parameter.dtype).train(source.training)


def _check_positions(fields: dict, overrides: dict) -> None:
    """One line for a ``position_scheme`` other than the source's: its position embeddings would be lost (a relative
    scheme has none) or read with another numbering."""
    source = fields.get("position_scheme", "absolute")
    wanted = overrides.get("position_scheme", source)
    if wanted != source:
        raise ValueError(f"from_bert(position_scheme={wanted!r}) is invalid: the source has {source!r} position "
                         f"embeddings, which the converted model would lose; allowed: {source!r} (the source's)")


def _is_bertode_only(key: str) -> bool:
    """Parameters with no HF counterpart: vector-field parameters, block gates, DEQ (or looped core's) injection."""
    return ".field." in key or key.endswith((".gate.weight", ".gate.bias")) or \
        re.search(r"(^|\.)encoder\.(core\.)?injection\.", key) is not None


CORE_FROM = ("first", "mean")
LAYER_KEY = re.compile(r"^(.*?)encoder\.layer\.(\d+)\.(.*)$")


def _check_split(config, layers: int, core_from, split: bool) -> None:
    """One line for a prelude/coda split (or a ``core_from``) the source's stack cannot give."""
    if core_from not in CORE_FROM:
        raise ValueError(f"from_bert(core_from={core_from!r}) is invalid; allowed: {', '.join(map(repr, CORE_FROM))}")
    if core_from != "first" and not (split and config.weight_tying):
        raise ValueError(f"from_bert(core_from={core_from!r}) is invalid without a weight-tied core between a prelude "
                         "and a coda; allowed: 'first' (or weight_tying=True with prelude_layers or coda_layers)")
    if split and config.prelude_layers + config.coda_layers >= layers:
        raise ValueError(f"from_bert(prelude_layers={config.prelude_layers}, coda_layers={config.coda_layers}) needs a "
                         f"source of more than {config.prelude_layers + config.coda_layers} layers, got {layers}; "
                         "allowed: a split that leaves the core at least one of the source's layers")


def split_stack(state: dict, layers: int, config, core_from: str = "first", shared: bool = False) -> dict:
    """The source's ``encoder.layer.{i}`` (bertode's names) onto the prelude (i < p), the core
    (``encoder.core.layer.{i - p}``; a weight-tied core's one layer: the first middle layer or the
    middle layers' mean) and the coda (the last c). ``shared``: the source applies its one layer
    (``encoder.layer.0``, ALBERT's) ``layers`` times."""
    p, c = config.prelude_layers, config.coda_layers
    per_layer: dict = {}
    out = {}
    for key, value in state.items():
        match = LAYER_KEY.match(key)
        if match is None:
            out[key] = value
        else:
            per_layer.setdefault(int(match[2]), {})[(match[1], match[3])] = value
    if shared:
        per_layer = {i: per_layer[0] for i in range(layers)}
    middle = range(p, layers - c)
    for i in range(p):
        out.update({f"{head}encoder.prelude.{i}.{rest}": v for (head, rest), v in per_layer[i].items()})
    for j, i in enumerate(range(layers - c, layers)):
        out.update({f"{head}encoder.coda.{j}.{rest}": v for (head, rest), v in per_layer[i].items()})
    if config.weight_tying:
        first = per_layer[p]
        core = first if core_from == "first" else {
            name: torch.stack([per_layer[i][name] for i in middle]).mean(0) for name in first}
        out.update({f"{head}encoder.core.layer.0.{rest}": v for (head, rest), v in core.items()})
    else:
        for j, i in enumerate(middle):
            out.update({f"{head}encoder.core.layer.{j}.{rest}": v for (head, rest), v in per_layer[i].items()})
    return out


def load_foreign(cls, path, kwargs: dict):
    """``BertODE<Head>.from_pretrained(dir)`` where ``dir`` holds another BERT-family model
    type: load it with its own ``<Family><Head>`` class and convert (what `from_bert` does;
    `BertODEConfig` fields among ``kwargs`` are conversion overrides). One line for an
    unsupported type or head; None for a bertode directory (or a hub name: not looked at)."""
    if not isinstance(path, (str, os.PathLike)):
        return None  # from_pretrained(None, config=..., state_dict=...)
    config_file = Path(os.fspath(path)) / "config.json"
    if not config_file.is_file():
        return None
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None  # transformers names the damaged file
    if model_type == "bertode":
        return None
    family = family_of(model_type)
    suffix = next((name for name, target in family.heads.items() if target is cls), None)  # LMHeadModel: ForCausalLM
    if suffix is None:
        allowed = ", ".join(c.__name__ for c in dict.fromkeys(family.heads.values()))
        raise ValueError(f"{cls.__name__}.from_pretrained: a {model_type!r} checkpoint has no {cls.__name__} "
                         f"conversion; allowed: {allowed}")
    # bertode's own fields (solver, mode, ...) are conversion overrides; the rest (dtype,
    # num_labels, id2label, BertConfig fields) is the source's from_pretrained's business.
    overrides = {key: kwargs.pop(key) for key in list(kwargs)
                 if key in BertODEConfig.__annotations__ or key == "core_from"}
    source = getattr(transformers, family.class_prefix + suffix).from_pretrained(path, **kwargs)
    return from_bert(source, **overrides)

