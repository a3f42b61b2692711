"""Language-model loss and evaluation (either `objective.Objective`), shared by `train`
and `evaluate`.

The training loss of a step is the mean cross-entropy over *all* target tokens of the
step's global batch (every rank and accumulation micro-batch), so a torchrun run with the
same global batch computes the same loss and gradient as one process. Evaluation masks
the held-out rows once with a fixed seed (MLM), so numbers are comparable across runs.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"trainer.precision={precision!r} is invalid; allowed: 'fp32', 'bf16'")


def masked_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over masked positions, and the number of correct predictions."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
    chosen = flat_labels != -100
    correct = (flat_logits[chosen].argmax(-1) == flat_labels[chosen]).sum()
    return loss, correct


def scored(objective, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the labels they score: a model's (batch, seq, vocab) logits lined up by the objective, or
    sparse prediction's (n_targets, vocab) rows (``config.sparse_prediction`` while training) with the targets'
    labels in the same (batch, seq) order."""
    if logits.dim() == labels.dim():  # sparse prediction: one row per target
        _, targets = objective.aligned(labels, labels)
        return logits, targets[targets != -100]
    return objective.aligned(logits, labels)


def fixed_eval_batches(rows: torch.Tensor, objective, seed: int, batch_size: int, max_rows: int | None = None):
    """The eval rows made into (inputs, labels) once with ``seed``, cut into batches."""
    rows = rows[:max_rows] if max_rows else rows[:]  # a tensor, also from token shards
    generator = torch.Generator().manual_seed(seed)
    inputs, labels = objective.make_batch(rows, generator)
    return [(inputs[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def evaluate(model, batches, objective, device: torch.device, precision: str = "fp32") -> dict:
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    compute: dict[str, float] = {}  # the solves' cost, summed over batches
    mems, remembers = None, bool(getattr(getattr(model, "config", None), "mem_len", 0))
    for inputs, labels in batches:  # with a segment memory: batches in text order (`segments.ordered_eval_batches`)
        with autocast(device, precision):
            output = model(input_ids=inputs.to(device), **({"mems": mems} if remembers else {}))
        logits, mems = output.logits, getattr(output, "mems", None)
        loss, right = masked_ce_sum(*objective.aligned(logits, labels.to(device)))
        total += loss.item()
        correct += int(right)
        count += objective.targets(labels)
        stats = model.solver_stats() if hasattr(model, "solver_stats") else {}
        for key in ("nfe_forward", "forward_iterations", "depth", "exit_depth_mean"):  # looped cores report depth
            if isinstance(stats.get(key), (int, float)):
                compute[key] = compute.get(key, 0.0) + stats[key]
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / max(count, 1),
            "target_tokens": count, **{key: value / max(len(batches), 1) for key, value in compute.items()}}
