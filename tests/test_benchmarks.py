"""The benchmark scripts end to end: each runs as a subprocess at ``--size tiny`` with two
timed steps and writes JSON whose structure is checked, and whose numbers are checked
against what the methods imply, never against timings:

* speed: HF BERT, bertode's discrete mode and Euler-1 (both loops) have equal losses and saved bytes
  (HF is the oracle); RK4 takes 4 branch evaluations per step; the DEQ's evaluations are
  2 per map evaluation (forward iterations, plus the one IFT / 5 phantom steps with a graph).
* memory: IFT bytes equal across iteration counts; autograd bytes exactly linear and
  growing in the steps; the adjoint saves the same bytes at every step count and no stages
  (Euler and RK4 equal), and its backward takes one adjoint step per forward step.
* kv cache: a step with the cache computes the logits of the step without it (a DEQ: to its tolerance),
  for every model and context.
* solvers: RK4 NFE = 4 x steps x sites in both backends; RK4 error falls by >= 50x from 1 to
  4 steps (4th order: 256x); dopri5 error falls with the tolerance; the two float64
  references agree.

All four scripts run at once (each spends ~10 s importing torch and transformers).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden=64, layers=2, heads=4, intermediate=256, seq=32, batch=4)
COMMON = ["--size", "tiny", "--device", "cpu", "--dtype", "fp32", "--steps", "2", "--warmup", "1", "--threads", "1"]
EXTRA = {
    "bench_speed": ["--interleave"],
    "bench_memory": ["--layers", "2", "--ode-steps", "1,2,4"],
    "bench_solvers": [],
    "bench_kv_cache": ["--contexts", "8,24"],
}
SPEED_ROWS = ["hf_bert", "discrete", "euler_1", "discrete_sparse", "euler_1_sparse", "euler_1_neural_ode", "block_rk2", "rk4_1",
              "rk4_4", "dopri5_1e-3", "dopri5_1e-5", "dopri5_1e-3_adjoint", "deq_anderson_ift", "deq_anderson_ift_sparse",
              "deq_phantom"]
ITERS = [10, 20, 40]
ODE_STEPS = [1, 2, 4]
MEMORY_ROWS = (["hf_bert", "bert_discrete"] + [f"deq_ift_iter{n}" for n in ITERS] + [f"deq_ift_sparse_iter{n}" for n in ITERS]
               + [f"ode_{s}_{g}_s{n}" for s in ("euler", "rk4") for g in ("autograd", "adjoint") for n in ODE_STEPS])
SOLVER_ROWS = [f"{b} {s}" for s in ("dopri5 tol=1e-03", "dopri5 tol=1e-05", "dopri5 tol=1e-07")
               for b in ("torchdiffeq", "torchdyn", "bertode", "torchode")] + [
    f"{b} {s}" for s in ("rk4 steps=1", "rk4 steps=4", "rk4 steps=16") for b in ("torchdiffeq", "torchdyn")]
SITES = 2 * TINY["layers"]  # residual sites: attention and feed-forward per layer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = {
        name: subprocess.Popen([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *COMMON, *extra,
                                "--out", str(out / f"{name}.json")],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, extra in EXTRA.items()
    }
    logs = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    return {name: (proc.returncode, logs[name], out / f"{name}.json") for name, proc in procs.items()}


def load(runs, name):
    code, log, path = runs[name]
    assert code == 0, log[-4000:]
    return json.loads(path.read_text())


def rows_by_name(payload):
    return {row["name"]: row for row in payload["rows"]}


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("name", list(EXTRA))
def test_json_has_device_dtype_sizes_versions(runs, name):
    payload = load(runs, name)
    assert payload["device"].startswith("CPU") and payload["device_type"] == "cpu"
    assert payload["dtype"] == "fp32"
    assert {k: payload["sizes"][k] for k in TINY if k != "layers"} == {k: v for k, v in TINY.items() if k != "layers"}
    for package in ("torch", "transformers", "torchdyn", "torchdiffeq"):
        assert payload["versions"][package], package


def test_speed_rows_and_their_relations(runs):
    rows = rows_by_name(load(runs, "bench_speed"))
    assert list(rows) == SPEED_ROWS
    for row in rows.values():
        assert row["error"] is None, row
        for key in ("tokens_per_s", "ms_per_step", "ratio", "activation_bytes", "nfe_forward", "branch_evals_forward"):
            assert positive(row[key]), (row["name"], key, row[key])
    # MFU (against the CPU's measured matmul rate) for the fixed-step rows only.
    fixed = {"hf_bert", "discrete", "euler_1", "euler_1_neural_ode", "block_rk2", "rk4_1", "rk4_4"}
    for name, row in rows.items():
        assert (0 < row["mfu"] < 1) if name in fixed else row["mfu"] is None, (name, row["mfu"])
    assert rows["hf_bert"]["ratio"] == 1.0
    # Euler-1 and the discrete mode are BERT: same loss after an identical warm-up step, same saved tensors
    # (Euler adds one 4-byte time scalar per solve).
    for name in ("discrete", "euler_1", "euler_1_neural_ode"):
        assert abs(rows[name]["loss"] - rows["hf_bert"]["loss"]) <= 1e-5, name
        assert 0 <= rows[name]["activation_bytes"] - rows["hf_bert"]["activation_bytes"] <= 4 * SITES, name
    evals = {name: row["branch_evals_forward"] for name, row in rows.items()}
    assert evals["hf_bert"] == evals["discrete"] == evals["euler_1"] == evals["euler_1_neural_ode"] == SITES
    assert (evals["block_rk2"], evals["rk4_1"], evals["rk4_4"]) == (2 * SITES, 4 * SITES, 16 * SITES)
    assert rows["rk4_4"]["nfe_forward"] == 16 * SITES and rows["rk4_4"]["nfe_backward"] == 0
    assert rows["dopri5_1e-5"]["nfe_forward"] >= rows["dopri5_1e-3"]["nfe_forward"]
    adjoint, autograd = rows["dopri5_1e-3_adjoint"], rows["dopri5_1e-3"]
    assert adjoint["nfe_backward"] > 0 and adjoint["activation_bytes"] < autograd["activation_bytes"] / 5
    # The one-layer DEQ: 2 branches per evaluation of f; IFT adds f(z*), phantom 5 damped steps.
    ift, phantom = rows["deq_anderson_ift"], rows["deq_phantom"]
    assert ift["branch_evals_forward"] == 2 * (ift["solver"]["forward_iterations"] + 1)
    assert phantom["branch_evals_forward"] == 2 * (phantom["solver"]["forward_iterations"] + 5)
    assert ift["nfe_backward"] == ift["solver"]["backward_iterations"] > 0
    # Sparse prediction: the same loss as the dense head (summation order only) and the same encoder work, with
    # fewer saved bytes (the head runs on the labelled rows only).
    for dense, sparse in (("discrete", "discrete_sparse"), ("euler_1", "euler_1_sparse"),
                          ("deq_anderson_ift", "deq_anderson_ift_sparse")):
        assert abs(rows[sparse]["loss"] - rows[dense]["loss"]) <= 1e-5, sparse
        assert rows[sparse]["branch_evals_forward"] == rows[dense]["branch_evals_forward"], sparse
        assert rows[sparse]["activation_bytes"] < rows[dense]["activation_bytes"], sparse


def test_memory_ift_and_adjoint_are_flat_autograd_grows(runs):
    payload = load(runs, "bench_memory")
    rows = rows_by_name(payload)
    assert list(rows) == MEMORY_ROWS
    for row in rows.values():
        assert positive(row["activation_bytes"]) and positive(row["ms_per_step"]) and positive(row["ratio"]), row
    assert rows["hf_bert"]["ratio"] == 1.0
    assert rows["bert_discrete"]["activation_bytes"] == rows["hf_bert"]["activation_bytes"]

    ift = [rows[f"deq_ift_iter{n}"] for n in ITERS]
    assert [row["nfe_forward"] for row in ift] == ITERS  # deq_tol=1e-30: every iteration ran
    assert len({row["activation_bytes"] for row in ift}) == 1
    assert ift[0]["activation_bytes"] < rows["hf_bert"]["activation_bytes"]
    sparse = [rows[f"deq_ift_sparse_iter{n}"]["activation_bytes"] for n in ITERS]
    assert len(set(sparse)) == 1 and sparse[0] < ift[0]["activation_bytes"]  # flat too, without the dense head's bytes

    for solver in ("euler", "rk4"):
        grad = [rows[f"ode_{solver}_autograd_s{n}"]["activation_bytes"] for n in ODE_STEPS]
        adj = [rows[f"ode_{solver}_adjoint_s{n}"]["activation_bytes"] for n in ODE_STEPS]
        # Autograd keeps every stage of every step: exactly linear in the steps (1, 2, 4).
        assert grad[0] < grad[1] < grad[2] and grad[2] - grad[1] == 2 * (grad[1] - grad[0]), grad
        # The adjoint keeps each solve's endpoints only (`substeps.py`): flat in the steps ...
        assert len(set(adj)) == 1, adj
        assert adj[0] < rows["hf_bert"]["activation_bytes"]
        # ... while its backward solve still takes one adjoint step per forward step and site.
        nfe_backward = [rows[f"ode_{solver}_adjoint_s{n}"]["nfe_backward"] for n in ODE_STEPS]
        stages = 1 if solver == "euler" else 4
        assert nfe_backward == [SITES * (stages * n + 2) for n in ODE_STEPS], nfe_backward
    # ... and no stages: Euler and RK4 adjoints save the same bytes.
    for n in ODE_STEPS:
        assert rows[f"ode_euler_adjoint_s{n}"]["activation_bytes"] == rows[f"ode_rk4_adjoint_s{n}"]["activation_bytes"]


def test_kv_cache_rows_time_the_same_logits_with_and_without_the_cache(runs):
    rows = load(runs, "bench_kv_cache")["rows"]
    assert {(r["model"], r["context"], r["cache"]) for r in rows} == {
        (m, n, c) for m in ("hf", "euler1", "rk4x2", "deq") for n in (8, 24) for c in (True, False)}
    for row in rows:
        assert row["max_logit_gap"] <= (1e-2 if row["model"] == "deq" else 1e-5), row
        assert positive(row["ms_per_token"]) and positive(row["cpu_ms_per_token"])
        assert (row["cache_speedup"] is None) != row["cache"]


def test_solvers_backends_agree_on_nfe_and_converge(runs):
    payload = load(runs, "bench_solvers")
    rows = rows_by_name(payload)
    assert list(rows) == SOLVER_ROWS
    for row in rows.values():
        for key in ("nfe_forward", "ms_per_forward", "ratio", "max_abs_error", "rel_error"):
            assert positive(row[key]), (row["name"], key, row[key])
        if row["backend"] == "torchdiffeq":
            assert row["ratio"] == 1.0
    assert payload["reference"]["reference_gap"] <= 1e-6
    for backend in ("torchdiffeq", "torchdyn"):
        rk4 = [rows[f"{backend} rk4 steps={n}"] for n in (1, 4, 16)]
        assert [row["nfe_forward"] for row in rk4] == [4 * n * SITES for n in (1, 4, 16)]
        assert rk4[0]["rel_error"] >= 50 * rk4[1]["rel_error"], backend
    for backend in ("torchdiffeq", "torchdyn", "bertode", "torchode"):
        dopri5 = [rows[f"{backend} dopri5 tol={tol}"] for tol in ("1e-03", "1e-05", "1e-07")]
        assert dopri5[0]["rel_error"] > dopri5[2]["rel_error"] and dopri5[2]["rel_error"] <= 1e-5, backend
        assert dopri5[0]["nfe_forward"] <= dopri5[1]["nfe_forward"] <= dopri5[2]["nfe_forward"], backend
    # One stiff sequence: per-sequence steps leave the easy ones as they are alone; a shared step size does not.
    stiff = {row["backend"]: row for row in payload["stiff_batch"]}
    assert stiff["bertode"]["easy_nfe_in_batch"] == stiff["bertode"]["easy_nfe_alone"] < stiff["bertode"]["stiff_nfe_in_batch"]
    assert stiff["torchode"]["easy_steps_in_batch"] == stiff["torchode"]["easy_steps_alone"]
    for backend in ("torchdiffeq", "torchdyn"):
        assert stiff[backend]["easy_nfe_in_batch"] > stiff[backend]["easy_nfe_alone"], backend


def test_profile_steps_writes_each_row_and_the_batch_it_ran(tmp_path):
    """scripts/profile_steps.py (the GPU run's profiler summary) on the CPU: one block per
    row with its top operators, numbers in JSON at the ``--batch`` given; no CUDA, so no
    kernels and no outside-kernel share."""
    text, numbers = tmp_path / "profile.txt", tmp_path / "profile.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_steps.py"), *COMMON, "--batch", "2",
                           "--rows", "hf_bert,euler_1", "--top", "5", "--out", str(text), "--json", str(numbers)],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    payload = json.loads(numbers.read_text())
    assert payload["sizes"]["batch"] == 2 and [r["name"] for r in payload["rows"]] == ["hf_bert", "euler_1"]
    for row in payload["rows"]:
        assert positive(row["wall_ms_per_step"]) and row["kernels_per_step"] == 0 and row["outside_kernels"] is None
    summary = text.read_text()
    assert summary.count("\n== ") == 2 and "aten::" in summary
