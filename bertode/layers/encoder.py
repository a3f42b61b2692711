"""The ODE-BERT encoder: layers whose Add & Norm residuals are ODE solves.

`ResidualSite` is one Add & Norm residual (a branch G, its LayerNorm, and, in ODE mode,
a vector field and a solve); `BertODELayer` is attention site then feed-forward site,
stepped by a block (`blocks.py`; ``none`` applies it once); `BertODEEncoder` applies
``num_hidden_layers`` layers (or one layer that many times, with ``weight_tying``).

`Encoder` is the contract every encoder keeps with the model and its heads (the DEQ's is
in `deq.py`): a forward returns an `EncoderOutput` (hidden states, the solves'
statistics, one penalty term already weighted for the loss, a skipped flag), and the
encoder answers what depends on its kind (which attention evaluation to report, whether
activation checkpointing saves anything, the gradient rollback of a skipped backward).

Nothing here reads ``config.mode``: whoever builds an encoder (`deq.build_encoder`) says
whether the sites integrate (``integrate``) and whether attention dropout may be drawn
per evaluation (``attention_dropout``); a DEQ forward hands the sites its dropout masks.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ..solve import observe
from ..solve.sensitivities import build_sensitivity, get_sensitivity
from ..solve.dial import current_dial
from ..solve.ode import ODESolve
from ..solve.stats import SolveRecord, SolverStats
from . import kv_cache
from .blocks import build_block
from .dropout import current_split, dropout, keep_mask, restored
from .loop import iterate, refuse_training_exit, valid_tokens
from .regularizers import REGULARIZERS, augmented
from .sublayers import AttentionBranch, CrossAttentionBranch, CrossMemory, FeedForwardBranch
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
    over [l t_end, (l + 1) t_end] from x and apply the field's `finish` (e.g. the LayerNorm)."""

    def __init__(self, config, branch: nn.Module, name: str, integrate: bool):
        super().__init__()
        self.name = name
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
        return [p for module in modules for p in module.parameters()]

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
        rows = rows + update if self.pre_norm else self.norm(rows + update)
        return active.scatter(x, rows)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, run: Pass):
        """(output, the solve's `SolveRecord` or None)."""
        observer = observe.active()
        if observer is not None:
            observer.layer = run.layer_index
        if not self.ode and run.active is not None:
            return self._active_rows(x, attn_mask, run), None
        if not self.ode:
            if self.pre_norm:
                return x + self._dropout(self.branch(self.norm(x), attn_mask, run.qkv_injection), run), None
            update = self._dropout(self.branch(x, attn_mask, run.qkv_injection), run)
            return self.norm(x + update), None

        # One dropout mask per solve: the field stays one deterministic function of (t, z).
        keep = None
        if self.training and self.hidden_dropout > 0:
            keep = _in_compute_dtype(keep_mask(x, self.hidden_dropout))

        evaluate = self.compiled_evaluate or type(self).evaluate

        def dynamics(t, z):
            return evaluate(self, t, z, attn_mask, keep)

        t0 = run.layer_index * self.t_end
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
                                       self.dynamics_parameters, t0, t0 + self.t_end, name, run.steps, run.backprop)
            z = state[..., :width]
            run.penalties.append((state[..., width:], regularizer.names))
        else:
            z, record = self.solve(x, dynamics, self.dynamics_parameters, t0, t0 + self.t_end, name, run.steps,
                                   run.backprop)
        out = self.field.finish(z, self.field_norm())
        if observer is not None:
            observer.end(t0 + self.t_end, z, lambda state: self.field.finish(state, self.field_norm()), out)
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


def replaying(checkpoint, function, *inputs):
    """``checkpoint(function, *inputs)`` (transformers' activation checkpointing), whose recomputation in the
    backward pass runs with the forward's dropout masks (the RNG state, restored by the checkpoint, and the
    row split, `dropout.restored`) and under an observer that takes the forward's attention paths (eager or
    fused) but records nothing, so it is neither observed nor counted twice."""
    split, observer = current_split(), observe.active()
    replay = observer.replay() if observer is not None else None
    runs = []

    def run(*args):
        recomputing = bool(runs)
        runs.append(True)
        watching = (replay.replay() if replay is not None else None) if recomputing else observer
        with restored(split), observe.observing(watching):
            return function(*args)

    return checkpoint(run, *inputs)


class BertODELayer(GradientCheckpointingLayer):
    """Attention site, (a decoder with ``add_cross_attention``) cross-attention site, then feed-forward site, stepped
    by the configured block; without encoder states the cross-attention site is skipped, as HF's. A transformers
    `GradientCheckpointingLayer`: ``activation_checkpointing_enable()`` (with its ``every_n_layers``,
    ``activation_checkpointing_kwargs``) checkpoints it, recomputed by `replaying`."""

    _checkpoint = None  # the checkpoint function transformers sets (as `_gradient_checkpointing_func`)

    @property
    def _gradient_checkpointing_func(self):
        return functools.partial(replaying, self._checkpoint)

    @_gradient_checkpointing_func.setter
    def _gradient_checkpointing_func(self, checkpoint):
        self._checkpoint = checkpoint

    @_gradient_checkpointing_func.deleter
    def _gradient_checkpointing_func(self):  # what mock.patch.object does to restore it
        self.__dict__.pop("_checkpoint", None)

    def __init__(self, config, integrate: bool = True, attention_dropout: float | None = None):
        super().__init__()
        self.attention = ResidualSite(config, AttentionBranch(config, attention_dropout), "attention", integrate)
        self.cross_attention = None
        if getattr(config, "add_cross_attention", False):
            self.cross_attention = ResidualSite(config, CrossAttentionBranch(config, attention_dropout),
                                                "cross_attention", integrate)
        self.feed_forward = ResidualSite(config, FeedForwardBranch(config), "feed_forward", integrate)
        self.block = build_block(config)

    def layer(self, x, attn_mask, run: Pass, records: list):
        x, record = self.attention(x, attn_mask, run)
        records.append(record)
        if self.cross_attention is not None and run.cross is not None:
            x, record = self.cross_attention(x, run.cross, run)  # the memory takes the mask's place
            records.append(record)
        x, record = self.feed_forward(x, attn_mask, run)
        records.append(record)
        return x

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, run: Pass):
        """(output, the records of every solve this layer ran)."""
        records: list = []
        if self.block.is_plain:
            out = self.layer(x, attn_mask, run, records)
        else:
            block_record = SolveRecord(f"layer.{run.layer_index}.block", fixed_steps=1)

            def layer(y):
                block_record.count_evaluation()
                return self.layer(y, attn_mask, run, records)

            out = self.block(layer, x)
            records.insert(0, block_record)
        return out, [r for r in records if r is not None]


@dataclass
class EncoderOutput:
    """What an encoder's forward gives the model (which passes it on to its heads): the last
    hidden state, the embeddings and every layer's output (``output_hidden_states``) or None,
    this forward's `SolverStats`, the loss's penalty term of this forward, already weighted
    (None: none), and whether the batch was skipped (``deq_on_nonfinite="skip"``: ``hidden``
    is then zeros with no path to any parameter, and the heads return a zero loss)."""

    hidden: torch.Tensor
    states: tuple | None
    stats: SolverStats
    penalty: torch.Tensor | None = None
    skipped: bool = False


class Encoder(nn.Module):
    """What the model asks of every encoder, beside ``forward`` (an `EncoderOutput`), ``solver_stats()`` and
    ``skipped_batches``; the defaults are those of an encoder that never skips."""

    observed_attention = "first"  # the evaluation whose attention ``output_attentions`` reports per layer

    def checkpointing_refusal(self) -> str | None:
        """Why per-layer activation checkpointing would save nothing here (a phrase), or None."""
        return None

    def rollback_guard(self, parameters):
        """A context for one forward of the model that owns ``parameters`` (a callable): if that forward's
        backward is skipped, its gradients are rolled back (the DEQ's; here nothing to do)."""
        return contextlib.nullcontext()

    def caching_refusal(self) -> str | None:
        """Why a key/value cache would not be exact for this forward (a phrase naming the setting), or None
        (`kv_cache`): per-token exit chooses each token's depth from the whole sequence."""
        exit_criterion = current_dial().exit
        if exit_criterion is not None:
            return f"exit={exit_criterion.registry_name!r} (per-token exit)"
        return None


class BertODEEncoder(Encoder):
    """``num_hidden_layers`` layers whose residuals are ODE solves (``integrate``) or BERT's (discrete).

    With ``weight_tying`` the one layer is a looped core: the dialled depth (`bertode.dialed`) is
    its number of applications, run by `loop.iterate` (truncated backpropagation, per-token
    exit, per-iterate reports), and ``core_injection="add"`` feeds it z + U e at every
    application, from z = 0. Untied, the dialled depth is each ODE solve's fixed steps."""

    def __init__(self, config, integrate: bool):
        from .init import identity_init

        super().__init__()
        self.config = config
        self.integrate = integrate
        self.num_applications = config.num_hidden_layers
        distinct = 1 if config.weight_tying else config.num_hidden_layers
        self.layer = nn.ModuleList(BertODELayer(config, integrate) for _ in range(distinct))
        self.injection = None
        if getattr(config, "core_injection", None) == "add":
            self.injection = nn.Linear(config.hidden_size, config.hidden_size)
            identity_init(self.injection)
        self.last_stats = SolverStats()
        self.ode_penalty = None  # the regularisers' integrals of the latest forward, unweighted (`regularizers.py`)
        self.skipped_batches = 0  # what `Encoder` users read; an ODE encoder never skips

    def solver_stats(self) -> dict:
        return self.last_stats.summary()

    def checkpointing_refusal(self) -> str | None:
        sensitivity = self.config.sensitivity
        if self.integrate and get_sensitivity(sensitivity).reevaluates_field:
            return (f"sensitivity={sensitivity!r}: the adjoint keeps no activations of the solve (memory is "
                    "already constant in its steps)")
        return None

    def caching_refusal(self) -> str | None:
        refusal = super().caching_refusal()
        if refusal or not self.integrate:
            return refusal
        if self.layer[0].attention.solve.spec.adaptive:
            return kv_cache.config_refusal(self.config)
        sensitivity = self.config.sensitivity
        if get_sensitivity(sensitivity).reevaluates_field and torch.is_grad_enabled():
            return f"sensitivity={sensitivity!r} with gradients on (its backward re-evaluates attention without the cache)"
        return None

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor | None,
                output_hidden_states: bool = False, cross: CrossMemory | None = None) -> EncoderOutput:
        """This forward's output; its penalty: ``regularizer_weight`` times the regularisers' integrals.
        ``cross``: the encoder's states a decoder cross-attends to."""
        stats = SolverStats()
        states = [hidden] if output_hidden_states else None
        penalties: list = []
        dial = current_dial()

        def apply(layer, x, run):
            x, records = layer(x, attn_mask, run)  # checkpointed by the layer itself, when enabled
            stats.records.extend(records)
            return x

        if self.config.weight_tying:
            hidden = self._loop(hidden, attn_mask, dial, apply, penalties, states, stats, cross)
        else:
            for index in range(self.num_applications):
                hidden = apply(self.layer[index], hidden, Pass(index, penalties=penalties, steps=dial.depth,
                                                               backprop=dial.backprop, cross=cross))
                if states is not None:
                    states.append(hidden)
        self.ode_penalty = None
        if penalties:
            self.ode_penalty = sum(integrals.float().mean() for integrals, _ in penalties)
            for integrals, names in penalties:  # logged: summed over sites, mean over batch and tokens
                for channel, name in enumerate(names):
                    stats.counters[name] = stats.counters.get(name, 0.0) + integrals[..., channel].float().mean().item()
            del penalties[:]  # a checkpointed layer's recomputation appends again: nothing keeps those
        self.last_stats = stats
        penalty = self.config.regularizer_weight * self.ode_penalty if self.ode_penalty is not None else None
        return EncoderOutput(hidden, tuple(states) if states is not None else None, stats, penalty)

    def _loop(self, hidden, attn_mask, dial, apply, penalties, states, stats, cross=None):
        """The looped core: the tied layer applied the dialled number of times (`loop.iterate`)."""
        refuse_training_exit(dial.exit, self)
        depth = dial.steps(self.num_applications)
        injected = self.injection(hidden) if self.injection is not None else None
        z0 = torch.zeros_like(hidden) if injected is not None else hidden
        count = [0]

        def step(z, active):
            index, count[0] = count[0], count[0] + 1
            return apply(self.layer[0], z + injected if injected is not None else z,
                         Pass(index, penalties=penalties, active=active, cross=cross))

        def on_iterate(n, z):
            if states is not None:
                states.append(z)
            if dial.on_iterate is not None:
                dial.on_iterate(n, z)

        valid = valid_tokens(attn_mask, hidden.shape)
        result = iterate(step, z0, depth, graph_from=dial.graph_from(depth), criterion=dial.exit,
                         readout=dial.readout, on_iterate=on_iterate, valid=valid)
        stats.counters.update(depth=result.iterations, **result.exit_summary(valid))
        stats.exit_depths = result.exit_depths
        return result.state
