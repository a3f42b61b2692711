"""Word-level WikiText-2 with a segment memory (issue 25): the DEQ-Transformer's setting at CPU size.

    python scripts/compare_memory.py --out results/memory_wikitext2_cpu.json   # ~25 minutes on 2 cores
    python scripts/compare_memory.py --budget 15 --out /tmp/quick.json         # a dry run

Every row is ``python -m bertode.train objective=clm`` at tiny size (hidden 128, 2 layers, 4 heads),
word level (``data.vocabulary=word``: whitespace words with ``<eos>`` at line ends, the vocabulary of
the shared WikiText-2 ``valid.txt``, the adaptive softmax cut at 2,000 and 10,000), Transformer-XL
positions, 64-word segments (``data.seq_len=66``: [CLS], 64 words, [SEP]), trained on ``valid.txt``
for ``--budget`` seconds each (``trainer.max_time``) and evaluated on the first ``--eval-rows`` rows of
``test.txt`` (1,024 of its 3,840: about 65k words; a DEQ's evaluation at 12 iterations over all of it takes
longer than its training) read in order (`training/segments.py`), perplexity per word. Rows: the causal DEQ of
``experiment=deq_transformer_wt2_cpu`` (Q/K/V injection, Anderson/Broyden, Jacobian regularisation)
trained without memory and with ``mem_len=64``; the latter evaluated again with
``bertode.evaluate model.mem_len=256`` (the paper's longer memory at evaluation); and a discrete
Transformer-XL-style baseline (2 causal post-LN layers) with ``mem_len=64``. Writes one JSON and
prints a markdown table.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_clm import ROOT, parse_arguments, run_row  # noqa: E402  (the same runner as the WordPiece table)

ROWS = {
    "DEQ, no memory": ["experiment=deq_transformer_wt2_cpu", "model.mem_len=0"],
    "DEQ, mem_len 64": ["experiment=deq_transformer_wt2_cpu", "model.mem_len=64"],
    "discrete Transformer-XL, mem_len 64": ["model=bert", "model.mem_len=64"],
}
LONGER = {"DEQ, mem_len 64": 256}  # rows evaluated again at a longer memory


def shared(args, cache: Path) -> list[str]:
    return ["objective=clm", "size=tiny", "data=text", f"data.files=[{args.data / 'valid.txt'}]",
            f"data.eval_files=[{args.data / 'test.txt'}]", "data.vocabulary=word", "data.vocab_size=null",
            "data.lowercase=false", "data.seq_len=66", f"data.max_eval_sequences={args.eval_rows}", f"data.cache_dir={cache}",
            "model.position_scheme=transformer_xl", "model.lm_head_type=adaptive", "model.adaptive_cutoffs=[2000,10000]",
            "trainer.batch_size=16", "trainer.lr=1e-3", "trainer.max_steps=1000000", f"trainer.max_time={args.budget}",
            "trainer.eval_every=1000000", "trainer.checkpoint_every=1000000", "trainer.log_every=100",
            f"seed={args.seed}"]


def evaluate_at(row: dict, mem_len: int, args, cache: Path) -> dict:
    """``bertode.evaluate`` of a row's final model at another ``mem_len`` (the training run's eval batches)."""
    out = Path(row["run_dir"]) / f"evaluate_mem{mem_len}"
    command = [sys.executable, "-m", "bertode.evaluate", f"checkpoint={row['run_dir']}/final", f"model.mem_len={mem_len}",
               "data=text", f"data.files=[{args.data / 'valid.txt'}]", f"data.eval_files=[{args.data / 'test.txt'}]",
               "data.vocabulary=word", "data.vocab_size=null", "data.lowercase=false", "data.seq_len=66",
               f"data.cache_dir={cache}", "batch_size=16", f"max_sequences={args.eval_rows}", f"hydra.run.dir={out}"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if done.returncode != 0:
        raise SystemExit(f"evaluate at mem_len {mem_len} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads((out / "evaluation.json").read_text())
    return {"name": f"{row['name']}, evaluated at mem_len {mem_len}", "parameters_m": row["parameters_m"],
            "steps": row["steps"], "eval_loss": result["loss"], "eval_perplexity": result["perplexity"],
            "eval_tokens": result["target_tokens"], "eval_seconds": time.perf_counter() - started,
            "forward_iterations": result.get("forward_iterations"), "mem_len_eval": mem_len}


def main() -> None:
    def eval_rows(parser):
        parser.add_argument("--eval-rows", type=int, default=1024, help="the first rows of test.txt scored (64 words each)")

    args = parse_arguments(__doc__.splitlines()[0], Path("/tmp/bertode-compare-memory"), eval_rows)
    import torch

    cache = args.work / "cache"
    rows = []
    for name, overrides in ROWS.items():
        row = run_row(name, overrides, args, args.work, shared(args, cache))
        row["mem_len_eval"] = int(overrides[-1].split("=")[1])
        rows.append(row)
        if name in LONGER:
            rows.append(evaluate_at(row, LONGER[name], args, cache))
    payload = {"script": "scripts/compare_memory.py", "device": f"CPU, {os.cpu_count()} cores", "dtype": "fp32",
               "python": platform.python_version(), "torch": torch.__version__, "budget_seconds": args.budget,
               "data": f"WikiText-2 word level: train valid.txt, evaluate the first {args.eval_rows} rows of test.txt in order", "rows": rows,
               "command": " ".join(["python scripts/compare_memory.py", f"--budget {args.budget:g}",
                                    f"--eval-rows {args.eval_rows}", f"--out {args.out}"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"| model | params | steps in {args.budget:g} s | memory at eval | test loss | test perplexity per word |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['parameters_m']:.2f} M | {row['steps']} | {row['mem_len_eval']} | "
              f"{row['eval_loss']:.3f} | **{row['eval_perplexity']:.1f}** |")
    print(f"| unigram baseline | | | | {rows[0]['unigram_loss']:.3f} | {math.exp(rows[0]['unigram_loss']):.1f} |")


if __name__ == "__main__":
    main()
