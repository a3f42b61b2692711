"""Inference-time compute: a model trained with rk4 and 4 steps, evaluated with 1, 2, 4, 8
and 16 steps through a `bertode.evaluate -m` sweep, converges (8 and 16 steps differ from
4 far less than 1 step does); the same for a DEQ's iteration budget; `bertode.report`
tabulates and plots the sweep and the training run."""

import json
import subprocess
import sys

import pytest

from bertode.report import main as report

SMALL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2", "data.seq_len=32",
         "data.vocab_size=500", "trainer.batch_size=16", "trainer.log_every=50", "trainer.eval_every=1000",
         "model.hidden_dropout_prob=0"]


def _run(module, *args, cwd):
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _sweep(tmp_path, name, train, sweep):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    _run("bertode.train", f"hydra.run.dir={tmp_path / name}", cache, *SMALL, *train, cwd=tmp_path)
    _run("bertode.evaluate", "-m", f"checkpoint={tmp_path / name / 'final'}", *sweep,
         f"hydra.sweep.dir={tmp_path / (name + '-sweep')}", cache, "data.seq_len=32", "max_sequences=64", cwd=tmp_path)
    out = tmp_path / (name + "-report")
    assert report([str(tmp_path / (name + "-sweep")), str(tmp_path / name), "--out", str(out)]) == 0
    rows = json.loads((out / "report.json").read_text())
    assert (out / "evaluation_vs_compute.png").stat().st_size > 1000 and (out / "training.png").stat().st_size > 1000
    assert "| run | loss | perplexity | accuracy |" in (out / "report.md").read_text()
    return [r for r in rows if r["kind"] == "evaluate"], [r for r in rows if r["kind"] == "train"]


def test_rk4_steps_chosen_at_evaluation_converge(tmp_path):
    evaluations, trained = _sweep(tmp_path, "rk4", ["solver=rk4", "solver.steps=4", "solver.t_end=4",
                                                    "trainer.max_steps=200", "trainer.lr=1e-2"],
                                  ["solver.steps=1,2,4,8,16"])
    loss = {r["label"]: r["loss"] for r in evaluations}
    nfe = {r["label"]: r["nfe_forward"] for r in evaluations}
    assert sorted(loss) == sorted(f"steps={n}" for n in (1, 2, 4, 8, 16))
    assert [nfe[f"steps={n}"] for n in (1, 2, 4, 8, 16)] == [16, 32, 64, 128, 256]  # 2 layers x 2 sites x 4 stages
    coarse = abs(loss["steps=1"] - loss["steps=4"])  # measured 1.1e-5
    assert coarse > 1e-6
    assert abs(loss["steps=8"] - loss["steps=4"]) < coarse / 10 and abs(loss["steps=16"] - loss["steps=4"]) < coarse / 10
    assert len(trained) == 1 and trained[0]["steps"] == 200 and trained[0]["nfe_forward"] == 64


def test_deq_iterations_chosen_at_evaluation_converge(tmp_path):
    evaluations, _ = _sweep(tmp_path, "deq", ["model=deq", "model.num_hidden_layers=1", "trainer.max_steps=60",
                                              "trainer.lr=3e-3"], ["deq.max_iter=1,2,4,30,60", "deq.tol=1e-6"])
    loss = {r["label"].split(",")[0]: r["loss"] for r in evaluations}
    iterations = {r["label"].split(",")[0]: r["forward_iterations"] for r in evaluations}
    assert iterations["deq_max_iter=1"] == 1 and iterations["deq_max_iter=60"] > 4
    coarse = abs(loss["deq_max_iter=1"] - loss["deq_max_iter=30"])  # measured 1.1e-2
    assert coarse > 1e-4 and abs(loss["deq_max_iter=60"] - loss["deq_max_iter=30"]) < coarse / 10


def test_report_refuses_directories_without_runs(tmp_path, capsys):
    assert report([str(tmp_path / "missing")]) == 2
    assert report([str(tmp_path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "is invalid; allowed: existing run or sweep directories" in errors[0]
    assert "hold no runs" in errors[1]


@pytest.mark.parametrize("overrides,expected", [
    (["solver.steps=0"], "solver.steps=0 is invalid; allowed: an integer >= 1"),
    (["deq.max_iter=5"], "deq.max_iter=5 is invalid with the model's mode='ode'"),
    (["solver=heun3"], "solver='heun3' is invalid"),
    (["solver.name=rk4"], "solver.name=rk4 is invalid: this setting is spelled solver=rk4 now"),
    (["vector_field=time_weights"], "vector_field='time_weights' is invalid for checkpoint="),
])
def test_evaluate_refuses_a_bad_solve_in_one_line(tmp_path, monkeypatch, capsys, overrides, expected):
    import bertode
    from bertode.evaluate import main

    model_dir = tmp_path / "model"
    config = bertode.BertODEConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                   num_hidden_layers=1)
    bertode.BertODEForMaskedLM(config).save_pretrained(model_dir)
    (model_dir / "tokenizer_config.json").write_text("{}")
    capsys.readouterr()  # save_pretrained's progress bar
    monkeypatch.setattr(sys, "argv", ["bertode.evaluate", f"checkpoint={model_dir}", f"hydra.run.dir={tmp_path / 'e'}",
                                      *overrides])
    with pytest.raises(SystemExit) as exit_info:
        main()
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.count("\n") == 0 and expected in error, error
    assert not (tmp_path / "e").exists()
