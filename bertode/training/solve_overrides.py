"""A trained model's solve, chosen again at evaluation (inference-time compute).

``bertode.evaluate`` takes ``solver.name``, ``solver.steps``, ``solver.atol``,
``solver.rtol``, ``deq.solver``, ``deq.max_iter`` and ``deq.tol`` (null: as trained),
so that ``python -m bertode.evaluate checkpoint=DIR -m solver.steps=1,2,4,8,16`` is a
sweep of compute against quality; `bertode.finetune`'s ``eval_solve`` is the same idea.
The keys map onto `BertODEConfig` fields and are checked against the model's mode.
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..configuration import BertODEConfig

FIELDS = {("solver", "name"): "solver", ("solver", "steps"): "steps", ("solver", "atol"): "atol",
          ("solver", "rtol"): "rtol", ("deq", "solver"): "deq_solver", ("deq", "max_iter"): "deq_max_iter",
          ("deq", "tol"): "deq_tol"}


def overrides(cfg: DictConfig) -> dict:
    """The `BertODEConfig` fields set by the command line (the null keys left out)."""
    chosen = {}
    for (group, key), field in FIELDS.items():
        value = cfg.get(group, {}).get(key) if cfg.get(group) is not None else None
        if value is not None:
            chosen[field] = value
    return chosen


def check_fields(fields: dict, mode: str | None, key_of) -> None:
    """``fields`` (`BertODEConfig` names) must suit a model of ``mode`` (None: the default
    mode); the one-line error names the command-line key ``key_of(field)``."""
    try:
        BertODEConfig(hidden_size=8, num_attention_heads=1, intermediate_size=8, vocab_size=8,
                      **({"mode": mode} if mode else {}), **fields)
    except ValueError as error:
        message = str(error)
        for field in fields:
            message = message.replace(f"BertODEConfig.{field}=", f"{key_of(field)}=")
        raise ValueError(message.replace("BertODEConfig.mode", "the model's mode")) from None


def check(cfg: DictConfig, mode: str) -> dict:
    """The overrides, checked against a model of ``mode``; one line naming the key."""
    chosen = overrides(cfg)
    names = {field: f"{group}.{key}" for (group, key), field in FIELDS.items()}
    check_fields(chosen, mode, names.get)
    return chosen
