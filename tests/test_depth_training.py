"""The depth drawn in training (issue 24): ``depth=`` draws each optimizer step's depth from a
registered distribution, as a function of (seed, step) only, and dials it around that step's
forward and backward; evaluate and generate dial ``depth.steps`` and ``exit=``.

- the distributions: one (seed, step) gives one draw, in fresh processes too (torchrun's
  ranks, a killed run's), without touching the global RNG; ``uniform`` covers [low, high] and nothing else;
  ``poisson_lognormal``'s mean is E[Poisson(lambda)] + 1 = mean + 1;
- a distribution registered by a plugin (docs/extending.md's) trains as ``depth=<name>``;
- the depths logged per step are ``[draw(seed, s) for s in steps]`` at world size 1 and 2
  (with the same losses: every rank ran that depth) and across a SIGKILL and a resume;
- the dial reaches the model (its solve statistics are depth 3's), evaluation during
  training and after runs at the model's own depth, finetune dials its steps too;
- every bad input is one line, exit status 2, nothing written.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import bertode
from bertode.training.depth import make_depth_distribution
from conftest import file_tree, refused_line, run_command

pytestmark = pytest.mark.usefixtures("restore_logging")  # in-process Hydra runs move the root logger

ROOT = Path(__file__).resolve().parents[1]
_DOC = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")
_SECTION = _DOC[_DOC.index("## A depth distribution"):]
PLUGIN = _SECTION[_SECTION.index("```python") + len("```python"):_SECTION.index("```", _SECTION.index("```python") + 9)]

SMALL = ["data.seq_len=16", "data.vocab_size=500", "data.max_eval_sequences=4", "trainer.batch_size=4",
         "trainer.warmup_steps=1", "trainer.log_every=1", "trainer.eval_every=1000", "model.hidden_size=32",
         "model.intermediate_size=64", "model.num_attention_heads=2", "model.hidden_dropout_prob=0.0"]
UNIFORM = ["depth=uniform", "depth.low=1", "depth.high=4"]


def _records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _train(run: Path, cache_dir, *overrides) -> list[dict]:
    code = run_command("train", [f"hydra.run.dir={run}", f"data.cache_dir={cache_dir}", *SMALL, *overrides])
    assert code == 0
    return _records(run)


# --- the distributions -------------------------------------------------------------------------

DISTRIBUTIONS = {"fixed": {"steps": 3}, "uniform": {"low": 2, "high": 7}, "poisson_lognormal": {"mean": 6, "sigma": 0.5}}


def _draws(seed: int) -> dict:
    return {name: [make_depth_distribution(name, **p).draw(seed, s) for s in range(1, 41)]
            for name, p in DISTRIBUTIONS.items()}


def test_one_seed_and_step_give_one_draw_in_any_process_without_touching_the_global_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = _draws(0)
    assert torch.equal(torch.get_rng_state(), before)  # the model's random streams are an undialled run's
    torch.rand(1000)  # the global RNG moved: no draw follows it
    assert _draws(0) == first
    assert first["fixed"] == [3] * 40
    assert _draws(1)["uniform"] != first["uniform"] and _draws(1)["poisson_lognormal"] != first["poisson_lognormal"]
    assert len(set(first["uniform"])) > 3  # steps draw differently
    # fresh processes (torchrun's ranks, a killed run's) draw the same: the tests below


def test_uniform_covers_low_to_high_and_nothing_else():
    uniform = make_depth_distribution("uniform", low=3, high=6)
    draws = [uniform.draw(7, s) for s in range(4000)]
    assert set(draws) == {3, 4, 5, 6}
    for n in range(3, 7):  # each 1/4: binomial standard error sqrt(4000 * 1/4 * 3/4) ~ 27
        assert abs(draws.count(n) - 1000) < 5 * 27.4, (n, draws.count(n))
    assert {make_depth_distribution("uniform", low=5, high=5).draw(0, s) for s in range(50)} == {5}


@pytest.mark.parametrize("mean,sigma", [(6.0, 0.5), (3.0, 0.0)])
def test_poisson_lognormal_mean_is_mean_plus_one(mean, sigma):
    """r = Poisson(lambda) + 1, lambda = exp(mu + sigma eps), mu = log(mean) - sigma^2/2:
    E[lambda] = exp(mu + sigma^2/2) = mean, so E[r] = mean + 1 and Var[r] = E[lambda] +
    Var[lambda] = mean + mean^2 (exp(sigma^2) - 1)."""
    distribution = make_depth_distribution("poisson_lognormal", mean=mean, sigma=sigma)
    draws = torch.tensor([distribution.draw(0, s) for s in range(20000)], dtype=torch.float64)
    assert draws.min() >= 1
    standard_error = draws.std() / len(draws) ** 0.5
    assert abs(draws.mean() - (mean + 1)) < 3 * standard_error, (draws.mean(), standard_error)
    variance = mean + mean ** 2 * (torch.tensor(sigma ** 2, dtype=torch.float64).exp() - 1)
    assert abs(draws.var() / variance - 1) < 0.1, (draws.var(), variance)


# --- training ----------------------------------------------------------------------------------

def test_a_plugin_distribution_trains_as_depth_name_and_its_draws_are_logged(tmp_path, cache_dir, monkeypatch):
    (tmp_path / "geometric_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    records = _train(tmp_path / "run", cache_dir, "plugins=[geometric_plugin]", "depth=geometric", "depth.p=0.4",
                     "depth.cap=5", "trainer.max_steps=4", "seed=3")
    geometric = make_depth_distribution("geometric", p=0.4, cap=5)
    assert [r["depth"] for r in records] == [geometric.draw(3, s) for s in (1, 2, 3, 4)]
    assert [r["nfe_forward"] for r in records] == [4 * r["depth"] for r in records]  # 2 layers x 2 Euler sites
    assert "geometric" in bertode.available_depth_distributions() and "geometric" in bertode.available()["depth"]


def test_the_dial_reaches_the_model_and_evaluation_runs_at_its_own_depth(tmp_path, cache_dir, monkeypatch):
    """depth.steps=3: an untied Euler ODE takes 3 steps per solve (2 layers x 2 sites x 3 = 12
    evaluations), a looped core 3 applications (x 2 sites), a DEQ 3 iterations; the model's
    forward sees depth 3 and backprop 2 while training and no dial at evaluation."""
    from bertode.modeling import BertODEModel

    seen = []
    forward = BertODEModel.forward

    def recording(self, *args, **kwargs):
        dial = bertode.current_dial()
        seen.append((self.training, dial.depth, dial.backprop))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(BertODEModel, "forward", recording)
    common = ["depth.steps=3", "trainer.max_steps=2", "trainer.eval_every=1"]
    records = _train(tmp_path / "ode", cache_dir, *common, "depth.backprop=2")
    assert [r["nfe_forward"] for r in records] == [12, 12] and [r["depth"] for r in records] == [3, 3]
    final = json.loads((tmp_path / "ode" / "final" / "train_results.json").read_text())
    assert final["eval"]["nfe_forward"] == 4  # the model's own depth: one Euler step per solve
    assert {s for s in seen if s[0]} == {(True, 3, 2)} and {s for s in seen if not s[0]} == {(False, None, None)}
    assert sum(s[0] for s in seen) == 2 and sum(not s[0] for s in seen) >= 2  # 2 steps; evals at 1 and 2
    looped = _train(tmp_path / "looped", cache_dir, *common, "model.weight_tying=true")
    assert [r["nfe_forward"] for r in looped] == [6, 6]
    deq = _train(tmp_path / "deq", cache_dir, *common, "model=deq", "sensitivity=unrolled", "deq.tol=1e-12")
    assert [r["forward_iterations"] for r in deq] == [3, 3]
    undialled = _train(tmp_path / "own", cache_dir, "trainer.max_steps=1")
    assert undialled[0]["depth"] is None and undialled[0]["nfe_forward"] == 4


def test_finetune_dials_each_step_at_its_draw(tmp_path, monkeypatch):
    from bertode.modeling import BertODEModel

    rows = [(f"{'good fine great' if i % 2 else 'bad awful poor'} item number {i}", i % 2) for i in range(40)]
    data = tmp_path / "rows.csv"
    data.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    seen = []
    forward = BertODEModel.forward

    def recording(self, *args, **kwargs):
        seen.append((self.training, bertode.current_dial().depth))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(BertODEModel, "forward", recording)
    code = run_command("finetune", [f"hydra.run.dir={tmp_path / 'run'}", "task.source=files", f"task.train_file={data}",
                                 f"task.eval_file={data}", "task.text_column=text", "trainer.epochs=1",
                                 "trainer.batch_size=4", "scratch.vocab_size=100", "trainer.device=cpu", "seed=5",
                                 *UNIFORM])
    assert code == 0
    uniform = make_depth_distribution("uniform", low=1, high=4)
    assert [d for training, d in seen if training] == [uniform.draw(5, s) for s in range(1, 11)]  # 40 rows / 4
    assert {d for training, d in seen if not training} == {None}  # final/ evaluated at its own depth
    logged = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [(r["step"], r["depth"]) for r in logged] == [(10, uniform.draw(5, 10))]


def _python(*args, cwd, env=None):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))


def test_two_processes_draw_and_run_one_processs_depths(tmp_path, cache_dir):
    overrides = [*UNIFORM, "model.weight_tying=true", "trainer.device=cpu", "trainer.max_steps=4", "trainer.batch_size=8",
                 "seed=2"]  # a looped core: its loss moves with the depth (an ODE's barely: one solution, finer or coarser)
    one = _train(tmp_path / "one", cache_dir, *overrides)
    many = _python("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", "-m", "bertode.train",
                   f"hydra.run.dir={tmp_path / 'two'}", f"data.cache_dir={cache_dir}", *SMALL, *overrides, cwd=tmp_path)
    assert many.returncode == 0, many.stderr[-3000:]
    two = _records(tmp_path / "two")
    uniform = make_depth_distribution("uniform", low=1, high=4)
    expected = [uniform.draw(2, s) for s in (1, 2, 3, 4)]
    assert [r["depth"] for r in one] == [r["depth"] for r in two] == expected
    assert len(set(expected)) > 1
    # every rank ran the step's depth: the all-reduced losses are one process's
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) <= 1e-4


SLOW = """
import os, time
import bertode
from bertode.training.depth import Uniform


@bertode.register_depth_distribution("uniform_slow_at_4")
class SlowAtFour(Uniform):
    def draw(self, seed, step):
        if step == 4 and os.environ.get("SLOW_AT_4"):
            open(os.environ["SLOW_AT_4"], "w").close()
            time.sleep(120)
        return super().draw(seed, step)
"""


def test_a_run_killed_and_resumed_draws_the_uninterrupted_depths(tmp_path, cache_dir, monkeypatch):
    (tmp_path / "slow_plugin.py").write_text(SLOW)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = [*SMALL, "plugins=[slow_plugin]", "depth=uniform_slow_at_4", "depth.low=1", "depth.high=4",
              "trainer.max_steps=6", "trainer.checkpoint_every=3", "model.hidden_dropout_prob=0.1"]
    run, flag = tmp_path / "killed", tmp_path / "at_step_4"
    process = subprocess.Popen([sys.executable, "-m", "bertode.train", f"hydra.run.dir={run}",
                                f"data.cache_dir={cache_dir}", *common], cwd=tmp_path,
                               env=dict(os.environ, SLOW_AT_4=str(flag),
                                        PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not flag.exists():  # step 3 is checkpointed, step 4 is drawing
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert [r["step"] for r in _records(run)] == [1, 2, 3]
    resumed = _train(run, cache_dir, *common, "trainer.resume=auto")
    uniform = make_depth_distribution("uniform", low=1, high=4)
    expected = [uniform.draw(0, s) for s in range(1, 7)]
    assert [r["depth"] for r in resumed] == expected  # steps 1-3 drawn by the killed process, 4-6 by this one


# --- refusals ----------------------------------------------------------------------------------


TRAIN_REFUSALS = [
    (["depth=nope"], "depth='nope' is invalid; allowed: 'default', 'fixed', "),
    (["depth.backprop=-1"], "depth.backprop=-1 is invalid; allowed: null (every step differentiated) or an integer >= 1"),
    (["depth=uniform", "depth.low=5", "depth.high=3"], "depth.low=5 is invalid with depth.high=3; allowed: an integer "
                                                       "in [1, 3]"),
    (["depth=uniform", "depth.low=0", "depth.high=3"], "depth.low=0 is invalid; allowed: an integer >= 1"),
    (["depth=uniform", "depth.high=3"], "depth.low=null is invalid; allowed: an integer >= 1"),
    (["depth=poisson_lognormal", "depth.mean=0"], "depth.mean=0 is invalid; allowed: a number > 0"),
    (["depth=poisson_lognormal", "depth.mean=4", "depth.sigma=-0.5"], "depth.sigma=-0.5 is invalid; allowed: a number >= 0"),
    (["depth.steps=0"], "depth.steps=0 is invalid; allowed: null (the model's own depth) or an integer >= 1"),
    (["model=bert", "depth.steps=3"], "depth.steps=3 is invalid for the model's mode='discrete' with "
                                      "weight_tying=False: nothing is iterated"),
    (["model=bert", *UNIFORM], "depth='uniform' is invalid for the model's mode='discrete' with weight_tying=False"),
    (["solver=dopri5", "depth.backprop=1"], "depth.backprop=1 is invalid with solver='dopri5': an adaptive solver "
                                            "chooses its own steps"),
    (["exit=kl"], "exit=kl is invalid for bertode.train: it takes no exit group"),
    (["trainer.dynamics_every=-1"], "trainer.dynamics_every=-1 is invalid; allowed: 0 (off) or an integer >= 1"),
    (["model.prelude_layers=1", "model.coda_layers=1"], "model.prelude_layers=1 is invalid with coda_layers=1 and "
                                                        "num_hidden_layers=2; allowed: prelude_layers + coda_layers < 2"),
    (["model.core_injection=add"], "model.core_injection='add' is invalid with mode='ode', weight_tying=False"),
    (["depth.backprop=0"], "depth.backprop=0 is invalid; allowed: null (every step differentiated) or an integer >= 1"),
    (["sensitivity=adjoint", "depth.backprop=1"], "depth.backprop=1 is invalid with sensitivity='adjoint': it does not "
                                                  "backpropagate through the steps; allowed: null, or sensitivity='autograd'"),
    (["model=deq", "depth.backprop=2"], "depth.backprop=2 is invalid with sensitivity='ift'"),
    (["solver.ode_backend=torchdiffeq", "depth.backprop=1"], "depth.backprop=1 is invalid with "
                                                              "solver.ode_backend='torchdiffeq'"),
    (["model.weight_tying=true", *UNIFORM, "trainer.compile=true"], "trainer.compile=True is invalid with "
                                                                    "depth='uniform'"),
    (["model=bert", "trainer.dynamics_every=5"], "trainer.dynamics_every=5 is invalid with mode='discrete' and untied "
                                                 "layers"),
]


@pytest.mark.parametrize("argv,expected", TRAIN_REFUSALS, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_bad_training_depth_is_one_line_and_writes_nothing(tmp_path, cache_dir, capsys, argv, expected):
    before = file_tree(tmp_path, cache_dir)
    error = refused_line(capsys, "train", f"hydra.run.dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}", *SMALL, *argv)
    assert expected in error, error
    if argv == ["depth=nope"]:  # every registered name (a plugin's too, once imported)
        assert all(repr(name) in error for name in bertode.available_depth_distributions())
    assert file_tree(tmp_path, cache_dir) == before


def test_resuming_with_another_depth_is_refused_before_hydra_rewrites_the_run(tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    _train(run, cache_dir, *UNIFORM, "trainer.max_steps=2", "trainer.checkpoint_every=2")
    target = run / "checkpoints" / "step_00000002"
    before = file_tree(run, cache_dir)
    for change, expected in (
            (["depth.steps=2"], f"depth='fixed' is invalid: the run being resumed ({target}) was trained with "
                                "depth='uniform' (depth=uniform depth.low=1 depth.high=4 depth.backprop=null); allowed: "
                                "depth=uniform depth.low=1 depth.high=4 depth.backprop=null (or a new run directory)"),
            ([*UNIFORM[:2], "depth.high=5"], f"depth.high=5 is invalid: the run being resumed ({target}) was trained "
                                             "with 4; allowed: 4"),
            ([*UNIFORM, "depth.backprop=1"], "depth.backprop=1 is invalid: the run being resumed")):
        error = refused_line(capsys, "train", f"hydra.run.dir={run}", f"data.cache_dir={cache_dir}", *SMALL, *change,
                         "trainer.max_steps=3", "trainer.resume=auto")
        assert expected in error, error
        assert file_tree(run, cache_dir) == before
    resumed = _train(run, cache_dir, *UNIFORM, "trainer.max_steps=3", "trainer.resume=auto")  # the same depth resumes
    assert [r["step"] for r in resumed] == [1, 2, 3]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from test_grammar import _checkpoint

    root = tmp_path_factory.mktemp("depth-checkpoints")
    return {"ode": _checkpoint(root / "ode"), "tied": _checkpoint(root / "tied", weight_tying=True),
            "bert": _checkpoint(root / "bert", mode="discrete"), "clm": _checkpoint(root / "clm", causal=True),
            "clm_tied": _checkpoint(root / "clm_tied", causal=True, weight_tying=True)}


INFERENCE_REFUSALS = [
    ("evaluate", "ode", ["exit=nope"], "exit='nope' is invalid; allowed: 'default', 'kl', 'latent_diff', 'none'"),
    ("evaluate", "tied", ["exit=latent_diff", "exit.threshold=-0.1"], "exit.threshold=-0.1 is invalid; allowed: a "
                                                                      "number >= 0"),
    ("evaluate", "ode", ["exit=latent_diff"], "exit='latent_diff' is invalid for the model's mode='ode' with "
                                              "weight_tying=False: exit applies to DEQ (mode='deq') and weight-tied "
                                              "(looped, weight_tying=true) models"),
    ("generate", "clm", ["exit=kl"], "exit='kl' is invalid for the model's mode='ode' with weight_tying=False"),
    ("evaluate", "tied", UNIFORM, "depth='uniform' is invalid for bertode.evaluate: a distribution is drawn per "
                                  "training step; allowed: depth=fixed with depth.steps=N"),
    ("generate", "clm_tied", ["depth=poisson_lognormal", "depth.mean=3"], "depth='poisson_lognormal' is invalid for "
                                                                          "bertode.generate"),
    ("evaluate", "tied", ["depth.steps=2", "depth.backprop=1"], "depth.backprop=1 is invalid for bertode.evaluate: "
                                                                "nothing is differentiated; allowed: null"),
    ("evaluate", "bert", ["depth.steps=2"], "depth.steps=2 is invalid for the model's mode='discrete' with "
                                            "weight_tying=False: nothing is iterated"),
    ("evaluate", "ode", ["solver=tsit5", "depth.steps=4"], "depth.steps=4 is invalid with solver='tsit5': an "
                                                           "adaptive solver chooses its own steps"),
    ("evaluate", "ode", ["depth.steps=-2"], "depth.steps=-2 is invalid; allowed: null (the model's own depth) or an "
                                            "integer >= 1"),
]


@pytest.mark.parametrize("command,model,argv,expected", INFERENCE_REFUSALS, ids=lambda a: str(a))
def test_bad_depth_or_exit_at_inference_is_one_line_and_writes_nothing(tmp_path, cache_dir, capsys, checkpoints,
                                                                      monkeypatch, command, model, argv, expected):
    monkeypatch.chdir(tmp_path)  # generate's run directory is "."
    folder = checkpoints[model]
    before = file_tree(tmp_path, folder.parent, cache_dir)
    data = [f"data.cache_dir={cache_dir}"] if command == "evaluate" else []
    error = refused_line(capsys, command, f"checkpoint={folder}", *data, *argv)
    assert expected in error, error
    assert file_tree(tmp_path, folder.parent, cache_dir) == before


def test_finetune_refuses_a_depth_on_a_discrete_model(tmp_path, capsys):
    error = refused_line(capsys, "finetune", f"hydra.run.dir={tmp_path / 'run'}", "model=bert", "depth.steps=2")
    assert "depth.steps=2 is invalid for the model's mode='discrete' with weight_tying=False" in error
    assert list(tmp_path.iterdir()) == []


def test_evaluate_and_generate_dial_depth_and_exit_around_every_forward(tmp_path, cache_dir, checkpoints, capsys,
                                                                       monkeypatch):
    """An untied Euler ODE of one layer: 2 evaluations per forward, 2 x depth.steps dialled;
    generate's every forward sees the dial (depth and the built exit criterion)."""
    from bertode.modeling import BertODEModel
    from bertode.training.cli import compose
    from bertode.training.evaluate import run as evaluate

    base = [f"checkpoint={checkpoints['ode']}", f"data.cache_dir={cache_dir}", "data.seq_len=16", "max_sequences=4"]
    own = evaluate(compose("evaluate", base), tmp_path / "e1")
    dialled = evaluate(compose("evaluate", [*base, "depth.steps=3"]), tmp_path / "e2")
    assert (own["nfe_forward"], own["depth"]) == (2, None) and (dialled["nfe_forward"], dialled["depth"]) == (6, 3)
    seen = []
    forward = BertODEModel.forward

    def recording(self, *args, **kwargs):
        dial = bertode.current_dial()
        seen.append((dial.depth, type(dial.exit).__name__, getattr(dial.exit, "threshold", None)))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(BertODEModel, "forward", recording)
    monkeypatch.chdir(tmp_path)
    code = run_command("generate", [f"checkpoint={checkpoints['clm_tied']}", "prompt='the whale'", "max_new_tokens=3",
                                 "depth.steps=2", "exit=latent_diff", "exit.threshold=0.2"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert len(seen) == 3 and set(seen) == {(2, "LatentDifference", 0.2)}


def test_dynamics_every_logs_the_probe_at_every_nth_step(tmp_path, cache_dir, monkeypatch):
    from bertode.training import loop

    seen = []

    def probe(model, input_ids, attention_mask=None):
        result = real(model, input_ids, attention_mask)
        seen.append((input_ids.shape, result))
        return result

    real = loop.dynamics_probe
    monkeypatch.setattr(loop, "dynamics_probe", probe)
    records = _train(tmp_path / "looped", cache_dir, "model.weight_tying=true", "trainer.max_steps=5",
                     "trainer.dynamics_every=2")
    logged = {r["step"]: r["dynamics_spectral_radius"] for r in records if "dynamics_spectral_radius" in r}
    assert sorted(logged) == [2, 4] and len(seen) == 2
    assert [logged[2], logged[4]] == [result["spectral_radius"] for _, result in seen]
    assert all(shape[0] == 1 for shape, _ in seen)  # one sequence
    assert all(0 < value < 10 for value in logged.values())
