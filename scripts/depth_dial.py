"""Depth as a dial (issue 24 item 5): does more depth at test time buy quality, and can each token stop early?

    python scripts/depth_dial.py --out results/depth_dial_cpu        # ~35 minutes on 2 CPU cores
    python scripts/depth_dial.py --steps 20 --out /tmp/depth_quick   # a dry run

The setting (Huginn's, at tiny size): a looped masked LM with a 1-layer prelude, a weight-tied
discrete core that re-injects its input at every application (``core_injection=add``, from
z = 0) and a 1-layer coda: hidden 128, 4 heads, intermediate 512, the same 1.73 M parameters in
every row. Trained ``--steps`` optimizer steps on the shared WikiText-2 ``valid.txt`` (batch 16,
128 tokens, WordPiece 8000), evaluated on every row of ``test.txt`` with the masking fixed.

1. Two models, truncated backpropagation through the last ``--backprop`` applications:
   ``fixed``: the core applied n = ``--depth`` times in every step; ``sampled``: the number of
   applications drawn per step from Poisson-log-normal of mean n (``depth=poisson_lognormal``).
   Each is evaluated at depth 1..4n from ONE pass (``bertode.evaluate curve=true depth.steps=4n``),
   which gives the loss at n/2, n, 2n and 4n.
2. The sampled model with ``exit=latent_diff`` at several thresholds against itself at its
   maximum depth (2n): mean exit depth, loss, and evaluation wall-clock (the model's forward
   and its head at the masked positions, what the loss reads), in one process, the
   configurations interleaved batch by batch (median of ``--repeats`` rounds).
3. L(n) = L_inf + A exp(-n / tau) fitted to each curve (`bertode.training.report.fit_saturation`)
   and the extrapolation ratio loss(4n) / loss(n).

Writes ``OUT.json`` (device, versions, budget, every number), ``OUT.md`` (the tables) and
``OUT.png`` (the curves with their fits).
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

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data" / "wikitext-2"
LOOPED = ["model=bert", "model.weight_tying=true", "model.prelude_layers=1", "model.coda_layers=1", "size=tiny"]


def data_overrides(args, cache: Path) -> list[str]:
    return ["data=text", f"data.files=[{args.data / 'valid.txt'}]", f"data.eval_files=[{args.data / 'test.txt'}]",
            "data.seq_len=128", "data.vocab_size=8000", "data.max_eval_sequences=null", f"data.cache_dir={cache}"]


def run(command: list[str], what: str) -> str:
    done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if done.returncode != 0:
        raise SystemExit(f"{what} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def train(name: str, depth: list[str], args, work: Path) -> Path:
    run_dir = work / name
    if not (run_dir / "final" / "config.json").exists():
        injection = [] if args.injection == "none" else [f"model.core_injection={args.injection}"]
        run(["bertode.train", *LOOPED, *injection, f"model.num_hidden_layers={args.depth + 2}", *depth,
             f"depth.backprop={args.backprop}", *data_overrides(args, work / "cache"), "trainer.batch_size=16",
             "trainer.lr=1e-3", f"trainer.max_steps={args.steps}", f"trainer.eval_every={args.steps}",
             f"trainer.checkpoint_every={args.steps}", "trainer.log_every=100", f"seed={args.seed}",
             f"hydra.run.dir={run_dir}"], f"training {name}")
    return run_dir / "final"


def curve(name: str, final: Path, args, work: Path) -> list[dict]:
    out = work / f"{name}_curve"
    run(["bertode.evaluate", f"checkpoint={final}", "curve=true", f"depth.steps={4 * args.depth}",
         *data_overrides(args, work / "cache"), f"hydra.run.dir={out}"], f"the curve of {name}")
    return json.loads((out / "evaluation.json").read_text())["curve"]


def exit_timing(final: Path, args, work: Path) -> list[dict]:
    """The sampled model at depth 2n, with and without exit, interleaved batch by batch in this process."""
    import torch

    import bertode
    from bertode.training.cli import compose
    from bertode.training.corpus import load_tokenizer, prepare
    from bertode.training.lm import fixed_eval_batches, masked_ce_sum
    from bertode.training.objective import make_objective

    torch.set_num_threads(args.threads)
    cfg = compose("evaluate", [f"checkpoint={final}", *data_overrides(args, work / "cache")])
    tokenizer = load_tokenizer(final)
    corpus = prepare(cfg.data, tokenizer=tokenizer)
    objective = make_objective("mlm", tokenizer, cfg.data.mlm_probability)
    model = bertode.BertODEForMaskedLM.from_pretrained(final).eval()
    batches = fixed_eval_batches(corpus.eval, objective, 0, 16)
    depth = 2 * args.depth
    settings = [("none", None)] + [(f"latent_diff {t:g}", bertode.make_exit_criterion("latent_diff", t))
                                   for t in args.thresholds]
    totals = {name: {"ce": 0.0, "targets": 0, "depths": 0.0, "tokens": 0, "seconds": []} for name, _ in settings}
    with torch.no_grad():
        for round_index in range(args.repeats):
            for name, _ in settings:
                totals[name]["round"] = 0.0
            for inputs, labels in batches:
                for name, criterion in settings:
                    started = time.perf_counter()
                    with bertode.dialed(depth=depth, exit=criterion):
                        hidden = model.bert(input_ids=inputs).last_hidden_state
                    scored = labels != -100  # the head at the masked positions only: what the loss reads
                    logits = model.readout(hidden[scored])
                    totals[name]["round"] += time.perf_counter() - started
                    if round_index == 0:  # the losses and depths are the same every round
                        ce, _right = masked_ce_sum(logits, labels[scored])
                        total = totals[name]
                        total["ce"] += ce.item()
                        total["targets"] += int((labels != -100).sum())
                        depths = model.bert.encoder.last_stats.exit_depths
                        total["depths"] += float(depths.sum()) if depths is not None else depth * inputs.numel()
                        total["tokens"] += inputs.numel()
            for name, _ in settings:
                totals[name]["seconds"].append(totals[name]["round"])
    base = statistics.median(totals["none"]["seconds"])
    rows = []
    for name, _ in settings:
        total = totals[name]
        seconds = statistics.median(total["seconds"])
        rows.append({"exit": name, "max_depth": depth, "loss": total["ce"] / total["targets"],
                     "mean_depth": total["depths"] / total["tokens"], "seconds": seconds,
                     "time_ratio": seconds / base, "rounds": total["seconds"]})
    return rows


def fits(curves: dict, trained: int) -> dict:
    from bertode.training.report import extrapolation_ratio, fit_saturation

    out = {}
    for name, points in curves.items():
        depths = [p["depth"] for p in points]
        losses = [p["loss"] for p in points]
        fit = fit_saturation(depths, losses)
        out[name] = {**fit, "ratio_4x": extrapolation_ratio(depths, losses, trained, fit)}
    return out


def saturates(fit: dict, depths: list) -> bool:
    """Whether the fit is a saturation within the measured depths (a rising curve fits a line, not L_inf)."""
    return fit.get("tau") is not None and fit.get("A", 0) >= 0 and fit["tau"] <= max(depths)


def plot(curves: dict, fitted: dict, path: Path) -> None:
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        depths = [p["depth"] for p in points]
        line, = axes.plot(depths, [p["loss"] for p in points], "o", label=f"{name} (measured)")
        fit = fitted[name]
        if saturates(fit, depths):
            grid = [1 + i * (max(depths) - 1) / 200 for i in range(201)]
            axes.plot(grid, [fit["L_inf"] + fit["A"] * math.exp(-n / fit["tau"]) for n in grid], "-",
                      color=line.get_color(), label=f"{name}: L_inf {fit['L_inf']:.3f}, tau {fit['tau']:.2f}")
    axes.set_xlabel("depth (core applications)")
    axes.set_ylabel("MLM loss on WikiText-2 test (nats)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def markdown(result: dict, args) -> str:
    n = args.depth
    lines = [f"Depth dial, {result['device']}, {result['budget']}", "",
             f"| model | loss @ {n // 2} | @ {n} (trained) | @ {2 * n} | @ {4 * n} | L_inf | tau | loss(4n)/loss(n) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, points in result["curves"].items():
        at = {p["depth"]: p["loss"] for p in points}
        fit = result["fits"][name]
        cells = [f"{at[d]:.4f}" if d in at else "" for d in (max(n // 2, 1), n, 2 * n, 4 * n)]
        shown = (f"{fit['L_inf']:.4f} | {fit['tau']:.2f}" if saturates(fit, list(at))
                 else "no saturation | (the loss rises past its minimum)")
        lines.append(f"| {name} | {' | '.join(cells)} | {shown} | {fit['ratio_4x']:.4f} |")
    lines += ["", f"| sampled model, max depth {2 * n} | mean depth | loss | eval seconds | time × no exit |",
              "|---|---|---|---|---|"]
    for row in result["exit"]:
        lines.append(f"| {row['exit']} | {row['mean_depth']:.2f} | {row['loss']:.4f} | {row['seconds']:.2f} | "
                     f"{row['time_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="OUT.json, OUT.md and OUT.png are written")
    parser.add_argument("--work", type=Path, default=None, help="run directories (default: OUT_runs)")
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--depth", type=int, default=4, help="n: the fixed model's depth, the sampled model's mean")
    parser.add_argument("--backprop", type=int, default=2)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--injection", choices=["add", "none"], default="add", help="the looped core's input injection")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.05, 0.03])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-json", type=Path, default=None, help="redraw OUT.md and OUT.png from a result JSON")
    args = parser.parse_args()
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        Path(f"{args.out}.md").write_text(markdown(result, args))
        plot(result["curves"], result["fits"], Path(f"{args.out}.png"))
        return 0
    work = args.work or Path(f"{args.out}_runs")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    finals = {"fixed": train("fixed", ["depth=fixed"], args, work),
              "sampled": train("sampled", ["depth=poisson_lognormal", f"depth.mean={args.depth}",
                                           f"depth.sigma={args.sigma}"], args, work)}
    curves = {name: curve(name, final, args, work) for name, final in finals.items()}
    import torch
    import transformers

    result = {"device": f"CPU {os.cpu_count()} cores ({platform.machine()}), {args.threads} torch thread(s), fp32",
              "budget": f"{args.steps} steps of batch 16 x 128 tokens per model, depth n = {args.depth}, "
                        f"backprop {args.backprop}, sigma {args.sigma}, core injection {args.injection}, seed {args.seed}",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "curves": curves, "fits": fits(curves, args.depth), "exit": exit_timing(finals["sampled"], args, work)}
    result["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2))
    Path(f"{args.out}.md").write_text(markdown(result, args))
    plot(curves, result["fits"], Path(f"{args.out}.png"))
    print(markdown(result, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
