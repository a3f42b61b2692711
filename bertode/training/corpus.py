"""Training data for masked-language modelling: text in, packed token ids out.

`prepare(data_cfg)` reads the train and eval text (the embedded sample, local files and
globs, or a `datasets` hub dataset), trains a WordPiece tokenizer on the train text
(deterministically: `wordpiece.py`; on its first ``tokenizer_sample_bytes`` bytes) or
loads one, packs each split into rows ``[CLS] t1 ... t_{T-2} [SEP]`` of length T, and
caches tokenizer and rows under ``cache_dir/<hash of the data config and inputs>``, so
a rerun reuses them. Rows are stored with safetensors (no pickle). `mask_tokens` is
`DataCollatorForLanguageModeling`'s 15 % / 80-10-10 rule with an explicit generator.
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
from safetensors.torch import load_file, save_file

from .sources import DataError, read_splits

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class Corpus:
    tokenizer: object  # transformers BertTokenizerFast
    train: torch.Tensor  # (rows, seq_len) int64
    eval: torch.Tensor
    cache: Path


# --- tokenizer and packing ------------------------------------------------------------
def _train_tokenizer(lines: list[str], vocab_size: int, lowercase: bool, sample_bytes: int | None = None):
    """WordPiece trained deterministically (`wordpiece.py`) on the train text, or on its
    first ``sample_bytes`` bytes (a bounded, deterministic sample for large corpora)."""
    from .wordpiece import train_tokenizer

    return train_tokenizer(_sample(lines, sample_bytes), vocab_size, SPECIAL_TOKENS, lowercase)


def _sample(lines: list[str], sample_bytes: int | None) -> list[str]:
    if not sample_bytes:
        return lines
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


def pack(tokenizer, lines: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate the token ids of every line and cut rows [CLS] ... [SEP] of seq_len."""
    ids: list[int] = []
    for start in range(0, len(lines), 1000):
        for row in tokenizer(lines[start:start + 1000], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
    body = seq_len - 2
    rows = len(ids) // body
    if rows == 0:
        raise DataError(f"data.seq_len={seq_len} is longer than the whole split ({len(ids)} tokens)")
    table = torch.tensor(ids[: rows * body], dtype=torch.long).view(rows, body)
    cls = torch.full((rows, 1), tokenizer.cls_token_id, dtype=torch.long)
    sep = torch.full((rows, 1), tokenizer.sep_token_id, dtype=torch.long)
    return torch.cat([cls, table, sep], dim=1)


def vocabulary_hash(tokenizer) -> str:
    """A tokenizer's identity for the cache: its vocabulary, lower-casing and special tokens."""
    blob = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens,
                       getattr(tokenizer, "do_lower_case", None)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_key(cfg, identities) -> str:
    fields = {k: cfg.get(k) for k in ("source", "hub_path", "hub_name", "eval_fraction", "seq_len", "vocab_size",
                                      "lowercase", "tokenizer", "tokenizer_sample_bytes")}
    fields["tokenizer"] = str(Path(fields["tokenizer"]).resolve()) if fields["tokenizer"] else None
    # format 2: WordPiece trained deterministically (format 1 entries hold a per-process draw)
    blob = json.dumps({"fields": fields, "inputs": identities, "format": 2}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_data(cfg, trains_tokenizer: bool = True) -> None:
    """The data options that need no reading (also checked before Hydra writes anything)."""
    if not isinstance(cfg.seq_len, int) or cfg.seq_len < 8:
        raise DataError(f"data.seq_len={cfg.seq_len!r} is invalid; allowed: an integer >= 8")
    if not isinstance(cfg.mlm_probability, (int, float)) or not 0 < cfg.mlm_probability < 1:
        raise DataError(f"data.mlm_probability={cfg.mlm_probability!r} is invalid; allowed: a number in (0, 1)")
    if trains_tokenizer and not cfg.tokenizer and (isinstance(cfg.vocab_size, bool) or not isinstance(cfg.vocab_size, int)
                              or cfg.vocab_size <= len(SPECIAL_TOKENS)):
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


def prepare(cfg, tokenizer=None) -> Corpus:
    """Tokenizer and packed rows for this data config, from the cache when it has them.

    A given ``tokenizer`` (e.g. a checkpoint's) replaces ``data.tokenizer``."""
    check_data(cfg)
    train_lines, eval_lines, identities = read_splits(cfg)
    if tokenizer is not None:
        identities = identities + [f"tokenizer:{vocabulary_hash(tokenizer)}"]
    elif cfg.tokenizer:
        identities = identities + [f"tokenizer:{vocabulary_hash(load_tokenizer(cfg.tokenizer))}"]
    cache = Path(os.path.expanduser(str(cfg.cache_dir))) / _cache_key(cfg, identities)
    if (cache / "rows.safetensors").is_file():
        rows = load_file(cache / "rows.safetensors")
        tok = tokenizer if tokenizer is not None else load_tokenizer(cache / "tokenizer")
        return Corpus(tok, rows["train"], rows["eval"], cache)

    if tokenizer is None:
        tokenizer = (load_tokenizer(cfg.tokenizer) if cfg.tokenizer else
                     _train_tokenizer(train_lines, cfg.vocab_size, cfg.lowercase, cfg.get("tokenizer_sample_bytes")))
    train, evaluation = pack(tokenizer, train_lines, cfg.seq_len), pack(tokenizer, eval_lines, cfg.seq_len)
    # Build beside the cache entry, then rename: a killed run leaves no half-written entry.
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    tokenizer.save_pretrained(staging / "tokenizer")
    save_file({"train": train.contiguous(), "eval": evaluation.contiguous()}, staging / "rows.safetensors")
    try:
        os.rename(staging, cache)
    except OSError:  # another process won the race; use its entry
        shutil.rmtree(staging, ignore_errors=True)
    return Corpus(tokenizer, train, evaluation, cache)


# --- masking ---------------------------------------------------------------------------
def mask_tokens(rows: torch.Tensor, tokenizer, probability: float, generator: torch.Generator):
    """BERT's MLM corruption: choose ``probability`` of the tokens that are not special
    ([CLS], [SEP], [PAD], [UNK], [MASK]); of those,
    80 % become [MASK], 10 % a random token, 10 % stay. Labels are -100 elsewhere."""
    labels = rows.clone()
    special = torch.isin(rows, torch.tensor(tokenizer.all_special_ids, dtype=rows.dtype))  # as HF's collator
    chosen = (torch.rand(rows.shape, generator=generator) < probability) & ~special
    labels[~chosen] = -100
    inputs = rows.clone()
    draw = torch.rand(rows.shape, generator=generator)
    inputs[chosen & (draw < 0.8)] = tokenizer.mask_token_id
    randomise = chosen & (draw >= 0.8) & (draw < 0.9)
    inputs[randomise] = torch.randint(len(tokenizer), rows.shape, generator=generator)[randomise]
    return inputs, labels


def unigram_cross_entropy(train: torch.Tensor, evaluation: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats) of eval tokens under the add-one unigram distribution of train:
    the loss a model that ignores context would reach."""
    counts = torch.bincount(train[:, 1:-1].flatten(), minlength=vocab_size).double() + 1
    log_probs = (counts / counts.sum()).log()
    return -log_probs[evaluation[:, 1:-1].flatten()].mean().item()
