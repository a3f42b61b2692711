"""From a composed Hydra config to a validated `BertODEConfig`, with errors that name the
command-line keys.

Each group node's keys map to `BertODEConfig` fields by one rule (`groups.field_for`), so
a setting keeps one name from the command line to the solve. `BertODEConfig` validates
every field and every pairing; here its field names are translated back to the keys a
user typed (``solver.atol`` rather than ``atol``), also for options the model's mode does
not use, which `BertODEConfig` refuses when changed (``model=bert solver.steps=4``).
"""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

from ..configuration import BertODEConfig
from .groups import REGISTRY_GROUPS, field_for


def model_kwargs(cfg: DictConfig, vocab_size: int, pad_token_id: int = 0) -> tuple[dict, dict]:
    """BertODEConfig keyword arguments and, per argument, the command-line key it came from."""
    kwargs: dict = {}
    origin: dict = {}

    def put(field, value, key):
        kwargs[field] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        origin[field] = key

    for key, value in cfg.model.items():
        put(key, value, f"model.{key}")
    for group in (*REGISTRY_GROUPS, "deq"):
        for key, value in cfg[group].items():
            put(field_for(group, key), value, group if key == "name" else f"{group}.{key}")
    for key, value in cfg.get("model_overrides", {}).items():
        put(key, value, f"model_overrides.{key}")
    causal = cfg.get("objective", "mlm") == "clm"  # the objective chooses the attention (`objective.py`)
    if kwargs.get("is_decoder", causal) != causal:
        raise ValueError(f"{origin['is_decoder']}={kwargs['is_decoder']!r} is invalid with objective="
                         f"{cfg.get('objective', 'mlm')!r}; allowed: leave it unset (objective=clm makes "
                         "attention causal, objective=mlm bidirectional)")
    put("is_decoder", causal, "objective")
    put("vocab_size", vocab_size, "data.vocab_size")
    put("pad_token_id", pad_token_id, "data.tokenizer")
    return kwargs, origin


def build_model_config(cfg: DictConfig, vocab_size: int, pad_token_id: int = 0) -> BertODEConfig:
    kwargs, origin = model_kwargs(cfg, vocab_size, pad_token_id)
    try:
        return BertODEConfig(**kwargs)
    except ValueError as error:
        raise ValueError(_rename(str(error), origin)) from None


def _rename(message: str, origin: dict) -> str:
    """``BertODEConfig.<field>=`` -> the command-line key that set the field."""

    def key(match):
        field = match.group(1)
        return f"{origin.get(field, field)}="

    return re.sub(r"BertODEConfig\.(\w+)=", key, message)
