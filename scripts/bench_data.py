"""Data pipeline throughput and footprint (issue 12): does loading ever starve the model?

    python scripts/bench_data.py --out results/bench_data_cpu.json            # ~4 minutes on 2 cores
    python scripts/bench_data.py --corpus-mb 64 --rows 400 --out /tmp/quick.json

In one process, on a corpus generated from the WikiText-2 files (``../shared/data``; its
lines repeated, each copy with its words rotated, until ``--corpus-mb`` MB):

* ``pipeline``: rows/s and tokens/s of the training rows alone: the stream
  (``data.streaming=true``: read, tokenize, pack, mask; 0 and 2 DataLoader workers) and
  the token shards (``bertode.prepare``'s files, random batches read by row, masked).
* ``steps``: training-step time of the tiny and small models (`configs/size`) with
  batches made beforehand (no pipeline) and with each batch pulled from the stream
  (2 workers) just before its step: the ratio is the pipeline's cost to training.
* ``streaming_run``: ``python -m bertode.train`` streaming the whole generated corpus
  (2 workers, tokenizer trained on its first 20 MB beforehand, eval on WikiText-2 test):
  the wall time from launch to the first optimizer step's record and the peak resident
  memory of the run and its workers (``getrusage`` in a wrapper that only waits for it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data" / "wikitext-2"
sys.path.insert(0, str(ROOT))


def make_corpus(folder: Path, megabytes: int) -> Path:
    path = folder / f"corpus_{megabytes}mb.txt"
    if path.is_file():
        return path
    lines = [line for line in (SHARED / "valid.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    target, written, copy = megabytes << 20, 0, 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target:
            for line in lines:
                words = line.split()
                shift = copy % max(len(words), 1)
                text = " ".join(words[shift:] + words[:shift]) + "\n"
                handle.write(text)
                written += len(text.encode("utf-8"))
            copy += 1
    return path


def compose(overrides):
    from bertode.train import compose as compose_train

    return compose_train(list(overrides))


def data_overrides(corpus: Path, cache: Path, streaming: bool, workers: int = 0):
    return ["data=text", f"data.files=[{corpus}]", f"data.eval_files=[{SHARED / 'test.txt'}]", "data.seq_len=128",
            "data.vocab_size=8192", "data.tokenizer_sample_bytes=20000000", f"data.cache_dir={cache}",
            f"data.streaming={str(streaming).lower()}", "data.stream_shards=4", f"data.num_workers={workers}"]


def _mlm(tokenizer):
    from bertode.training.objective import make_objective

    return make_objective("mlm", tokenizer, 0.15)


def pipeline_rate(cfg, tokenizer, rows: int, batch: int, workers: int) -> dict:
    from bertode.training.stream import StreamOrder

    cfg.num_workers = workers
    order = StreamOrder(cfg, tokenizer, batch, 0, 0, 1)
    order.local_batch(0, _mlm(tokenizer).make_batch)  # start-up (workers, first documents) not counted
    start, m = time.perf_counter(), 1
    while m * batch < rows:
        order.local_batch(m, _mlm(tokenizer).make_batch)
        m += 1
    seconds = time.perf_counter() - start
    produced = (m - 1) * batch
    return dict(kind=f"stream, {workers} workers", rows=produced, rows_per_s=produced / seconds,
                tokens_per_s=produced * cfg.seq_len / seconds, max_lookahead_documents=order.lookahead)


def shard_rate(corpus_cfg, tokenizer, train, rows: int, batch: int) -> dict:
    from bertode.training.distributed import BatchOrder

    order = BatchOrder(train, batch, 0)
    start, m = time.perf_counter(), 0
    while m * batch < rows:
        order.local_batch(m, _mlm(tokenizer).make_batch)
        m += 1
    seconds = time.perf_counter() - start
    return dict(kind="token shards (random rows)", rows=m * batch, rows_per_s=m * batch / seconds,
                tokens_per_s=m * batch * corpus_cfg.seq_len / seconds)


def step_times(size: str, cfg_data, tokenizer, steps: int) -> dict:
    from bertode.modeling import BertODEForMaskedLM
    from bertode.training.run_config import build_model_config
    from bertode.training.stream import StreamOrder

    cfg = compose([f"size={size}", "trainer.batch_size=32"])
    config = build_model_config(cfg, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = BertODEForMaskedLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg_data.num_workers = 2
    order = StreamOrder(cfg_data, tokenizer, 32, 0, 0, 1)
    made = [order.local_batch(m, _mlm(tokenizer).make_batch) for m in range(2)]

    def step(inputs, labels):
        model(input_ids=inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(*made[0])  # warm-up
    without, with_pipeline = [], []
    for m in range(steps):
        start = time.perf_counter()
        step(*made[m % 2])
        without.append(time.perf_counter() - start)
        start = time.perf_counter()
        step(*order.local_batch(m + 2, _mlm(tokenizer).make_batch))
        with_pipeline.append(time.perf_counter() - start)
    a, b = statistics.median(without) * 1e3, statistics.median(with_pipeline) * 1e3
    return dict(size=size, batch=32, seq_len=cfg_data.seq_len, ms_per_step_premade=a, ms_per_step_with_stream=b,
                ratio=b / a)


def streaming_run(corpus: Path, cache: Path, run_dir: Path) -> dict:
    overrides = data_overrides(corpus, cache, True, 2) + ["size=tiny", "trainer.max_steps=20", "trainer.log_every=1",
                                                          "trainer.eval_every=1000", f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
    # A fresh wrapper process waits for the run: its RUSAGE_CHILDREN peak covers the run and
    # its DataLoader workers only (not this process's own earlier workers).
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:]); "
               "print('peak_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", wrapper, sys.executable, "-m", "bertode.train", *overrides], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step, peak_kib = None, None
    for line in proc.stdout:
        if first_step is None and line.startswith("step 1/"):
            first_step = time.perf_counter() - start
        if line.startswith("peak_kib"):
            peak_kib = int(line.split()[1])
    proc.wait()
    total = time.perf_counter() - start
    return dict(returncode=proc.returncode, corpus_bytes=corpus.stat().st_size, seconds_to_first_step=first_step,
                seconds_total=total, peak_rss_mib=peak_kib / 1024 if peak_kib else None, steps=20,
                note="peak RSS: the largest single process among the run and its DataLoader workers "
                "(getrusage RUSAGE_CHILDREN of a wrapper process that only waits for the run)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--corpus-mb", type=int, default=1024)
    p.add_argument("--rows", type=int, default=3000, help="rows timed per pipeline")
    p.add_argument("--steps", type=int, default=10, help="timed steps per size")
    p.add_argument("--work", default="/tmp/bertode-bench-data", help="corpus and cache folder")
    p.add_argument("--out", default=str(ROOT / "results" / "bench_data_cpu.json"))
    args = p.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from bertode.training.corpus import prepare

    corpus = make_corpus(work, args.corpus_mb)
    result = dict(device=f"CPU {os.cpu_count()} cores ({platform.machine()})", torch=torch.__version__,
                  python=platform.python_version(), corpus_mb=args.corpus_mb, seq_len=128, vocab_size=8192)
    streamed = compose(data_overrides(corpus, work / "cache", True)).data
    tokenizer = prepare(streamed).tokenizer
    result["pipeline"] = [pipeline_rate(streamed, tokenizer, args.rows, 32, w) for w in (0, 2)]
    sharded = compose(data_overrides(SHARED / "valid.txt", work / "cache", False)).data
    small_corpus = prepare(sharded)
    result["pipeline"].append(shard_rate(sharded, small_corpus.tokenizer, small_corpus.train, args.rows, 32))
    for row in result["pipeline"]:
        print(f"{row['kind']}: {row['rows_per_s']:,.0f} rows/s, {row['tokens_per_s']:,.0f} tokens/s", flush=True)
    result["steps"] = [step_times(size, streamed, tokenizer, args.steps) for size in ("tiny", "small")]
    for row in result["steps"]:
        print(f"step {row['size']}: {row['ms_per_step_premade']:.1f} ms premade, {row['ms_per_step_with_stream']:.1f} ms "
              f"with the stream (x{row['ratio']:.2f})", flush=True)
    result["streaming_run"] = streaming_run(corpus, work / "cache", work / f"run-{time.time_ns()}")
    print("streaming run:", result["streaming_run"], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
