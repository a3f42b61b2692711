"""Segment memory (``mem_len``, Transformer-XL's recurrence, Dai et al. 2019 section 3.2; the DEQ-Transformer's
``z_hist``): a causal LM reads a long text as consecutive segments, and each self-attention evaluation of a
segment also attends to states of the previous segment(s), kept without gradient.

What a layer remembers is the state its self-attention was first evaluated at in a forward (`SegmentMemory.enter`):

* discrete and ODE layers: the layer's input (an ODE site's state at its solve's start; every stage and step
  of the solve attends to the same remembered states of that layer; a block's first stage);
* a looped core: each application's input (application ``n`` remembers for application ``n``);
* a DEQ: the map's layer inputs at the equilibrium z* (the encoder evaluates the map once more at z*, with no
  gradient, and those inputs replace what the solve's iterates left), so the next segment's solve sees the
  previous segment's equilibrium, as the DEQ-Transformer's ``z_hist``.

Attention prepends the remembered states' keys and values (computed with the current weights, so the weights
get gradients through them; the states themselves get none), and the new tokens' positions continue after
them: the relative schemes (`positions.py`) see the distances across the boundary. The output's ``mems`` are,
per remembered layer, the last ``mem_len`` of (the old memory, this segment's states), detached; a model
given ``mem_len=0`` remembers nothing and computes what it did before.

The current memory is a module global, as the key/value cache's session (`kv_cache`): the model opens one
around its encoder's forward, and activation checkpointing's recomputation (`encoder.replaying`) reopens it.
"""

from __future__ import annotations

import contextlib

import torch


class SegmentMemory:
    """One forward's memory: ``past`` (a tuple of (batch, m, hidden) tensors, one per remembered layer, or
    None at a text's first segment) is read; this forward's states are collected for `updated`."""

    def __init__(self, past: tuple | list | None, mem_len: int):
        self.past = tuple(past) if past else ()
        self.mem_len = int(mem_len)
        self.length = self.past[0].shape[1] if self.past else 0  # remembered positions (0 at the first segment)
        self.layer: int | None = None  # the layer whose self-attention runs now (`enter`)
        self.new: dict[int, torch.Tensor] = {}

    def check(self, batch: int, width: int) -> None:
        """One line for memories that do not fit this forward (another batch size or width, or lengths that
        differ between layers). ``width``: hidden, or 4 x hidden where the states carry their Q/K/V injection."""
        for index, state in enumerate(self.past):
            if state.dim() != 3 or state.shape[0] != batch or state.shape[2] != width \
                    or state.shape[1] != self.length:
                raise ValueError(f"mems[{index}] of shape {tuple(state.shape)} is invalid; allowed: (batch={batch}, "
                                 f"{self.length}, {width}) tensors, one per layer, as the model's output "
                                 "`mems` returned them for the previous segment of the same rows")

    def enter(self, layer: int, hidden: torch.Tensor, injection: torch.Tensor | None = None) -> None:
        """Layer ``layer``'s self-attention is evaluated now at ``hidden`` (with a DEQ's Q/K/V ``injection``, which
        is remembered beside the states: the DEQ-Transformer's injection spans memory and segment): it reads that
        layer's memory, and the first state seen for that layer in this forward is what it remembers."""
        self.layer = layer
        if layer not in self.new:
            self.new[layer] = (hidden if injection is None else torch.cat([hidden, injection.to(hidden.dtype)], -1)).detach()

    def states(self) -> torch.Tensor | None:
        """The current layer's remembered states (batch, m, hidden), followed on the last axis by their Q/K/V
        injection (batch, m, 3 x hidden) under a DEQ's ``qkv`` injection; None at a text's first segment. A looped
        core whose previous segment ran fewer applications (per-token exit) reads its last application's."""
        if self.layer is None or not self.past:
            return None
        return self.past[min(self.layer, len(self.past) - 1)]

    def restart(self) -> None:
        """Forget this forward's states (a DEQ remembers its map's evaluation at z*, made after the solve)."""
        self.new = {}

    def updated(self) -> tuple:
        """Per remembered layer, the last ``mem_len`` positions of (past, this forward's states), detached. Where a
        looped core ran fewer applications in one of the two segments than in the other, the missing ones take its
        last application's states, so that every layer remembers as many positions."""
        layers = sorted(self.new)
        if layers != list(range(len(layers))):
            raise RuntimeError(f"segment memory recorded layers {layers}; expected 0 .. {len(layers) - 1}")
        out = []
        for index in range(max(len(layers), len(self.past))):
            state = self.new[min(index, len(layers) - 1)]
            if self.past:
                state = torch.cat([self.past[min(index, len(self.past) - 1)].to(state.dtype), state], dim=1)
            out.append(state[:, max(0, state.shape[1] - self.mem_len):].detach())
        return tuple(out)


def open_memory(config, mems, batch: int, width: int) -> SegmentMemory | None:
    """The segment memory of a forward given ``mems`` (None: a text's first segment), or None where the config's
    ``mem_len`` is 0; one line for mems the model cannot use."""
    mem_len = getattr(config, "mem_len", 0)
    if not mem_len:
        if mems:
            raise ValueError(f"mems is invalid with BertODEConfig.mem_len={mem_len}; allowed: None (set mem_len > 0 "
                             "for a segment memory)")
        return None
    reason = refusal(config)
    if reason is not None:
        raise ValueError(f"BertODEConfig.mem_len={mem_len} is invalid with {reason}; allowed: 0")
    memory = SegmentMemory(mems, mem_len)
    memory.check(batch, width * (4 if getattr(config, "mode", None) == "deq" and config.deq_injection == "qkv" else 1))
    return memory


def spanning(attention_mask: torch.Tensor | None, memory: SegmentMemory | None, length: int):
    """A padding mask over the new tokens only, extended over the remembered positions (all kept); one
    over both is kept as given."""
    if attention_mask is None or memory is None or not memory.length or attention_mask.shape[-1] != length:
        return attention_mask
    kept = attention_mask.new_ones(*attention_mask.shape[:-1], memory.length)
    return torch.cat([kept, attention_mask], dim=-1)


class _State:
    memory: SegmentMemory | None = None


_ACTIVE = _State()


def active() -> SegmentMemory | None:
    return _ACTIVE.memory


@contextlib.contextmanager
def remembering(memory: SegmentMemory | None):
    previous = _ACTIVE.memory
    _ACTIVE.memory = memory
    try:
        yield memory
    finally:
        _ACTIVE.memory = previous


def refusal(config) -> str | None:
    """Why a model of ``config`` cannot use a segment memory (a phrase), or None."""
    if not getattr(config, "is_decoder", False):
        return "is_decoder=False (a bidirectional model's tokens would attend to the memory and to later tokens)"
    scheme = getattr(config, "position_scheme", "absolute")
    if scheme not in ("transformer_xl", "rotary", "deberta") or getattr(config, "position_biased_input", False):
        return (f"position_scheme={scheme!r}{' with position_biased_input=True' if scheme == 'deberta' else ''} "
                "(absolute positions restart at 0 in every segment; the memory needs relative positions)")
    if getattr(config, "add_cross_attention", False):
        return "add_cross_attention=True (a decoder of an encoder-decoder model)"
    if getattr(config, "prelude_layers", 0) or getattr(config, "coda_layers", 0):
        # the core numbers its layers (applications) from 0 again: their memories would share the prelude's slots
        return (f"prelude_layers={config.prelude_layers}, coda_layers={config.coda_layers} (a memory per layer of a "
                "prelude-core-coda stack is not built yet)")
    return None
