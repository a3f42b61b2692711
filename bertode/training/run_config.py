"""From a composed Hydra config to a validated `BertODEConfig`: the one place where the
command line becomes a model config, for every command.

Each group node's keys map to `BertODEConfig` fields by one rule (`groups.field_for`), so
a setting keeps one name from the command line to the solve, and a null value means "the
base's": `BertODEConfig`'s defaults for a new model (`build_model_config`, train and
finetune from scratch), the saved config for a checkpoint (`checkpoint_fields`, evaluate,
generate, finetune). `BertODEConfig` validates every field and every pairing; here its
field names are translated back to the keys a user typed (``solver.atol`` rather than
``atol``), also for options the model's mode does not use, which `BertODEConfig` refuses
when set (``model=bert solver.steps=4``).
"""

from __future__ import annotations

import copy
import re

from omegaconf import DictConfig, OmegaConf

from ..configuration import BertODEConfig
from ..validation import SIZE_LIMITS, check_adaptive
from .groups import REGISTRY_GROUPS, field_for, key_for, kwargs_defaults

# Keys of the old grammar (before every command took the same groups), and their spelling now.
RENAMED = {"solve.mode": "model", "solve.solver": "solver", "solve.steps": "solver.steps", "solve.atol": "solver.atol",
           "solve.rtol": "solver.rtol", **{f"{group}.name": group for group in REGISTRY_GROUPS}}


def renamed(argv: list[str]) -> str | None:
    """The one-line error for the first old spelling in ``argv`` (None: there is none)."""
    for argument in argv:
        key, _, value = argument.lstrip("+~").partition("=")
        if key in RENAMED or key.startswith("solve."):
            new = RENAMED.get(key, key.replace("solve.", "solver.", 1))
            return f"{argument} is invalid: this setting is spelled {new}={value} now; allowed: {new}={value}"
    return None


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def group_fields(cfg: DictConfig, base: dict | None = None) -> tuple[dict, dict]:
    """The `BertODEConfig` fields that ``cfg``'s solve groups set (their null values left to
    ``base``, a saved config's dict; None: the defaults), and per field the key a user typed.

    ``<group>.kwargs.<k>`` values merge over the base's keyword arguments while the group's
    choice stays the base's; a new choice starts from its own constructor's defaults, saved
    with the model so that it reloads as trained."""
    base = base or {}
    fields: dict = {}
    origin: dict = {}
    for group in (*REGISTRY_GROUPS, "deq"):
        node = cfg.get(group)
        if node is None:
            continue
        name = node.get("name")
        for key, value in node.items():
            field, value = field_for(group, key), _plain(value)
            if key == "kwargs":
                given = {k: v for k, v in (value or {}).items() if v is not None}
                if name is None or name == base.get(group):
                    if not given:
                        continue
                    given = {**(base.get(field) or {}), **given}
                else:
                    given = {**kwargs_defaults(group, name), **given}
                value = given or None
            elif value is None:
                continue
            fields[field] = value
            origin[field] = key_for(group, field)
    return fields, origin


def model_kwargs(cfg: DictConfig, vocab_size: int, pad_token_id: int = 0) -> tuple[dict, dict]:
    """BertODEConfig keyword arguments of a new model and, per argument, the command-line key it came from."""
    from .objective import get_objective

    kwargs: dict = {}
    origin: dict = {}

    def put(field, value, key):
        kwargs[field] = _plain(value)
        origin[field] = key

    for key, value in cfg.model.items():
        if value is not None:
            put(key, value, f"model.{key}")
        origin.setdefault(key, f"model.{key}")  # a null one's key too, for a refusal that names it
    fields, keys = group_fields(cfg)
    for field, value in fields.items():
        put(field, value, keys[field])
    for key, value in cfg.get("model_overrides", {}).items():
        put(key, value, f"model_overrides.{key}")
    objective = get_objective(cfg.get("objective"))
    name, causal = objective.registry_name, objective.causal  # the objective chooses the attention
    if kwargs.get("is_decoder", causal) != causal:
        raise ValueError(f"{origin['is_decoder']}={kwargs['is_decoder']!r} is invalid with objective={name!r}; "
                         f"allowed: leave it unset (objective={name!r} makes attention "
                         f"{'causal' if causal else 'bidirectional'})")
    put("is_decoder", causal, "objective")
    put("objective", name, "objective")
    put("vocab_size", vocab_size, "data.vocab_size")
    put("pad_token_id", pad_token_id, "data.tokenizer")
    return kwargs, origin


def build_model_config(cfg: DictConfig, vocab_size: int, pad_token_id: int = 0) -> BertODEConfig:
    kwargs, origin = model_kwargs(cfg, vocab_size, pad_token_id)
    try:
        config = BertODEConfig(**kwargs)
        config.validate_ode()  # the pairings too (construction checks each field alone), before anything is written
        return config
    except ValueError as error:
        raise ValueError(rename(str(error), origin)) from None


_BUILT: dict[str, BertODEConfig] = {}  # a composed config (as yaml) -> its validated model config


def model_config(cfg: DictConfig, vocab_size: int, pad_token_id: int = 0) -> BertODEConfig:
    """The run's model config with the data's vocabulary: built and validated once per
    composed config in this process (the checks before Hydra starts, the resume check and
    the training loop all ask; Hydra composes its own copy of the same config)."""
    key = OmegaConf.to_yaml(cfg)
    if key not in _BUILT:  # at the largest vocabulary: what depends on it is checked below, at the data's
        _BUILT[key] = build_model_config(cfg, vocab_size=SIZE_LIMITS["vocab_size"])
    config = copy.deepcopy(_BUILT[key])
    config.vocab_size, config.pad_token_id = vocab_size, pad_token_id
    if config.lm_head_type == "adaptive":  # its cutoffs cut this vocabulary
        try:
            check_adaptive(config)
        except ValueError as error:
            raise ValueError(rename(str(error), model_kwargs(cfg, vocab_size, pad_token_id)[1])) from None
    return config


def announced_vocab_size(cfg: DictConfig) -> int:
    """The vocabulary size known before the data is read: ``data.vocab_size`` where it bounds a trained
    vocabulary (WordPiece's reaches it but for a larger alphabet), else the largest allowed."""
    data = cfg.get("data") or {}
    size = data.get("vocab_size")
    if data.get("tokenizer") or isinstance(size, bool) or not isinstance(size, int) or size < 1:
        return SIZE_LIMITS["vocab_size"]
    return size


def forget_model_configs() -> None:
    """The end of a run: the next one builds its model config again."""
    _BUILT.clear()


def checkpoint_fields(cfg: DictConfig, saved: dict, extra: dict | None = None) -> dict:
    """The fields ``cfg``'s groups (and ``extra``, e.g. finetune's ``model=``) change on the
    saved config ``saved``, checked as the model they make; one line naming the typed key."""
    fields, origin = group_fields(cfg, saved)
    for field, (value, key) in (extra or {}).items():
        fields[field], origin[field] = value, key
    check_changes(saved, fields, origin)
    return fields


def check_changes(saved: dict, fields: dict, origin: dict) -> None:
    """``fields`` set on the saved config ``saved`` must make a valid model; one line naming
    ``origin[field]``, the key a user typed."""
    if not fields:
        return
    saved_scheme, scheme = saved.get("position_scheme", "absolute"), fields.get("position_scheme")
    if scheme is not None and scheme != saved_scheme:  # e.g. a converted BERT's absolute positions would be lost
        raise ValueError(f"{origin.get('position_scheme', 'position_scheme')}={scheme!r} is invalid with the checkpoint's "
                         f"position_scheme={saved_scheme!r} (its weights were trained with those positions); allowed: "
                         f"{saved_scheme!r}")
    try:
        config = BertODEConfig.from_dict(saved)  # as `from_pretrained` loads it: unused options forgotten
        for field, value in fields.items():
            setattr(config, field, value)
        config.validate_ode()
    except ValueError as error:
        message = str(error) if "mode" in origin else str(error).replace("BertODEConfig.mode=", "the model's mode=")
        raise ValueError(rename(message, origin)) from None


def rename(message: str, origin: dict) -> str:
    """``BertODEConfig.<field>=`` -> the command-line key that set the field."""

    def key(match):
        field = match.group(1)
        return f"{origin.get(field, field)}="

    return re.sub(r"BertODEConfig\.(\w+)=", key, message)
