"""A prelude and a coda around the iterated core (Huginn's prelude/core/coda; Geiping et al. 2025).

`PreludeCodaEncoder` is the encoder of a config with ``prelude_layers`` or ``coda_layers``
(`deq.build_encoder`): ``prelude_layers`` discrete, untied `BertODELayer`s (``encoder.prelude.{i}``),
then the mode's own encoder over the remaining ``num_hidden_layers - prelude_layers - coda_layers``
layers (``encoder.core``: its own names, e.g. ``encoder.core.layer.0``, a DEQ's
``encoder.core.injection``; it is built from a copy of the config that has no prelude or coda,
so a DEQ or a looped core sees only its layers and numbers them from 0), then ``coda_layers``
discrete, untied layers (``encoder.coda.{i}``).

The core keeps its meaning: its solves, its penalty, its skipped batch, its statistics, its
counters and its policy (attention reported at the first or last evaluation, the checkpointing
refusal, the gradient rollback) are the encoder's. While the core runs, the depth dial's
``on_iterate`` and ``readout`` (`bertode.solve.dial`) see the coda applied, so per-iterate curves
and the ``kl`` exit criterion read the whole model's output. Attentions are reported per layer of
the whole stack (prelude, core, coda), in that order.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ..solve import observe
from ..solve.dial import current_dial, dialed
from ..solve.stats import SolverStats
from .encoder import BertODELayer, Encoder, EncoderOutput, Pass
from .sublayers import AttentionBranch

# What the model, the tests and the tools read of an encoder that is the core's (beside the properties below).
DELEGATED = ("counters", "ode_penalty", "jac_weight", "jac_loss", "last_forward_info", "last_backward_info")


def core_config(config):
    """A validated copy of ``config`` for the core: its own layers only, no prelude, no coda."""
    core = copy.deepcopy(config)
    core.num_hidden_layers = config.num_hidden_layers - config.prelude_layers - config.coda_layers
    core.prelude_layers = core.coda_layers = 0
    core.validate_ode()
    return core


@contextlib.contextmanager
def _observed_apart(observer, place):
    """Run the block under a fresh observer making ``observer``'s choices; afterwards its attentions (a
    decoder's cross-attentions too) go into ``observer`` under the layers ``place(layers)`` gives (a dict),
    its solves after ``observer``'s."""
    if observer is None:
        yield None
        return
    child = observe.Observer(attentions=observer.wants_attentions, trajectory=observer.wants_trajectory,
                             keep=observer.keep)
    with observe.observing(child):
        yield child
    moved = place(sorted(child._attentions))  # a layer's cross-attention is kept under its self-attention's
    for kept, into in ((child._attentions, observer._attentions), (child._cross, observer._cross)):
        for layer, new in moved.items():
            if layer in kept:
                into[new] = kept[layer]
    observer.solves.extend(child.solves)


class PreludeCodaEncoder(Encoder):
    """Prelude layers, the mode's encoder (``encoders[config.mode]``), coda layers."""

    def __init__(self, config, encoders: dict):
        super().__init__()
        self.config = config
        self.prelude = nn.ModuleList(BertODELayer(config, integrate=False) for _ in range(config.prelude_layers))
        self.core = encoders[config.mode](core_config(config))
        for module in self.core.modules():  # attention reads the model's config at call time (attn_implementation)
            if isinstance(module, AttentionBranch):
                module.config = config
        self.coda = nn.ModuleList(BertODELayer(config, integrate=False) for _ in range(config.coda_layers))
        self.last_stats = SolverStats()

    # --- what the model asks of an encoder: the core's -----------------------------------------
    @property
    def observed_attention(self) -> str:
        return self.core.observed_attention

    @property
    def layer(self) -> nn.ModuleList:
        """The core's layers (what ``from_bert``'s weight normalisation and `bertode.analysis` index)."""
        return self.core.layer

    @property
    def skipped_batches(self):
        return self.core.skipped_batches

    def __getattr__(self, name: str):
        if name in DELEGATED:
            return getattr(self._modules["core"], name)
        return super().__getattr__(name)

    def checkpointing_refusal(self) -> str | None:
        return self.core.checkpointing_refusal()

    def rollback_guard(self, parameters):
        return self.core.rollback_guard(parameters)

    def caching_refusal(self) -> str | None:
        return self.core.caching_refusal()

    def solver_stats(self) -> dict:
        running = self.core.counters() if hasattr(self.core, "counters") else {}  # a DEQ's, now
        return SolverStats(self.last_stats.records, {**self.last_stats.counters, **running}).summary()

    # --- forward -------------------------------------------------------------------------------
    def _coda_index(self, i: int) -> int:
        """The coda layer's index in the whole stack, as configured (block record names)."""
        return self.config.num_hidden_layers - len(self.coda) + i

    def _stack(self, layers, first_index, hidden, attn_mask, records: list, states: list | None, cross=None):
        for i, layer in enumerate(layers):
            # checkpointed by the layer itself when enabled (`encoder.replaying`), as the core's
            hidden, new = layer(hidden, attn_mask, Pass(first_index + i, cross=cross))
            records.extend(new)
            if states is not None:
                states.append(hidden)
        return hidden

    def apply_coda(self, hidden: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """The coda on ``hidden``, observed and counted nowhere (what the dial's callables see)."""
        with observe.observing(None):
            return self._stack(self.coda, self._coda_index(0), hidden, attn_mask, [], None)

    def _dial_through_coda(self, attn_mask, like: torch.Tensor) -> dict:
        """The current dial's ``on_iterate`` and ``readout`` (those set), composed after the coda."""
        dial, changes = current_dial(), {}

        def coda(hidden):
            if hidden.shape != like.shape and hidden.numel() == like.numel():  # a flat iterate
                hidden = hidden.reshape(like.shape)
            return self.apply_coda(hidden.to(like.dtype), attn_mask)

        if dial.on_iterate is not None:
            on_iterate = dial.on_iterate
            changes["on_iterate"] = lambda n, hidden: on_iterate(n, coda(hidden))
        if dial.readout is not None:
            readout = dial.readout
            changes["readout"] = lambda hidden: readout(coda(hidden))
        return changes

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor | None,
                output_hidden_states: bool = False, cross=None) -> EncoderOutput:
        """The prelude, the core, the coda; the core's penalty, skipped flag and counters (``cross``: a decoder's
        encoder states, `sublayers.CrossMemory`)."""
        states = [hidden] if output_hidden_states else None
        records: list = []
        observer = observe.active()
        hidden = self._stack(self.prelude, 0, hidden, attn_mask, records, states, cross)
        start = len(self.prelude)
        with _observed_apart(observer, lambda layers: {k: start + k for k in layers}), \
                dialed(**self._dial_through_coda(attn_mask, hidden)):
            core = self.core(hidden, attn_mask, output_hidden_states, *([cross] if cross is not None else []))
        if core.skipped:
            self.last_stats = core.stats
            return core
        if states is not None:
            states.extend(core.states[1:])  # the core's first state is the prelude's last
        records.extend(core.stats.records)
        after_core = max(observer._attentions, default=start - 1) + 1 if observer is not None else 0
        with _observed_apart(observer, lambda layers: {k: after_core + i for i, k in enumerate(layers)}):
            hidden = self._stack(self.coda, self._coda_index(0), core.hidden, attn_mask, records, states, cross)
        stats = SolverStats(records, core.stats.counters)
        stats.exit_depths = getattr(core.stats, "exit_depths", None)
        self.last_stats = stats
        return EncoderOutput(hidden, tuple(states) if states is not None else None, stats, core.penalty)
