"""One Add & Norm residual of a BERT layer: `ResidualSite`, and `Pass`, what one forward tells every site.

A site is a branch G (attention, cross-attention or feed-forward, `sublayers.py`), its LayerNorm and,
when it integrates (ODE mode), a vector field (`vector_fields.py`) and a solve (`solve/ode.py`):
x -> LN(x + G(x)) (pre-LN: x + G(LN(x))) when it does not, the field's ODE over [l t_end, (l + 1) t_end]
from x, then the field's `finish`, when it does. Hidden dropout draws one mask per solve (the field stays one
deterministic function of (t, z)), or reuses a DEQ forward's masks (``Pass.dropout_masks``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..solve import observe
from ..solve.ode import ODESolve
from ..solve.sensitivities import build_sensitivity
from . import segment_memory
from .dropout import dropout, keep_mask
from .regularizers import REGULARIZERS, augmented
from .sublayers import CrossMemory
from .vector_fields import build_vector_field


@dataclass
class Pass:
    """What one forward pass tells every site: which layer this is and, in DEQ mode, the
    Q/K/V input injection and the dropout masks reused by every evaluation of the map
    during this forward (variational dropout; ``None``: a fresh mask per call)."""

    layer_index: int
    qkv_injection: torch.Tensor | None = None
    dropout_masks: dict | None = None
    penalties: list | None = None  # (integrals, names) of each regularised solve (`regularizers.py`)
    steps: int | None = None  # an ODE site's fixed steps for this pass (the dialled depth; None: the config's)
    backprop: int | None = None  # differentiate the last k steps of each solve only (None: all)
    active: object | None = None  # `loop.ActiveTokens`: the tokens still iterating (None: all)
    cross: CrossMemory | None = None  # a decoder's encoder states and mask (None: no cross-attention this pass)


def ode_solve(config) -> ODESolve:
    """The solve every ODE site of this config uses (solver, sensitivity method, options)."""
    return ODESolve(config.solver, build_sensitivity(config), steps=config.steps, atol=config.atol, rtol=config.rtol,
                    ode_backend=config.ode_backend, fixed_step_loop=config.fixed_step_loop)


IDENTITY = nn.Identity()


class ResidualSite(nn.Module):
    """x -> LN(x + G(x)) (pre: x + G(LN(x))) when it does not integrate; otherwise integrate the vector field
    over [l t_end, (l + 1) t_end] from x and apply the field's `finish` (e.g. the LayerNorm).

    ``span`` (a, b): the part of the layer's time interval this site covers, [(l + a) t_end, (l + b) t_end];
    not integrating, the update is scaled by b - a (LN(x + (b - a) G(x)), one Euler step over the span). A
    Strang-split (Macaron) layer's feed-forward halves cover (0, 1/2) and (1/2, 1)."""

    def __init__(self, config, branch: nn.Module, name: str, integrate: bool, span: tuple = (0.0, 1.0)):
        super().__init__()
        self.name = name
        self.span = (float(span[0]), float(span[1]))
        self.scale = self.span[1] - self.span[0]  # the discrete update's weight (1 for a whole-interval site)
        self.branch = branch
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.hidden_dropout = config.hidden_dropout_prob
        # pre: x + G(LN(x)); an ODE field then sees the branch G(LN(.)) and no norm of its own
        self.pre_norm = getattr(config, "norm_position", "post") == "pre"
        self.ode = integrate
        self.compiled_evaluate = None  # torch.compile(ResidualSite.evaluate), set by compile_model
        if integrate:
            self.field = build_vector_field(config)
            self.field.bind(branch)
            self.solve = ode_solve(config)
            self.t_end = config.t_end
            self.regularizer = REGULARIZERS[config.regularizer]()

    def __getstate__(self):
        state = super().__getstate__()
        return {**state, "compiled_evaluate": None}  # copies and pickles are uncompiled

    def dynamics_parameters(self) -> list[nn.Parameter]:
        """Exactly the parameters the dynamics use (what an adjoint must differentiate)."""
        modules = [self.branch, self.field] + ([self.norm] if self.field.uses_norm or self.pre_norm else [])
        shared = getattr(getattr(self.branch, "positions", None), "shared_parameters", None)  # DeBERTa's table
        return [p for module in modules for p in module.parameters()] + (list(shared()) if shared else [])

    def evaluate(self, t: torch.Tensor, z: torch.Tensor, attn_mask: torch.Tensor | None,
                 keep: torch.Tensor | None) -> torch.Tensor:
        """dz/dt at (t, z): the vector field on this site's branch, with the solve's dropout
        mask ``keep`` (one evaluation; what ``compile_model(scope="fields")`` compiles)."""

        def branch(state):
            update = self.branch(self.norm(state) if self.pre_norm else state, attn_mask)
            return update if keep is None else update * keep

        return self.field(t, z, branch, self.field_norm())

    def field_norm(self) -> nn.Module:
        """The norm the vector field sees: the site's (post) or none (pre: it is in the branch)."""
        return IDENTITY if self.pre_norm else self.norm

    def _dropout(self, update: torch.Tensor, run: Pass) -> torch.Tensor:
        if not (self.training and self.hidden_dropout > 0):
            return update
        if run.dropout_masks is None:
            return dropout(update, self.hidden_dropout, True)
        key = (run.layer_index, self.name)
        if key not in run.dropout_masks:
            run.dropout_masks[key] = keep_mask(update, self.hidden_dropout)
        return update * run.dropout_masks[key]

    def _active_rows(self, x: torch.Tensor, attn_mask: torch.Tensor | None, run: Pass) -> torch.Tensor:
        """The discrete residual computed for the active tokens only (exited ones keep ``x``): the
        feed-forward branch, and the attention's query and output projections, run on those rows;
        every token still supplies keys and values."""
        active = run.active
        if getattr(self.branch, "per_token", False):
            rows = active.gather(x)
            update = self.branch(self.norm(rows) if self.pre_norm else rows)
        else:
            update = self.branch(self.norm(x) if self.pre_norm else x, attn_mask, run.qkv_injection, active=active)
            rows = active.gather(x)
        if self.training and self.hidden_dropout > 0:
            if run.dropout_masks is None:
                update = dropout(update, self.hidden_dropout, True)
            else:
                key = (run.layer_index, self.name)
                if key not in run.dropout_masks:
                    run.dropout_masks[key] = keep_mask(x, self.hidden_dropout)
                update = update * active.gather(run.dropout_masks[key])
        update = self._scaled(update)
        rows = rows + update if self.pre_norm else self.norm(rows + update)
        return active.scatter(x, rows)

    def _scaled(self, update: torch.Tensor) -> torch.Tensor:
        return update if self.scale == 1.0 else update * self.scale

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, run: Pass):
        """(output, the solve's `SolveRecord` or None)."""
        observer = observe.active()
        if observer is not None:
            observer.layer = run.layer_index
        memory = segment_memory.active()
        if memory is not None and getattr(self.branch, "positional", False):  # self-attention reads (and fills) it
            memory.enter(run.layer_index, x, run.qkv_injection)
        if not self.ode and run.active is not None:
            return self._active_rows(x, attn_mask, run), None
        if not self.ode:
            if self.pre_norm:
                return x + self._scaled(self._dropout(self.branch(self.norm(x), attn_mask, run.qkv_injection), run)), None
            update = self._scaled(self._dropout(self.branch(x, attn_mask, run.qkv_injection), run))
            return self.norm(x + update), None

        # One dropout mask per solve: the field stays one deterministic function of (t, z).
        keep = None
        if self.training and self.hidden_dropout > 0:
            keep = _in_compute_dtype(keep_mask(x, self.hidden_dropout))

        evaluate = self.compiled_evaluate or type(self).evaluate

        def dynamics(t, z):
            return evaluate(self, t, z, attn_mask, keep)

        t0 = (run.layer_index + self.span[0]) * self.t_end
        t1 = t0 + self.scale * self.t_end  # (a whole-interval site: t0 + t_end, as before spans)
        name = f"layer.{run.layer_index}.{self.name}"
        if observer is not None:
            observer.begin(name, t0, x)
        regularizer = self.regularizer
        if regularizer.names and run.penalties is not None and self.training and torch.is_grad_enabled():
            # The penalties' integrals ride along as extra channels of the state (RNODE).
            # Rademacher probes drawn as dropout masks are (keep_mask(p=1/2) - 1): inside `split_invariant`
            # from each row's own stream, so a row's probe does not depend on how the batch is split.
            noise = keep_mask(x, 0.5).sub_(1) if regularizer.uses_jacobian else None
            width = x.shape[-1]
            state = torch.cat([x, x.new_zeros(*x.shape[:-1], len(regularizer.names))], -1)
            state, record = self.solve(state, augmented(dynamics, regularizer, noise, width),
                                       self.dynamics_parameters, t0, t1, name, run.steps, run.backprop)
            z = state[..., :width]
            run.penalties.append((state[..., width:], regularizer.names))
        else:
            z, record = self.solve(x, dynamics, self.dynamics_parameters, t0, t1, name, run.steps, run.backprop)
        out = self.field.finish(z, self.field_norm())
        if observer is not None:
            observer.end(t1, z, lambda state: self.field.finish(state, self.field_norm()), out)
        return out, record


def _in_compute_dtype(mask: torch.Tensor) -> torch.Tensor:
    """A dropout mask in the dtype the branch computes in: under autocast, the autocast dtype
    (the branch's output is bf16 there, so an fp32 mask would promote every product and keep
    an fp32 copy for backward where HF BERT's dropout keeps one in bf16; 1/(1-p) rounds the
    same way as HF's bf16 dropout)."""
    device_type = mask.device.type
    if torch.is_autocast_enabled(device_type):
        return mask.to(torch.get_autocast_dtype(device_type))
    return mask
