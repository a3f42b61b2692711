"""ODE backends side by side: torchdyn, torchdiffeq, bertode's per-sequence stepper and torchode on one model.

    python scripts/bench_solvers.py --size tiny --device cpu --out results/bench_solvers_cpu_tiny.json

Owns the backend comparison of issues 6 and 27. One seeded HF BERT (encoder matrices times
``--weight-scale``, default 4 as in ``bertode.demo``, so that the flow is far from the
identity) is converted with `from_bert` into ODE-BERT encoders (`BertODEModel`, residual
vector field) that differ only in ``ode_backend`` and the solver: dopri5 at atol = rtol =
1e-3, 1e-5, 1e-7 on every backend (torchdyn and torchdiffeq: one step size for the batch;
bertode and torchode: one per sequence) and rk4 with 1, 4, 16 steps (torchdyn, torchdiffeq;
fixed steps are the same per sequence). For each: NFE of a forward
(``solver_stats()["nfe_forward"]``), wall time of an inference forward (eval, no_grad;
median of ``--steps`` after ``--warmup``), and the error of ``last_hidden_state`` against
a reference solved by torchdyn's dopri5 at atol = rtol = 1e-9 in float64 (max |.| and
relative Frobenius norm). The same reference from torchdiffeq is reported as
``reference_gap``, how far the two tight float64 solutions are apart.

ratio = this row's ms / the torchdiffeq row of the same solver setting (torchdiffeq = 1).

The stiff batch (``stiff_batch`` in the JSON): the last sequence's branch outputs are scaled
by ``--stiff-scale`` (a field larger on that row only, as a per-row dropout mask scales it);
dopri5 at ``STIFF_TOL``. For each backend: the easy sequences' NFE (summed over the sites;
the whole batch's for shared-step backends, each row's own for bertode) and steps (accepted +
rejected), solved alone and in the stiff batch. torchode reports steps per sequence, not NFE.
Note torchdiffeq's ``rk4`` is the 3/8-rule variant and torchdyn's the classical one:
same order and NFE, slightly different errors.
"""

from __future__ import annotations

import torch

import _bench_common as common
from bertode.solve.solvers import get_solver

SETTINGS = [("dopri5", dict(atol=tol, rtol=tol), f"tol={tol:.0e}") for tol in (1e-3, 1e-5, 1e-7)] + [
    ("rk4", dict(steps=steps), f"steps={steps}") for steps in (1, 4, 16)
]
BACKENDS = ("torchdiffeq", "torchdyn", "bertode", "torchode")  # the peer first: each setting's reference time
FIXED_STEP_BACKENDS = BACKENDS[:2]  # per-sequence backends take the same fixed steps
REFERENCE_TOL = 1e-9
STIFF_TOL = 1e-5


def stiff_rows(model, scale: torch.Tensor):
    """Hooks scaling every ODE site's branch output by ``scale`` (batch, 1, 1) on full batches."""
    from bertode.layers.encoder import ResidualSite

    def hook(module, inputs, output):
        return output * scale.to(output) if output.shape[0] == scale.shape[0] else output

    return [m.branch.register_forward_hook(hook) for m in model.modules() if isinstance(m, ResidualSite)]


def _plus(a, b):
    return None if a is None or b is None else a + b


def per_sequence_counts(stats: dict, batch: int) -> tuple[list, list]:
    """(NFE, steps) of each sequence summed over the sites: a per-sequence row's own counts, a
    shared-step row's whole-batch counts for every sequence (None where a backend has none)."""
    nfe, steps = [0] * batch, [0] * batch
    for row in stats["layers"]:
        if "accepted_per_sequence" in row:
            row_nfe = row["nfe_per_sequence"] or [None] * batch
            row_steps = [a + r for a, r in zip(row["accepted_per_sequence"], row["rejected_per_sequence"])]
        else:
            row_nfe = [row["nfe_forward"]] * batch
            row_steps = [_plus(row["accepted_steps"], row["rejected_steps"])] * batch
        nfe, steps = list(map(_plus, nfe, row_nfe)), list(map(_plus, steps, row_steps))
    return nfe, steps


def stiff_batch(source, inputs, args, device) -> list[dict]:
    """The easy sequences' NFE and steps alone and beside one stiff sequence, per backend."""
    batch = inputs["input_ids"].shape[0]
    scale = torch.ones(batch, 1, 1, device=device)
    scale[-1] = args.stiff_scale
    rows = []
    for backend in BACKENDS:
        model = encoder(source, ode_backend=backend, solver="dopri5", atol=STIFF_TOL, rtol=STIFF_TOL).to(device)
        alone_nfe, alone_steps = [], []
        with torch.no_grad():
            for i in range(batch - 1):
                model(**{k: v[i:i + 1] for k, v in inputs.items()})
                nfe, steps = per_sequence_counts(model.solver_stats(), 1)
                alone_nfe += nfe
                alone_steps += steps
            hooks = stiff_rows(model, scale)
            try:
                model(**inputs)
                nfe, steps = per_sequence_counts(model.solver_stats(), batch)
                ms = common.time_calls(lambda: model(**inputs), args.steps, args.warmup, device)
            finally:
                for hook in hooks:
                    hook.remove()

        def mean(values):
            return None if any(v is None for v in values) else sum(values) / len(values)

        rows.append(dict(backend=backend, easy_nfe_alone=mean(alone_nfe), easy_nfe_in_batch=mean(nfe[:-1]),
                         stiff_nfe_in_batch=nfe[-1], easy_steps_alone=mean(alone_steps),
                         easy_steps_in_batch=mean(steps[:-1]), stiff_steps_in_batch=steps[-1], ms_batch=ms))
    return rows


def encoder(source, **overrides):
    """The `BertODEModel` (embeddings and encoder, no MLM head) converted from ``source``."""
    return common.bertode_model(source, **overrides).bert.eval()


def main(argv=None) -> dict:
    p = common.parser(__doc__, steps=5, warmup=1)
    p.add_argument("--weight-scale", type=float, default=4.0)
    p.add_argument("--stiff-scale", type=float, default=4.0, help="the stiff sequence's branch scale")
    args = p.parse_args(argv)
    device = common.setup(args)
    sizes = common.sizes_of(args)
    batch, data = common.mlm_batch(sizes, device, args.seed)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    source = common.hf_source(sizes, args.seed, weight_scale=args.weight_scale)

    def solve(model):
        with torch.no_grad(), common.autocast(device, args.dtype):
            return model(**inputs).last_hidden_state

    tight = dict(solver="dopri5", atol=REFERENCE_TOL, rtol=REFERENCE_TOL)
    references = {}
    for backend in FIXED_STEP_BACKENDS:
        model = encoder(source, ode_backend=backend, **tight).to(device=device, dtype=torch.float64)
        with torch.no_grad():
            references[backend] = model(**inputs).last_hidden_state
        references[backend + "_nfe"] = model.solver_stats()["nfe_forward"]
    reference = references["torchdyn"]
    gap = (references["torchdiffeq"] - reference).abs().max().item()
    payload = common.header(args, device, sizes, data=data, weight_scale=args.weight_scale,
                            reference=dict(solver="dopri5", tol=REFERENCE_TOL, dtype="float64", backend="torchdyn",
                                           nfe=references["torchdyn_nfe"], torchdiffeq_nfe=references["torchdiffeq_nfe"],
                                           reference_gap=gap),
                            rows=[])
    common.print_header(payload)

    peer_ms = {}
    for solver, options, label in SETTINGS:
        for backend in BACKENDS if get_solver(solver).adaptive else FIXED_STEP_BACKENDS:
            model = encoder(source, ode_backend=backend, solver=solver, **options).to(device)
            out = solve(model).double()
            nfe = model.solver_stats()["nfe_forward"]
            ms = common.time_calls(lambda: solve(model), args.steps, args.warmup, device)
            if backend == "torchdiffeq":
                peer_ms[label] = ms
            payload["rows"].append(dict(
                name=f"{backend} {solver} {label}", backend=backend, solver=solver, config=options, error=None,
                nfe_forward=nfe, ms_per_forward=ms, ratio=ms / peer_ms[label],
                tokens_per_s=sizes["batch"] * sizes["seq"] / (ms / 1e3),
                max_abs_error=(out - reference).abs().max().item(),
                rel_error=((out - reference).norm() / reference.norm()).item(),
            ))

    print(f"reference: torchdyn dopri5 tol {REFERENCE_TOL:.0e} float64, NFE {references['torchdyn_nfe']}; "
          f"torchdiffeq's differs by {gap:.1e}")
    print(common.markdown_table(payload["rows"], [
        ("name", "row", ""), ("nfe_forward", "nfe", "d"), ("ms_per_forward", "ms/forward", ".2f"),
        ("ratio", "× torchdiffeq", ".2f"), ("max_abs_error", "max |err|", ".1e"), ("rel_error", "rel err", ".1e"),
    ]))
    payload["stiff_batch"] = stiff_batch(source, inputs, args, device)
    print(f"stiff batch: the last sequence's branch x {args.stiff_scale}, dopri5 tol {STIFF_TOL:.0e}; "
          "easy sequences' mean NFE and steps (summed over sites)")
    print(common.markdown_table(payload["stiff_batch"], [
        ("backend", "backend", ""), ("easy_nfe_alone", "easy NFE alone", ".1f"),
        ("easy_nfe_in_batch", "easy NFE in batch", ".1f"), ("stiff_nfe_in_batch", "stiff NFE", ".0f"),
        ("easy_steps_alone", "easy steps alone", ".1f"), ("easy_steps_in_batch", "easy steps in batch", ".1f"),
        ("stiff_steps_in_batch", "stiff steps", ".0f"), ("ms_batch", "ms/forward (batch)", ".1f"),
    ]))
    print("wrote", common.write_json(args.out, payload, "bench_solvers", device))
    return payload


if __name__ == "__main__":
    main()
