"""The ODE-BERT encoder: layers whose Add & Norm residuals are ODE solves.

`site.ResidualSite` is one Add & Norm residual (a branch G, its LayerNorm, and, in ODE mode,
a vector field and a solve); `BertODELayer` is attention site (a decoder's cross-attention site)
then feed-forward site, stepped by a block (`blocks.py`; ``none`` applies it once); `BertODEEncoder` applies
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
from ..solve.sensitivities import get_sensitivity
from ..solve.dial import current_dial
from ..solve.stats import SolveRecord, SolverStats
from . import kv_cache, segment_memory
from .blocks import BLOCKS, build_block
from .dropout import current_split, restored
from .loop import iterate, refuse_training_exit, valid_tokens
from .site import Pass, ResidualSite  # noqa: F401  (imported from here too)
from .sublayers import AttentionBranch, CrossAttentionBranch, CrossMemory, FeedForwardBranch


def replaying(checkpoint, function, *inputs):
    """``checkpoint(function, *inputs)`` (transformers' activation checkpointing), whose recomputation in the
    backward pass runs with the forward's dropout masks (the RNG state, restored by the checkpoint, and the
    row split, `dropout.restored`), the forward's segment memory, and under an observer that takes the forward's attention paths (eager or
    fused) but records nothing, so it is neither observed nor counted twice."""
    split, observer, memory = current_split(), observe.active(), segment_memory.active()
    replay = observer.replay() if observer is not None else None
    runs = []

    def run(*args):
        recomputing = bool(runs)
        runs.append(True)
        watching = (replay.replay() if replay is not None else None) if recomputing else observer
        with restored(split), observe.observing(watching), segment_memory.remembering(memory):
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
        # a splitting (block="strang", the Macaron layer): a first feed-forward half-step before the attention
        split = BLOCKS[config.block].splits_layer
        self.feed_forward_first = ResidualSite(config, FeedForwardBranch(config), "feed_forward_first", integrate,
                                               span=(0.0, 0.5)) if split else None
        self.attention = ResidualSite(config, AttentionBranch(config, attention_dropout), "attention", integrate)
        self.cross_attention = None
        if getattr(config, "add_cross_attention", False):
            self.cross_attention = ResidualSite(config, CrossAttentionBranch(config, attention_dropout),
                                                "cross_attention", integrate)
        self.feed_forward = ResidualSite(config, FeedForwardBranch(config), "feed_forward", integrate,
                                         span=(0.5, 1.0) if split else (0.0, 1.0))
        self.block = build_block(config)  # after the sites: their initialisation draws come first, as always

    def layer(self, x, attn_mask, run: Pass, records: list):
        if self.feed_forward_first is not None:
            x, record = self.feed_forward_first(x, attn_mask, run)
            records.append(record)
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
        if getattr(getattr(self, "config", None), "mem_len", 0):
            return kv_cache.config_refusal(self.config)
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
