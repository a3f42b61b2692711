"""Depth as a dial (issue 24): ``bertode.evaluate curve=true`` reads the loss at every depth
1..max from one pass, and it equals separate evaluations at each depth (a DEQ's
``deq.max_iter``, a looped core's dialled depth); ``curve=true`` on an untied ODE model is
refused in one line; the saturation fit L(n) = L_inf + A exp(-n / tau) recovers its
parameters and `bertode.report` prints and plots it for evaluate runs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import bertode
from bertode.layers.deq import BertDEQEncoder
from bertode.solve.dial import current_dial, dialed
from bertode.training.cli import compose
from bertode.training.report import extrapolation_ratio, fit_saturation

TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    from bertode.training.corpus import SPECIAL_TOKENS
    from bertode.training.wordpiece import train_tokenizer

    text = (Path(bertode.__file__).parent / "sample_data" / "moby_dick_eval.txt").read_text()[:20000]
    return train_tokenizer(text.splitlines(), 120, SPECIAL_TOKENS)


def _checkpoint(folder, tokenizer, scale=1.5, **fields):
    """A saved random tiny masked-LM model with its tokenizer (what a run's final/ holds), its
    encoder's weights times ``scale`` (a map that takes a few iterations to settle)."""
    torch.manual_seed(0)
    config = bertode.BertODEConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   **{**TINY, **fields})
    model = bertode.BertODEForMaskedLM(config)
    with torch.no_grad():
        for p in model.bert.encoder.parameters():
            p.mul_(scale)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _evaluate(folder, cache, *overrides):
    from bertode.training.evaluate import run

    cfg = compose("evaluate", [f"checkpoint={folder}", f"data.cache_dir={cache}", "data.seq_len=16",
                               "max_sequences=8", "batch_size=4", *overrides])
    return run(cfg, folder.parent / "evaluate")


# --- the plumbing, against a fake encoder ---------------------------------------------------

def _fake_iterates(monkeypatch, last=3):
    """The DEQ encoder as the encoder side will behave, faked: at depth d (the dial's, else
    deq_max_iter) its output is z* * min(d, last) / last, and it reports iterate n (n <= last:
    a solve converged at ``last``) as z* * n / last."""
    original = BertDEQEncoder.forward

    def forward(self, embeddings, attn_mask, output_hidden_states=False):
        dial = current_dial()
        with dialed(depth=None, on_iterate=None):  # the configured solve, however the real encoder reads the dial
            out = original(self, embeddings, attn_mask, output_hidden_states)
        depth = dial.steps(self.config.deq_max_iter)
        solved = out.hidden
        for n in range(1, min(depth, last) + 1):
            if dial.on_iterate is not None:
                dial.on_iterate(n, solved * n / last)
        out.hidden = solved * min(depth, last) / last
        return out

    monkeypatch.setattr(BertDEQEncoder, "forward", forward)


def test_the_curve_plumbing_scores_each_reported_iterate_as_a_separate_evaluation(tmp_path, tokenizer, monkeypatch,
                                                                                   capsys):
    _fake_iterates(monkeypatch)
    folder = _checkpoint(tmp_path / "deq", tokenizer, mode="deq", deq_max_iter=5)
    cache = tmp_path / "cache"
    result = _evaluate(folder, cache, "curve=true")
    curve = result["curve"]
    assert [p["depth"] for p in curve] == [1, 2, 3, 4, 5]  # 1..deq_max_iter
    for point in curve:
        with dialed(depth=point["depth"]):
            alone = _evaluate(folder, cache)
        assert abs(point["loss"] - alone["loss"]) <= 1e-6, (point, alone["loss"])
        assert point["perplexity"] == pytest.approx(math.exp(point["loss"]))
        assert point["accuracy"] == pytest.approx(alone["accuracy"])
    assert curve[2]["loss"] == curve[3]["loss"] == curve[4]["loss"] == result["loss"]  # converged at 3: repeated
    assert curve[0]["loss"] != curve[2]["loss"]
    written = json.loads((tmp_path / "evaluate" / "evaluation.json").read_text())  # the last run's: a separate one
    assert "curve" not in written
    _evaluate(folder, cache, "curve=true")
    written = json.loads((tmp_path / "evaluate" / "evaluation.json").read_text())
    assert [p["loss"] for p in written["curve"]] == [p["loss"] for p in curve]
    assert "  depth 5: loss" in capsys.readouterr().out


def test_curve_on_an_untied_ode_model_is_refused_in_one_line(tmp_path, tokenizer):
    from bertode.training.evaluate import validate

    folder = _checkpoint(tmp_path / "ode", tokenizer, solver="rk4", steps=2)
    with pytest.raises(ValueError) as error:
        validate(compose("evaluate", [f"checkpoint={folder}", "data.seq_len=16", "curve=true"]))
    message = str(error.value)
    assert "\n" not in message and "curve=true is invalid" in message and "-m solver.steps=1,2,4,8" in message
    with pytest.raises(ValueError, match="curve='yes' is invalid; allowed: true, false"):
        validate(compose("evaluate", [f"checkpoint={folder}", "data.seq_len=16", "curve=yes"]))


# --- the real encoders (issue 24's encoder side) ----------------------------------------------

def test_the_curve_of_one_deq_solve_equals_separate_evaluations_at_each_max_iter(tmp_path, tokenizer):
    folder = _checkpoint(tmp_path / "deq", tokenizer, mode="deq", deq_max_iter=6, deq_tol=1e-12,
                         scale=3.0)
    cache = tmp_path / "cache"
    result = _evaluate(folder, cache, "curve=true")
    curve = {p["depth"]: p["loss"] for p in result["curve"]}
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]
    for n in range(1, 7):
        alone = _evaluate(folder, cache, f"deq.max_iter={n}")["loss"]
        assert abs(curve[n] - alone) <= 1e-6, (n, curve[n], alone)
    assert curve[6] == pytest.approx(result["loss"], abs=1e-6)
    assert min(abs(curve[n + 1] - curve[n]) for n in range(1, 6)) > 1e-5  # every iteration changes the loss


def test_the_curve_of_a_looped_core_equals_separate_evaluations_at_each_depth(tmp_path, tokenizer):
    from bertode.training.evaluate import configured_depth

    folder = _checkpoint(tmp_path / "looped", tokenizer, mode="discrete", weight_tying=True,
                         num_hidden_layers=4, scale=4.0)
    model = bertode.BertODEForMaskedLM.from_pretrained(folder)
    cache = tmp_path / "cache"
    assert configured_depth(model.config) == 4
    result = _evaluate(folder, cache, "curve=true")
    curve = {p["depth"]: p["loss"] for p in result["curve"]}
    assert sorted(curve) == [1, 2, 3, 4]
    for n in range(1, 5):
        with dialed(depth=n):
            alone = _evaluate(folder, cache)["loss"]
        assert abs(curve[n] - alone) <= 1e-6, (n, curve[n], alone)
    assert curve[4] == pytest.approx(result["loss"], abs=1e-6)
    assert min(abs(curve[n + 1] - curve[n]) for n in range(1, 4)) > 1e-5  # every application changes the loss
