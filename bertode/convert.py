"""`from_bert`: turn any `transformers` BERT into the matching ODE-BERT, with all weights.

Parameter names follow HF's except inside a layer, where each Add & Norm residual is a
site with a ``branch`` and a ``norm``; `HF_TO_BERTODE` is that renaming. Parameters HF
BERT has no counterpart for (a time embedding, an rk2 gate) keep their initialisation,
which makes them neutral (zero), so with ``solver="euler", steps=1`` the converted
model computes exactly what the source computes.
"""

from __future__ import annotations

import os
import re

from transformers import AutoConfig, BertForMaskedLM, BertForSequenceClassification, BertModel, PreTrainedModel

from .configuration import BertODEConfig
from .modeling import BertODEForMaskedLM, BertODEForSequenceClassification, BertODEModel

HF_TO_BERTODE = [
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"encoder.layer.\1.attention.branch.\2."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"encoder.layer.\1.attention.branch.dense."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"encoder.layer.\1.attention.norm."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"encoder.layer.\1.feed_forward.branch.intermediate."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"encoder.layer.\1.feed_forward.branch.dense."),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"encoder.layer.\1.feed_forward.norm."),
]
# (HF class, bertode class), most specific first: BertForMaskedLM is not a BertModel subclass.
CONVERSIONS = [
    (BertForMaskedLM, BertODEForMaskedLM),
    (BertForSequenceClassification, BertODEForSequenceClassification),
    (BertModel, BertODEModel),
]
_NOT_CONFIG = {"model_type", "architectures", "transformers_version", "dtype", "torch_dtype"}


def rename_bert_key(key: str) -> str:
    for pattern, replacement in HF_TO_BERTODE:
        key = re.sub(pattern, replacement, key)
    return key


def _load_source(path: str) -> PreTrainedModel:
    architectures = AutoConfig.from_pretrained(path).architectures or ["BertModel"]
    for hf_class, _ in CONVERSIONS:
        if hf_class.__name__ in architectures:
            return hf_class.from_pretrained(path)
    return BertModel.from_pretrained(path)


def from_bert(model_or_path, **overrides) -> BertODEModel:
    """Convert a `BertModel`, `BertForMaskedLM` or `BertForSequenceClassification` (an
    instance or a local directory saved with `save_pretrained`) to the bertode class of
    the same kind; ``overrides`` set `BertODEConfig` fields (solver, steps, ...)."""
    source = _load_source(os.fspath(model_or_path)) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    target_class = next((ours for hf_class, ours in CONVERSIONS if isinstance(source, hf_class)), None)
    if target_class is None:
        allowed = ", ".join(hf.__name__ for hf, _ in CONVERSIONS)
        raise TypeError(f"from_bert(model_or_path={type(source).__name__}) is not supported; allowed: {allowed} or a directory holding one")

    fields = {k: v for k, v in source.config.to_dict().items() if k not in _NOT_CONFIG}
    fields.update(overrides)
    config = BertODEConfig(**fields)
    weight_norm = config.mode == "deq" and config.deq_weight_norm
    config.deq_weight_norm = False  # load plain weights first, then reparametrise
    if config.weight_tying and source.config.num_hidden_layers != 1:
        raise ValueError(
            f"from_bert(weight_tying=True) needs a 1-layer source, got num_hidden_layers={source.config.num_hidden_layers}; "
            "allowed: weight_tying=False for a multi-layer BERT"
        )
    if config.num_hidden_layers != source.config.num_hidden_layers and not config.weight_tying:
        raise ValueError(
            f"from_bert(num_hidden_layers={config.num_hidden_layers}) differs from the source's "
            f"{source.config.num_hidden_layers} layers; allowed: the source's count, or weight_tying=True with a 1-layer source"
        )

    target = target_class(config)
    state = {rename_bert_key(k): v for k, v in source.state_dict().items()}
    result = target.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"from_bert: the source has parameters bertode cannot place: {result.unexpected_keys[:5]}")
    own = {name for name, _ in target.named_parameters()}
    missing = [k for k in result.missing_keys if k in own and not _is_bertode_only(k)]
    if missing:
        raise ValueError(f"from_bert: the source lacks parameters bertode needs: {missing[:5]}")
    if weight_norm:
        from .deq import apply_weight_norm

        apply_weight_norm(target.base_model.encoder.layer)
        target.config.deq_weight_norm = True
    parameter = next(source.parameters())
    return target.to(device=parameter.device, dtype=parameter.dtype).train(source.training)


def _is_bertode_only(key: str) -> bool:
    """Parameters with no HF counterpart: vector-field parameters, block gates, DEQ injection."""
    return ".field." in key or key.endswith((".gate.weight", ".gate.bias")) or ".encoder.injection." in key or key.startswith("encoder.injection.")
