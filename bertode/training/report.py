"""`python -m bertode.report DIR [DIR ...] [--out OUT]`: one table and plots from runs.

Reads every run under the given directories: `bertode.evaluate` runs (``evaluation.json``),
`bertode.finetune` runs (``results.json``) and `bertode.train` runs (``metrics.jsonl``
with their ``.hydra/overrides.yaml``). Each run is labelled by the overrides that differ
between the runs of its kind. Prints a markdown table per kind; with ``--out`` also
writes ``report.md``, ``report.json`` (the rows) and PNG plots: evaluation quality
against inference compute (NFE or DEQ iterations), training loss against wall-clock time
and against cumulative forward NFE.

Depth curves (issue 24): an evaluate run with a ``curve`` (``curve=true``: the loss at every
depth of one pass), or the evaluate runs of one checkpoint at several depths (a ``-m`` sweep
of ``solver.steps``, ``deq.max_iter`` or ``depth.steps``, read from each run's overrides),
are fitted with the saturation law L(n) = L_inf + A exp(-n / tau) (`fit_saturation`) and
tabulated with L_inf, tau and `extrapolation_ratio`, the loss at 4x the trained depth over
the loss at the trained depth (read from the checkpoint's config.json); ``--out`` plots
them with their fits (``depth_curves.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
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
                             **{k: data.get(k) for k in COLUMNS["evaluate"]},
                             "checkpoint": data.get("checkpoint"), "depth": _run_depth(data),
                             "dial": (data.get("exit"), data.get("exit_threshold")), "depth_curve": data.get("curve")})
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


# Where an evaluate run's overrides (field names, or the typed keys) hold its depth.
DEPTH_KEYS = ("depth", "depth.steps", "depth_steps", "deq_max_iter", "deq.max_iter", "steps", "solver.steps")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _run_depth(data: dict) -> int | None:
    """The depth an evaluate run ran at: the dialled ``depth`` (``depth.steps``), else the
    ``deq.max_iter`` or ``solver.steps`` it chose, else the model's own (its ``deq_max_iter``
    or ODE ``steps``, as evaluate records them); None for a looped core left at its own."""
    overrides = data.get("overrides") or {}
    for value in [data.get("depth")] + [overrides.get(key) for key in DEPTH_KEYS]:
        if _is_count(value):
            return value
    own = data.get("deq_max_iter") if data.get("mode") == "deq" else data.get("steps")
    return own if _is_count(own) else None


def _sweep_key(r: dict) -> tuple:
    """What the runs of one depth sweep share: the checkpoint, every other override, the exit."""
    others = tuple(s for s in r["settings"] if s.split("=", 1)[0] not in DEPTH_KEYS)
    return r.get("checkpoint") or "", others, r.get("dial")


def _trained_depth(checkpoint: str | None) -> int | None:
    """The depth a checkpoint was trained at: a DEQ's ``deq_max_iter``, a looped core's
    applications, an ODE's ``steps`` (its config.json), or None."""
    path = Path(checkpoint) / "config.json" if checkpoint else None
    if path is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        return None
    if saved.get("mode") == "deq":
        return saved.get("deq_max_iter")
    if saved.get("weight_tying"):
        return saved.get("num_hidden_layers", 0) - (saved.get("prelude_layers") or 0) - (saved.get("coda_layers") or 0)
    return saved.get("steps") if saved.get("mode", "ode") == "ode" else None


def _saturation(n, l_inf, a, tau):
    import numpy as np

    return l_inf + a * np.exp(-np.asarray(n, dtype=float) / tau)


def fit_saturation(depths, losses) -> dict:
    """Least-squares fit of L(n) = L_inf + A exp(-n / tau) (tau > 0) to the losses at the depths:
    ``{"L_inf", "A", "tau", "rmse", "message"}``, ``message`` None; where there is nothing to
    fit (fewer than 3 distinct depths, non-finite losses, a failed fit) the numbers are None
    and ``message`` says why (it never raises). A flat curve fits A = 0 and tau None."""
    import numpy as np

    failed = dict(L_inf=None, A=None, tau=None, rmse=None)
    points = sorted({float(n): float(loss) for n, loss in zip(depths, losses)}.items())
    if len(points) < 3:
        return {**failed, "message": f"{len(points)} distinct depth(s); the saturation fit needs at least 3"}
    n, y = (np.array(column) for column in zip(*points))
    if not np.all(np.isfinite(y)) or not np.all(np.isfinite(n)):
        return {**failed, "message": "non-finite losses or depths; nothing to fit"}
    spread = float(y.max() - y.min())
    if spread <= 1e-12 * max(1.0, abs(float(y.mean()))):
        return dict(L_inf=float(y.mean()), A=0.0, tau=None, rmse=float(np.sqrt(np.mean((y - y.mean()) ** 2))),
                    message="the loss does not change with depth: A = 0, tau undefined")
    # Initial guesses: L_inf a little past the last loss, tau from a line through log(L - L_inf).
    decreasing = y[0] >= y[-1]
    l_inf0 = y[-1] - 0.1 * spread if decreasing else y[-1] + 0.1 * spread
    gap = np.abs(y - l_inf0)
    slope = np.polyfit(n, np.log(np.maximum(gap, 1e-12)), 1)[0]
    tau0 = -1.0 / slope if slope < 0 else float(n.max() - n.min()) / 2 or 1.0
    tau0 = float(np.clip(tau0, 1e-3, 1e6))
    a0 = float((y[0] - l_inf0) * np.exp(n[0] / tau0))
    if not np.isfinite(a0):
        a0 = float(y[0] - l_inf0)
    try:
        from scipy.optimize import OptimizeWarning, curve_fit

        with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore"):
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(_saturation, n, y, p0=(l_inf0, a0, tau0),
                                  bounds=((-np.inf, -np.inf, 1e-9), (np.inf, np.inf, np.inf)),
                                  maxfev=20000, ftol=1e-15, xtol=1e-15, gtol=1e-15)
    except (RuntimeError, ValueError) as error:
        return {**failed, "message": f"the saturation fit failed: {str(error).splitlines()[0]}"}
    l_inf, a, tau = (float(v) for v in params)
    rmse = float(np.sqrt(np.mean((_saturation(n, l_inf, a, tau) - y) ** 2)))
    if not all(map(math.isfinite, (l_inf, a, tau, rmse))):
        return {**failed, "message": "the saturation fit failed: non-finite parameters"}
    return dict(L_inf=l_inf, A=a, tau=tau, rmse=rmse, message=None)


def extrapolation_ratio(depths, losses, trained_depth, fit: dict | None = None) -> float | None:
    """loss(4 x trained_depth) / loss(trained_depth): measured losses where the depths were
    evaluated, the saturation fit (`fit_saturation`, or ``fit``) where not; None where a loss
    needed is neither measured nor fitted."""
    if not trained_depth:
        return None
    measured = {float(n): float(loss) for n, loss in zip(depths, losses)}

    def loss_at(depth):
        nonlocal fit
        if float(depth) in measured:
            return measured[float(depth)]
        fit = fit or fit_saturation(depths, losses)
        if fit.get("L_inf") is None:
            return None
        return float(_saturation(depth, fit["L_inf"], fit["A"] or 0.0, fit["tau"] or 1.0))

    base, far = loss_at(trained_depth), loss_at(4 * trained_depth)
    return None if base is None or far is None or base == 0 else far / base


def depth_curves(runs: list[dict]) -> list[dict]:
    """One curve per model: each evaluate run's own ``curve``, and per checkpoint the evaluate
    runs without one that chose depths (at least two), each with its fit and ratio."""
    curves, sweeps = [], {}
    for r in runs:
        if r["kind"] != "evaluate":
            continue
        if r.get("depth_curve"):
            points = [(p["depth"], p["loss"]) for p in r["depth_curve"]]
            curves.append({"checkpoint": r.get("checkpoint"), "run": r["run"], "points": points})
        elif r.get("depth") is not None and r.get("loss") is not None:
            sweeps.setdefault(_sweep_key(r), []).append((r["depth"], r["loss"]))
    for (checkpoint, others, _), points in sweeps.items():
        if len({n for n, _ in points}) >= 2:
            curves.append({"checkpoint": checkpoint or None, "run": None, "points": sorted(points), "others": others})
    for curve in curves:
        depths, losses = zip(*curve["points"])
        curve["depths"], curve["losses"] = list(depths), list(losses)
        checkpoint = curve["checkpoint"]
        curve["model"] = "/".join(Path(checkpoint).parts[-2:]) if checkpoint else Path(curve["run"] or "?").name
        if curve.get("others"):
            curve["model"] += f" ({', '.join(curve['others'])})"
        curve["trained_depth"] = _trained_depth(checkpoint)
        curve["fit"] = fit_saturation(depths, losses)
        curve["ratio"] = extrapolation_ratio(depths, losses, curve["trained_depth"], curve["fit"])
    return curves


def depth_table(curves: list[dict]) -> str:
    """The depth curves' fits: model, L_inf, A, tau, rmse, trained depth and the 4x ratio."""
    if not curves:
        return ""
    out = [f"### depth curves ({len(curves)} model{'s' if len(curves) > 1 else ''}): "
           "L(n) = L_inf + A exp(-n / tau)", "",
           "| model | depths | L_inf | A | tau | rmse | trained depth | loss(4x) / loss(1x) |", "|---" * 8 + "|"]
    notes = []
    for c in curves:
        fit = c["fit"]
        span = f"{min(c['depths'])}-{max(c['depths'])} ({len(c['depths'])})"
        out.append("| " + " | ".join([c["model"], span] + [_cell(fit.get(k)) for k in ("L_inf", "A", "tau", "rmse")]
                                     + [_cell(c["trained_depth"]), _cell(c["ratio"])]) + " |")
        if fit.get("message"):
            notes.append(f"{c['model']}: {fit['message']}")
    return "\n".join(out + [""] + notes + ([""] if notes else []))


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
    def compute_of(r):
        return r.get("nfe_forward") if r.get("nfe_forward") is not None else r.get("forward_iterations")

    evaluations = [r for r in runs if r["kind"] == "evaluate" and r.get("loss") is not None
                   and compute_of(r) is not None]  # an evaluation that counted no compute has no place here
    if evaluations:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for r in evaluations:
            compute = compute_of(r)
            ax.plot(compute, r["loss"], "o")
            ax.annotate(r["label"], (compute, r["loss"]), fontsize=8)
        ax.set(xlabel="forward NFE (or DEQ iterations) per batch", ylabel="eval loss (MLM or next-token)", xscale="log",
               title="quality against inference compute")
        written.append(out / "evaluation_vs_compute.png")
        fig.tight_layout(), fig.savefig(written[-1], dpi=120), plt.close(fig)
    curves = depth_curves(runs)
    if curves:
        import numpy as np

        fig, ax = plt.subplots(figsize=(5.5, 4))
        for index, c in enumerate(curves):
            color = f"C{index % 10}"
            ax.plot(c["depths"], c["losses"], "o", color=color, label=c["model"])
            fit = c["fit"]
            if fit.get("L_inf") is not None and fit.get("tau") is not None:
                grid = np.linspace(min(c["depths"]), max(max(c["depths"]), 4 * (c["trained_depth"] or 0)), 200)
                ax.plot(grid, _saturation(grid, fit["L_inf"], fit["A"], fit["tau"]), "-", color=color, alpha=0.7,
                        label=f"L_inf {fit['L_inf']:.3f}, tau {fit['tau']:.2f}")
            if c["trained_depth"]:
                ax.axvline(c["trained_depth"], color=color, linestyle=":", alpha=0.5)
        ax.set(xlabel="depth (iterations, applications or steps)", ylabel="eval loss",
               title="quality against depth: L_inf + A exp(-n / tau)")
        ax.legend(fontsize=7)
        written.append(out / "depth_curves.png")
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
    curves = depth_curves(runs)
    text = table(runs) + ("\n" + depth_table(curves) if curves else "")
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(text)
        rows = [{k: v for k, v in r.items() if k != "curve"} for r in runs]
        rows += [{"kind": "depth_curve", **{k: c[k] for k in ("model", "checkpoint", "depths", "losses", "trained_depth",
                                                              "fit", "ratio")}} for c in curves]
        (args.out / "report.json").write_text(json.dumps(rows, indent=2, default=float))
        for path in plots(runs, args.out):
            print(f"wrote {path}")
    return 0
