"""What the three benchmarks share: sizes, the CLI, model builders, one MLM batch, the
instrumented and the timed training step, version/device info, the table and the JSON.

Every model in a benchmark is converted with `bertode.from_bert` from one seeded HF
`BertForMaskedLM` (SDPA attention), so HF and every bertode row share config, weights,
data and dtype. Dropout is 0 (the adjoint forbids attention dropout; one setting for
all rows). Measurements:

* activation_bytes: bytes of every tensor autograd saves for backward during the forward
  of one training step (``torch.autograd.graph.saved_tensors_hooks``; a tensor saved twice
  counts twice, parameters saved by a matmul included). tracemalloc cannot see torch's
  allocator, and on CPU this is the number that a checkpointing or adjoint method changes.
* peak_bytes (CUDA only): ``torch.cuda.max_memory_allocated`` over one training step
  (forward, backward, AdamW step), and peak_step_bytes, the same minus what was allocated
  before the step (weights, gradients, optimizer state).
* branch evaluations: forward hooks on the sublayer branches (bertode's `AttentionBranch`
  and `FeedForwardBranch`, HF's `BertAttention` and `BertIntermediate`) count their calls
  in the forward and in the backward (an adjoint re-evaluates the field). BERT is 2 per
  layer; the number is comparable across HF, ODE, block and DEQ rows.
* host syncs: `bertode.solve.host_syncs.count_host_syncs` over one eager training step (forward,
  backward, AdamW step), on every device; on CUDA also what CUDA's sync detector reports.
* time: median of ``--steps`` timed steps after ``--warmup`` untimed ones, with
  ``torch.cuda.synchronize`` around each step on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM

import bertode
from bertode.solve.host_syncs import count_host_syncs

ROOT = Path(__file__).resolve().parents[1]
# A GPU machine sees only the checkout: BERTODE_WIKITEXT points at a copy brought along.
WIKITEXT = Path(os.environ.get("BERTODE_WIKITEXT", ROOT / ".." / "shared" / "data" / "wikitext-2" / "valid.txt"))

SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, intermediate=256, seq=32, batch=4, vocab=512),
    "small": dict(hidden=256, layers=4, heads=4, intermediate=1024, seq=128, batch=8, vocab=8192),
    "base": dict(hidden=768, layers=12, heads=12, intermediate=3072, seq=128, batch=32, vocab=30522),
}
# Dense bf16 peak FLOP/s (no sparsity), matched as a substring of the CUDA device name.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# --- command line and environment --------------------------------------------------------
def parser(description: str, steps: int = 10, warmup: int = 2) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: the size's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = torch.autocast")
    p.add_argument("--steps", type=int, default=steps, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed repetitions first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="JSON path (default results/<script>_<device>.json)")
    return p


def row_names(p: argparse.ArgumentParser, text: str, allowed) -> list[str]:
    """``--rows`` as a list, refused (argparse's one-line error) if a name is not in ``allowed``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        p.error(f"--rows: unknown {unknown}; allowed: {', '.join(allowed)}")
    return names


def setup(args) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    return torch.device(args.device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {cores} cores ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "bertode": bertode.__version__}
    for package in ("transformers", "torchdyn", "torchdiffeq"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def header(args, device: torch.device, sizes: dict, **extra) -> dict:
    """The JSON fields every benchmark writes before its rows."""
    return dict(device=device_name(device), device_type=device.type, dtype=args.dtype, size=args.size,
                sizes=sizes, versions=versions(), steps=args.steps, warmup=args.warmup, seed=args.seed, **extra)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- models and data ---------------------------------------------------------------------
def hf_source(sizes: dict, seed: int = 0, layers: int | None = None, weight_scale: float = 1.0) -> BertForMaskedLM:
    """A seeded HF BertForMaskedLM with SDPA attention; encoder matrices times ``weight_scale``
    (``bertode.demo`` uses 4 so the flow is far from the identity and tolerances matter)."""
    config = BertConfig(vocab_size=sizes["vocab"], hidden_size=sizes["hidden"],
                        num_hidden_layers=layers or sizes["layers"], num_attention_heads=sizes["heads"],
                        intermediate_size=sizes["intermediate"], max_position_embeddings=max(512, sizes["seq"]),
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = BertForMaskedLM._from_config(config, attn_implementation="sdpa")
    if weight_scale != 1.0:
        with torch.no_grad():
            for p in model.bert.encoder.parameters():
                if p.dim() == 2:
                    p.mul_(weight_scale)
    return model


def bertode_model(source, **overrides):
    """``from_bert(source, **overrides)``: the same weights as the HF source."""
    return bertode.from_bert(source, **overrides)


def mlm_batch(sizes: dict, device: torch.device, seed: int = 0) -> tuple[dict, str]:
    """One MLM batch (batch, seq): WikiText-2 valid words mapped to the ``vocab - 3`` most
    frequent (0 pad, 1 [MASK], 2 unk) where ``../shared/data`` is present, else random ids;
    15 % of positions masked and labelled, the rest ignored (-100). Returns (batch, source)."""
    batch, seq, vocab = sizes["batch"], sizes["seq"], sizes["vocab"]
    generator = torch.Generator().manual_seed(seed)
    if WIKITEXT.is_file():
        words = WIKITEXT.read_text(encoding="utf-8").split()[:200_000]
        ids_of = {w: i + 3 for i, (w, _) in enumerate(Counter(words).most_common(vocab - 3))}
        need = batch * seq
        start = int(torch.randint(0, len(words) - need, (1,), generator=generator))
        ids = torch.tensor([ids_of.get(w, 2) for w in words[start:start + need]]).view(batch, seq)
        source = f"wikitext-2 valid, word level, top {vocab - 3} words"
    else:
        ids = torch.randint(3, vocab, (batch, seq), generator=generator)
        source = "random token ids (../shared/data/wikitext-2 not found)"
    chosen = torch.rand(ids.shape, generator=generator) < 0.15
    chosen[:, 0] = True  # every row has a label
    labels = ids.masked_fill(~chosen, -100)
    data = dict(input_ids=ids.masked_fill(chosen, 1), attention_mask=torch.ones_like(ids), labels=labels)
    return {k: v.to(device) for k, v in data.items()}, source


# --- measuring ---------------------------------------------------------------------------
BRANCH_CLASSES = ("AttentionBranch", "FeedForwardBranch", "BertAttention", "BertIntermediate")


@contextlib.contextmanager
def count_branch_calls(model):
    """Yields a Counter whose ``"calls"`` grows by one per sublayer-branch evaluation."""
    counter = Counter()
    handles = [m.register_forward_hook(lambda *_: counter.update(calls=1))
               for m in model.modules() if type(m).__name__ in BRANCH_CLASSES]
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def saved_bytes():
    """Yields a Counter whose ``"bytes"`` sums the tensors autograd saves for backward."""
    counter = Counter()

    def pack(tensor):
        counter.update(bytes=tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield counter


def solver_numbers(model, layers: int) -> dict:
    """NFE from ``model.solver_stats()``: ODE vector-field evaluations (forward/backward),
    DEQ iterations of the map (forward_iterations/backward_iterations); for HF and the
    discrete mode (no solver) one evaluation per residual, 2 per layer, as Euler-1."""
    if not hasattr(model, "solver_stats"):
        return dict(nfe_forward=2 * layers, nfe_backward=0, solver={})
    stats = {k: v for k, v in model.solver_stats().items() if k != "layers"}
    if "forward_iterations" in stats:  # DEQ
        return dict(nfe_forward=stats["forward_iterations"], nfe_backward=stats.get("backward_iterations", 0), solver=stats)
    if stats.get("solves", 0) == 0:  # mode="discrete"
        return dict(nfe_forward=2 * layers, nfe_backward=0, solver=stats)
    return dict(nfe_forward=stats["nfe_forward"], nfe_backward=stats["nfe_backward"], solver=stats)


def make_step(model, batch, optimizer, device, dtype):
    """One training step: MLM loss forward (under autocast for bf16), backward, AdamW step."""

    def step():
        with autocast(device, dtype):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def instrumented_step(model, batch, optimizer, device, dtype, layers: int) -> dict:
    """One untimed training step that records saved bytes, branch evaluations, solver
    statistics and (CUDA) peak memory; ``model`` must be the plain (uncompiled) module."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with count_branch_calls(model) as calls:
        with saved_bytes() as saved, autocast(device, dtype):
            loss = model(**batch).loss
        forward_calls = calls["calls"]
        loss.backward()
    numbers = solver_numbers(model, layers)  # forward and backward NFE / iterations
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out = dict(activation_bytes=saved["bytes"], branch_evals_forward=forward_calls,
               branch_evals_backward=calls["calls"] - forward_calls, loss=loss.item(), **numbers)
    if device.type == "cuda":
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_bytes=peak, peak_step_bytes=peak - before)
    else:
        out.update(peak_bytes=None, peak_step_bytes=None)
    return out


def sizes_of(args) -> dict:
    """The size's dimensions, with ``--batch`` applied."""
    return dict(SIZES[args.size], **({"batch": args.batch} if args.batch else {}))


def host_syncs(fn) -> dict:
    """Host synchronisations of one ``fn()`` counted by `bertode.solve.host_syncs.count_host_syncs` (every
    device: on CPU, what would synchronise on an accelerator): ``host_syncs`` and ``host_syncs_by_op``."""
    with count_host_syncs() as syncs:
        fn()
    return dict(host_syncs=syncs.count, host_syncs_by_op=dict(syncs.by_op))


def cuda_detector_syncs(fn, device: torch.device) -> int | None:
    """Synchronisations CUDA's own sync detector (``set_sync_debug_mode``) reports during one ``fn()``
    (None on CPU). It sees only the calls that go through its checks (stream syncs, blocking copies),
    not every scalar read; `host_syncs` is the count comparable across devices."""
    if device.type != "cuda":
        return None
    import warnings
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def matmul_rate(device: torch.device) -> float | None:
    """FLOP/s of an 8192^3 bf16 matrix product measured here (CUDA only): an attainable peak."""
    if device.type != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n ** 3 / (time_calls(lambda: a @ b, 10, 3, device) / 1e3)


def time_calls(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, steps)):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --- output ------------------------------------------------------------------------------
def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, fmt)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, heading, format spec) triples."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['name']} | error: {row['error'][:80]} |" + " |" * (len(columns) - 2))
            continue
        lines.append("| " + " | ".join(_cell(row.get(k), f) for k, _, f in columns) + " |")
    return "\n".join(lines)


def write_json(path, payload: dict, script: str, device: torch.device) -> Path:
    path = Path(path) if path else ROOT / "results" / f"{script}_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def print_header(payload: dict) -> None:
    v = payload["versions"]
    s = payload["sizes"]
    print(f"device {payload['device']}, dtype {payload['dtype']}, size {payload['size']} "
          f"(hidden {s['hidden']}, layers {s['layers']}, heads {s['heads']}, intermediate {s['intermediate']}, "
          f"seq {s['seq']}, batch {s['batch']}); torch {v['torch']}, transformers {v['transformers']}, "
          f"torchdyn {v['torchdyn']}, torchdiffeq {v['torchdiffeq']}")
