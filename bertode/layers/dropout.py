"""Dropout masks that do not depend on how a batch is split across processes.

Every dropout in a bertode model (embeddings, hidden dropout at each residual, attention
probabilities) draws its mask through `keep_mask`. Outside `split_invariant` that is an
ordinary Bernoulli draw of the tensor's shape (and `dropout` is exactly ``F.dropout``).
Inside it, each row's mask comes from that row's own counter-based stream: a splitmix64
hash of (the block's seed, the draw's index in the block, the row's *global* index, the
element's index), written in torch integer ops and computed on the device for this
process's rows only. Every process makes the same draws in the same order (they run the
same layers and, with fixed-step solvers, the same number of evaluations), so row i gets
the same mask whether one process computes it or rank i % world of several: training
with dropout gives the same losses at any world size. `bertode.train` seeds with (seed,
micro-batch index), so a resumed run also redraws exactly the masks of the uninterrupted
one. The masks neither read nor advance torch's generator (`split_invariant` still seeds
it, for the block's other random draws, and restores it after).

The cost is O(local rows): a dozen elementwise int64 passes over half the local mask (two
elements per 64-bit hash) in eager mode, about torch's own Bernoulli draw on a CPU, and
one fused kernel under ``torch.compile``; the same at any world size
(``scripts/bench_dropout.py``; the draw used to be made for the global batch and sliced:
``world`` times the work). The draw counter is a device tensor advanced in place, so
``torch.compile`` traces it without guarding on its value, and compiled masks equal
eager ones. `current_split` snapshots the counter and `restored` re-enters it: a
checkpointed layer's recomputation redraws the forward's masks. The active split is
one module global: not for several threads running forwards at once
(``nn.DataParallel``; use torchrun).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GAMMA = _signed(0x9E3779B97F4A7C15)  # splitmix64's increment (the golden ratio)
_ROW_GAMMA = _signed(0xD1B54A32D192ED03)  # another odd constant: row r's stream starts apart from draw d's
_MUL1, _MUL2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _mix64_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, in place on an int64 tensor (multiplication wraps modulo
    2**64; the masks make torch's sign-extending ``>>`` a logical shift)."""
    z ^= (z >> 30) & ((1 << 34) - 1)
    z *= _MUL1
    z ^= (z >> 27) & ((1 << 37) - 1)
    z *= _MUL2
    z ^= (z >> 31) & ((1 << 33) - 1)
    return z


def mix64(value: int) -> int:
    """`_mix64_` on a Python int (the seed's premix; the tests' reference)."""
    z = value & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass
class _Split:
    rows: torch.Tensor  # this process's rows of the global batch (long, on the device)
    global_rows: int
    key: torch.Tensor  # the premixed seed (0-d int64 on the device)
    draws: torch.Tensor  # draws made so far in this block (0-d int64, advanced in place)

    def copy(self) -> "_Split":
        return _Split(self.rows, self.global_rows, self.key, self.draws.clone())


class _State:
    """The active split (a plain module global, not a ContextVar: torch.compile traces a
    read of it, with a guard, instead of breaking the graph at every dropout)."""

    split: _Split | None = None


_ACTIVE = _State()


@contextlib.contextmanager
def split_invariant(seed: int, rows: torch.Tensor, global_rows: int, device: torch.device | str = "cpu"):
    """Within this block, each row's masks come from the stream of (``seed``, draw, global
    row): ``rows`` are this process's global row indices (in the order of its batch), out
    of ``global_rows``. Torch's generator is seeded with ``seed`` too (its state before is
    restored after)."""
    device = torch.device(device)
    rows = torch.as_tensor(rows, dtype=torch.long, device=device)
    if rows.ndim != 1 or (len(rows) and not 0 <= int(rows.min()) <= int(rows.max()) < global_rows):
        raise ValueError(f"split_invariant rows of shape {tuple(rows.shape)} in [{int(rows.min())}, "
                         f"{int(rows.max())}] are invalid; allowed: 1-d row indices in [0, {global_rows})")
    key = torch.tensor(_signed(mix64(int(seed))), dtype=torch.long, device=device)
    previous = _ACTIVE.split
    # The masks do not read torch's generator, but other draws in the block do (a DEQ's
    # Hutchinson probes and jac_reg_freq coin, the ODE regularisers' noise): seeded here
    # and restored after, so a resumed run redraws them too.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(int(seed) % 2**63)
        _ACTIVE.split = _Split(rows, int(global_rows), key, torch.zeros((), dtype=torch.long, device=device))
        try:
            yield
        finally:
            _ACTIVE.split = previous


def current_split():
    """A snapshot of the active split (or None), its draw counter included, to re-enter
    with `restored` (a checkpointed layer's recomputation in the backward pass draws the
    masks it drew in the forward)."""
    split = _ACTIVE.split
    return None if split is None else split.copy()


@contextlib.contextmanager
def restored(snapshot):
    """The split of `current_split`'s snapshot, drawing from its counter on; every entry
    starts from the snapshot. On exit the enclosing block of the same stream advances
    past what was drawn here (the forward's draws), but never goes back (the backward's)."""
    previous = _ACTIVE.split
    _ACTIVE.split = active = None if snapshot is None else snapshot.copy()
    try:
        yield
    finally:
        _ACTIVE.split = previous
        if active is not None and previous is not None and previous.key is active.key:
            previous.draws.copy_(torch.maximum(previous.draws, active.draws))


def splitting_rows() -> bool:
    """True inside `split_invariant`."""
    return _ACTIVE.split is not None


def _keep_threshold(p: float) -> int:
    """The int32 below which a uniform 32-bit word keeps an element: probability 1 - p
    (to within 2**-32)."""
    return min(int((1 - p) * 2.0**32), 2**32 - 1) - 2**31


def _row_keep(split: _Split, elements: int, p: float) -> torch.Tensor:
    """(local rows, elements) bools: this block's next draw for this process's rows.
    Word j of a row's stream is the hash of counter j + 1; its low and high 32-bit halves
    decide elements 2j and 2j + 1 (an int32 view of the little-endian words)."""
    draw = split.draws.add_(1)  # the counter is the draw's index (1, 2, ...)
    stream = _mix64_(split.key + draw * _GAMMA)
    row_seed = _mix64_(stream + (split.rows + 1) * _ROW_GAMMA)
    words = (elements + 1) // 2
    counters = torch.arange(1, words + 1, dtype=torch.long, device=row_seed.device).mul_(_GAMMA)
    halves = _mix64_(row_seed[:, None] + counters).view(torch.int32)
    return halves[:, :elements] < _keep_threshold(p)


def keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """A mask of ``like``'s shape: 0 with probability ``p``, else ``1 / (1 - p)``."""
    split = _ACTIVE.split
    if split is None:
        return torch.empty_like(like).bernoulli_(1 - p).div_(1 - p)
    if like.shape[0] != len(split.rows):
        raise ValueError(f"split-invariant dropout: a tensor of {like.shape[0]} rows in a block for "
                         f"{len(split.rows)} rows of this process")
    keep = _row_keep(split, math.prod(like.shape[1:]), p)
    return keep.to(like.dtype).reshape(like.shape).div_(1 - p)


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
