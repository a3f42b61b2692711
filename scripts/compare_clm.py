"""Causal LMs on WikiText-2 at equal parameters and equal wall-clock (issue 15 item 6).

    python scripts/compare_clm.py --out results/clm_wikitext2_cpu.json      # ~25 minutes on 2 cores
    python scripts/compare_clm.py --budget 20 --out /tmp/quick.json          # a dry run

Every row is ``python -m bertode.train objective=clm`` at tiny size (hidden 128, 2
layers, 4 heads), trained on the shared WikiText-2 ``valid.txt`` for ``--budget``
seconds of training (``trainer.max_time``; the learning-rate schedule follows elapsed
time) and evaluated on every row of ``test.txt`` (next-token loss over each packed row's
text tokens, `bertode/training/objective.py`), against the unigram baseline of the same
tokens. Rows: a discrete causal transformer (post-LN BERT layers, causal), pre-LN and
post-LN ODEs (rk4, 1 step per residual) and the causal DEQ of
``experiment=deq_transformer_wt2_cpu`` (its map is the same 2 layers). Writes one JSON
(device, versions, budget, per row: parameters, steps, tokens, eval loss, perplexity)
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data" / "wikitext-2"
ROWS = {
    "discrete causal (post-LN)": ["model=bert"],
    "ODE pre-LN, rk4": ["model.norm_position=pre", "solver=rk4"],
    "ODE post-LN, rk4": ["solver=rk4"],
    "DEQ causal (qkv, Anderson/Broyden, Jacobian reg.)": ["experiment=deq_transformer_wt2_cpu"],
}


def common(args, cache: Path) -> list[str]:
    return ["objective=clm", "size=tiny", "data=text", f"data.files=[{args.data / 'valid.txt'}]",
            f"data.eval_files=[{args.data / 'test.txt'}]", "data.seq_len=128", "data.vocab_size=8000",
            "data.max_eval_sequences=null", f"data.cache_dir={cache}", "trainer.batch_size=16", "trainer.lr=1e-3",
            "trainer.max_steps=1000000", f"trainer.max_time={args.budget}", "trainer.eval_every=1000000",
            "trainer.checkpoint_every=1000000", "trainer.log_every=100", f"seed={args.seed}"]


def run_row(name: str, overrides: list[str], args, work: Path, shared: list[str] | None = None) -> dict:
    """One training run (``shared``: the overrides every row has; default: this table's `common`)."""
    run_dir = work / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    shared = common(args, work / "cache") if shared is None else shared
    command = [sys.executable, "-m", "bertode.train", *overrides, *shared, f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "final" / "train_results.json").read_text())
    config = json.loads((run_dir / "final" / "config.json").read_text())
    parameters = next(int(float(line.split(" model, ")[1].split(" M ")[0]) * 1e6) for line in done.stdout.splitlines()
                      if line.startswith("bertode.train:"))
    evaluation = summary["eval"]
    return {"name": name, "overrides": overrides, "parameters_m": parameters / 1e6, "steps": summary["step"],
            "train_tokens": summary["tokens"], "train_seconds": summary["elapsed"],
            "wall_seconds": time.perf_counter() - started, "mode": config["mode"],
            "norm_position": config["norm_position"], "solver": config.get("solver"),
            "eval_loss": evaluation["loss"], "eval_perplexity": evaluation["perplexity"],
            "eval_tokens": evaluation["target_tokens"], "unigram_loss": summary["unigram_baseline"],
            "unigram_perplexity": math.exp(summary["unigram_baseline"]),
            "nfe_forward": evaluation.get("nfe_forward"), "forward_iterations": evaluation.get("forward_iterations"),
            "run_dir": str(run_dir)}


def parse_arguments(description: str, work: Path, extra=None) -> argparse.Namespace:
    """The WikiText-2 tables' command line (``extra(parser)`` adds a table's own options); one line for a
    ``--data`` folder without valid.txt and test.txt."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds per row")
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--work", type=Path, default=work)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    for split in ("valid.txt", "test.txt"):
        if not (args.data / split).is_file():
            raise SystemExit(f"--data={args.data} is invalid: no {split}; allowed: a folder with WikiText-2's "
                             "valid.txt and test.txt (../shared/data/wikitext-2)")
    return args


def main() -> None:
    args = parse_arguments(__doc__.splitlines()[0], Path("/tmp/bertode-compare-clm"))
    import torch

    rows = [run_row(name, overrides, args, args.work) for name, overrides in ROWS.items()]
    payload = {"script": "scripts/compare_clm.py", "device": f"CPU, {os.cpu_count()} cores", "dtype": "fp32",
               "python": platform.python_version(), "torch": torch.__version__, "budget_seconds": args.budget,
               "data": "WikiText-2: train valid.txt, evaluate test.txt (every row)", "rows": rows,
               "command": " ".join(["python scripts/compare_clm.py", f"--budget {args.budget:g}", f"--out {args.out}"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"| model | params | steps in {args.budget:g} s | test loss | test perplexity |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['parameters_m']:.2f} M | {row['steps']} | {row['eval_loss']:.3f} | "
              f"**{row['eval_perplexity']:.0f}** |")
    print(f"| unigram baseline | | | {rows[0]['unigram_loss']:.3f} | {rows[0]['unigram_perplexity']:.0f} |")


if __name__ == "__main__":
    main()
