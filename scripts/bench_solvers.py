"""ODE backends side by side: torchdyn (bertode's) against torchdiffeq (the peer) on one model.

    python scripts/bench_solvers.py --size tiny --device cpu --out results/bench_solvers_cpu_tiny.json

Owns the backend comparison of issue 6. One seeded HF BERT (encoder matrices times
``--weight-scale``, default 4 as in ``bertode.demo``, so that the flow is far from the
identity) is converted with `from_bert` into ODE-BERT encoders (`BertODEModel`, residual
vector field) that differ only in ``ode_backend`` and the solver: dopri5 at atol = rtol =
1e-3, 1e-5, 1e-7 and rk4 with 1, 4, 16 steps. For each: NFE of a forward
(``solver_stats()["nfe_forward"]``), wall time of an inference forward (eval, no_grad;
median of ``--steps`` after ``--warmup``), and the error of ``last_hidden_state`` against
a reference solved by torchdyn's dopri5 at atol = rtol = 1e-9 in float64 (max |.| and
relative Frobenius norm). The same reference from torchdiffeq is reported as
``reference_gap``, how far the two tight float64 solutions are apart.

ratio = this row's ms / the torchdiffeq row of the same solver setting (torchdiffeq = 1).
Note torchdiffeq's ``rk4`` is the 3/8-rule variant and torchdyn's the classical one:
same order and NFE, slightly different errors.
"""

from __future__ import annotations

import torch

import _bench_common as common

SETTINGS = [("dopri5", dict(atol=tol, rtol=tol), f"tol={tol:.0e}") for tol in (1e-3, 1e-5, 1e-7)] + [
    ("rk4", dict(steps=steps), f"steps={steps}") for steps in (1, 4, 16)
]
BACKENDS = ("torchdiffeq", "torchdyn")  # the peer first: it is each setting's reference time
REFERENCE_TOL = 1e-9


def encoder(source, **overrides):
    """The `BertODEModel` (embeddings and encoder, no MLM head) converted from ``source``."""
    return common.bertode_model(source, **overrides).bert.eval()


def main(argv=None) -> dict:
    p = common.parser(__doc__, steps=5, warmup=1)
    p.add_argument("--weight-scale", type=float, default=4.0)
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
    for backend in BACKENDS:
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
        for backend in BACKENDS:
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
    print("wrote", common.write_json(args.out, payload, "bench_solvers", device))
    return payload


if __name__ == "__main__":
    main()
