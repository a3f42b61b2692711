"""Solver statistics, one shape for ODE and DEQ: per-solve records gathered per forward.

Every solve returns a record (`SolveRecord` for an ODE solve, `FixedPointRecord` for a
DEQ solve); an encoder gathers its forward's records in a `SolverStats`, which travels
up with the model output (``out.solver_stats``) and backs ``model.solver_stats()``.
``summary()`` gives

    {"nfe_forward", "nfe_backward", "accepted_steps", "rejected_steps", "solves",
     "layers": [one row per site: "name", "nfe_forward", "nfe_backward", ...], ...}

where an ODE site's NFE counts vector-field evaluations (forward solve, and the adjoint's
backward solve) and a DEQ solve's counts evaluations of the map (forward iterations) and
vector-Jacobian products (the implicit backward's iterations); DEQ summaries also carry
the fixed-point keys (``forward_iterations``, residuals, ``converged_fraction``, ...).

A per-sequence solve (``ode_backend`` ``bertode`` or ``torchode``) takes its own steps per
sequence: its row also carries ``accepted_per_sequence``, ``rejected_per_sequence`` and
(bertode) ``nfe_per_sequence``, lists with one int per batch row (the evaluations in which
that row was still running), and its ``accepted_steps``/``rejected_steps`` are the most any
sequence took (the length of the batch's solve, comparable to a shared-step solve's).
Counting happens on the host as plain integers; adaptive step times stay tensors until
statistics are asked for, so a solve never waits on the device to count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

SUMMED = ("nfe_forward", "nfe_backward", "accepted_steps", "rejected_steps")
PER_SEQUENCE = ("accepted_per_sequence", "rejected_per_sequence", "nfe_per_sequence")  # lists, summed per row


def on_host(values: dict) -> dict:
    """``values`` with its one-element tensors (a DEQ's counters, its Jacobian penalty) as Python numbers,
    read in one transfer: solves store them as tensors so that they never wait on the device."""
    groups: dict = {}  # one transfer per (device, integer or float)
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            groups.setdefault((value.device, value.is_floating_point()), []).append(key)
    if not groups:
        return values
    cast = dict(values)
    for keys in groups.values():
        tensors = [values[k].detach().reshape(()) for k in keys]
        dtype = tensors[0].dtype
        for tensor in tensors[1:]:
            dtype = torch.promote_types(dtype, tensor.dtype)
        cast.update(zip(keys, torch.stack([t.to(dtype) for t in tensors]).tolist()))
    return cast


@dataclass
class SolveRecord:
    """One ODE solve: NFE of its forward and backward solves, steps of its forward solve."""

    name: str
    fixed_steps: int | None = None  # steps of a fixed-step solver; None for adaptive ones
    nfe_forward: int = 0
    nfe_backward: int = 0
    phase: str = "forward"  # "backward" once the adjoint's backward pass has begun
    step_times: list = field(default_factory=list)  # t of every adaptive step attempt (tensors)
    per_sequence: dict | None = None  # per-sequence solves: (batch,) tensors "accepted", "rejected", "nfe" (or None)

    def count_evaluation(self) -> None:
        if self.phase == "forward":
            self.nfe_forward += 1
        else:
            self.nfe_backward += 1

    def step_counts(self) -> tuple[int | None, int | None]:
        """(accepted, rejected) steps of the forward solve.

        An adaptive solver retries a rejected step from the same t and moves t on after an
        accepted one, so the accepted steps are the distinct consecutive t values tried.
        """
        if self.fixed_steps is not None:
            return self.fixed_steps, 0
        if self.per_sequence is not None:  # the most any sequence took
            return (int(self.per_sequence["accepted"].max()), int(self.per_sequence["rejected"].max()))
        if not self.step_times:
            return None, None
        times = torch.stack([t.reshape(()) for t in self.step_times]).cpu()
        accepted = 1 + int((times[1:] != times[:-1]).sum())
        return accepted, len(times) - accepted

    def as_dict(self) -> dict:
        accepted, rejected = self.step_counts()
        row = {"name": self.name, "nfe_forward": self.nfe_forward, "nfe_backward": self.nfe_backward,
               "accepted_steps": accepted, "rejected_steps": rejected}
        if self.per_sequence is not None:
            for key in ("accepted", "rejected", "nfe"):
                counts = self.per_sequence[key]
                row[f"{key}_per_sequence"] = None if counts is None else counts.tolist()
        return row


@dataclass
class FixedPointRecord:
    """One DEQ solve: iterations of the forward and implicit-backward solves, and what the
    DEQ reports besides (residuals, converged fraction, Jacobian penalty, ...)."""

    name: str
    nfe_forward: int = 0
    nfe_backward: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "nfe_forward": self.nfe_forward, "nfe_backward": self.nfe_backward,
                "accepted_steps": None, "rejected_steps": None, **on_host(self.extra)}


class SolverStats(Mapping):
    """The records of one forward pass (and of its backward, once it has run).

    A read-only mapping onto `summary()`, so ``out.solver_stats["nfe_forward"]`` works;
    ``counters`` holds the model's running counters at the time of the forward."""

    def __init__(self, records: list | None = None, counters: dict | None = None):
        self.records: list = list(records or [])
        self.counters: dict = dict(counters or {})
        self.exit_depths = None  # (batch, seq) iterations each token ran, under a per-token exit criterion

    def add(self, record) -> None:
        self.records.append(record)

    def extend(self, other: "SolverStats") -> None:
        self.records.extend(other.records)

    def summary(self) -> dict:
        """Totals and per-site rows; repeated solves of one site (blocks) are summed."""
        per_site: dict[str, dict] = {}
        for record in self.records:
            row = record.as_dict()
            into = per_site.get(row["name"])
            if into is None:
                per_site[row["name"]] = dict(row, solves=1)
                continue
            into["solves"] += 1
            for key in SUMMED:
                if row[key] is not None and into[key] is not None:
                    into[key] += row[key]
            for key in PER_SEQUENCE:
                if row.get(key) is not None and into.get(key) is not None and len(row[key]) == len(into[key]):
                    into[key] = [a + b for a, b in zip(into[key], row[key])]
        layers = list(per_site.values())

        def total(key):
            values = [r[key] for r in layers if r[key] is not None]
            return sum(values) if values else None

        summary = {"nfe_forward": total("nfe_forward") or 0, "nfe_backward": total("nfe_backward") or 0,
                   "accepted_steps": total("accepted_steps"), "rejected_steps": total("rejected_steps"),
                   "solves": len(self.records), "layers": layers}
        for record in self.records:  # DEQ solves: their keys at the top level too
            summary.update(on_host(getattr(record, "extra", {})))
        summary.update(on_host(self.counters))
        return summary

    # Mapping onto the summary (computed on each access: backward counts arrive later).
    def __getitem__(self, key):
        return self.summary()[key]

    def __iter__(self):
        return iter(self.summary())

    def __len__(self) -> int:
        return len(self.summary())

    def __repr__(self) -> str:
        return f"SolverStats({self.summary()!r})"
