"""The Hydra config groups that come from bertode's registries, and one name per setting.

The groups ``solver``, ``sensitivity``, ``block``, ``vector_field``, ``regularizer`` and ``deq`` are not
yaml files: `store_groups` writes one Hydra ConfigStore entry per registered name
(your registrations included, e.g. a ``plugins=[my_module]`` module's), plus ``default``
(nothing chosen). Every command that solves (train, evaluate, finetune, generate) takes
these groups with the same spellings (`SOLVE_GROUPS`, `TRAINING_GROUPS`).

Every node's keys are `BertODEConfig` field names, by one rule (`field_for`): the choice
itself (``solver=rk4``) sets the field ``<group>``, ``<group>.kwargs.<k>`` sets
``<group>_kwargs``, ``regularizer.weight`` sets ``regularizer_weight``, ``deq.<key>`` sets
``deq_<key>`` where that field exists, and every other ``<group>.<key>`` sets ``<key>``.

The groups ``depth`` (a registered depth distribution, `depth.py`; train and finetune draw
it per optimizer step, evaluate and generate take ``fixed``) and ``exit`` (``none`` or a
registered exit criterion; evaluate, generate) are stored the same way (`DIAL_GROUPS`);
they set no `BertODEConfig` field but the dial (`bertode.dialed`) around the command's
forwards. Each choice's node holds its constructor's arguments (null: its default), plus
``depth.backprop`` and ``exit.threshold``.

Every value is ``null``, meaning "the base's value": `BertODEConfig`'s default for a new
model (train, finetune from scratch), the checkpoint's for a saved one (evaluate,
generate, finetune from a checkpoint). So ``solver=rk4 solver.steps=2`` sets exactly the
fields ``solver`` and ``steps`` on every command, and no default is written twice.
"""

from __future__ import annotations

import dataclasses
import inspect

from hydra.core.config_store import ConfigStore

from ..layers.blocks import BLOCKS
from ..solve.exits import EXIT_CRITERIA
from .depth import DEPTH_DISTRIBUTIONS, parameters
from ..layers.regularizers import REGULARIZERS
from ..configuration import BertODEConfig
from ..solve.sensitivities import SENSITIVITIES
from ..solve.solvers import SOLVERS
from ..layers.vector_fields import VECTOR_FIELDS

REGISTRY_GROUPS = {"solver": SOLVERS, "sensitivity": SENSITIVITIES, "block": BLOCKS, "vector_field": VECTOR_FIELDS,
                   "regularizer": REGULARIZERS}
# The groups every solving command takes (train, evaluate, finetune, generate), and the ones
# that only mean something while training (a penalty added to the loss).
SOLVE_GROUPS = ("solver", "sensitivity", "vector_field", "block", "deq")
TRAINING_GROUPS = ("regularizer",)
# The groups that dial the depth of a command's forwards (`depth.py`), not a model field.
DIAL_GROUPS = ("depth", "exit")
FIXED_STEP_KEYS = ("steps", "t_end", "ode_backend", "fixed_step_loop")
ADAPTIVE_KEYS = ("atol", "rtol", "t_end", "ode_backend")
DEFAULT = "default"
# The sensitivity methods' own config fields (beyond kwargs), shown in their group node.
SENSITIVITY_KEYS = ("adjoint_solver", "adjoint_atol", "adjoint_rtol")
DEQ_PLAIN_FIELDS = ("jac_reg_weight", "jac_reg_freq", "jac_reg_increment_every")


def config_default(field: str):
    return {f.name: f.default for f in dataclasses.fields(BertODEConfig)}[field]


def field_for(group: str, key: str) -> str:
    """The `BertODEConfig` field that ``<group>.<key>`` on the command line sets."""
    if key == "name":
        return group
    if key == "kwargs":
        return f"{group}_kwargs"
    if group == "regularizer" and key == "weight":
        return "regularizer_weight"
    if group == "deq" and key not in DEQ_PLAIN_FIELDS:
        return f"deq_{key}"
    return key


def key_for(group: str, field: str) -> str | None:
    """What a user types for the `BertODEConfig` field ``field`` in ``group`` (``solver`` for the
    choice, else ``<group>.<key>``); None where the group has no key for it."""
    keys = {"solver": FIXED_STEP_KEYS + ADAPTIVE_KEYS, "sensitivity": SENSITIVITY_KEYS, "regularizer": ("weight",),
            "deq": tuple(deq_node())}.get(group, ())
    for key in ("name", "kwargs", *keys):
        if field_for(group, key) == field:
            return group if key == "name" else f"{group}.{key}"
    return None


def typed_key(field: str) -> str | None:
    """The command-line key of a `BertODEConfig` field in any solve group (``steps`` ->
    ``solver.steps``, ``solver`` -> ``solver``); None for a field no group sets."""
    keys = (key_for(group, field) for group in (*REGISTRY_GROUPS, "deq"))
    return next((key for key in keys if key is not None), None)


def _solver_node(name):
    keys = ADAPTIVE_KEYS if SOLVERS[name].adaptive else FIXED_STEP_KEYS
    return {"name": name, **dict.fromkeys(keys)}


def _keyword_defaults(function, skip: int) -> dict:
    """A constructor's keyword arguments and their defaults (after ``skip`` leading ones)."""
    parameters = list(inspect.signature(function).parameters.values())[skip:]
    return {p.name: p.default for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.default is not p.empty}


def _kwargs(names) -> dict | None:
    """A ``kwargs`` node: each constructor keyword, null (its own default) unless set."""
    return dict.fromkeys(names) or None


def kwargs_defaults(group: str, name: str) -> dict:
    """The constructor keywords (and defaults) of ``group``'s choice ``name`` that ``<group>.kwargs.<k>`` sets."""
    if group == "sensitivity":
        method = SENSITIVITIES[name]
        return {k: v for k, v in _keyword_defaults(method.__init__, 1).items() if k not in method.config_fields}
    if group in ("vector_field", "block"):
        return _keyword_defaults(REGISTRY_GROUPS[group][name].__init__, 2)
    return {}


def _sensitivity_node(name):
    """``name``, the config fields of this group the method reads, and its other
    constructor arguments under ``kwargs`` (its DEQ fields live in the deq group)."""
    own = {field for field in SENSITIVITIES[name].config_fields.values() if field in SENSITIVITY_KEYS}
    return {"name": name, **dict.fromkeys(sorted(own)), "kwargs": _kwargs(kwargs_defaults("sensitivity", name))}


def _kwargs_node(group, name):
    """A field's or block's constructor keywords, overridable as kwargs.<key>."""
    return {"name": name, "kwargs": _kwargs(kwargs_defaults(group, name))}


def group_node(group: str, name: str) -> dict:
    if group == "solver":
        return _solver_node(name)
    if group == "sensitivity":
        return _sensitivity_node(name)
    if group == "regularizer":
        return {"name": name, "weight": None}
    return _kwargs_node(group, name)


def default_node(group: str) -> dict:
    """The ``default`` choice: every key of the group's nodes, nothing chosen."""
    node: dict = {}
    for name in REGISTRY_GROUPS[group].names():
        for key, value in group_node(group, name).items():
            node.setdefault(key, None)
    node.update(name=None)
    if "kwargs" in node:
        node["kwargs"] = None
    if group == "solver":
        node = {key: node[key] for key in ("name",) + tuple(dict.fromkeys(FIXED_STEP_KEYS + ADAPTIVE_KEYS))}
    return node


def deq_node() -> dict:
    """The ``deq`` group: every DEQ field, null (the base's value) unless set."""
    node = {}
    for field in dataclasses.fields(BertODEConfig):
        if field.name.startswith("deq_"):
            node[field.name[len("deq_"):]] = None
        elif field.name in DEQ_PLAIN_FIELDS:
            node[field.name] = None
    return node


def depth_node(name: str) -> dict:
    """``depth=name``: its constructor's arguments (null: their defaults) and ``backprop`` (null: all);
    ``default``: the registry's default distribution's (``name`` null)."""
    chosen = DEPTH_DISTRIBUTIONS.default if name == DEFAULT else name
    return {"name": None if name == DEFAULT else name, **dict.fromkeys(parameters(chosen)), "backprop": None}


def exit_node(name: str) -> dict:
    """``exit=name``: ``threshold`` (null: the criterion's default, 0.03) and its other arguments;
    ``default``: the registry's default criterion's (``name`` null)."""
    chosen = EXIT_CRITERIA.default if name == DEFAULT else name
    return {"name": None if name == DEFAULT else name, "threshold": None,
            **dict.fromkeys(_keyword_defaults(EXIT_CRITERIA[chosen].__init__, 1))}


def dial_choices(group: str) -> list[str]:
    """``default`` first, then the registry's names (as the registry-backed groups list theirs)."""
    return [DEFAULT, *(DEPTH_DISTRIBUTIONS if group == "depth" else EXIT_CRITERIA).names()]


def store_groups() -> None:
    """(Re)write the registry-backed groups into Hydra's ConfigStore (call after registering)."""
    store = ConfigStore.instance()
    for group, registry in REGISTRY_GROUPS.items():
        store.store(group=group, name=DEFAULT, node=default_node(group))
        for name in registry.names():
            store.store(group=group, name=name, node=group_node(group, name))
    store.store(group="deq", name=DEFAULT, node=deq_node())
    for group, node in (("depth", depth_node), ("exit", exit_node)):
        for name in dial_choices(group):
            store.store(group=group, name=name, node=node(name))


def group_choices(group: str) -> list[str]:
    """The choices of a registry-backed group (``default`` first), else None."""
    if group in REGISTRY_GROUPS:
        return [DEFAULT, *REGISTRY_GROUPS[group].names()]
    if group == "deq":
        return [DEFAULT]
    if group in DIAL_GROUPS:
        return dial_choices(group)
    return None


store_groups()
