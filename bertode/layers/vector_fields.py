"""The vector-field registry: what dz/dt is at one Add & Norm residual.

A vector field sees the sublayer branch ``G`` (attention or feed-forward, hidden
dropout included) and that residual's LayerNorm ``LN``, and defines

* ``forward(t, z, branch, norm)`` -> dz/dt, evaluated by the solver, and
* ``finish(z, norm)`` -> the site's output, applied once to the solution at ``t_end``.

It owns only its *own* extra parameters (e.g. a time embedding); the branch and the
norm belong to the layer. ``per_sequence_time`` says whether ``forward`` accepts, besides a
scalar t, a (batch, 1, 1) tensor with each sequence at its own time (the per-sequence
backends ``bertode`` and ``torchode`` pass one; other fields are refused there). ``uses_norm`` says whether the dynamics use the norm's
parameters, so that an adjoint differentiates exactly what the dynamics use.

Built in, each reproducing BERT with one Euler step on [0, 1]:

* ``residual``       dz/dt = G(z), LN after the solve (the ODE-Transformer view);
* ``add_norm``       dz/dt = LN(z + G(z)) - z (its equilibria are DEQ fixed points);
* ``time_residual``  dz/dt = G(z + W phi(t)), phi sinusoidal features of t, W zero at
                     initialisation (so it starts as ``residual``), LN after the solve;
* ``time_weights``   dz/dt = G(z; W(t)): every Linear of the branch plus a rank-r change
                     gated by phi(t) through a zero-initialised generator (it starts as
                     ``residual``); it reaches the branch's layers through `VectorField.bind`.

Users add their own with ``@bertode.register_vector_field("name")``; a field's own
``nn.Linear`` layers get BERT's initialisation from ``post_init`` unless marked with
`bertode.zero_init` / `bertode.identity_init` (see `init.py`).
"""

from __future__ import annotations

import abc
import functools
import math
from typing import Callable

import torch
from torch import nn

from ..registry import Registry
from .init import zero_init

Branch = Callable[[torch.Tensor], torch.Tensor]


class VectorField(nn.Module, abc.ABC):
    """Base class of vector fields; subclass it and register it by name."""

    uses_norm: bool = False
    per_sequence_time: bool = False  # forward takes t of shape (batch, 1, 1) as well as a scalar t

    def __init__(self, config, **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(
                f"BertODEConfig.vector_field_kwargs={kwargs!r} is invalid for vector_field="
                f"{type(self).registry_name!r}; allowed: no extra arguments"
            )

    @abc.abstractmethod
    def forward(self, t: torch.Tensor, z: torch.Tensor, branch: Branch, norm: nn.LayerNorm) -> torch.Tensor:
        """dz/dt at time t for the state z of shape (batch, seq, hidden)."""

    def finish(self, z: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        """Map the solution at t_end to the residual site's output (default: the identity)."""
        return z

    def bind(self, branch: nn.Module) -> None:
        """Called once with the site's branch module (default: nothing). A field that changes
        the branch's weights with depth (``time_weights``) attaches itself here."""


VECTOR_FIELDS = Registry("vector field", "vector_field", base=VectorField, decorator="register_vector_field")


def register_vector_field(name: str, *, default: bool = False):
    """Class decorator: make a `VectorField` subclass selectable as ``vector_field=name``."""
    return VECTOR_FIELDS.register(name, default=default)


def available_vector_fields() -> tuple[str, ...]:
    return VECTOR_FIELDS.names()


def build_vector_field(config) -> VectorField:
    return VECTOR_FIELDS[config.vector_field](config, **(config.vector_field_kwargs or {}))


@register_vector_field("residual", default=True)
class ResidualField(VectorField):
    """dz/dt = G(z); the LayerNorm is applied after the solve."""

    per_sequence_time = True  # autonomous

    def forward(self, t, z, branch, norm):
        return branch(z)

    def finish(self, z, norm):
        return norm(z)


@register_vector_field("add_norm")
class AddNormField(VectorField):
    """dz/dt = LN(z + G(z)) - z: Euler with step h is the damped map z <- (1-h) z + h LN(z + G(z))."""

    uses_norm = True
    per_sequence_time = True  # autonomous

    def forward(self, t, z, branch, norm):
        return norm(z + branch(z)) - z


@register_vector_field("time_residual")
class TimeResidualField(VectorField):
    """dz/dt = G(z + W phi(t)): the branch sees depth through a learned time embedding.

    phi(t) = [sin(w_k t), cos(w_k t)] with w_k geometric in [1, max_frequency]; W starts at
    zero so a fresh (or converted) model begins as the autonomous ``residual`` field.
    """

    per_sequence_time = True  # t of shape (batch, 1, 1) gives one embedding per sequence

    def __init__(self, config, time_features: int = 16, max_frequency: float = 100.0):
        super().__init__(config)
        if time_features < 2 or time_features % 2:
            raise ValueError(
                f"BertODEConfig.vector_field_kwargs['time_features']={time_features!r} is invalid; allowed: an even integer >= 2"
            )
        self.time_features = time_features
        self.max_frequency = float(max_frequency)
        self.time_proj = zero_init(nn.Linear(time_features, config.hidden_size, bias=False))

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.time_features // 2
        weight = self.time_proj.weight
        freqs = torch.exp(torch.linspace(0.0, math.log(self.max_frequency), half, device=weight.device, dtype=torch.float32))
        angles = t.to(device=weight.device, dtype=torch.float32)[..., None] * freqs  # t (batch, 1, 1): (batch, 1, 1, half)
        embedding = self.time_proj(torch.cat([angles.sin(), angles.cos()], -1).to(weight.dtype))
        return embedding if t.dim() == 0 else embedding.squeeze(-2)  # (hidden,) or (batch, 1, hidden)

    def forward(self, t, z, branch, norm):
        return branch(z + self.time_embedding(t).to(z.dtype))

    def finish(self, z, norm):
        return norm(z)


@register_vector_field("time_weights")
class TimeWeightsField(VectorField):
    """dz/dt = G(z; W(t)): every Linear W of the branch (Q, K, V, O; both feed-forward
    layers) becomes W(t) = W + U_i diag(g_i(phi(t))) D_i, a rank-``rank`` change whose
    gates g = A phi(t) come from a Fourier embedding of depth t through one generator A.
    A starts at zero, so a fresh (or converted) model begins as ``residual`` exactly; the
    LayerNorm is applied after the solve. Depth-varying weights, as in Tong et al., ICLR
    2025 ("Neural ODE Transformers")."""

    per_sequence_time = True  # t of shape (batch, 1, 1) gives each sequence its own gates

    def __init__(self, config, rank: int = 4, time_features: int = 16, max_frequency: float = 4.0):
        super().__init__(config)
        if not (isinstance(rank, int) and rank >= 1) or time_features < 2 or time_features % 2:
            raise ValueError(f"BertODEConfig.vector_field_kwargs={{'rank': {rank!r}, 'time_features': "
                             f"{time_features!r}}} is invalid; allowed: rank >= 1, time_features even >= 2")
        self.rank, self.time_features, self.max_frequency = rank, time_features, float(max_frequency)
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        self.generator = None
        self._gates = None  # (linears, rank) while this field evaluates the branch

    def bind(self, branch: nn.Module) -> None:
        linears = [m for m in branch.modules() if isinstance(m, nn.Linear)]
        for index, linear in enumerate(linears):
            self.down.append(nn.Parameter(torch.randn(self.rank, linear.in_features) / math.sqrt(linear.in_features)))
            self.up.append(nn.Parameter(torch.randn(linear.out_features, self.rank) / math.sqrt(self.rank)))
            linear.register_forward_hook(functools.partial(self._delta, index))
        self.generator = zero_init(nn.Linear(self.time_features, self.rank * len(linears), bias=False))

    def _delta(self, index, module, inputs, output):
        if self._gates is None:
            return output
        x = inputs[0]
        return output + ((x @ self.down[index].T.to(x.dtype)) * self._gates[index].to(x.dtype)) @ self.up[index].T.to(x.dtype)

    def forward(self, t, z, branch, norm):
        weight = self.generator.weight
        half = self.time_features // 2
        freqs = torch.exp(torch.linspace(0.0, math.log(self.max_frequency), half, device=weight.device, dtype=torch.float32))
        angles = t.to(device=weight.device, dtype=torch.float32)[..., None] * freqs
        gates = self.generator(torch.cat([angles.sin(), angles.cos()], -1).to(weight.dtype))
        if t.dim() == 0:
            self._gates = gates.view(len(self.down), -1)  # (linears, rank)
        else:  # t (batch, 1, 1): (linears, batch, 1, rank), one gate per sequence
            self._gates = gates.reshape(t.shape[0], 1, len(self.down), -1).movedim(2, 0)
        try:
            return branch(z)
        finally:
            self._gates = None

    def finish(self, z, norm):
        return norm(z)
