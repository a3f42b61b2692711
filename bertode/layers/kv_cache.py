"""Key/value caches for incremental decoding, in every mode where caching is exact.

A causal layer's attention at position i reads keys and values of positions <= i only, so
the past's keys and values never depend on new tokens. bertode evaluates attention more
than once per layer (each stage of each step of a fixed-step ODE solve, each stage of a
block, each application of a looped core), and every evaluation sees a different state:
the cache therefore holds one entry per attention *evaluation* of a forward, a "slot",
numbered in the order the forward runs them. Slot n of the next forward is the same
evaluation as slot n of this one (same layer, stage and step), so it appends the new
tokens' keys and values to the past's and attends over both. transformers' `Cache`
classes hold the slots as their layers (`DynamicCache` grows as many as needed), so
beam-search reordering, cropping and `generate` work unchanged.

Where the evaluation order depends on the sequence (adaptive and per-sequence solvers,
per-token exit) a cache would be wrong: `caching_refusal` says why, and the model refuses
``use_cache=True`` in one line. A DEQ solves the new tokens' equilibrium against the
past's cached keys and values, reading them at every iteration (``appending`` off) and
appending the new tokens' once, from one evaluation of the map at z* (`deq.py`). The
past's equilibrium is the one its own solve reached, so the cache is exact to the solve's
tolerance.

The current session is a plain module global, as the observer is (`solve/observe.py`):
the model opens one around its encoder's forward; every attention branch reads it.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.utils import logging

logger = logging.get_logger(__name__)


class CacheSession:
    """One forward's use of a transformers ``cache``: ``past`` cached positions, and the slot the
    next attention evaluation (self- or cross-attention, counted apart) reads and writes."""

    def __init__(self, cache: Cache):
        self.cache = cache
        cross = isinstance(cache, EncoderDecoderCache)
        self.self_cache = cache.self_attention_cache if cross else cache
        self.cross_cache = cache.cross_attention_cache if cross else None
        refuse_fixed_length(cache, self.self_cache, self.cross_cache)
        self.past = filled_length(self.self_cache)
        self.filled = sum(1 for layer in self.self_cache.layers if _holds(layer))
        self.slot = self.cross_slot = 0
        self.map_start = 0  # the slot a DEQ's map starts at (after any prelude layers)
        self.appending = True  # False: read the past, keep this evaluation's keys and values out of the cache

    def rewind(self) -> None:
        """The next evaluation is the map's first slot again (each evaluation of a DEQ's map reads the same slots)."""
        self.slot = self.map_start

    def keys_values(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, heads, new, head_size) keys and values of this evaluation -> the past's followed by them."""
        slot, self.slot = self.slot, self.slot + 1
        if self.past and slot >= self.filled:  # before anything is written: the cache stays as it was
            self.refuse(more=True)
        layer = _slot(self.self_cache, slot)
        if self.appending:
            return self.self_cache.update(keys, values, slot)
        if not _holds(layer):
            return keys, values
        return torch.cat([layer.keys, keys], dim=-2), torch.cat([layer.values, values], dim=-2)

    def cross_keys_values(self, compute) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's keys and values of this cross-attention evaluation: computed once (``compute()``)
        at the first forward, read from the cache after; without an encoder-decoder cache, computed."""
        if self.cross_cache is None:
            return compute()
        slot, self.cross_slot = self.cross_slot, self.cross_slot + 1
        layer = _slot(self.cross_cache, slot)
        if _holds(layer):
            return layer.keys, layer.values
        keys, values = compute()
        if not self.appending:
            return keys, values
        self.cache.is_updated[slot] = True
        return self.cross_cache.update(keys, values, slot)

    def check_complete(self) -> None:
        """After the forward: a cache filled by an earlier forward must have been read by as many attention
        evaluations as it holds, or the calls disagree on depth, solver or steps (`refuse`)."""
        if self.past and self.slot != self.filled:
            self.refuse(more=False)

    def refuse(self, more: bool) -> None:
        """One line; first the slots this forward extended are cut back to the past, so the cache holds what it
        held before the call."""
        for layer in self.self_cache.layers[:self.filled]:
            extra = layer.get_seq_length() - self.past
            if extra > 0:
                layer.crop(-extra)  # (transformers' crop counts from the end)
        ran = "more" if more else str(self.slot)
        raise ValueError(f"cache holds the keys and values of {self.filled} attention evaluations, but this forward "
                         f"ran {ran}; allowed: the same depth, solver, steps and block in every call that shares a "
                         "cache (or a new cache)")


def open_session(model, cache, use_cache, encoder_hidden_states) -> CacheSession | None:
    """The key/value cache ``model``'s forward reads and extends (a decoder's, as HF's BERT: ``use_cache`` defaults to
    ``config.use_cache``, and a new cache is made when none is given), or None; refused in one line where the
    encoder says caching would not be exact, or with activation checkpointing while training (HF's rule:
    then no cache, with a warning)."""
    if not model.config.is_decoder:
        return None
    asked = use_cache is True or (use_cache is None and cache is not None)
    if not (asked or (use_cache is None and model.config.use_cache)):
        return None
    checkpointing = getattr(type(model), "is_activation_checkpointing", None)
    checkpointing = checkpointing.__get__(model) if checkpointing is not None else model.is_gradient_checkpointing
    if checkpointing and model.training:
        logger.warning_once("use_cache=True is incompatible with activation checkpointing; using no cache")
        return None
    refusal = model.encoder.caching_refusal() if hasattr(model.encoder, "caching_refusal") else None
    if refusal is not None:
        if not asked:  # the config's default: no cache, silently
            return None
        raise ValueError(f"use_cache=True is invalid with {refusal}; allowed: use_cache=False, or a fixed-step "
                         "solver without per-token exit (a key/value cache must see the same evaluations at every "
                         "call)")
    if cache is None:
        cache = new_cache(encoder_hidden_states is not None and model.config.add_cross_attention)
    return CacheSession(cache)


def refuse_fixed_length(cache: Cache, *parts: Cache | None) -> None:
    """One line for a cache whose layers have a fixed length (`StaticCache`, ``generate(cache_implementation=
    "static")``, sliding windows): it is sized for ``num_hidden_layers`` layers and a maximum length, where
    bertode needs one growing slot per attention evaluation (`_slot`) and masks over the cached positions only."""
    for part in parts:
        fixed = [layer for layer in (part.layers if part is not None else ()) if not isinstance(layer, DynamicLayer)]
        if fixed:
            raise ValueError(f"cache={type(cache).__name__} is invalid: its layers ({type(fixed[0]).__name__}) have a "
                             "fixed length; allowed: a DynamicCache (generate's default, one growing slot per "
                             "attention evaluation), or an EncoderDecoderCache of two")


def config_refusal(config) -> str | None:
    """Why a model of ``config`` cannot cache keys and values exactly (a phrase naming the setting), or None:
    an adaptive solver chooses its step grid, hence its attention evaluations, from the whole sequence; a
    segment memory (``mem_len``) takes the cache's place."""
    if getattr(config, "mem_len", 0):
        return f"mem_len={config.mem_len} (a segment memory; pass the output's mems instead)"
    if config.mode != "ode":
        return None
    from ..solve.solvers import get_solver

    spec = get_solver(config.solver) if isinstance(config.solver, str) or config.solver is None else None
    if spec is not None and spec.adaptive:
        return f"solver={spec.name!r} (adaptive: its step grid depends on the whole sequence)"
    return None


def filled_length(cache: Cache) -> int:
    """Cached positions (0 for an empty cache), read off its first slot."""
    return cache.layers[0].get_seq_length() if cache.layers and _holds(cache.layers[0]) else 0


def _holds(layer) -> bool:
    return getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel() > 0


def _slot(cache: Cache, slot: int):
    """The cache's layer for ``slot``; a `DynamicCache` built for ``num_hidden_layers`` layers (as ``generate``
    builds it) grows to the number of attention evaluations. Other caches are refused in one line."""
    if slot >= len(cache.layers):
        if not isinstance(cache, DynamicCache):
            raise ValueError(f"cache={type(cache).__name__} is invalid: it has {len(cache.layers)} layers and this "
                             f"model evaluates attention more often per forward; allowed: a DynamicCache")
        while len(cache.layers) <= slot:
            cache.layers.append(DynamicLayer())
    return cache.layers[slot]


def new_cache(cross_attention: bool) -> Cache:
    """A growing cache (and for a decoder with cross-attention, a second one for the encoder's keys and values)."""
    return EncoderDecoderCache(DynamicCache(), DynamicCache()) if cross_attention else DynamicCache()


class _State:
    session: CacheSession | None = None


_ACTIVE = _State()


def active() -> CacheSession | None:
    return _ACTIVE.session


@contextlib.contextmanager
def caching(session: CacheSession | None):
    previous = _ACTIVE.session
    _ACTIVE.session = session
    try:
        yield session
    finally:
        _ACTIVE.session = previous


@contextlib.contextmanager
def appending(flag: bool):
    """Within: the active session's evaluations do (True) or do not (False) append to the cache."""
    session = _ACTIVE.session
    if session is None:
        yield
        return
    previous, session.appending = session.appending, flag
    try:
        yield
    finally:
        session.appending = previous
