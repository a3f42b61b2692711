"""Streaming train rows (``data.streaming=true``): documents read, tokenized and packed on
the fly in a `torch.utils.data` pipeline, in memory bounded whatever the corpus size.

The global row sequence is fixed by the data and ``data.stream_shards`` (S) alone: train
document i goes to shard i mod S; each shard is packed on its own (`shards.Packer`) and
starts over when it runs out (its next epoch); global row k is row k // S of shard k mod S.
Micro-batch m holds rows k = m B ... m B + B - 1. Rank r of W keeps the rows k ≡ r
(mod W) (the rows `bertode.dropout` gives it too), and these come only from shards
s ≡ r (mod W): each rank packs its own shards and no other's. Inside a rank the
``data.num_workers`` (P) DataLoader workers split the rank's shards again (worker w packs
every P-th, from where the rank's sequence resumes); the DataLoader's round-robin over
its workers then returns exactly the rank's sequence. Hence W must divide S, and P the
S / W shards of a rank. Every worker reads the document stream and tokenizes only its
shards' documents.

Each row arrives with its shard's position after it (epoch, document of the shard, token
offset), so a checkpoint records where every shard stands (`StreamOrder.state`) and a
resumed run continues with exactly the rows the uninterrupted run would have seen. MLM
masks are drawn per row, keyed by the global row index k: a rank masks only its rows,
and the masks do not depend on W.
"""

from __future__ import annotations

import itertools
import os

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .documents import documents
from .errors import DataError
from .shards import Packer
from .words import read_by


def resolve_shards(data_cfg, world: int) -> int:
    """``data.stream_shards``, or (null) one shard per worker of every rank: each process
    then reads the document stream once. Set it to compare runs across world sizes."""
    return data_cfg.stream_shards or world * max(int(data_cfg.num_workers), 1)


def check_layout(shards, workers, world: int) -> str | None:
    """What is wrong with ``data.stream_shards``/``data.num_workers`` at ``world`` ranks, or None."""
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int) or shards < 1):
        return f"data.stream_shards={shards!r} is invalid; allowed: null (one per worker of every rank) or an integer >= 1"
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        return f"data.num_workers={workers!r} is invalid; allowed: an integer >= 0"
    shards = shards or world * max(workers, 1)
    if shards % world:
        return (f"data.stream_shards={shards} is invalid with {world} processes; allowed: a multiple of the "
                "process count (each rank packs its own shards)")
    if (shards // world) % max(workers, 1):
        return (f"data.num_workers={workers} is invalid with data.stream_shards={shards} over {world} process(es); "
                f"allowed: a divisor of {shards // world} (the shards of one rank)")
    return None


def shard_rows(cfg, tokenizer, shard: int, shards: int, position: tuple[int, int, int]):
    """(row, position after it, look-ahead) of one shard, forever, from ``position``
    (epoch, document, offset)."""
    epoch, document, offset = position
    cfg = read_by(cfg, tokenizer)  # a word-level tokenizer reads blank lines too
    while True:
        texts = (text for i, text in enumerate(documents(cfg, "train")) if i % shards == shard)
        packer = Packer(tokenizer, itertools.islice(texts, document, None), cfg.seq_len, start=(document, offset))
        produced = False
        for row in packer:
            produced = True
            yield row, (epoch, *packer.position()), packer.lookahead()
        if not produced and document == 0 and offset == 0:
            raise DataError(f"data.stream_shards={shards} is invalid: shard {shard} holds less than one row of "
                             f"{cfg.seq_len} tokens; allowed: fewer shards or a shorter data.seq_len")
        epoch, document, offset = epoch + 1, 0, 0


def check_shards(cfg, tokenizer, world: int) -> None:
    """DataError unless every shard packs at least one row (reads each shard's first rows)."""
    shards = resolve_shards(cfg, world)
    for shard in range(shards):
        next(shard_rows(cfg, tokenizer, shard, shards, (0, 0, 0)))


class StreamRows(IterableDataset):
    """One rank's rows in its order, from its ``first`` local row on (module docstring)."""

    def __init__(self, cfg, tokenizer, rank: int, world: int, first: int, positions: dict, shards: int):
        self.cfg, self.tokenizer, self.rank, self.world = cfg, tokenizer, rank, world
        self.first, self.positions, self.shards = first, positions, shards

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        mine = list(range(self.rank, self.shards, self.world))  # the rank's shards, in its order
        start = (self.first + worker) % len(mine)
        order = [mine[(start + workers * t) % len(mine)] for t in range(len(mine) // workers)]
        streams = [shard_rows(self.cfg, self.tokenizer, s, self.shards, tuple(self.positions.get(s, (0, 0, 0))))
                   for s in order]
        for s, stream in itertools.cycle(zip(order, streams)):
            row, position, lookahead = next(stream)
            yield s, row, position, lookahead  # a list: workers pickle it faster than a tensor's shared memory


class StreamOrder:
    """The streaming counterpart of `distributed.BatchOrder`: this rank's (inputs, labels) of
    each micro-batch, in order, and the stream's position for checkpoints."""

    def __init__(self, cfg, tokenizer, micro_batch: int, seed: int, rank: int, world: int,
                 first_micro_batch: int = 0, state: dict | None = None):
        self.cfg, self.tokenizer, self.micro, self.seed, self.rank, self.world = (cfg, tokenizer, micro_batch, seed,
                                                                                   rank, world)
        self.shards = resolve_shards(cfg, world)
        if state is not None and state.get("stream_shards") != self.shards:
            raise DataError(f"data.stream_shards={self.shards} is invalid for this resume: the checkpoint's stream "
                            f"has {state.get('stream_shards')} shards; allowed: the run's own value")
        self.positions = {int(s): tuple(p) for s, p in (state or {}).get("positions", {}).items()}
        self.next_micro_batch = first_micro_batch
        first = first_micro_batch * micro_batch // world  # this rank's rows already consumed
        workers = int(cfg.num_workers)
        if workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers tokenize on their own
        dataset = StreamRows(cfg, tokenizer, rank, world, first, self.positions, self.shards)
        self.loader = iter(DataLoader(dataset, batch_size=None, num_workers=workers,
                                      prefetch_factor=2 if workers else None, persistent_workers=False))
        self.lookahead = 0  # the most documents any packer had read beyond its next row

    def local_batch(self, m: int, make_batch):
        """(inputs, labels) of this rank's rows of micro-batch m (m must be the next one), each
        row made by ``make_batch(row, generator)`` with a generator keyed by its global index."""
        if m != self.next_micro_batch:
            raise RuntimeError(f"stream micro-batch {m} requested, {self.next_micro_batch} expected")
        self.next_micro_batch += 1
        inputs, labels = [], []
        for j in range(self.rank, self.micro, self.world):
            shard, row, position, lookahead = next(self.loader)
            k = m * self.micro + j
            if shard != k % self.shards:  # the pipeline's order is the contract; never train out of it
                raise RuntimeError(f"stream row {k} came from shard {shard}, expected {k % self.shards}")
            self.positions[shard] = position
            self.lookahead = max(self.lookahead, lookahead)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
            masked, label = make_batch(torch.tensor([row], dtype=torch.long), generator)
            inputs.append(masked)
            labels.append(label)
        return torch.cat(inputs), torch.cat(labels)

    def noise_seed(self, m: int) -> int:
        from .distributed import BatchOrder

        return BatchOrder.noise_seed_of(self.seed, m)

    def state(self, dist) -> dict:
        """Every shard's position (gathered from all ranks: a collective call)."""
        positions = {}
        for part in dist.gather(self.positions):
            positions.update(part)
        return {"positions": {int(s): list(p) for s, p in positions.items()}, "stream_shards": self.shards}


def batch_order(data_cfg, corpus, micro_batch: int, seed: int, dist, first_micro_batch: int, state: dict | None):
    """The rows of every micro-batch: the stream's (resumed from ``state``, the checkpoint's
    stream position) or, from token shards, `distributed.BatchOrder` (a pure function of
    the micro-batch index)."""
    from .distributed import BatchOrder

    if data_cfg.streaming:
        return StreamOrder(data_cfg, corpus.tokenizer, micro_batch, seed, dist.rank, dist.world,
                           first_micro_batch=first_micro_batch, state=state)
    return BatchOrder(corpus.train, micro_batch, seed, dist.rank, dist.world)
