"""The ODE-BERT encoder: layers whose Add & Norm residuals are ODE solves.

`ResidualSite` is one Add & Norm residual (a branch G, its LayerNorm, a vector field and
a solve); `BertODELayer` is attention site then feed-forward site, optionally wrapped in
an ODE-Transformer block; `BertODEEncoder` applies ``num_hidden_layers`` layers (or one
layer that many times, with ``weight_tying``) and gathers the solver statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ode import ODESolve
from .stats import SolverStats
from .sublayers import AttentionBranch, FeedForwardBranch
from .vector_fields import build_vector_field


@dataclass
class Pass:
    """What one forward pass tells every site: where statistics go, which layer this is,
    and, in DEQ mode, the Q/K/V input injection and the dropout masks reused by every
    evaluation of the map during this forward (variational dropout)."""

    stats: SolverStats | None
    layer_index: int
    qkv_injection: torch.Tensor | None = None
    dropout_masks: dict | None = None


class ResidualSite(nn.Module):
    """x -> LN(x + G(x)) in discrete mode; in ODE mode, integrate the vector field over
    [l t_end, (l + 1) t_end] from x and apply the field's `finish` (e.g. the LayerNorm)."""

    def __init__(self, config, branch: nn.Module, name: str):
        super().__init__()
        self.name = name
        self.branch = branch
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.hidden_dropout = config.hidden_dropout_prob
        self.ode = config.mode == "ode"
        self.variational = config.mode == "deq"
        self.compiled_evaluate = None  # torch.compile(ResidualSite.evaluate), set by compile_model
        if self.ode:
            self.field = build_vector_field(config)
            self.solve = ODESolve.from_config(config)
            self.t_end = config.t_end
            self.fixed_steps = None if config.adaptive else config.steps

    def __getstate__(self):
        state = super().__getstate__()
        return {**state, "compiled_evaluate": None}  # copies and pickles are uncompiled

    def dynamics_parameters(self) -> list[nn.Parameter]:
        """Exactly the parameters the dynamics use (what an adjoint must differentiate)."""
        modules = [self.branch, self.field] + ([self.norm] if self.field.uses_norm else [])
        return [p for module in modules for p in module.parameters()]

    def evaluate(self, t: torch.Tensor, z: torch.Tensor, attn_mask: torch.Tensor | None,
                 keep: torch.Tensor | None) -> torch.Tensor:
        """dz/dt at (t, z): the vector field on this site's branch, with the solve's dropout
        mask ``keep`` (one evaluation; what ``compile_model(scope="fields")`` compiles)."""

        def branch(state):
            update = self.branch(state, attn_mask)
            return update if keep is None else update * keep

        return self.field(t, z, branch, self.norm)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, run: Pass) -> torch.Tensor:
        if not self.ode:
            update = self.branch(x, attn_mask, run.qkv_injection)
            if self.variational and run.dropout_masks is not None and self.training and self.hidden_dropout > 0:
                key = (run.layer_index, self.name)
                if key not in run.dropout_masks:
                    run.dropout_masks[key] = torch.empty_like(update).bernoulli_(1 - self.hidden_dropout) / (1 - self.hidden_dropout)
                update = update * run.dropout_masks[key]
            else:
                update = F.dropout(update, self.hidden_dropout, self.training)
            return self.norm(x + update)

        # One dropout mask per solve: the field stays one deterministic function of (t, z).
        keep = None
        if self.training and self.hidden_dropout > 0:
            keep = torch.empty_like(x).bernoulli_(1 - self.hidden_dropout).div_(1 - self.hidden_dropout)

        evaluate = self.compiled_evaluate or type(self).evaluate

        def dynamics(t, z):
            return evaluate(self, t, z, attn_mask, keep)

        record = run.stats.new_record(f"layer.{run.layer_index}.{self.name}", self.fixed_steps)
        t0 = run.layer_index * self.t_end
        z = self.solve(x, dynamics, self.dynamics_parameters(), t0, t0 + self.t_end, record)
        return self.field.finish(z, self.norm)


class BertODELayer(nn.Module):
    """Attention site then feed-forward site; with ``block`` set, one ODE-Transformer
    block step of the whole layer's increment F(y) = Layer(y) - y (see `schemes.py`)."""

    def __init__(self, config):
        super().__init__()
        self.attention = ResidualSite(config, AttentionBranch(config), "attention")
        self.feed_forward = ResidualSite(config, FeedForwardBranch(config), "feed_forward")
        self.block = config.block
        if self.block != "none":
            self.block_solve = ODESolve(solver=self.block, steps=1, loop=config.fixed_step_loop)
            self.hidden_size = config.hidden_size
        if self.block == "rk2_gated":
            self.gate = nn.Linear(2 * config.hidden_size, 1)
            self.gate._bertode_zero_init = True
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def layer(self, x, attn_mask, run: Pass):
        return self.feed_forward(self.attention(x, attn_mask, run), attn_mask, run)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, run: Pass) -> torch.Tensor:
        if self.block == "none":
            return self.layer(x, attn_mask, run)

        def increment(t, y):
            return self.layer(y, attn_mask, run) - y

        scheme_state = {"gate": self.gate, "hidden_size": self.hidden_size} if self.block == "rk2_gated" else None
        record = run.stats.new_record(f"layer.{run.layer_index}.block", 1)
        return self.block_solve(x, increment, list(self.parameters()), 0.0, 1.0, record, scheme_state)


class BertODEEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_applications = config.num_hidden_layers
        distinct = 1 if config.weight_tying else config.num_hidden_layers
        self.layer = nn.ModuleList(BertODELayer(config) for _ in range(distinct))
        self.stats = SolverStats()

    def solver_stats(self) -> dict:
        return self.stats.summary()

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor | None, output_hidden_states: bool = False):
        self.stats.reset()
        states = [hidden] if output_hidden_states else None
        for index in range(self.num_applications):
            layer = self.layer[index if len(self.layer) > 1 else 0]
            hidden = layer(hidden, attn_mask, Pass(self.stats, index))
            if states is not None:
                states.append(hidden)
        return hidden, (tuple(states) if states is not None else None)
