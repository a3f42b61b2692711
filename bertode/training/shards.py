"""Packed rows: the one packing rule, and token shards on disk.

`Packer` turns documents into rows ``[CLS] t1 ... t_{T-2} [SEP]`` by concatenating their
token ids (no separator; a word vocabulary's ``<eos>`` ends each document) and cutting every T-2 tokens; a last partial row is dropped. It
tokenizes in small batches (at most ``BATCH_DOCUMENTS`` documents or ``BATCH_CHARS``
characters ahead of the row being cut) and knows the position of the next row's first
token (document index, token offset), so a stream can restart exactly there.

`write_rows` stores rows as ``uint16`` (vocabularies up to 65,536) or ``uint32`` shard
files of ``SHARD_ROWS`` rows plus ``index.json`` (rows, dtype, files) and the train
tokens' counts (for the unigram baseline). `ShardRows` reads them back by row with
``os.pread``: random access whose resident memory does not grow with the shards' size.
"""

from __future__ import annotations

import json
import os
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .words import line_end_id

BATCH_DOCUMENTS = 16
BATCH_CHARS = 1 << 15
SHARD_ROWS = 1 << 16
OPEN_FILES = 64  # shard files a reader keeps open at once


class Packer:
    """Rows of ``seq_len`` from ``documents``: an iterator of texts that starts at document
    ``start[0]``, of whose tokens the first ``start[1]`` are skipped."""

    def __init__(self, tokenizer, documents: Iterable[str], seq_len: int, start: tuple[int, int] = (0, 0)):
        self.tokenizer, self.documents, self.body = tokenizer, iter(documents), seq_len - 2
        self.cls, self.sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.line_end = line_end_id(tokenizer)  # a word vocabulary's <eos>, after every document (`words.py`)
        self.buffer: list[int] = []
        self.pieces: deque[list[int]] = deque()  # [document index, its tokens, of them still in the buffer]
        self.next_document, self.skip = start

    def _fill(self) -> bool:
        texts, chars = [], 0
        for text in self.documents:
            texts.append(text)
            chars += len(text)
            if len(texts) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
                break
        if not texts:
            return False
        for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
            if self.line_end is not None:
                ids = ids + [self.line_end]
            total = len(ids)
            if self.skip:  # resuming inside this document
                ids, self.skip = ids[self.skip:], 0
            if ids:
                self.pieces.append([self.next_document, total, len(ids)])
                self.buffer.extend(ids)
            self.next_document += 1
        return True

    def position(self) -> tuple[int, int]:
        """(document index, token offset) of the next row's first token."""
        if self.pieces:
            document, total, left = self.pieces[0]
            return (document, total - left)
        return (self.next_document, self.skip)

    def lookahead(self) -> int:
        """Documents read beyond the one the next row starts in."""
        return self.next_document - self.position()[0]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            while len(self.buffer) < self.body:
                if not self._fill():
                    return
            row = self.buffer[:self.body]
            del self.buffer[:self.body]
            need = self.body
            while need:
                piece = self.pieces[0]
                take = min(need, piece[2])
                piece[2] -= take
                need -= take
                if piece[2] == 0:
                    self.pieces.popleft()
            yield [self.cls, *row, self.sep]


def pack(tokenizer, documents: Iterable[str], seq_len: int) -> torch.Tensor:
    """Every row of ``documents`` as an int64 tensor (rows, seq_len)."""
    rows = list(Packer(tokenizer, documents, seq_len))
    if not rows:
        return torch.empty(0, seq_len, dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long)


def dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_rows(folder: Path, rows: Iterable[list[int]], seq_len: int, vocab_size: int,
               limit: int | None = None) -> int:
    """Rows into ``folder`` (shard files, index.json, counts.npy); returns the row count."""
    folder.mkdir(parents=True)
    dtype = dtype_for(vocab_size)
    counts = np.zeros(vocab_size, dtype=np.int64)
    files, total, chunk = [], 0, []

    def flush():
        nonlocal chunk
        if chunk:
            array = np.asarray(chunk, dtype=dtype)
            name = f"rows-{len(files):05d}.bin"
            array.tofile(folder / name)
            files.append({"file": name, "rows": len(chunk)})
            counts[:] += np.bincount(array[:, 1:-1].ravel().astype(np.int64), minlength=vocab_size)[:vocab_size]
            chunk = []

    for row in rows:
        if limit is not None and total >= limit:
            break
        chunk.append(row)
        total += 1
        if len(chunk) == SHARD_ROWS:
            flush()
    flush()
    np.save(folder / "counts.npy", counts)
    index = {"rows": total, "seq_len": seq_len, "dtype": np.dtype(dtype).name, "files": files, "format": 1}
    (folder / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return total


class ShardRows:
    """The rows of a `write_rows` folder, read on demand: ``len``, ``shape``, and indexing
    by an int, a slice, a 1-D index tensor, or (rows, columns) give int64 tensors."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        self.seq_len, self.dtype = index["seq_len"], np.dtype(index["dtype"])
        self.row_bytes = self.seq_len * self.dtype.itemsize
        self.files = [self.folder / f["file"] for f in index["files"]]
        self.starts = np.cumsum([0] + [f["rows"] for f in index["files"]])
        self.shape = (int(self.starts[-1]), self.seq_len)
        self._handles: OrderedDict[int, int] = OrderedDict()  # at most OPEN_FILES, least recently used closed
        weakref.finalize(self, _close_all, self._handles)

    def __len__(self) -> int:
        return self.shape[0]

    def counts(self) -> torch.Tensor:
        return torch.from_numpy(np.load(self.folder / "counts.npy"))

    def _row(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        shard = int(np.searchsorted(self.starts, i, side="right") - 1)
        if shard in self._handles:
            self._handles.move_to_end(shard)
        else:
            if len(self._handles) >= OPEN_FILES:
                os.close(self._handles.popitem(last=False)[1])
            self._handles[shard] = os.open(self.files[shard], os.O_RDONLY)
        data = os.pread(self._handles[shard], self.row_bytes, (i - int(self.starts[shard])) * self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype)

    def _rows(self, indices) -> torch.Tensor:
        indices = list(indices)
        if not indices:
            return torch.empty(0, self.seq_len, dtype=torch.long)
        return torch.from_numpy(np.stack([self._row(i) for i in indices]).astype(np.int64))

    def __getitem__(self, key):
        """Rows by an integer, a slice or a 1-D integer index (negatives count from the end),
        optionally with columns: ``rows[index, columns]``."""
        columns = slice(None)
        if isinstance(key, tuple):
            key, columns = key
        if isinstance(key, slice):
            return self._rows(range(*key.indices(len(self))))[:, columns]
        index = torch.as_tensor(key)
        if index.dtype == torch.bool or index.is_floating_point() or index.dim() > 1:
            raise IndexError(f"token shards are indexed by integers, slices or 1-D integer indices, not {key!r}")
        rows = self._rows(i + len(self) if i < 0 else i for i in index.reshape(-1).tolist())
        return (rows[0] if index.dim() == 0 else rows)[..., columns]

    def __getstate__(self):  # picklable (DataLoader workers): file handles are reopened
        return {k: v for k, v in self.__dict__.items() if k != "_handles"}

    def __setstate__(self, state):
        self.__dict__.update(state, _handles=OrderedDict())
        weakref.finalize(self, _close_all, self._handles)


def _close_all(handles: dict) -> None:
    for handle in handles.values():
        os.close(handle)
    handles.clear()
