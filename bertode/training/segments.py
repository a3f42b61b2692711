"""Training and evaluation with a segment memory (``model.mem_len`` > 0, `layers/segment_memory.py`): the text
read in order, as Transformer-XL's ordered iterator reads it, and the memory carried from batch to batch.

* `SegmentOrder` (train rows, in place of `distributed.BatchOrder`'s shuffled epochs): the packed rows, in corpus
  order, cut into as many contiguous slices as a micro-batch has rows (all ranks together); global row b of
  micro-batch m is the m-th row of slice b (m modulo the slice's length), so every row of a batch continues the
  text its previous batch's row read. A pure function of m: a resumed run reads the same rows, and a global row
  reads the same text at any world size (each rank takes its rows ``rank::world``, as always).
* `MemoryCarry`: the rows' memory from micro-batch to micro-batch (gradient accumulation included). It starts
  empty, and again where the slices wrap around to their first rows. In a checkpoint it is saved for every global
  row (gathered from the ranks), so a resume at any world size continues it.
* `ordered_eval_batches`: the eval rows cut the same way into ``batch_size`` contiguous slices; `lm.evaluate` carries
  the memory over them, so the loss is the stream's (the few rows past the last whole slice are left out).
"""

from __future__ import annotations

import contextlib

import torch

from .distributed import BatchOrder
from .sources import DataError


def slice_length(rows: int, width: int, what: str) -> int:
    """Rows per contiguous slice when ``rows`` are read ``width`` at a time; one line if fewer than one each."""
    if rows < width:
        raise DataError(f"model.mem_len needs the {what} rows read as {width} contiguous slices, but there are "
                        f"{rows} rows; allowed: more text, or a smaller batch")
    return rows // width


class SegmentOrder(BatchOrder):
    """Micro-batch m's rows: row ``b * n + m % n`` for global row b (n rows per slice), in place of
    `distributed.BatchOrder`'s shuffled epochs; its masking, dropout seeds and rank slicing are BatchOrder's."""

    def __init__(self, rows, micro_batch: int, seed: int, rank: int = 0, world: int = 1):
        super().__init__(rows, micro_batch, seed, rank, world)
        self.length = slice_length(len(rows), micro_batch, "train")

    def micro_batch_rows(self, m: int) -> torch.Tensor:
        return self.rows[torch.arange(self.micro_batch) * self.length + m % self.length]

    def starts_over(self, m: int) -> bool:
        """Whether micro-batch m reads the slices' first rows (the memory starts empty there)."""
        return m % self.length == 0


class MemoryCarry:
    """This rank's rows' memory (the model's output ``mems``) from one micro-batch to the next."""

    def __init__(self, own_rows: torch.Tensor):
        self.own_rows = own_rows
        self.mems: tuple | None = None

    def before(self, order: SegmentOrder, m: int) -> dict:
        """The model's keyword arguments for micro-batch m."""
        if order.starts_over(m):
            self.mems = None
        return {"mems": self.mems}

    def after(self, output) -> None:
        """Keep the forward's memory (a skipped batch's is none: the next starts empty)."""
        mems = getattr(output, "mems", None)
        self.mems = tuple(m.detach() for m in mems) if mems is not None else None

    def state(self, dist) -> dict | None:
        """Every global row's memory, on every rank (a collective call): {"rows": [...], "mems": [...]}."""
        mine = None if self.mems is None else [m.cpu() for m in self.mems]
        parts = dist.gather({"rows": self.own_rows.tolist(), "mems": mine})
        if any(part["mems"] is None for part in parts):
            return None
        rows = [row for part in parts for row in part["rows"]]
        order = torch.argsort(torch.tensor(rows))
        layers = len(parts[0]["mems"])
        return {"mems": [torch.cat([part["mems"][i] for part in parts])[order] for i in range(layers)]}

    def load(self, state: dict | None, device) -> None:
        """A checkpoint's memory: this rank's rows of it."""
        if state is None:
            self.mems = None
            return
        self.mems = tuple(m[self.own_rows].to(device) for m in state["mems"])


def ordered_eval_batches(rows, objective, seed: int, batch_size: int, max_rows: int | None = None) -> list:
    """The eval rows (the first ``max_rows``) in ``min(batch_size, rows)`` contiguous slices; batch j holds the j-th
    row of every slice, made into (inputs, labels) with ``seed`` as `lm.fixed_eval_batches` makes them."""
    rows = rows[:max_rows] if max_rows else rows[:]
    width = max(1, min(batch_size, len(rows)))
    length = slice_length(len(rows), width, "eval")
    inputs, labels = objective.make_batch(rows[:width * length], torch.Generator().manual_seed(seed))
    index = torch.arange(width) * length
    return [(inputs[index + j], labels[index + j]) for j in range(length)]


def check_eval_memory(eval_mem_len, mem_len: int) -> None:
    """``trainer.eval_mem_len``: null, or a length >= 0 for a model trained with a memory; one line otherwise."""
    if eval_mem_len is None:
        return
    if isinstance(eval_mem_len, bool) or not isinstance(eval_mem_len, int) or eval_mem_len < 0 or not mem_len:
        raise ValueError(f"trainer.eval_mem_len={eval_mem_len!r} is invalid with model.mem_len={mem_len}; allowed: null, "
                         "or an integer >= 0 for a model trained with a segment memory (model.mem_len > 0)")


@contextlib.contextmanager
def memory_length(model, mem_len: int | None):
    """Within: ``model`` (its config) remembers ``mem_len`` positions (None: its own)."""
    own = model.config.mem_len
    if mem_len is not None:
        model.config.mem_len = mem_len
    try:
        yield
    finally:
        model.config.mem_len = own
