"""`iterate`: the engine of iterated depth, z_{t+1} = step(z_t), as the depth dial drives it.

A looped core (a weight-tied stack applied again and again) and a DEQ iterated with an exit
criterion both run here, so the dial means one thing for both (`bertode.solve.dial`):

* ``depth`` iterations at most; iterations before ``graph_from`` run without a graph
  (truncated backpropagation through the last ``depth - graph_from``); in the backward pass
  they count as the identity, so a ``z0`` with a graph (a core without input injection, fed
  by the prelude) still passes its gradient on;
* per-token exit: after each iteration the criterion scores every token against its
  previous state; a token below the threshold is frozen (its state never changes again)
  and the step is told which tokens are still active (``step(z, active)``, ``active`` an
  `ActiveTokens`, or None while every token is), so that it computes only those
  (`encoder.ResidualSite`); the loop ends when every real token has exited;
* ``on_iterate(n, z)`` after each iteration n, for the per-iterate loss curve.

With no criterion (or one that never fires: threshold 0) ``step`` always gets ``active=None``
and the iteration is exactly the plain loop. ``stop(previous, current)`` is the caller's
global early stop (an unrolled DEQ's tolerance); it is not used with a criterion, because
it reads whole sequences and a causal model's exit decisions must not read future tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..solve.ode import straight_through


class ActiveTokens:
    """The tokens still iterating: a (batch, seq) bool ``mask``, their flat row ``index`` (row-major),
    and per batch row their positions packed to the left (``positions`` (batch, width), ``packed``
    marking the real entries), so that attention can run on the active queries only."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask
        self.index = mask.reshape(-1).nonzero().squeeze(1)
        counts = mask.sum(1)
        self.width = int(counts.max())
        # stable sort: each row's active positions first, in ascending order (the flat order)
        self.positions = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, : self.width]
        self.packed = torch.arange(self.width, device=mask.device)[None] < counts[:, None]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, ...) -> the active rows (n, ...)."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.index)

    def scatter(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``x`` with the active rows replaced by ``rows`` (out of place)."""
        return x.reshape(-1, *x.shape[2:]).index_copy(0, self.index, rows.to(x.dtype)).view_as(x)

    def unpack_queries(self, probs: torch.Tensor, seq: int) -> torch.Tensor:
        """Attention probabilities of the active queries (batch, heads, width, keys) at their positions
        in (batch, heads, seq, keys); the rows of exited tokens are zeros (they attended nowhere)."""
        batch, heads, _, keys = probs.shape
        kept = probs * self.packed[:, None, :, None]  # padding entries write zeros (into exited rows)
        index = self.positions[:, None, :, None].expand(batch, heads, self.width, keys)
        return probs.new_zeros(batch, heads, seq, keys).scatter(2, index, kept)

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """The active rows (n, ...) as (batch, width, ...), zeros where a row has fewer active tokens."""
        out = rows.new_zeros(self.mask.shape[0], self.width, *rows.shape[1:])
        out[self.packed] = rows
        return out


@dataclass
class LoopResult:
    state: torch.Tensor
    iterations: int
    exit_depths: torch.Tensor | None = None  # (batch, seq): the iterations each token ran (with a criterion)

    def exit_summary(self, valid: torch.Tensor | None) -> dict:
        """Mean and max exit depth over the real (``valid``) tokens, for `solver_stats`."""
        if self.exit_depths is None:
            return {}
        depths = self.exit_depths if valid is None else self.exit_depths[valid]
        depths = depths.float()
        return {"exit_depth_mean": depths.mean().item() if depths.numel() else 0.0,
                "exit_depth_max": int(depths.max().item()) if depths.numel() else 0}


def valid_tokens(attn_mask: torch.Tensor | None, shape) -> torch.Tensor | None:
    """(batch, seq) bool of the real (non-padding) tokens, read off an SDPA mask (None: all real).
    The last query row of a causal mask sees every real key, so both mask shapes read alike; under a
    key/value cache the keys are the cached positions' and then these tokens', the last ``seq`` columns."""
    if attn_mask is None:
        return None
    return attn_mask[:, 0, -1, -shape[1]:].expand(shape[0], shape[1])


def refuse_training_exit(criterion, module) -> None:
    """Per-token exit is an inference dial: refused (one line) for a module training with gradients."""
    if criterion is not None and module.training and torch.is_grad_enabled():
        raise ValueError(f"exit={criterion.registry_name!r} is invalid while training (train mode with gradients): "
                         "per-token exit is an inference dial (exited tokens would leave dropout and the gradient); "
                         "allowed: model.eval() or torch.no_grad(), or no exit while training")


def iterate(step: Callable, z0: torch.Tensor, depth: int, *, graph_from: int = 0, criterion=None,
            readout: Callable | None = None, on_iterate: Callable | None = None,
            stop: Callable | None = None, valid: torch.Tensor | None = None) -> LoopResult:
    """Run ``step`` from ``z0`` (batch, seq, hidden) for ``depth`` iterations (see the module doc)."""
    grad = torch.is_grad_enabled()
    z = z0
    active = None  # None: every token is active
    exit_depths = previous = None
    if criterion is not None:
        exit_depths = torch.full(z0.shape[:2], depth, dtype=torch.long, device=z0.device)
        running = torch.ones(z0.shape[:2], dtype=torch.bool, device=z0.device)
        with torch.no_grad():
            previous = criterion.summary(z0, readout)
    iterations = 0
    for index in range(depth):
        if index == graph_from and index > 0 and grad:
            z = straight_through(z0, z)  # the skipped iterations pass z0's gradient on unchanged
        with torch.set_grad_enabled(grad and index >= graph_from):
            new = step(z, active)
            if active is not None:  # exited tokens keep their state
                new = torch.where(active.mask[..., None], new, z)
        iterations = index + 1
        if criterion is not None:
            with torch.no_grad():
                current = criterion.summary(new, readout)
                leaving = criterion.exits(previous, current) & running
                previous = current
            if bool(leaving.any()):
                exit_depths[leaving] = iterations
                running = running & ~leaving
                active = ActiveTokens(running) if bool(running.any()) else None
        elif stop is not None and stop(z, new):
            z = new
            if on_iterate is not None:
                on_iterate(iterations, z)
            break
        z = new
        if on_iterate is not None:
            on_iterate(iterations, z)
        if criterion is not None and not bool((running if valid is None else running & valid).any()):
            break  # every real token has exited
    if exit_depths is not None:
        exit_depths = torch.where(running, torch.full_like(exit_depths, iterations), exit_depths)
    return LoopResult(z, iterations, exit_depths)
