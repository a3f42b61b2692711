"""The ODE-Transformer block registry (Li et al. 2021, arXiv 2104.02308): ``block=<name>``.

A block takes one step of size 1 on dy/dt = F(y), where F(y) = Layer(y) - y is the whole
layer's increment, reusing the layer's parameters in every stage (the paper's equations,
not its released code, which adds the residual twice). A `Block` is a module owned by
the layer (it may own parameters, like the gate); its ``forward(layer, y)`` gets
``layer`` (y -> Layer(y), counted as one evaluation) and returns the next y. Built in:

* ``none``       y' = Layer(y): no block (the layer itself, exactly);
* ``rk2``        y' = y + (F1 + F2) / 2,            F1 = F(y), F2 = F(y + F1)  (Heun)
* ``rk2_gated``  y' = y + g F1 + (1 - g) F2,        g = sigmoid(w . [F1; F2] + b), one
                 gate per token, w = 0 and b = 0 at initialisation so g = 1/2
* ``rk4``        classical RK4: y' = y + (F1 + 2 F2 + 2 F3 + F4) / 6

* ``strang``     the Macaron layer (Lu et al. 2019, Strang-Marchuk splitting of the layer's convection-
                 diffusion ODE): y = x + 1/2 FFN(x), then the attention step, then + 1/2 FFN', two
                 feed-forward sites over the first and the second half of the layer's time interval, each
                 an ODE site in ``mode="ode"`` and post-LN as BERT's (``splits_layer``: the layer builds them)

A `SchemeBlock` takes one step of any explicit solver: a registered solver's name, a
`ButcherTableau` or a torchdyn solver class. Register your own with
``@bertode.register_block("name")``. Blocks are discrete one-step schemes, trained by
backpropagation: they need a sensitivity method that does not re-evaluate the field.
"""

from __future__ import annotations

import abc
from typing import Callable

import torch
from torch import nn

from ..registry import Registry
from ..solve._torchdyn import RungeKutta4
from ..solve.ode import ODESolve
from ..solve.solvers import HEUN, get_solver, solver_spec
from .init import zero_init

LayerMap = Callable[[torch.Tensor], torch.Tensor]


class Block(nn.Module, abc.ABC):
    """Base class of blocks; subclass it and register it by name.

    ``is_plain`` is True for the choices that apply the layer once (no block; a splitting);
    ``splits_layer``: the layer itself is laid out as a splitting (`encoder.BertODELayer`)."""

    is_plain: bool = False
    splits_layer: bool = False

    def __init__(self, config, **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(f"BertODEConfig.block_kwargs={kwargs!r} is invalid for block="
                             f"{type(self).registry_name!r}; allowed: no extra arguments")

    @abc.abstractmethod
    def forward(self, layer: LayerMap, y: torch.Tensor) -> torch.Tensor:
        """The next state from ``y``; F(v) = layer(v) - v is the layer's increment."""


BLOCKS = Registry("block", "block", base=Block, decorator="register_block")


def register_block(name: str, *, default: bool = False):
    """Class decorator: make a `Block` subclass selectable as ``block=name``."""
    return BLOCKS.register(name, default=default)


def available_blocks() -> tuple[str, ...]:
    return BLOCKS.names()


def build_block(config) -> Block:
    return BLOCKS[config.block](config, **(getattr(config, "block_kwargs", None) or {}))


@register_block("none", default=True)
class PlainLayer(Block):
    """No block: the layer itself."""

    is_plain = True

    def forward(self, layer, y):
        return layer(y)


class SchemeBlock(Block):
    """One step (h = 1) of the explicit solver ``solver`` on F(y) = Layer(y) - y.

    ``solver``: a registered solver name, a `ButcherTableau` or a torchdyn solver class."""

    solver = None

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        solver = self.solver
        spec = get_solver(solver) if isinstance(solver, str) else solver_spec(type(self).__name__, solver)
        if spec.adaptive:
            raise ValueError(f"{type(self).__name__}.solver is adaptive; allowed: a fixed-step solver (one step)")
        # One explicit step: bertode calls the solver's step itself (what NeuralODE's loop would do).
        self._solve = ODESolve(spec, steps=1)

    def forward(self, layer, y):
        z, _ = self._solve(y, lambda t, v: layer(v) - v, (), 0.0, 1.0, "block")
        return z


@register_block("rk2")
class RK2Block(SchemeBlock):
    solver = HEUN


@register_block("rk4")
class RK4Block(SchemeBlock):
    solver = RungeKutta4


@register_block("strang")
class StrangSplitting(Block):
    """The Macaron layer: the layer, once, laid out as half feed-forward, attention, half feed-forward."""

    is_plain = True
    splits_layer = True

    def forward(self, layer, y):
        return layer(y)


@register_block("rk2_gated")
class GatedRK2Block(Block):
    """Heun's stages mixed by a learned per-token gate g = sigmoid(w . [F1; F2] + b)."""

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.gate = zero_init(nn.Linear(2 * config.hidden_size, 1))

    def forward(self, layer, y):
        f1 = layer(y) - y
        y1 = y + f1
        f2 = layer(y1) - y1
        g = torch.sigmoid(self.gate(torch.cat([f1, f2], dim=-1))).to(y.dtype)
        return y + (g * f1 + (1 - g) * f2)


__all__ = ["Block", "SchemeBlock", "register_block", "available_blocks", "build_block", "BLOCKS"]
