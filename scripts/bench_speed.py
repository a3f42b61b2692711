"""Training-step speed of bertode against HF BERT: tokens/s, ms/step, NFE, activation bytes, MFU.

    python scripts/bench_speed.py --size tiny --device cpu --out results/bench_speed_cpu_tiny.json
    python scripts/bench_speed.py --size base --device cuda --dtype bf16 [--compile]

Owns the speed comparison of issue 6. In one process, on one config, one batch and one
dtype, it times a full training step (MLM forward, backward, AdamW step) of HF
`transformers.BertForMaskedLM` (``attn_implementation="sdpa"``, the reference, always run)
and of bertode converted from it with `from_bert` (same weights): the discrete mode,
Euler with one step (= BERT) through bertode's direct loop and through torchdyn's
`NeuralODE` loop (``fixed_step_loop``; the difference is torchdyn's per-solve host
work), the discrete mode, Euler-1 and the DEQ with sparse prediction (``*_sparse``:
``sparse_prediction=True``, the MLM head and its chunked cross-entropy run on the
labelled positions only; HF stays dense), an RK2 ODE-Transformer block, RK4 with 1 and 4 steps,
dopri5 at tolerances 1e-3 and 1e-5 with autograd, dopri5 at 1e-3 with the adjoint
(backward tolerance 1e-3), and the DEQ (one layer from a one-layer source, Anderson,
max 30 iterations, tol 1e-3) with IFT and with a 5-step phantom gradient.

Timing: median of ``--steps`` steps per row after ``--warmup``, row after row (one model
in memory at a time); with ``--interleave`` every model is kept and each round times one
step of every row, so that a shared machine's drifting load falls on all rows alike.

Columns: tokens/s = batch * seq / median step time; ratio = step time / HF's;
nfe fwd/bwd from ``model.solver_stats()`` (vector-field evaluations summed over sites;
block rows also count the block's own stages; DEQ rows: forward_iterations and
backward_iterations; HF and discrete: 2 per layer); branch evals = sublayer
evaluations counted by hooks (comparable across all rows); activation bytes and CUDA
peak as in `_bench_common`. Encoder matrices are scaled by ``--weight-scale`` (default 4,
as ``bertode.demo``) so adaptive solvers' NFE depends on the tolerance.

With ``--compile`` every bertode row runs through `bertode.compile_model` (whole model
where `bertode.compile.whole_graph` holds, compiled fields otherwise; the row's ``compiled`` says which),
HF runs eager (the reference) and compiled (row ``hf_bert_compiled``), and counts come
from one eager step before compiling.

Host syncs per step (``host_syncs``, every device): `bertode.solve.host_syncs.count_host_syncs` over
one eager training step (compiled graphs hide their ops from it): scalar reads, ``.tolist()``,
data-dependent shapes, device-to-host copies, counted on CPU as what would synchronise on CUDA
(``host_syncs_by_op`` in the JSON says which). On CUDA, ``cuda_detector_syncs`` is what CUDA's own
sync detector reports during one timed step (the column called ``host_syncs_per_step`` before).

MFU (fixed-step autograd rows only; null for an unknown GPU):

    f     = forward branch evaluations / (2 * layers)      (1 for BERT, 4 for rk4 1 step, 2 for rk2)
    FLOPs = 6 * tokens * (N_enc * f + N_head + hidden * vocab) + 12 * layers * seq * hidden * tokens * f
    MFU   = FLOPs / step time / peak

with N_enc the encoder's parameters, N_head the MLM head's transform (dense + LayerNorm),
hidden * vocab the tied decoder matmul run on every token (embedding lookups are not
FLOPs), 12 * layers * seq * hidden per token the attention scores and values (forward
and backward), and peak the dense bf16 peak of the GPU from `PEAK_BF16_FLOPS` (H100,
H200 989e12; A100 312e12), whatever ``--dtype``. On CPU, peak is the fp32 matmul rate
measured in the same process (1024 x 1024, median of 5, at the run's thread count): an
attainable peak, not a datasheet one. On CUDA, ``mfu_measured`` divides by the rate of an
8192^3 bf16 matrix product measured in the same process instead of the datasheet peak.
"""

from __future__ import annotations

import statistics

import gc

import torch

import _bench_common as common
from bertode.compile import compile_model, resolve_scope

# name -> (source: "hf" | "layers" | "one_layer", from_bert overrides)
ROWS = {
    "hf_bert": ("hf", {}),
    "discrete": ("layers", dict(mode="discrete")),
    "euler_1": ("layers", dict(solver="euler", steps=1)),
    "discrete_sparse": ("layers", dict(mode="discrete", sparse_prediction=True)),
    "euler_1_sparse": ("layers", dict(solver="euler", steps=1, sparse_prediction=True)),
    "euler_1_neural_ode": ("layers", dict(solver="euler", steps=1, fixed_step_loop="neural_ode")),
    "block_rk2": ("layers", dict(block="rk2")),
    "rk4_1": ("layers", dict(solver="rk4", steps=1)),
    "rk4_4": ("layers", dict(solver="rk4", steps=4)),
    "dopri5_1e-3": ("layers", dict(solver="dopri5", atol=1e-3, rtol=1e-3)),
    "dopri5_1e-5": ("layers", dict(solver="dopri5", atol=1e-5, rtol=1e-5)),
    "dopri5_1e-3_adjoint": ("layers", dict(solver="dopri5", atol=1e-3, rtol=1e-3, sensitivity="adjoint",
                                           adjoint_atol=1e-3, adjoint_rtol=1e-3)),
    "deq_anderson_ift": ("one_layer", dict(mode="deq", deq_solver="anderson", sensitivity="ift")),
    "deq_anderson_ift_sparse": ("one_layer", dict(mode="deq", deq_solver="anderson", sensitivity="ift",
                                                  sparse_prediction=True)),
    "deq_phantom": ("one_layer", dict(mode="deq", deq_solver="anderson", sensitivity="phantom", deq_phantom_steps=5)),
}
FIXED_STEP = ("hf_bert", "hf_bert_compiled", "discrete", "euler_1", "euler_1_neural_ode", "block_rk2", "rk4_1", "rk4_4")


def peak_flops(device: torch.device, device_name: str) -> float | None:
    """The GPU's dense bf16 peak from the table, or the CPU's measured fp32 matmul rate."""
    if device.type == "cuda":
        return next((v for k, v in common.PEAK_BF16_FLOPS.items() if k in device_name), None)
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / (common.time_calls(lambda: a @ b, 5, 2, device) / 1e3)


def mfu(row: dict, sizes: dict, counts: dict, peak: float | None) -> float | None:
    """The formula in the module docstring; None for unknown GPUs and adaptive/DEQ rows."""
    if peak is None or row["name"] not in FIXED_STEP:  # sparse rows too: the formula's decoder runs everywhere
        return None
    tokens = sizes["batch"] * sizes["seq"]
    f = row["branch_evals_forward"] / (2 * sizes["layers"])
    flops = (6 * tokens * (counts["encoder"] * f + counts["head"] + sizes["hidden"] * sizes["vocab"])
             + 12 * sizes["layers"] * sizes["seq"] * sizes["hidden"] * tokens * f)
    return flops / (row["ms_per_step"] / 1e3) / peak


def prepare_row(name, model, batch, args, device, sizes):
    """(row, step): counts from one eager instrumented step, then the (compiled) step to time."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    row = dict(name=name, error=None, compiled=None)
    row.update(common.instrumented_step(model, batch, optimizer, device, args.dtype, sizes["layers"]))
    row.update(common.host_syncs(common.make_step(model, batch, optimizer, device, args.dtype)))  # eager
    runner = model
    if args.compile and name != "hf_bert":  # HF eager stays the reference of every ratio
        try:
            if name == "hf_bert_compiled":
                runner, row["compiled"] = torch.compile(model), "model"
            else:
                row["compiled"] = resolve_scope("auto", model.config)
                runner = compile_model(model, "auto")
            common.make_step(runner, batch, optimizer, device, args.dtype)()
        except Exception as error:  # noqa: BLE001 - a row that does not compile is reported, not fatal
            return dict(row, error=f"{type(error).__name__}: {error}".splitlines()[0][:300]), None
    step = common.make_step(runner, batch, optimizer, device, args.dtype)
    for _ in range(args.warmup):
        step()
    return row, step


def time_rows(prepared: list, args, device, sizes) -> None:
    """Median ms/step of each row: row after row, or (``--interleave``) one step of each
    row per round, so that drifting machine load affects every row alike."""
    timed = [(row, step) for row, step in prepared if step is not None]
    if args.interleave:
        samples = {id(row): [] for row, _ in timed}
        for _ in range(args.steps):
            for row, step in timed:
                samples[id(row)].append(common.time_calls(step, 1, 0, device))
        for row, _ in timed:
            row["ms_per_step"] = statistics.median(samples[id(row)])
    else:
        for row, step in timed:
            row["ms_per_step"] = common.time_calls(step, args.steps, 0, device)
    for row, step in timed:
        row["tokens_per_s"] = sizes["batch"] * sizes["seq"] / (row["ms_per_step"] / 1e3)
        row["cuda_detector_syncs"] = common.cuda_detector_syncs(step, device)


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--compile", action="store_true", help="torch.compile every model (rows that fail record the error)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    p.add_argument("--weight-scale", type=float, default=4.0)
    p.add_argument("--interleave", action="store_true",
                   help="keep every model and time one step of each per round (for a noisy, shared CPU)")
    args = p.parse_args(argv)
    device = common.setup(args)
    sizes = common.sizes_of(args)
    names = common.row_names(p, args.rows, ROWS)
    names = ["hf_bert"] + [n for n in names if n != "hf_bert"]  # HF eager is the reference of every ratio
    if args.compile:
        names.insert(1, "hf_bert_compiled")

    batch, data = common.mlm_batch(sizes, device, args.seed)
    source = common.hf_source(sizes, args.seed, weight_scale=args.weight_scale)
    one_layer = common.hf_source(sizes, args.seed, layers=1, weight_scale=args.weight_scale)
    counts = dict(encoder=sum(p.numel() for p in source.bert.encoder.parameters()),
                  head=sum(p.numel() for p in source.cls.predictions.transform.parameters()))
    payload = common.header(args, device, sizes, data=data, weight_scale=args.weight_scale, compile=args.compile,
                            interleave=args.interleave, parameters=counts, rows=[])
    payload["peak_flops"] = peak_flops(device, payload["device"])
    payload["matmul_flops"] = common.matmul_rate(device)  # bf16 8192^3 here (CUDA), for mfu_measured
    common.print_header(payload)

    prepared = []
    for name in names:
        torch.manual_seed(args.seed)
        kind, overrides = ROWS.get(name, ("hf", {}))
        if kind == "hf":
            model = common.hf_source(sizes, args.seed, weight_scale=args.weight_scale)
        else:
            model = common.bertode_model(source if kind == "layers" else one_layer, **overrides)
        try:
            row, step = prepare_row(name, model, batch, args, device, sizes)
        except torch.OutOfMemoryError:  # e.g. dopri5 with autograd at a big batch: reported, not fatal
            row, step = dict(name=name, error=f"out of memory at batch {sizes['batch']}", compiled=None), None
        row["config"] = overrides
        payload["rows"].append(row)
        if args.interleave:
            prepared.append((row, step))
        else:  # one model in memory at a time
            try:
                time_rows([(row, step)], args, device, sizes)
            except torch.OutOfMemoryError:
                row["error"] = f"out of memory at batch {sizes['batch']}"
            del model, step
            gc.collect()  # an out-of-memory row's traceback holds its tensors in reference cycles
            if device.type == "cuda":
                torch.cuda.empty_cache()
    time_rows(prepared, args, device, sizes)

    reference = payload["rows"][0].get("ms_per_step")  # HF's; None if it failed to compile
    for row in payload["rows"]:
        if row["error"] is None:
            row["ratio"] = row["ms_per_step"] / reference if reference else None
            row["mfu"] = mfu(row, sizes, counts, payload["peak_flops"])
            if row["mfu"] is not None and payload["matmul_flops"]:
                row["mfu_measured"] = row["mfu"] * payload["peak_flops"] / payload["matmul_flops"]
    print(common.markdown_table(payload["rows"], [
        ("name", "row", ""), ("tokens_per_s", "tokens/s", ",.0f"), ("ms_per_step", "ms/step", ".1f"),
        ("ratio", "× HF", ".2f"), ("nfe_forward", "nfe fwd", "d"), ("nfe_backward", "nfe bwd", "d"),
        ("branch_evals_forward", "branch evals fwd", "d"), ("activation_bytes", "activation bytes", ",d"),
        ("peak_bytes", "CUDA peak bytes", ",d"), ("mfu", "MFU", ".1%"),
        ("mfu_measured", "MFU (measured matmul)", ".1%"), ("host_syncs", "host syncs", "d"),
        ("cuda_detector_syncs", "CUDA detector syncs", "d"),
    ]))
    print("wrote", common.write_json(args.out, payload, "bench_speed", device))
    return payload


if __name__ == "__main__":
    main()
