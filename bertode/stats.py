"""Solver statistics: one `SolveRecord` per solve, gathered per forward pass.

A record counts the vector-field evaluations of its forward solve and of its backward
(adjoint) solve, and the steps an adaptive solver took. Counting happens on the host as
plain integers; the step times an adaptive solver tried are kept as tensors and only
read when statistics are asked for, so a solve never waits on the device to count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SolveRecord:
    name: str
    fixed_steps: int | None = None  # steps of a fixed-step solver; None for adaptive ones
    nfe_forward: int = 0
    nfe_backward: int = 0
    phase: str = "forward"  # "backward" once the adjoint's backward pass has begun
    step_times: list = field(default_factory=list)  # t of every adaptive step attempt (tensors)

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
        if not self.step_times:
            return None, None
        times = torch.stack([t.reshape(()) for t in self.step_times]).cpu()
        accepted = 1 + int((times[1:] != times[:-1]).sum())
        return accepted, len(times) - accepted

    def as_dict(self) -> dict:
        accepted, rejected = self.step_counts()
        return {
            "name": self.name,
            "nfe_forward": self.nfe_forward,
            "nfe_backward": self.nfe_backward,
            "accepted_steps": accepted,
            "rejected_steps": rejected,
        }


class SolverStats:
    """The records of the latest forward pass (and of its backward, once it has run)."""

    def __init__(self):
        self.records: list[SolveRecord] = []

    def reset(self) -> None:
        self.records = []

    def new_record(self, name: str, fixed_steps: int | None) -> SolveRecord:
        record = SolveRecord(name=name, fixed_steps=fixed_steps)
        self.records.append(record)
        return record

    def summary(self) -> dict:
        """Totals and per-site numbers; repeated solves of one site (blocks) are summed."""
        per_site: dict[str, dict] = {}
        for record in self.records:
            row = record.as_dict()
            into = per_site.get(row["name"])
            if into is None:
                per_site[row["name"]] = dict(row, solves=1)
                continue
            into["solves"] += 1
            for key in ("nfe_forward", "nfe_backward", "accepted_steps", "rejected_steps"):
                if row[key] is not None and into[key] is not None:
                    into[key] += row[key]
        layers = list(per_site.values())

        def total(key):
            values = [r[key] for r in layers if r[key] is not None]
            return sum(values) if values else None

        return {
            "nfe_forward": total("nfe_forward") or 0,
            "nfe_backward": total("nfe_backward") or 0,
            "accepted_steps": total("accepted_steps"),
            "rejected_steps": total("rejected_steps"),
            "solves": len(self.records),
            "layers": layers,
        }
