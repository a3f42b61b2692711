"""`compile_model`: torch.compile for bertode models, at the scope that gives whole graphs.

* ``scope="model"``: ``torch.compile(model)``. Fixed-step solves with autograd
  (``fixed_step_loop="direct"``), the discrete mode and ODE-Transformer blocks trace into
  one graph per forward. torchdyn's adaptive loop and adjoint, and the DEQ's solver loop,
  read values on the host to decide what to do next; there the graph breaks at every such
  read (dozens of graphs per forward, and the first steps recompile as step counts change).
* ``scope="fields"``: compile one evaluation of the dynamics instead: each ODE site's
  vector field with its branch (`ResidualSite.evaluate`), or the DEQ's map
  (`BertDEQEncoder.evaluate_map`). The solver loops stay eager Python around compiled
  evaluations. The DEQ's Jacobian penalty, which needs a double backward (not supported
  by compiled graphs), and the evaluation of f(z*) that the implicit backward takes many
  VJPs through (``retain_graph``, refused by compiled graphs' donated buffers) use the
  eager map; the forward solve's evaluations, the bulk of the work, are compiled.
* ``scope="auto"`` (default): ``model`` where that gives one graph (discrete mode; ODE
  mode with fixed steps, a traceable sensitivity method such as autograd, torchdyn's direct
  loop), ``fields`` otherwise.

The compiled functions are the classes' functions compiled once per call and called
with the module as first argument. A copy of a field-compiled model (``copy.deepcopy``,
pickle, ``save_pretrained``/``from_pretrained``) is the plain model: compile it again.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers.deq import BertDEQEncoder
from .layers.encoder import ResidualSite
from .solve.sensitivities import get_sensitivity

SCOPES = ("auto", "model", "fields")


def whole_graph(config) -> bool:
    """True when ``torch.compile(model)`` traces a forward of this config as one graph."""
    if config.mode == "discrete":
        return True
    return (config.mode == "ode" and not config.adaptive and get_sensitivity(config.sensitivity).traceable
            and config.ode_backend == "torchdyn" and config.fixed_step_loop == "direct")


def resolve_scope(scope: str, config=None) -> str:
    """``model`` or ``fields`` for this config; ValueError naming the scope if it cannot apply."""
    if scope not in SCOPES:
        raise ValueError(f"compile scope={scope!r} is invalid; allowed: {', '.join(map(repr, SCOPES))}")
    if scope == "auto":
        return "model" if config is None or whole_graph(config) else "fields"
    if scope == "fields" and config is not None and config.mode == "discrete":
        raise ValueError("compile scope='fields' is invalid for a discrete model (no ODE sites or DEQ map); "
                         "allowed: 'model' or 'auto'")
    return scope


def compile_model(model: nn.Module, scope: str = "auto", **options) -> nn.Module:
    """The module to call: ``torch.compile(model, **options)`` or ``model`` with compiled fields."""
    config = getattr(getattr(model, "module", model), "config", None)  # through DistributedDataParallel
    if resolve_scope(scope, config) == "model":
        return torch.compile(model, **options)
    evaluate_site = torch.compile(ResidualSite.evaluate, **options)
    evaluate_map = torch.compile(BertDEQEncoder.evaluate_map, **options)
    found = False
    for module in model.modules():
        if isinstance(module, ResidualSite) and module.ode:
            module.compiled_evaluate, found = evaluate_site, True
        elif isinstance(module, BertDEQEncoder):
            module.compiled_map, found = evaluate_map, True
    if not found:
        raise ValueError(f"compile scope='fields' is invalid for {type(model).__name__}: it has no ODE sites or DEQ map; "
                         "allowed: 'model' or 'auto'")
    return model
