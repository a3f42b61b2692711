"""Where the training text comes from (``data.source``): the embedded sample, local
UTF-8 files and globs, or a `datasets` hub dataset. `check_sources` checks a data config
before anything is written (files exist, are UTF-8 and hold text); `read_splits` reads
the train and eval lines."""

from __future__ import annotations

import codecs
import glob
import os
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_data"
SAMPLE_FILES = {"train": [SAMPLE_DIR / "moby_dick_train.txt"], "eval": [SAMPLE_DIR / "moby_dick_eval.txt"]}
SOURCES = ("sample", "text", "hub")


class DataError(ValueError):
    """Bad data input; the message names the config field and the offending value."""


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _expand(field: str, patterns) -> list[Path]:
    if patterns is None or isinstance(patterns, str):
        patterns = [] if patterns is None else [patterns]
    files: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"data.{field}: {pattern!r} matches no file")
        for match in matches:
            if not Path(match).is_file():
                raise DataError(f"data.{field}: {match!r} does not exist or is not a file")
            files.append(Path(match))
    return files


def _read(field: str, files: list[Path]) -> list[str]:
    lines: list[str] = []
    for path in files:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"data.{field}: {str(path)!r} is not UTF-8 text (bad byte at offset {error.start})") from None
        lines.extend(line for line in text.splitlines() if line.strip())
    return lines


def _text_lines(field: str, files: list[Path]) -> int:
    """How many non-blank lines ``files`` hold (a line cut by a chunk boundary may count
    twice); DataError naming a file that is not UTF-8 (one streaming pass, a few MB of
    memory whatever the size)."""
    lines = 0
    for path in files:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(path, "rb") as handle:
            while True:
                chunk = handle.read(1 << 22)
                try:
                    text = decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as error:
                    raise DataError(f"data.{field}: {str(path)!r} is not UTF-8 text "
                                    f"(bad byte at offset {offset + error.start})") from None
                lines += sum(1 for line in text.splitlines() if line.strip())
                if not chunk:
                    break
                offset += len(chunk)
    return lines


def check_sources(cfg) -> None:
    """Where the text comes from, checked before anything is written: the source, the hub
    dataset's name, and that every local file exists, is UTF-8 and (train) holds text."""
    if cfg.source not in SOURCES:
        raise DataError(f"data.source={cfg.source!r} is invalid; allowed: {', '.join(map(repr, SOURCES))}")
    if cfg.source == "hub" and not cfg.hub_path:
        raise DataError(f"data.hub_path={cfg.hub_path!r} is invalid with data.source='hub'; allowed: a dataset "
                        "name or a local dataset directory")
    eval_files = []
    if cfg.source == "text":
        train_files, eval_files = _expand("files", cfg.files), _expand("eval_files", cfg.eval_files)
        if not train_files:
            raise DataError("data.files is empty; give at least one text file or glob")
        lines = _text_lines("files", train_files)
        if not lines:
            raise DataError(f"data.files: {[str(p) for p in train_files]} contain no text")
        if eval_files and not _text_lines("eval_files", eval_files):
            raise DataError(f"data.eval_files: {[str(p) for p in eval_files]} contain no text")
        if not eval_files and lines < 2:
            raise DataError(f"data.files: {lines} line(s) of text are too few to hold out an eval split")
    if cfg.source != "hub" and not eval_files and not (_real(cfg.eval_fraction) and 0 < cfg.eval_fraction < 1):
        raise DataError(f"data.eval_fraction={cfg.eval_fraction!r} is invalid; allowed: a number in (0, 1)")


def _hub_lines(cfg, split: str) -> list[str]:
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - datasets is a dependency
        raise DataError("data.source='hub' needs the `datasets` package: pip install datasets") from error
    try:
        cache = os.path.join(os.path.expanduser(str(cfg.cache_dir)), "datasets")
        dataset = datasets.load_dataset(cfg.hub_path, cfg.hub_name, split=split, cache_dir=cache)
    except Exception as error:  # the hub is often unreachable; say which dataset
        raise DataError(f"data.hub_path={cfg.hub_path!r} (name {cfg.hub_name!r}, split {split!r}) could not be loaded: "
                        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    return [line for line in dataset["text"] if line.strip()]


def read_splits(cfg) -> tuple[list[str], list[str], list[str]]:
    """Train lines, eval lines, and the identities of the inputs (for the cache key)."""
    if cfg.source == "sample":
        train_files, eval_files = SAMPLE_FILES["train"], SAMPLE_FILES["eval"]
    elif cfg.source == "text":
        train_files, eval_files = _expand("files", cfg.files), _expand("eval_files", cfg.eval_files)
        if not train_files:
            raise DataError("data.files is empty; give at least one text file or glob")
    elif cfg.source == "hub":
        train, evaluation = _hub_lines(cfg, "train"), _hub_lines(cfg, "validation")
        return train, evaluation, [f"hub:{cfg.hub_path}:{cfg.hub_name}"]
    else:
        raise DataError(f"data.source={cfg.source!r} is invalid; allowed: {', '.join(map(repr, SOURCES))}")
    identities = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in train_files + eval_files]
    train = _read("files", train_files)
    if not train:
        raise DataError(f"data.files: {[str(p) for p in train_files]} contain no text")
    if eval_files:
        evaluation = _read("eval_files", eval_files)
        if not evaluation:
            raise DataError(f"data.eval_files: {[str(p) for p in eval_files]} contain no text")
    else:
        if not (_real(cfg.eval_fraction) and 0 < cfg.eval_fraction < 1):
            raise DataError(f"data.eval_fraction={cfg.eval_fraction!r} is invalid; allowed: a number in (0, 1)")
        cut = max(1, int(len(train) * (1 - cfg.eval_fraction)))
        if cut >= len(train):
            raise DataError(f"data.files: {len(train)} line(s) of text are too few to hold out an eval split")
        train, evaluation = train[:cut], train[cut:]
    return train, evaluation, identities
