"""The documents of a split, read lazily: the embedded sample, local text files, or any
`datasets` source (a hub name, or a local builder such as ``json``/``parquet``/``csv``/
``text`` with ``data.data_files``), streamed (``data.streaming``) or loaded.

`documents(cfg, split)` yields the split's non-blank texts (a word vocabulary's: every line,
`keeps_blank`) in a fixed order, without
holding the corpus in memory; `identities(cfg)` says what determined them (for the cache
key). Held-out eval text: local files without ``eval_files`` keep their last
``eval_fraction`` of lines; a `datasets` source without ``eval_split`` holds out every
K-th document (K = round(1 / eval_fraction)), which needs no length and so also streams.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .hub import data_files_of, load_hub
from .sources import SAMPLE_FILES, DataError, expand_files

SPLITS = ("train", "eval")


def _file_lines(files: list[Path], blank: bool = False) -> Iterator[str]:
    """Non-blank lines (``blank``: every line), split as ``str.splitlines`` splits the whole text, one line in memory."""
    for path in files:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                for piece in line.splitlines():
                    if blank or piece.strip():
                        yield piece


def keeps_blank(cfg) -> bool:
    """A word vocabulary keeps blank lines: each is one ``<eos>``, as Transformer-XL reads WikiText (`words.py`)."""
    return cfg.get("vocabulary", "wordpiece") == "word"


def _count_lines(files: list[Path], blank: bool = False) -> int:
    return sum(1 for _ in _file_lines(files, blank))


def _local_files(cfg) -> tuple[list[Path], list[Path]]:
    if cfg.source == "sample":
        return SAMPLE_FILES["train"], SAMPLE_FILES["eval"]
    return expand_files("files", cfg.files), expand_files("eval_files", cfg.eval_files)


def holdout_every(cfg) -> int:
    """K of the every-K-th-document hold-out of `datasets` sources without an eval split."""
    return max(2, round(1 / cfg.eval_fraction))


def _whole(dataset) -> Iterator[dict]:
    """Every example, also inside a DataLoader worker: a streamed `datasets` dataset that
    sees a worker keeps only that worker's files, but bertode's workers deal documents to
    shards themselves (`stream.py`), so each must read the whole stream. The dataset looks
    for a worker once, when iteration starts; it is started with the worker hidden."""
    from torch.utils.data._utils import worker

    iterator, hidden = iter(dataset), worker._worker_info
    worker._worker_info = None
    try:
        first = next(iterator, None)
    finally:
        worker._worker_info = hidden
    if first is not None:
        yield first
        yield from iterator


def _hub_documents(cfg, split: str) -> Iterator[str]:
    source_split = cfg.train_split if split == "train" or not cfg.eval_split else cfg.eval_split
    dataset = load_hub(cfg, source_split, bool(cfg.streaming))
    column = cfg.text_column
    every = holdout_every(cfg) if not cfg.eval_split else 0
    index = 0
    for example in _whole(dataset):
        text = example[column]
        if not isinstance(text, str) or not (text.strip() or keeps_blank(cfg)):
            continue
        if every:
            held_out = index % every == every - 1
            index += 1
            if held_out != (split == "eval"):
                continue
        yield text


def documents(cfg, split: str) -> Iterator[str]:
    """The split's non-blank documents (lines, for local text), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; allowed: {SPLITS}")
    if cfg.source == "hub":
        return _hub_documents(cfg, split)
    train_files, eval_files = _local_files(cfg)
    blank = keeps_blank(cfg)
    if eval_files:
        return _file_lines(train_files if split == "train" else eval_files, blank)
    lines = _count_lines(train_files, blank)  # the text's last eval_fraction of lines is held out
    cut = max(1, int(lines * (1 - cfg.eval_fraction)))
    if cut >= lines:
        raise DataError(f"data.files: {lines} line(s) of text are too few to hold out an eval split")
    stream = _file_lines(train_files, blank)
    if split == "train":
        return (line for i, line in zip(range(cut), stream))
    return (line for i, line in enumerate(stream) if i >= cut)


def identities(cfg) -> list[str]:
    """What determines the documents: local files by path, size and modification time;
    `datasets` sources by name, config, splits, column and their local files."""
    if cfg.source == "hub":
        files = data_files_of(cfg)
        flat = [f for v in (files.values() if isinstance(files, dict) else [files or []]) for f in v]
        described = [f"{Path(f).resolve()}:{Path(f).stat().st_size}:{Path(f).stat().st_mtime_ns}"
                     if Path(f).is_file() else str(f) for f in flat]
        return [f"hub:{cfg.hub_path}:{cfg.hub_name}:{cfg.train_split}:{cfg.eval_split}:{cfg.text_column}",
                *described]
    train_files, eval_files = _local_files(cfg)
    return [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in train_files + eval_files]
