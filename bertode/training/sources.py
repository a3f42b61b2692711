"""Where the training text comes from (``data.source``): the embedded sample, local
UTF-8 files and globs, or a `datasets` source (a hub name, or a local builder with
``data.data_files``). `check_sources` checks a data config before anything is written:
local files exist, are UTF-8 and hold text; a `datasets` source loads (streamed, nothing
cached), has the splits and the text column asked for, and is not empty. Reading the
documents is `documents.py`'s."""

from __future__ import annotations

import codecs
import glob
import os
from pathlib import Path

from .errors import DataError

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_data"
SAMPLE_FILES = {"train": [SAMPLE_DIR / "moby_dick_train.txt"], "eval": [SAMPLE_DIR / "moby_dick_eval.txt"]}
SOURCES = ("sample", "text", "hub")




def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(cfg, field: str) -> str:
    """A file list as the user would write it on the command line (``???``: not given)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg) and OmegaConf.is_missing(cfg, field):
        return "???"
    value = cfg.get(field)
    if value is None or isinstance(value, str):
        return "null" if value is None else value
    return "[" + ",".join(map(str, value)) + "]"


def expand_files(field: str, patterns) -> list[Path]:
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
    if not isinstance(cfg.get("streaming", False), bool):
        raise DataError(f"data.streaming={cfg.streaming!r} is invalid; allowed: true, false")
    eval_files = []
    if cfg.source == "text":
        train_files, eval_files = expand_files("files", cfg.files), expand_files("eval_files", cfg.eval_files)
        if not train_files:
            raise DataError(f"data.files={_shown(cfg, 'files')} is invalid; allowed: one or more UTF-8 text files "
                            "or globs, e.g. for WikiText-2 (experiment=wikitext2_mini_5min or deq_transformer_wt2_cpu) "
                            "data.files='[../shared/data/wikitext-2/valid.txt]' "
                            "data.eval_files='[../shared/data/wikitext-2/test.txt]'")
        lines = _text_lines("files", train_files)
        if not lines:
            raise DataError(f"data.files: {[str(p) for p in train_files]} contain no text")
        if eval_files and not _text_lines("eval_files", eval_files):
            raise DataError(f"data.eval_files: {[str(p) for p in eval_files]} contain no text")
        if not eval_files and lines < 2:
            raise DataError(f"data.files: {lines} line(s) of text are too few to hold out an eval split")
    needs_holdout = not eval_files if cfg.source != "hub" else not cfg.get("eval_split")
    if needs_holdout and not (_real(cfg.eval_fraction) and 0 < cfg.eval_fraction < 1):
        raise DataError(f"data.eval_fraction={cfg.eval_fraction!r} is invalid; allowed: a number in (0, 1)")
    if cfg.source == "hub":
        from .hub import check_hub

        check_hub(cfg)
