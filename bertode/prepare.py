"""`python -m bertode.prepare data=...`: tokenize a corpus once into token shards.

    python -m bertode.prepare data=text 'data.files=[corpus/*.txt]' data.seq_len=128
    python -m bertode.prepare data=hub data.hub_path=json 'data.data_files=[shards/*.jsonl]' data.text_column=body

Runs exactly the preparation `bertode.train` runs for the same ``data`` config (the same
cache key: ``data.streaming`` is not part of it), without training: the tokenizer, the
eval rows and the train rows as ``uint16``/``uint32`` shard files with an index
(`bertode/training/shards.py`), under ``data.cache_dir``. A later `bertode.train` with the
same data config (``data.streaming=false``) reads them by row. Prints the cache entry, the
rows and the tokens; bad input is refused in one line, exit 2, and nothing is written (a
``data.cache_dir`` this run created is removed again). Several runs may prepare into one
cache at once: it takes no run-directory lock.
"""

from __future__ import annotations

from pathlib import Path

from .training.cli import hydra_entry, usage_errors
from .training.corpus import check_data, prepare
from .training.sources import check_sources


def validate(cfg) -> None:
    check_data(cfg.data)
    check_sources(cfg.data)


def run(cfg, run_dir: Path | None) -> dict:
    from omegaconf import OmegaConf

    data = OmegaConf.merge(cfg.data, {"streaming": False})  # shards are the point: write the train rows
    with usage_errors():  # data that only tokenizing shows bad (too short for one row)
        corpus = prepare(data)
    rows = len(corpus.train)
    summary = {"cache": str(corpus.cache), "train_rows": rows, "eval_rows": len(corpus.eval),
               "seq_len": data.seq_len, "train_tokens": rows * data.seq_len, "vocab_size": len(corpus.tokenizer)}
    print(f"bertode.prepare: {rows} train rows and {len(corpus.eval)} eval rows of {data.seq_len} tokens "
          f"({rows * data.seq_len:,} train tokens, vocabulary {len(corpus.tokenizer)}) in {corpus.cache}", flush=True)
    return summary


main = hydra_entry("prepare", run, precheck=validate, lock=False)

if __name__ == "__main__":
    main()
