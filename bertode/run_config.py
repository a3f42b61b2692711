"""From a composed Hydra config (model, size, solver, sensitivity, vector_field, block,
deq groups) to a validated `BertODEConfig`, with errors that name the command-line key.

`BertODEConfig` validates every field; here its field names are translated back to the
keys a user typed (``solver.atol`` rather than ``atol``), so a bad override fails at the
start of the run with one line naming what to fix.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

from .configuration import BertODEConfig

DEQ_PLAIN = ("jac_reg_weight", "jac_reg_freq")  # deq.<name> -> <name>; other deq.<x> -> deq_<x>


def model_kwargs(cfg: DictConfig, vocab_size: int, pad_token_id: int = 0) -> tuple[dict, dict]:
    """BertODEConfig keyword arguments and, per argument, the command-line key it came from."""
    kwargs: dict = {}
    origin: dict = {}

    def put(field, value, key):
        kwargs[field] = value
        origin[field] = key

    for key, value in cfg.model.items():
        put(key, value, f"model.{key}")
    solver = cfg.solver
    put("solver", solver.name, "solver")
    for key in ("steps", "t_end", "atol", "rtol"):
        if key in solver:
            put(key, solver[key], f"solver.{key}")
    if "backend" in solver:
        put("ode_backend", solver.backend, "solver.backend")
    if "loop" in solver:
        put("fixed_step_loop", solver.loop, "solver.loop")
    sensitivity = cfg.sensitivity
    put("sensitivity", sensitivity.method, "sensitivity")
    if sensitivity.get("solver") is not None:
        put("adjoint_solver", sensitivity.solver, "sensitivity.solver")
    for key in ("atol", "rtol"):
        if key in sensitivity:
            put(f"adjoint_{key}", sensitivity[key], f"sensitivity.{key}")
    put("vector_field", cfg.vector_field.name, "vector_field")
    kwargs_node = cfg.vector_field.get("kwargs")
    put("vector_field_kwargs", OmegaConf.to_container(kwargs_node) if kwargs_node is not None else None,
        "vector_field.kwargs")
    put("block", cfg.block.name, "block")
    for key, value in cfg.deq.items():
        put(key if key in DEQ_PLAIN else f"deq_{key}", value, f"deq.{key}")
    for key, value in cfg.get("model_overrides", {}).items():
        put(key, value, f"model_overrides.{key}")
    put("vocab_size", vocab_size, "data.vocab_size")
    put("pad_token_id", pad_token_id, "data.tokenizer")
    return kwargs, origin


def build_model_config(cfg: DictConfig, vocab_size: int, pad_token_id: int = 0) -> BertODEConfig:
    kwargs, origin = model_kwargs(cfg, vocab_size, pad_token_id)
    if kwargs.get("mode") != "ode":
        # Discrete and DEQ models ignore the ODE groups; keep their defaults valid.
        for field in ("solver", "steps", "atol", "rtol", "sensitivity", "adjoint_solver", "block", "vector_field_kwargs"):
            kwargs.pop(field, None)
    try:
        return BertODEConfig(**kwargs)
    except ValueError as error:
        raise ValueError(_rename(str(error), origin)) from None


def _rename(message: str, origin: dict) -> str:
    match = re.match(r"BertODEConfig\.(\w+)=", message)
    if match and match.group(1) in origin:
        field = match.group(1)
        return message.replace(f"BertODEConfig.{field}=", f"{origin[field]}=", 1)
    return message
