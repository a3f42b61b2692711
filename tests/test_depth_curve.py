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
        alone = _evaluate(folder, cache, f"depth.steps={n}")
        assert alone["depth"] == n and abs(curve[n] - alone["loss"]) <= 1e-6, (n, curve[n], alone)
    assert curve[4] == pytest.approx(result["loss"], abs=1e-6)
    assert min(abs(curve[n + 1] - curve[n]) for n in range(1, 4)) > 1e-5  # every application changes the loss


# --- the saturation fit and the report ----------------------------------------------------------

def _law(n, l_inf=5.0, a=1.0, tau=3.0):
    return l_inf + a * np.exp(-np.asarray(n, dtype=float) / tau)


def test_the_fit_recovers_the_saturation_law_from_exact_and_noisy_points():
    depths = np.arange(1, 13)
    fit = fit_saturation(depths, _law(depths))
    assert fit["message"] is None and fit["rmse"] < 1e-8
    for key, true in (("L_inf", 5.0), ("A", 1.0), ("tau", 3.0)):
        assert abs(fit[key] - true) <= 1e-4, (key, fit)
    # Seeded noise, sigma 1e-3, 16 depths: the bounds are ~3x the spread over seeds 0-19
    # (measured: |dL_inf| <= 1.3e-3, |dA| <= 3.6e-3, |dtau| <= 2.1e-2, rmse 4.9e-4 to 1.3e-3).
    depths = np.arange(1, 17)
    noisy = _law(depths) + np.random.default_rng(0).normal(0.0, 1e-3, depths.size)
    fit = fit_saturation(depths, noisy)
    assert abs(fit["L_inf"] - 5.0) <= 5e-3 and abs(fit["A"] - 1.0) <= 2e-2 and abs(fit["tau"] - 3.0) <= 0.1, fit
    assert 3e-4 <= fit["rmse"] <= 2e-3  # the noise's size
    # A rising law (A < 0) and a law in other units are fitted the same way.
    fit = fit_saturation(depths, _law(depths, 2.0, -0.5, 6.0))
    assert abs(fit["L_inf"] - 2.0) <= 1e-4 and abs(fit["A"] + 0.5) <= 1e-4 and abs(fit["tau"] - 6.0) <= 1e-4, fit


def test_the_fit_says_why_instead_of_raising():
    for depths, losses, words in (([1, 2], [3.0, 2.0], "at least 3"), ([1, 1, 1, 2], [3.0, 3.0, 3.0, 2.0], "at least 3"),
                                  ([1, 2, 3], [2.0, float("nan"), 1.0], "non-finite")):
        fit = fit_saturation(depths, losses)
        assert fit["L_inf"] is None and fit["tau"] is None and words in fit["message"], fit
    flat = fit_saturation([1, 2, 3], [2.0, 2.0, 2.0])
    assert flat["L_inf"] == 2.0 and flat["A"] == 0.0 and flat["tau"] is None and "does not change" in flat["message"]


def test_the_extrapolation_ratio_reads_measured_losses_else_the_fit():
    depths = np.arange(1, 13)
    # 4 x 3 = 12 was evaluated: both losses measured
    assert extrapolation_ratio(depths, _law(depths), 3) == pytest.approx(_law(12) / _law(3), rel=1e-12)
    # only 1..6 evaluated: loss(3) measured, loss(12) from the fit
    assert extrapolation_ratio(depths[:6], _law(depths[:6]), 3) == pytest.approx(_law(12) / _law(3), rel=1e-6)
    measured = _law(depths).copy()
    measured[11] = 4.0  # a measured value wins over the law
    assert extrapolation_ratio(depths, measured, 3) == pytest.approx(4.0 / _law(3), rel=1e-12)
    assert extrapolation_ratio(depths[:2], _law(depths[:2]), 1) is None  # loss(4) neither measured nor fitted
    assert extrapolation_ratio(depths, _law(depths), None) is None


def _saved_model(folder, **config):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bertode", **config}))
    return str(folder)


def test_report_fits_a_curve_run_and_a_depth_sweep_prints_and_plots_them(tmp_path, capsys):
    from bertode.report import main as report

    # One evaluate run with a curve (a DEQ trained at deq_max_iter=3) ...
    deq = _saved_model(tmp_path / "deq" / "final", mode="deq", deq_max_iter=3)
    depths = list(range(1, 9))
    curve_run = tmp_path / "deq" / "evaluate" / "one"
    curve_run.mkdir(parents=True)
    curve = [{"depth": n, "loss": float(_law(n)), "perplexity": math.exp(_law(n))} for n in depths]
    (curve_run / "evaluation.json").write_text(json.dumps({"loss": curve[2]["loss"], "checkpoint": deq, "overrides": {},
                                                           "curve": curve}))
    # ... and a -m sweep of another checkpoint (an ODE trained at 2 steps) over solver.steps.
    ode = _saved_model(tmp_path / "ode" / "final", mode="ode", steps=2)
    sweep = tmp_path / "ode" / "evaluate" / "sweep"
    for job, steps in enumerate((1, 2, 4, 8, 16)):
        (sweep / str(job)).mkdir(parents=True)
        (sweep / str(job) / "evaluation.json").write_text(json.dumps(
            {"loss": float(_law(steps, 4.0, 2.0, 1.5)), "checkpoint": ode, "overrides": {"steps": steps}}))
    for job, steps in enumerate((1, 2, 4)):  # the same sweep with another solver: a curve of its own
        (sweep / f"euler{job}").mkdir(parents=True)
        (sweep / f"euler{job}" / "evaluation.json").write_text(json.dumps(
            {"loss": float(_law(steps, 4.5, 2.0, 1.0)), "checkpoint": ode, "overrides": {"solver": "euler", "steps": steps}}))
    out = tmp_path / "report"
    assert report([str(tmp_path / "deq"), str(tmp_path / "ode"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "### depth curves (3 models)" in printed and "| model | depths | L_inf | A | tau |" in printed
    rows = {r["model"]: r for r in json.loads((out / "report.json").read_text()) if r["kind"] == "depth_curve"}
    assert sorted(rows) == ["deq/final", "ode/final", "ode/final (solver=euler)"]
    assert abs(rows["ode/final (solver=euler)"]["fit"]["L_inf"] - 4.5) <= 1e-4
    fitted = rows["deq/final"]
    assert fitted["depths"] == depths and fitted["trained_depth"] == 3
    assert abs(fitted["fit"]["L_inf"] - 5.0) <= 1e-4 and abs(fitted["fit"]["tau"] - 3.0) <= 1e-4
    assert fitted["ratio"] == pytest.approx(_law(12) / _law(3), rel=1e-6)  # 12 was not evaluated: the fit's
    swept = rows["ode/final"]
    assert swept["depths"] == [1, 2, 4, 8, 16] and swept["trained_depth"] == 2
    assert abs(swept["fit"]["L_inf"] - 4.0) <= 1e-4 and abs(swept["fit"]["tau"] - 1.5) <= 1e-4
    assert swept["ratio"] == pytest.approx(_law(8, 4.0, 2.0, 1.5) / _law(2, 4.0, 2.0, 1.5), rel=1e-12)  # measured
    line = next(line for line in printed.splitlines() if line.startswith("| deq/final |"))
    assert f"| {fitted['fit']['L_inf']:.4g} |" in line and f"| {fitted['fit']['tau']:.4g} |" in line
    assert f"| {fitted['ratio']:.4g} |" in line and "| 1-8 (8) |" in line
    assert (out / "depth_curves.png").stat().st_size > 1000 and f"wrote {out / 'depth_curves.png'}" in printed
