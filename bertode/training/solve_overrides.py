"""A saved model loaded with the command line's solve (inference-time compute).

`bertode.evaluate`, `bertode.generate` and `bertode.finetune` take the groups
``solver``, ``sensitivity``, ``vector_field``, ``block`` and ``deq`` with the spellings
of `bertode.train` (``solver=rk4 solver.steps=2 deq.max_iter=60``); a null value keeps
the checkpoint's (`run_config.checkpoint_fields`), so ``python -m bertode.evaluate
checkpoint=DIR -m solver.steps=1,2,4,8,16`` is a sweep of compute against quality. A
choice that would change the model's parameters (a vector field with weights of its
own, another block's gate) is refused in one line, since those weights were never trained.
"""

from __future__ import annotations

from pathlib import Path

from .groups import typed_key
from .run_config import checkpoint_fields


def check_parameters(model_class, folder: Path, saved: dict, fields: dict) -> None:
    """One line (ValueError) where ``fields`` make a model whose parameters (names and
    shapes) differ from the saved model's: weights no training has seen. Built on the meta
    device, so nothing is allocated."""
    if not fields:
        return
    import torch

    from ..configuration import BertODEConfig

    def shapes(changes: dict) -> dict:
        config = BertODEConfig.from_dict(saved)
        for field, value in changes.items():
            setattr(config, field, value)
        config.validate_ode()
        with torch.device("meta"):
            return {name: tuple(p.shape) for name, p in model_class(config).named_parameters()}

    trained, chosen = shapes({}), shapes(fields)
    if trained != chosen:
        new = sorted(set(chosen) - set(trained)) or sorted(k for k in chosen if chosen[k] != trained.get(k))
        dropped = sorted(set(trained) - set(chosen))
        # a choice's keyword arguments come with it: name the choice (``vector_field=...``) alone
        typed = " ".join(f"{typed_key(field) or field}={value!r}" for field, value in fields.items()
                         if value is not None and field.removesuffix("_kwargs") not in set(fields) - {field})
        raise ValueError(f"{typed} is invalid for checkpoint={str(folder)!r}: the model it makes has parameters the "
                         f"checkpoint never trained ({(new or dropped)[0]}, {len(new)} new, {len(dropped)} dropped); "
                         "allowed: choices that keep the trained parameters (solver, steps, tolerances, deq.* iterations)")


def load(model_class, folder: Path, fields: dict, **kwargs):
    """``model_class.from_pretrained(folder)`` with ``fields`` changed (checked by `check_parameters`)."""
    return model_class.from_pretrained(folder, **fields, **kwargs)
