"""Fast in-process kill tests of `bertode/training/evaluate.py` (issue 29's mutation testing):
its one-line refusals word for word (the field or checkpoint they name, the parser's own error),
the values it accepts, a plugin named after compose, a segment memory chosen at evaluation
(``model.mem_len``) against the loss recomputed from the model's logits, a DEQ's saved
``deq_max_iter`` and printed iterations, and a word vocabulary's perplexity unit. No training:
the checkpoints are tiny models (hidden 16, one layer) saved with a tokenizer trained here."""

import json
import math
import re
import shutil
import sys

import pytest
import torch

import bertode
from bertode.causal_lm import BertODEForCausalLM
from conftest import write_tiny_text

WORDS = "the a cat dog sat ran on under mat log red blue big small quick slow".split()
TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Tiny train and eval text files, and a data cache for them."""
    return write_tiny_text(tmp_path_factory.mktemp("text"), WORDS, lines=40, length=10, spread=5, held_out=12)


def _data(text, *extra):
    return ["data=text", f"data.files=[{text / 'train.txt'}]", f"data.eval_files=[{text / 'eval.txt'}]",
            f"data.cache_dir={text / 'cache'}", "data.seq_len=12", "data.vocab_size=60", *extra]


def _tokenizer(text, *extra):
    """The tokenizer `bertode.train` would train on ``text`` (``extra``: data overrides)."""
    from bertode.train import compose
    from bertode.training.corpus import prepare

    return prepare(compose(_data(text, *extra)).data).tokenizer


def _checkpoint(folder, tokenizer, model_class=bertode.BertODEForMaskedLM, seed=0, **fields):
    """A save_pretrained directory of a tiny model with ``tokenizer``."""
    torch.manual_seed(seed)
    config = bertode.BertODEConfig(**{**TINY, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                                      **fields})
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, text):
    """An ODE MLM, a DEQ MLM, a causal LM with Transformer-XL positions and no memory, a word-vocabulary MLM."""
    root = tmp_path_factory.mktemp("checkpoints")
    pieces = _tokenizer(text)
    return {"ode": _checkpoint(root / "ode", pieces, solver="euler", steps=1),
            "deq": _checkpoint(root / "deq", pieces, mode="deq", deq_max_iter=5),
            "clm": _checkpoint(root / "clm", pieces, BertODEForCausalLM, mode="discrete", is_decoder=True,
                               position_scheme="transformer_xl", mem_len=0, initializer_range=0.3),
            "word": _checkpoint(root / "word", _tokenizer(text, "data.vocabulary=word", "data.vocab_size=null"),
                                solver="euler", steps=1)}


def _config(text, folder, *extra):
    from bertode.training.cli import compose

    return compose("evaluate", [f"checkpoint={folder}", *_data(text), "max_sequences=4", "batch_size=2", "seed=5",
                                *extra])


def _refusal(text, folder, *extra):
    from bertode.training.evaluate import validate

    with pytest.raises(ValueError) as error:
        validate(_config(text, folder, *extra))
    return str(error.value)


REFUSALS = {  # (checkpoint, overrides) -> the one line, {folder} the checkpoint's directory
    ("ode", "seed=-1"): "seed=-1 is invalid; allowed: an integer >= 0",
    ("ode", "max_sequences=0"): "max_sequences=0 is invalid; allowed: null or an integer >= 1",
    ("ode", "objective=clm"): "objective='clm' is invalid for checkpoint='{folder}': it was trained with objective='mlm' "
                              "and causal attention would ask another model; allowed: objective=mlm or null (train a "
                              "causal one with bertode.train objective=clm)",
    ("ode", "curve=true"): "curve=true is invalid for checkpoint='{folder}': the model's mode='ode' with untied layers has "
                           "no iterated depth to score per iterate; allowed: curve=false, and sweep the solve instead "
                           "with -m solver.steps=1,2,4,8",
    ("clm", "model.mem_len=-1"): "model.mem_len=-1 is invalid; allowed: an integer >= 0",
    ("ode", "vector_field=time_weights"): "vector_field='time_weights' is invalid for checkpoint='{folder}': the model it "
                                          "makes has parameters the checkpoint never trained "
                                          "(bert.encoder.layer.0.attention.field.down.0, 14 new, 0 dropped); allowed: "
                                          "choices that keep the trained parameters (solver, steps, tolerances, deq.* "
                                          "iterations)",
    ("ode", "depth=uniform depth.low=1 depth.high=2"): "depth='uniform' is invalid for bertode.evaluate: a distribution "
                                                       "is drawn per training step; allowed: depth=fixed with "
                                                       "depth.steps=N (the depth of every forward)",
}


@pytest.mark.parametrize("kind, overrides", list(REFUSALS))
def test_a_refusal_names_the_field_the_value_and_the_checkpoint_in_one_line(text, checkpoints, kind, overrides):
    folder = checkpoints[kind]
    assert _refusal(text, folder, *overrides.split()) == REFUSALS[kind, overrides].format(folder=folder)


def test_a_damaged_config_or_weights_file_is_refused_with_the_parsers_own_error(text, checkpoints, tmp_path):
    """The parser's first error line (json's, safetensors') is quoted: recomputed here from the same bytes."""
    from safetensors import safe_open

    folder = tmp_path / "damaged"
    shutil.copytree(checkpoints["ode"], folder)
    saved = (folder / "config.json").read_text()
    (folder / "config.json").write_text(saved[:-3])
    try:
        json.loads(saved[:-3])
    except ValueError as error:
        parsed = str(error)
    assert _refusal(text, folder) == (f"checkpoint={str(folder)!r} is invalid: its config.json is not JSON ({parsed}); "
                                      "allowed: a directory written by save_pretrained")
    (folder / "config.json").write_text(saved)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(Exception) as error:
        with safe_open(str(folder / "model.safetensors"), "pt"):
            pass
    first = str(error.value).splitlines()[0]
    assert first and _refusal(text, folder) == (f"checkpoint={str(folder)!r} is invalid: its model.safetensors is "
                                                f"damaged ({first}); allowed: a directory written by save_pretrained")


@pytest.mark.parametrize("overrides", [["max_sequences=null"], ["max_sequences=1"], ["data.vocab_size=2"]])
def test_every_row_one_row_and_a_vocabulary_size_no_tokenizer_is_trained_for_are_accepted(text, checkpoints, overrides):
    """max_sequences: null (every row) or >= 1; data.vocab_size is not read (the checkpoint brings its tokenizer)."""
    from bertode.training.evaluate import validate

    folder, saved, name, fields = validate(_config(text, checkpoints["ode"], *overrides))
    assert (folder, saved["model_type"], name, fields) == (checkpoints["ode"], "bertode", "mlm", {})


def test_a_plugin_named_in_the_config_after_compose_is_imported(text, checkpoints, tmp_path, monkeypatch, request):
    """compose imports ``plugins=`` overrides itself: a plugin set on the composed config reaches evaluate's own import."""
    from bertode.training.evaluate import validate

    request.addfinalizer(lambda: sys.modules.pop("evaluate_kill_plugin", None))
    (tmp_path / "evaluate_kill_plugin.py").write_text("IMPORTED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _config(text, checkpoints["ode"])
    cfg.plugins = ["evaluate_kill_plugin"]
    assert "evaluate_kill_plugin" not in sys.modules
    validate(cfg)
    assert sys.modules["evaluate_kill_plugin"].IMPORTED


def test_a_memory_chosen_at_evaluation_reads_each_slice_as_one_text(text, checkpoints, tmp_path):
    """model.mem_len=64 on a causal LM saved without memory: the 4 rows are read in 2 slices of 2 rows in text order,
    the memory carried, so each target is scored as the forward of its whole slice (24 tokens) without memory
    scores it (the cross-entropy of next tokens recomputed here from the logits, [CLS]/[SEP] never targets)."""
    from bertode.training.corpus import load_tokenizer, prepare
    from bertode.training.evaluate import run

    folder = checkpoints["clm"]
    cfg = _config(text, folder, "model.mem_len=64")
    result = run(cfg, tmp_path / "out")
    assert result["overrides"] == {"mem_len": 64} and result["sequences"] == 4
    tokenizer = load_tokenizer(folder)
    rows = prepare(cfg.data, tokenizer=tokenizer).eval[:4]
    model = BertODEForCausalLM.from_pretrained(folder).eval()
    assert model.config.mem_len == 0
    total, count = 0.0, 0
    special = torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id])
    with torch.no_grad():
        for start in (0, 2):
            whole = rows[start:start + 2].reshape(1, -1)
            logits, targets = model(whole).logits[0, :-1], whole[0, 1:]
            kept = ~torch.isin(targets, special)
            total += torch.nn.functional.cross_entropy(logits[kept], targets[kept], reduction="sum").item()
            count += int(kept.sum())
    assert result["target_tokens"] == count
    assert abs(result["loss"] - total / count) <= 1e-5


def test_a_deq_evaluation_records_its_iteration_cap_and_prints_both_compute_counts(text, checkpoints, tmp_path, capsys):
    from bertode.training.evaluate import run

    folder = checkpoints["deq"]
    result = run(_config(text, folder), tmp_path / "out")
    assert (result["mode"], result["deq_max_iter"], result["steps"]) == ("deq", 5, None)
    assert json.loads((tmp_path / "out" / "evaluation.json").read_text())["deq_max_iter"] == 5
    line = [out for out in capsys.readouterr().out.splitlines() if out.startswith(str(folder))]
    assert line == [f"{folder} [eval]: MLM loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} per token, "
                    f"accuracy {result['accuracy']:.3f} over {result['target_tokens']} target tokens, nfe_forward "
                    f"{result['nfe_forward']:g}, forward_iterations {result['forward_iterations']:g}"]
    assert 1 <= result["forward_iterations"] <= 5


def test_a_word_vocabularys_perplexity_is_per_word(text, checkpoints, tmp_path, capsys):
    from bertode.training.evaluate import run

    result = run(_config(text, checkpoints["word"]), tmp_path / "out")
    assert result["perplexity_per"] == "word"
    assert math.isclose(result["perplexity"], math.exp(result["loss"]), rel_tol=1e-9)
    assert re.search(rf"perplexity {result['perplexity']:.2f} per word, accuracy [\d.]+ over "
                     rf"{result['target_tokens']} target words", capsys.readouterr().out)


def test_a_plugin_objectives_own_model_class_is_the_one_checked_for_new_parameters(text, checkpoints, tmp_path,
                                                                                    monkeypatch, request):
    """A plugin head with one parameter per solver step: solver.steps=2 makes a model whose parameters the
    checkpoint (steps=1) never trained, refused in one line naming it; the built-in MLM head has no such parameter."""
    from bertode.training.corpus import load_tokenizer
    from bertode.training.objective import OBJECTIVES

    monkeypatch.setattr(OBJECTIVES, "_entries", dict(OBJECTIVES._entries))
    request.addfinalizer(lambda: sys.modules.pop("stepped_head_plugin", None))
    (tmp_path / "stepped_head_plugin.py").write_text(
        "import torch\n"
        "import bertode\n"
        "from bertode.training.objective import MaskedLanguageModel, register_objective\n\n\n"
        "class SteppedHead(bertode.BertODEForMaskedLM):\n"
        "    def __init__(self, config):\n"
        "        super().__init__(config)\n"
        "        self.per_step = torch.nn.Parameter(torch.zeros(config.steps))\n\n\n"
        "@register_objective('stepped_head')\n"
        "class Stepped(MaskedLanguageModel):\n"
        "    model_class = SteppedHead\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import stepped_head_plugin

    folder = _checkpoint(tmp_path / "stepped", load_tokenizer(checkpoints["ode"]), stepped_head_plugin.SteppedHead,
                         solver="euler", steps=1, objective="stepped_head")
    assert _refusal(text, folder, "plugins=[stepped_head_plugin]", "solver.steps=2") == (
        f"solver.steps=2 is invalid for checkpoint={str(folder)!r}: the model it makes has parameters the checkpoint "
        "never trained (per_step, 1 new, 0 dropped); allowed: choices that keep the trained parameters (solver, steps, "
        "tolerances, deq.* iterations)")
