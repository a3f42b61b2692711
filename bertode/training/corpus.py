"""Training data for masked-language modelling: text in, packed token ids out.

`prepare(data_cfg)` reads the train and eval documents (`documents.py`: the embedded
sample, local files and globs, or any `datasets` source), trains a tokenizer on the train
text (deterministically; on its first ``tokenizer_sample_bytes`` bytes): ``data.vocabulary``
``wordpiece`` (`wordpiece.py`) or ``word`` (`words.py`: words, ``<eos>`` ending every line),
or loads one, packs each split into rows ``[CLS] t1 ... t_{T-2} [SEP]`` of length T
(`shards.Packer`) and writes them as token shards (`shards.write_rows`) under
``cache_dir/<hash of the data config and inputs>``: ``tokenizer/``, ``train/``, ``eval/``,
each built beside the entry and renamed into it, so a rerun (or ``python -m
bertode.prepare``, run once beforehand) reuses them and a killed run leaves nothing
half-written. With ``data.streaming=true`` the train split is not written: training
packs it on the fly (`stream.py`); the cache keeps the tokenizer, the eval rows and the
first ``STREAM_HEAD_ROWS`` train rows (their token counts give the unigram baseline).
What a row becomes as inputs and labels is the objective's (`objective.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from .documents import documents, identities
from .shards import Packer, ShardRows, write_rows
from .sources import DataError
from .words import SPECIAL_TOKENS as WORD_SPECIALS, read_by

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCABULARIES = ("wordpiece", "word")  # data.vocabulary: `wordpiece.py`, `words.py`


STREAM_HEAD_ROWS = 2048
STREAM_EVAL_ROWS = 4096  # eval rows kept for a streamed corpus when data.max_eval_sequences is null


@dataclass
class Corpus:
    tokenizer: object  # transformers BertTokenizerFast
    train: ShardRows | None  # (rows, seq_len) on disk, read by row; None when streaming
    eval: torch.Tensor  # (rows, seq_len) int64
    cache: Path
    counts: torch.Tensor  # token counts of the train rows (streaming: of the first STREAM_HEAD_ROWS)


# --- tokenizer and packing ------------------------------------------------------------
def _train_tokenizer(lines, vocab_size: int, lowercase: bool, sample_bytes: int | None = None, cfg=None):
    """``data.vocabulary``'s tokenizer trained deterministically on the train text, or on its first
    ``sample_bytes`` bytes (a bounded, deterministic sample for large corpora): WordPiece (`wordpiece.py`),
    or words (`words.py`, keeping those seen ``data.min_count`` times)."""
    if cfg is not None and cfg.get("vocabulary", "wordpiece") == "word":
        from . import words

        return words.train_tokenizer(_sample(lines, sample_bytes), vocab_size, cfg.get("min_count", 1), lowercase)
    from .wordpiece import train_tokenizer

    return train_tokenizer(_sample(lines, sample_bytes), vocab_size, SPECIAL_TOKENS, lowercase)


def _sample(lines, sample_bytes: int | None) -> list[str]:
    if not sample_bytes:
        return list(lines)
    taken, size = [], 0
    for line in lines:
        if size >= sample_bytes:
            break
        taken.append(line)
        size += len(line.encode("utf-8")) + 1
    return taken


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt")


def holds_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a saved tokenizer (any of the files transformers reads)."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise DataError(f"data.tokenizer: {str(path)!r} is not a directory with a saved tokenizer")
    return AutoTokenizer.from_pretrained(path)


def vocabulary_hash(tokenizer) -> str:
    """A tokenizer's identity for the cache: its vocabulary, lower-casing and special tokens."""
    blob = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens,
                       getattr(tokenizer, "do_lower_case", None)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_key(cfg, identities) -> str:
    fields = {k: cfg.get(k) for k in ("source", "hub_path", "hub_name", "eval_fraction", "seq_len", "vocab_size",
                                      "lowercase", "tokenizer", "tokenizer_sample_bytes", "text_column",
                                      "train_split", "eval_split")}
    fields["tokenizer"] = str(Path(fields["tokenizer"]).resolve()) if fields["tokenizer"] else None
    if cfg.get("vocabulary", "wordpiece") != "wordpiece":  # (absent for WordPiece: its entries keep their keys)
        fields.update(vocabulary=cfg.vocabulary, min_count=cfg.get("min_count", 1))
    # format 3: token shards (2: one safetensors file; 1: a per-process WordPiece draw)
    blob = json.dumps({"fields": fields, "inputs": identities, "format": 3}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_data(cfg, trains_tokenizer: bool = True) -> None:
    """The data options that need no reading (also checked before Hydra writes anything)."""
    if not isinstance(cfg.seq_len, int) or cfg.seq_len < 8:
        raise DataError(f"data.seq_len={cfg.seq_len!r} is invalid; allowed: an integer >= 8")
    if not isinstance(cfg.mlm_probability, (int, float)) or not 0 < cfg.mlm_probability < 1:
        raise DataError(f"data.mlm_probability={cfg.mlm_probability!r} is invalid; allowed: a number in (0, 1)")
    vocabulary, min_count = cfg.get("vocabulary", "wordpiece"), cfg.get("min_count", 1)
    if vocabulary not in VOCABULARIES:
        raise DataError(f"data.vocabulary={vocabulary!r} is invalid; allowed: {', '.join(map(repr, VOCABULARIES))}")
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1 or (
            min_count != 1 and vocabulary != "word"):
        raise DataError(f"data.min_count={min_count!r} is invalid with data.vocabulary={vocabulary!r}; allowed: an "
                        "integer >= 1 with data.vocabulary=word (words seen fewer times are <unk>), else 1")
    if vocabulary == "word" and trains_tokenizer and not cfg.tokenizer and cfg.vocab_size is not None and (
            isinstance(cfg.vocab_size, bool) or not isinstance(cfg.vocab_size, int) or cfg.vocab_size <= len(WORD_SPECIALS)):
        raise DataError(f"data.vocab_size={cfg.vocab_size!r} is invalid with data.vocabulary='word'; allowed: null "
                        f"(every word) or an integer > {len(WORD_SPECIALS)} (the special tokens, then the most frequent "
                        "words)")
    if vocabulary != "word" and trains_tokenizer and not cfg.tokenizer and (
            isinstance(cfg.vocab_size, bool) or not isinstance(cfg.vocab_size, int) or cfg.vocab_size <= len(SPECIAL_TOKENS)):
        raise DataError(f"data.vocab_size={cfg.vocab_size!r} is invalid; allowed: an integer > {len(SPECIAL_TOKENS)} "
                        "(the special tokens, then the characters and word pieces)")
    if not isinstance(cfg.lowercase, bool):
        raise DataError(f"data.lowercase={cfg.lowercase!r} is invalid; allowed: true, false")
    limit = cfg.max_eval_sequences
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"data.max_eval_sequences={limit!r} is invalid; allowed: null (all) or an integer >= 1")
    if cfg.tokenizer and not holds_tokenizer(Path(os.path.expanduser(str(cfg.tokenizer)))):
        raise DataError(f"data.tokenizer: {str(cfg.tokenizer)!r} is not a directory with a saved tokenizer")
    sample_bytes = cfg.get("tokenizer_sample_bytes")
    if sample_bytes is not None and (isinstance(sample_bytes, bool) or not isinstance(sample_bytes, int) or sample_bytes < 1):
        raise DataError(f"data.tokenizer_sample_bytes={sample_bytes!r} is invalid; allowed: null or an integer >= 1")
    cache = Path(os.path.expanduser(str(cfg.cache_dir)))
    blocker = next((p for p in (cache, *cache.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise DataError(f"data.cache_dir={str(cfg.cache_dir)!r} is invalid: {str(blocker)!r} is a file; allowed: a "
                        "directory (or a path to create)")


def _build(entry: Path, part: str, write) -> Path:
    """``entry/part``, written by ``write(folder)`` beside the entry and renamed into it
    unless it is there already (another process that won the race leaves its copy)."""
    target = entry / part
    if not target.exists():
        entry.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=entry))
        try:
            write(staging / part)
            os.rename(staging / part, target)
        except OSError:
            if not target.exists():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _rows(folder: Path, tokenizer, texts, cfg, split: str, limit: int | None = None) -> None:
    vocab = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    if write_rows(folder, Packer(tokenizer, texts, cfg.seq_len), cfg.seq_len, vocab, limit) == 0:
        raise DataError(f"data.seq_len={cfg.seq_len} is invalid: the whole {split} split holds less than one row "
                        f"of {cfg.seq_len} tokens; allowed: a shorter data.seq_len, or more text")


def prepare(cfg, tokenizer=None, check=None) -> Corpus:
    """Tokenizer and packed rows for this data config, from the cache when it has them.

    A given ``tokenizer`` (e.g. a checkpoint's) replaces ``data.tokenizer``. ``check(corpus)``
    checks the prepared data further: its DataError, like bad data's, drops the entry this
    call began."""
    check_data(cfg)
    inputs = identities(cfg)
    if tokenizer is not None or cfg.tokenizer:
        given = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        inputs = inputs + [f"tokenizer:{vocabulary_hash(given)}"]
        cfg = read_by(cfg, given)  # a given word-level tokenizer reads blank lines too
    entry = Path(os.path.expanduser(str(cfg.cache_dir))) / _cache_key(cfg, inputs)
    # what this call may create, deepest first: the entry and the cache_dir's missing folders
    created = [] if entry.exists() else [entry, *(p for p in entry.parents if not p.exists())]
    try:
        corpus = _prepare(cfg, tokenizer, entry)
        if check is not None:
            check(corpus)
        return corpus
    except DataError:  # bad data writes nothing: drop the entry this call began (and the cache_dir it made)
        if created:
            shutil.rmtree(entry, ignore_errors=True)
            for folder in created[1:]:
                try:
                    folder.rmdir()
                except OSError:  # another process's entry is there now
                    break
        raise


def _prepare(cfg, tokenizer, entry: Path) -> Corpus:
    if tokenizer is None:
        if cfg.tokenizer:
            tokenizer = load_tokenizer(cfg.tokenizer)
        else:
            folder = _build(entry, "tokenizer", lambda f: _train_tokenizer(
                documents(cfg, "train"), cfg.vocab_size, cfg.lowercase,
                cfg.get("tokenizer_sample_bytes"), cfg).save_pretrained(f))
            tokenizer = load_tokenizer(folder)
    streaming = bool(cfg.get("streaming"))
    eval_limit = (cfg.max_eval_sequences or STREAM_EVAL_ROWS) if streaming else None
    eval_folder = _build(entry, "eval" if not streaming else f"eval-head-{eval_limit}",
                         lambda f: _rows(f, tokenizer, documents(cfg, "eval"), cfg, "eval", eval_limit))
    if streaming:
        head = ShardRows(_build(entry, f"train-head-{STREAM_HEAD_ROWS}", lambda f: _rows(
            f, tokenizer, documents(cfg, "train"), cfg, "train", STREAM_HEAD_ROWS)))
        return Corpus(tokenizer, None, ShardRows(eval_folder)[:], entry, head.counts())
    train = ShardRows(_build(entry, "train", lambda f: _rows(f, tokenizer, documents(cfg, "train"), cfg, "train")))
    return Corpus(tokenizer, train, ShardRows(eval_folder)[:], entry, train.counts())


# --- masking ---------------------------------------------------------------------------
def unigram_cross_entropy(counts: torch.Tensor, evaluation: torch.Tensor) -> float:
    """Cross-entropy (nats) of eval tokens under the add-one unigram distribution of the
    train tokens' ``counts``: the loss a model that ignores context would reach."""
    counts = counts.double() + 1
    log_probs = (counts / counts.sum()).log()
    return -log_probs[evaluation[:, 1:-1].flatten()].mean().item()
