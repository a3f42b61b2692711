"""`Distributed` (torchrun's environment, or one process) and `BatchOrder` (which packed
rows each micro-batch uses, as a pure function of its index, so resumed runs see exactly
the batches of the uninterrupted run)."""

from __future__ import annotations

import os

import torch

from .checks import resolve_device


class Distributed:
    """torchrun's environment, or a single process."""

    def __init__(self, device_choice: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device_choice = resolve_device(device_choice)
        self.device = torch.device(f"cuda:{local_rank}" if device_choice == "cuda" else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value):
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value) -> list:
        """Every rank's ``value`` (a picklable object), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def close(self):
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class BatchOrder:
    """Which packed rows micro-batch m uses: consecutive slices of a per-epoch permutation
    seeded by (seed, epoch), masked with a generator seeded by (seed, m). A pure function
    of m, so a resumed run sees exactly the batches the uninterrupted run would have."""

    def __init__(self, rows, micro_batch: int, seed: int, rank: int = 0, world: int = 1):
        self.rows, self.micro_batch, self.seed, self.rank, self.world = rows, micro_batch, seed, rank, world
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.rows), generator=generator)
        return self._perm

    def micro_batch_rows(self, m: int) -> torch.Tensor:
        positions = range(m * self.micro_batch, (m + 1) * self.micro_batch)
        n = len(self.rows)
        return self.rows[torch.stack([self._permutation(p // n)[p % n] for p in positions])]

    @staticmethod
    def noise_seed_of(seed: int, m: int) -> int:
        return seed * 2_654_435_761 + 104_729 * m + 17

    def noise_seed(self, m: int) -> int:
        """The seed of micro-batch m's dropout masks (`bertode.layers.dropout.split_invariant`)."""
        return self.noise_seed_of(self.seed, m)

    def batch(self, m: int, make_batch):
        """Micro-batch m as ``make_batch(rows, generator)`` makes it (`objective.Objective.make_batch`)."""
        generator = torch.Generator().manual_seed(self.seed * 7_919 + m + 1)
        return make_batch(self.micro_batch_rows(m), generator)

    def local_batch(self, m: int, make_batch):
        """This rank's (inputs, labels) of micro-batch m: the global batch made at once, then
        sliced, so the MLM masks do not depend on the world size."""
        inputs, labels = self.batch(m, make_batch)
        return inputs[self.rank::self.world], labels[self.rank::self.world]

    def state(self, dist) -> None:
        return None  # a pure function of the micro-batch index: the step is the position


