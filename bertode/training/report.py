"""`python -m bertode.report DIR [DIR ...] [--out OUT]`: one table and plots from runs.

Reads every run under the given directories: `bertode.evaluate` runs (``evaluation.json``),
`bertode.finetune` runs (``results.json``) and `bertode.train` runs (``metrics.jsonl``
with their ``.hydra/overrides.yaml``). Each run is labelled by the overrides that differ
between the runs of its kind. Prints a markdown table per kind; with ``--out`` also
writes ``report.md``, ``report.json`` (the rows) and PNG plots: evaluation quality
against inference compute (NFE or DEQ iterations), training loss against wall-clock time
and against cumulative forward NFE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = {
    "evaluate": ("loss", "perplexity", "accuracy", "nfe_forward", "forward_iterations", "seconds"),
    "finetune": ("accuracy", "f1", "matthews", "pearson", "spearman", "majority_baseline", "nfe_forward"),
    "train": ("eval_loss", "eval_accuracy", "steps", "elapsed", "nfe_forward"),
}


def _records(path: Path) -> list[dict]:
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return records


def _overrides(run: Path) -> list[str]:
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [line.strip()[2:] for line in path.read_text().splitlines() if line.strip().startswith("- ")]


def find_runs(roots: list[Path]) -> list[dict]:
    """One row per run found under ``roots`` (sorted by path)."""
    runs = []
    for root in roots:
        for path in sorted({*root.rglob("evaluation.json"), *root.rglob("results.json"), *root.rglob("metrics.jsonl")}):
            run = path.parent
            if path.name == "evaluation.json":
                data = json.loads(path.read_text())
                runs.append({"kind": "evaluate", "run": str(run), "settings": [f"{k}={v}" for k, v in
                                                                              sorted(data.get("overrides", {}).items())],
                             **{k: data.get(k) for k in COLUMNS["evaluate"]}})
            elif path.name == "results.json":
                data = json.loads(path.read_text())
                runs.append({"kind": "finetune", "run": str(run), "settings": _overrides(run),
                             **{k: data.get(k) for k in COLUMNS["finetune"]}})
            elif not (run / "results.json").is_file():  # a train run (finetune runs also log metrics.jsonl)
                records = _records(path)
                train = [r for r in records if r.get("kind") == "train"]
                evals = [r for r in records if r.get("kind") == "eval"]
                if not train:
                    continue
                nfe = [r["nfe_forward"] for r in train if "nfe_forward" in r]
                runs.append({"kind": "train", "run": str(run), "settings": _overrides(run),
                             "eval_loss": evals[-1]["loss"] if evals else None,
                             "eval_accuracy": evals[-1].get("accuracy") if evals else None,
                             "steps": train[-1]["step"], "elapsed": train[-1].get("elapsed"),
                             "nfe_forward": sum(nfe) / len(nfe) if nfe else None,
                             "curve": [(r["step"], r.get("elapsed"), r["loss"], r.get("nfe_forward")) for r in train]})
    for kind in COLUMNS:  # label each run by what differs between the runs of its kind
        group = [r for r in runs if r["kind"] == kind]
        common = set.intersection(*(set(r["settings"]) for r in group)) if group else set()
        for r in group:
            r["label"] = ", ".join(s for s in r["settings"] if s not in common) or Path(r["run"]).name
    return runs


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table(runs: list[dict]) -> str:
    out = []
    for kind, columns in COLUMNS.items():
        group = [r for r in runs if r["kind"] == kind]
        columns = [c for c in columns if any(r.get(c) is not None for r in group)]
        if not group:
            continue
        out += [f"### {kind} ({len(group)} run{'s' if len(group) > 1 else ''})", "",
                "| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        out += ["| " + " | ".join([r["label"]] + [_cell(r.get(c)) for c in columns]) + " |" for r in group]
        out.append("")
    return "\n".join(out)


def plots(runs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    evaluations = [r for r in runs if r["kind"] == "evaluate" and r.get("loss") is not None]
    if evaluations:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for r in evaluations:
            compute = r.get("nfe_forward") if r.get("nfe_forward") is not None else r.get("forward_iterations")
            ax.plot(compute, r["loss"], "o")
            ax.annotate(r["label"], (compute, r["loss"]), fontsize=8)
        ax.set(xlabel="forward NFE (or DEQ iterations) per batch", ylabel="eval loss (MLM or next-token)", xscale="log",
               title="quality against inference compute")
        written.append(out / "evaluation_vs_compute.png")
        fig.tight_layout(), fig.savefig(written[-1], dpi=120), plt.close(fig)
    trained = [r for r in runs if r["kind"] == "train"]
    if trained:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for r in trained:
            steps, elapsed, loss, nfe = zip(*r["curve"])
            if all(e is not None for e in elapsed):
                left.plot(elapsed, loss, label=r["label"])
            if all(n is not None for n in nfe):
                total, cumulative = 0.0, []
                for n in nfe:
                    total += n
                    cumulative.append(total)
                right.plot(cumulative, loss, label=r["label"])
        left.set(xlabel="wall-clock (s)", ylabel="train loss")
        right.set(xlabel="cumulative forward NFE", ylabel="train loss")
        left.legend(fontsize=8)
        written.append(out / "training.png")
        fig.tight_layout(), fig.savefig(written[-1], dpi=120), plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bertode.report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument("--out", type=Path, default=None, help="write report.md, report.json and PNG plots here")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"error: dirs={missing} is invalid; allowed: existing run or sweep directories", file=sys.stderr)
        return 2
    runs = find_runs(args.dirs)
    if not runs:
        print(f"error: dirs={[str(d) for d in args.dirs]} hold no runs; allowed: directories with evaluation.json, "
              "results.json or metrics.jsonl", file=sys.stderr)
        return 2
    text = table(runs)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(text)
        rows = [{k: v for k, v in r.items() if k != "curve"} for r in runs]
        (args.out / "report.json").write_text(json.dumps(rows, indent=2, default=float))
        for path in plots(runs, args.out):
            print(f"wrote {path}")
    return 0
