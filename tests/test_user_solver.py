"""A researcher's own ODE solver, in one file, through the public API only: Ralston's
third-order method given as a Butcher tableau, checked to order 3 in float64 against a
tight torchdiffeq reference, then trained from the command line (``plugins=[...]``)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

import bertode

RALSTON3 = bertode.ButcherTableau(c=[0.0, 1 / 2, 3 / 4], a=[[], [1 / 2], [0.0, 3 / 4]], b=[2 / 9, 1 / 3, 4 / 9], order=3)
bertode.register_solver("ralston3", RALSTON3)

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_the_tableau_is_a_registered_choice_with_its_properties():
    assert "ralston3" in bertode.available()["solver"]
    spec = bertode.get_solver("ralston3")
    assert (spec.adaptive, spec.order, spec.torchdiffeq) == (False, 3, None)


def _model(**ode):
    model = bertode.BertODEModel(bertode.BertODEConfig(**TINY, **ode)).double().eval()
    return model


def test_ralston3_converges_with_order_three_in_float64():
    torch.manual_seed(0)
    reference = _model(solver="dopri5", atol=1e-12, rtol=1e-12, ode_backend="torchdiffeq")
    with torch.no_grad():  # larger weights than BERT's init, so the flow is far from linear
        for p in reference.encoder.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    weights = reference.state_dict()
    ids = torch.randint(5, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = reference(ids).last_hidden_state
        errors = []
        steps = [2, 4, 8, 16]
        for n in steps:
            model = _model(solver="ralston3", steps=n)
            model.load_state_dict(weights)
            out = model(ids)
            assert out.solver_stats["nfe_forward"] == 2 * 3 * n  # two sites, three stages per step
            errors.append((out.last_hidden_state - target).abs().max().item())
    order = (math.log(errors[0]) - math.log(errors[-1])) / math.log(steps[-1] / steps[0])
    assert abs(order - 3) <= 0.3, (errors, order)
    assert errors[-1] < 1e-4  # measured 2.0e-5 at 16 steps


def test_trained_from_the_command_line_as_a_plugin(tmp_path):
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "bertode.train", "plugins=[test_user_solver]", "solver=ralston3", "solver.steps=2",
         f"hydra.run.dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=16", "data.vocab_size=300",
         "data.max_eval_sequences=4", "trainer.batch_size=4", "trainer.max_steps=3", "trainer.warmup_steps=1",
         "trainer.log_every=1", "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    # 2 layers x 2 sites x 3 stages x 2 steps evaluations of the field per forward
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["nfe_forward"] == 24 for r in train)
    assert all(math.isfinite(r["loss"]) for r in train)
    saved = json.loads((tmp_path / "final" / "config.json").read_text())
    assert saved["solver"] == "ralston3" and saved["steps"] == 2
