"""Training-step memory of BERT, the DEQ and the ODE modes: activation bytes, CUDA peak.

    python scripts/bench_memory.py --size tiny --device cpu --out results/bench_memory_cpu_tiny.json
    python scripts/bench_memory.py --size base --device cuda

Owns the memory comparison of issue 6. One MLM training step (forward, backward, AdamW)
of each model, all converted with `from_bert` from one seeded HF BERT and run on one
batch and dtype in one process:

* ``hf_bert`` (the reference of every ratio) and ``bert_discrete``: ``--layers`` layers
  (default 12) of plain BERT, HF's and bertode's discrete mode.
* ``deq_ift_iter{N}``: the one-layer DEQ (Anderson, IFT gradient) with ``deq_max_iter=N``
  for N in ``--iters`` (default 10,20,40) and ``deq_tol=1e-30``, so every solve runs all
  N iterations (recorded as nfe_forward). IFT keeps one evaluation of f for backward,
  so its bytes must not depend on N.
* ``deq_ift_sparse_iter{N}``: the same with sparse prediction (``sparse_prediction=True``:
  the MLM head and its chunked cross-entropy run on the labelled positions only), so the
  head's bytes shrink to the targets' share.
* ``ode_{euler,rk4}_{autograd,adjoint}_s{S}``: ``--layers`` ODE layers with S fixed steps
  for S in ``--ode-steps`` (default 1,2,4,8,16,32). Autograd keeps every stage of every
  step (bytes grow linearly in S); the adjoint keeps only each solve's input and output
  (flat in S) and pays with a backward solve (nfe_backward).

Measured (see `_bench_common`): activation_bytes (saved_tensors_hooks, every device),
on CUDA peak_bytes (torch.cuda.max_memory_allocated over the step) and peak_step_bytes
(the same minus what was allocated before the step), NFE and branch evaluations, and
ms/step (median of ``--steps`` after ``--warmup``; secondary here, bench_speed owns speed).
"""

from __future__ import annotations

import gc

import torch

import _bench_common as common


def plan(args) -> list[tuple[str, str, dict]]:
    """(row name, source: "hf" | "layers" | "one_layer", from_bert overrides)."""
    rows = [("hf_bert", "hf", {}), ("bert_discrete", "layers", dict(mode="discrete"))]
    for n in args.iters:
        rows.append((f"deq_ift_iter{n}", "one_layer", dict(mode="deq", deq_solver="anderson", sensitivity="ift",
                                                          deq_max_iter=n, deq_tol=1e-30)))
    for n in args.iters:
        rows.append((f"deq_ift_sparse_iter{n}", "one_layer", dict(mode="deq", deq_solver="anderson", sensitivity="ift",
                                                                 deq_max_iter=n, deq_tol=1e-30, sparse_prediction=True)))
    for solver in args.solvers:
        for sensitivity in args.sensitivities:
            for steps in args.ode_steps:
                rows.append((f"ode_{solver}_{sensitivity}_s{steps}", "layers",
                             dict(solver=solver, steps=steps, sensitivity=sensitivity)))
    return rows


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> dict:
    p = common.parser(__doc__, steps=1, warmup=1)
    p.add_argument("--layers", type=int, default=12, help="layers of the BERT and ODE rows (the DEQ has one)")
    p.add_argument("--iters", type=int_list, default=[10, 20, 40], help="DEQ max_iter values")
    p.add_argument("--ode-steps", type=int_list, default=[1, 2, 4, 8, 16, 32], help="ODE fixed-step counts")
    p.add_argument("--solvers", type=lambda t: t.split(","), default=["euler", "rk4"], help="ODE rows' solvers")
    p.add_argument("--sensitivities", type=lambda t: t.split(","), default=["autograd", "adjoint"],
                   help="ODE rows' sensitivity methods")
    args = p.parse_args(argv)
    device = common.setup(args)
    sizes = dict(common.sizes_of(args), layers=args.layers)

    batch, data = common.mlm_batch(sizes, device, args.seed)
    sources = dict(hf=lambda: common.hf_source(sizes, args.seed),
                   layers=lambda: common.hf_source(sizes, args.seed),
                   one_layer=lambda: common.hf_source(sizes, args.seed, layers=1))
    payload = common.header(args, device, sizes, data=data, rows=[])
    common.print_header(payload)

    for name, kind, overrides in plan(args):
        model = sources[kind]()
        if kind != "hf":
            model = common.bertode_model(model, **overrides)
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        row = dict(name=name, error=None, config=overrides)
        try:
            step = common.make_step(model, batch, optimizer, device, args.dtype)
            for _ in range(args.warmup):  # creates the optimizer state before the measured step
                step()
            row.update(common.instrumented_step(model, batch, optimizer, device, args.dtype, sizes["layers"]))
            row["ms_per_step"] = common.time_calls(step, args.steps, 0, device)
            row["tokens_per_s"] = sizes["batch"] * sizes["seq"] / (row["ms_per_step"] / 1e3)
        except torch.OutOfMemoryError:  # autograd through many steps at BERT-base size: reported, not fatal
            row["error"] = "out of memory"
        payload["rows"].append(row)
        del model, optimizer
        gc.collect()  # an out-of-memory row's traceback holds its tensors in reference cycles
        if device.type == "cuda":
            torch.cuda.empty_cache()

    reference = payload["rows"][0]
    for row in payload["rows"]:
        if row["error"] is not None:
            continue
        row["ratio"] = row["activation_bytes"] / reference["activation_bytes"]
        if row["peak_step_bytes"] is not None:
            row["peak_ratio"] = row["peak_step_bytes"] / reference["peak_step_bytes"]
    print(common.markdown_table(payload["rows"], [
        ("name", "row", ""), ("activation_bytes", "activation bytes", ",d"), ("ratio", "× HF", ".3f"),
        ("peak_step_bytes", "CUDA peak step bytes", ",d"), ("nfe_forward", "nfe fwd", "d"),
        ("nfe_backward", "nfe bwd", "d"), ("branch_evals_forward", "branch evals fwd", "d"),
        ("branch_evals_backward", "branch evals bwd", "d"), ("ms_per_step", "ms/step", ".1f"),
    ]))
    print("wrote", common.write_json(args.out, payload, "bench_memory", device))
    return payload


if __name__ == "__main__":
    main()
