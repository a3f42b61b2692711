"""Dropout masks that do not depend on how a batch is split across processes.

Every dropout in a bertode model (embeddings, hidden dropout at each residual, attention
probabilities) draws its mask through `keep_mask`. Outside `split_invariant` that is an
ordinary Bernoulli draw of the tensor's shape. Inside it, torch's random state is seeded
by the caller (and restored afterwards), each draw is made for the *global* batch
(``global_rows`` rows), and this process keeps its own rows (``rows``). Every process
makes the same draws in the same order (they run the same layers and, with fixed-step
solvers, the same number of evaluations), so row i gets the same mask whether one
process computes it or rank i % world of several: training with dropout gives the same
losses at any world size. `bertode.train` seeds with (seed, micro-batch index), so a
resumed run also redraws exactly the masks of the uninterrupted one.

The cost is drawing ``world`` times the local random numbers: cheap for hidden dropout,
but with attention dropout each evaluation draws a (global batch, heads, seq, seq) mask
(the shipped sizes set attention dropout to 0). The active split is one module global:
not for several threads running forwards at once (``nn.DataParallel``; use torchrun).
The draws use torch's global generator, which ``torch.compile`` traces (a compiled
model's masks differ from eager ones, but not across world sizes: every rank compiles
the same global-shaped draw).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class _Split:
    rows: torch.Tensor  # this process's rows of the global batch (long, on the device)
    global_rows: int


class _State:
    """The active split (a plain module global, not a ContextVar: torch.compile traces a
    read of it, with a guard, instead of breaking the graph at every dropout)."""

    split: _Split | None = None


_ACTIVE = _State()


@contextlib.contextmanager
def split_invariant(seed: int, rows: torch.Tensor, global_rows: int, device: torch.device | str = "cpu"):
    """Within this block, masks are drawn for ``global_rows`` rows from torch's generator
    seeded with ``seed`` (the state before is restored after), and ``rows`` (this
    process's global row indices) are kept."""
    device = torch.device(device)
    previous = _ACTIVE.split
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(int(seed) % 2**63)
        _ACTIVE.split = _Split(torch.as_tensor(rows, dtype=torch.long, device=device), int(global_rows))
        try:
            yield
        finally:
            _ACTIVE.split = previous


def current_split():
    """The active split (or None), to re-enter with `restored` (a checkpointed layer's
    recomputation in the backward pass draws the masks it drew in the forward)."""
    return _ACTIVE.split


@contextlib.contextmanager
def restored(split):
    previous = _ACTIVE.split
    _ACTIVE.split = split
    try:
        yield
    finally:
        _ACTIVE.split = previous


def splitting_rows() -> bool:
    """True inside `split_invariant`."""
    return _ACTIVE.split is not None


def keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """A mask of ``like``'s shape: 0 with probability ``p``, else ``1 / (1 - p)``."""
    split = _ACTIVE.split
    if split is None:
        return torch.empty_like(like).bernoulli_(1 - p).div_(1 - p)
    if like.shape[0] != len(split.rows):
        raise ValueError(f"split-invariant dropout: a tensor of {like.shape[0]} rows in a block for "
                         f"{len(split.rows)} rows of this process")
    full = torch.empty((split.global_rows, *like.shape[1:]), dtype=like.dtype, device=like.device).bernoulli_(1 - p)
    return full.index_select(0, split.rows.to(like.device)).div_(1 - p)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` whose mask comes from `keep_mask` inside `split_invariant`."""
    if not training or p == 0:
        return x
    if _ACTIVE.split is None:
        return F.dropout(x, p, True)
    return x * keep_mask(x, p)


class Dropout(nn.Dropout):
    """``nn.Dropout`` that honours `split_invariant` (the embeddings' dropout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
