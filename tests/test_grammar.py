"""One grammar (issue 23): ``solver=rk4 solver.steps=2`` sets the same model fields in
train, evaluate, finetune and generate (null: the base's value, the checkpoint's for a saved
model); old spellings are refused naming the new one; ``--help`` lists each command's own
groups; a user objective registered in a plugin trains and is evaluated as itself."""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bertode
from bertode.training.cli import compose, command_groups
from bertode.training.run_config import build_model_config

SOLVE = ["solver=rk4", "solver.steps=2"]
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def _checkpoint(folder, causal=False, **fields):
    """A saved tiny model with a WordPiece tokenizer (what a run's final/ holds)."""
    from bertode.training.corpus import SPECIAL_TOKENS
    from bertode.training.wordpiece import train_tokenizer

    tokenizer = train_tokenizer(["the whale and the sea", "a ship on the sea"] * 20, 60, SPECIAL_TOKENS)
    config = bertode.BertODEConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, is_decoder=causal,
                                   objective="clm" if causal else "mlm", **TINY, **fields)
    head = bertode.BertODEForCausalLM if causal else bertode.BertODEForMaskedLM
    head(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _solve(config) -> dict:
    return {key: getattr(config, key) for key in ("mode", "solver", "steps", "t_end", "atol", "vector_field",
                                                   "sensitivity", "block")}


def test_solver_overrides_set_the_same_fields_in_train_evaluate_finetune_and_generate(tmp_path):
    from bertode.generate import validate as generate_validate
    from bertode.training import solve_overrides
    from bertode.training.evaluate import validate as evaluate_validate
    from bertode.training.finetune import _model_and_tokenizer, validate as finetune_validate

    trained = build_model_config(compose("train", SOLVE), vocab_size=60)
    masked, causal = _checkpoint(tmp_path / "mlm"), _checkpoint(tmp_path / "clm", causal=True)

    folder, saved, _, fields = evaluate_validate(compose("evaluate", [f"checkpoint={masked}", *SOLVE]))
    evaluated = solve_overrides.load(bertode.BertODEForMaskedLM, folder, fields).config
    folder, saved, fields = generate_validate(compose("generate", [f"checkpoint={causal}", *SOLVE]))
    generating = solve_overrides.load(bertode.BertODEForCausalLM, folder, fields).config
    cfg = compose("finetune", [f"checkpoint={masked}", *SOLVE])
    finetuned = _model_and_tokenizer(cfg, finetune_validate(cfg))[0].config
    cfg = compose("finetune", ["scratch.vocab_size=200", *SOLVE])
    scratch = _model_and_tokenizer(cfg, finetune_validate(cfg))[0].config

    expected = {**_solve(bertode.BertODEConfig(**TINY)), "solver": "rk4", "steps": 2}
    for config in (trained, evaluated, generating, finetuned, scratch):
        assert _solve(config) == expected
    assert _solve(bertode.BertODEConfig(**TINY))["solver"] == "euler"  # the overrides changed something


def test_a_null_value_keeps_the_checkpoints_own(tmp_path):
    """``solver=rk4`` alone on a model trained with 4 steps and t_end 2 keeps both."""
    from bertode.training.evaluate import validate

    folder = _checkpoint(tmp_path / "m", steps=4, t_end=2.0)
    _, saved, _, fields = validate(compose("evaluate", [f"checkpoint={folder}", "solver=rk4"]))
    assert fields == {"solver": "rk4"}
    _, _, _, fields = validate(compose("evaluate", [f"checkpoint={folder}", "deq.max_iter=null"]))
    assert fields == {}


@pytest.mark.parametrize("command,argument,new", [
    ("evaluate", "solver.name=rk4", "solver=rk4"),
    ("generate", "solver.name=rk4", "solver=rk4"),
    ("train", "solver.name=rk4", "solver=rk4"),
    ("finetune", "solve.solver=rk4", "solver=rk4"),
    ("finetune", "solve.steps=2", "solver.steps=2"),
    ("finetune", "solve.mode=deq", "model=deq"),
    ("train", "sensitivity.name=adjoint", "sensitivity=adjoint"),
])
def test_old_spellings_are_refused_naming_the_new_one(tmp_path, monkeypatch, capsys, command, argument, new):
    import importlib

    main = importlib.import_module(f"bertode.{command}").main
    monkeypatch.chdir(tmp_path)
    checkpoint = ["checkpoint=x"] if command in ("evaluate", "generate") else []
    monkeypatch.setattr(sys, "argv", [f"bertode.{command}", *checkpoint, argument])
    with pytest.raises(SystemExit) as exit_info:
        main()
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.count("\n") == 0, error
    assert error.startswith(f"error: {argument} is invalid") and f"allowed: {new}" in error
    assert list(tmp_path.iterdir()) == []


def test_a_group_the_command_does_not_take_is_refused_naming_its_groups(tmp_path, monkeypatch, capsys):
    from bertode.evaluate import main

    monkeypatch.setattr(sys, "argv", ["bertode.evaluate", f"checkpoint={tmp_path}", "model=deq"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.count("\n") == 0
    assert "model=deq is invalid for bertode.evaluate" in error and "solver, sensitivity, vector_field, block, deq" in error


@pytest.mark.parametrize("command", ["train", "evaluate", "finetune", "generate", "prepare"])
def test_help_lists_exactly_the_commands_own_groups(monkeypatch, capsys, command):
    import importlib

    main = importlib.import_module(f"bertode.{command}").main
    monkeypatch.setattr(sys, "argv", [f"bertode.{command}", "--help"])
    main()
    text = capsys.readouterr().out
    listed = [line.split(":")[0].strip() for line in text.split("config groups")[1].split("keys (")[0].splitlines()[1:]
              if line.strip()]
    assert listed == command_groups(command)
    solving = {"solver", "sensitivity", "vector_field", "block", "deq"}
    assert solving <= set(listed) if command != "prepare" else not solving & set(listed)
    assert ("size" in listed) == (command == "train")


ROOT = Path(__file__).resolve().parents[1]
_DOC = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")
_SECTION = _DOC[_DOC.index("## An objective"):]
PLUGIN = _SECTION[_SECTION.index("```python") + len("```python"):_SECTION.index("```", _SECTION.index("```python") + 9)]


def test_a_plugin_objective_trains_from_the_cli_and_is_evaluated_as_itself(tmp_path, cache_dir, monkeypatch, capsys):
    from test_train import small

    (tmp_path / "span_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    from bertode.train import main as train_main

    monkeypatch.setattr(sys, "argv", ["bertode.train", f"hydra.run.dir={tmp_path / 'run'}",
                                      *small(cache_dir, "plugins=[span_plugin]", "objective=span3")])
    train_main()  # the command line, in this process
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["objective"] == "span3"
    from bertode.evaluate import run as evaluate

    base = [f"checkpoint={final}", f"data.cache_dir={cache_dir}", "data.seq_len=16", "data.vocab_size=500",
            "max_sequences=4", "plugins=[span_plugin]"]
    own = evaluate(compose("evaluate", base), tmp_path / "e1")
    assert own["objective"] == "span3" and own["target_tokens"] == 3 * own["sequences"]
    # Its loss is the cross-entropy of the span positions: recomputed here from the model's logits.
    model = bertode.BertODEForMaskedLM.from_pretrained(final).eval()
    from bertode.training.corpus import load_tokenizer, prepare

    cfg = compose("evaluate", base)
    rows = prepare(cfg.data, tokenizer=load_tokenizer(final)).eval[:4]
    inputs = rows.clone()
    inputs[:, 2:5] = load_tokenizer(final).mask_token_id
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    expected = torch.nn.functional.cross_entropy(logits[:, 2:5].reshape(-1, logits.shape[-1]), rows[:, 2:5].reshape(-1))
    assert abs(own["loss"] - expected.item()) <= 1e-5
    # Another objective with the same attention may be asked for; it scores other targets.
    masked = evaluate(compose("evaluate", [*base, "objective=mlm"]), tmp_path / "e2")
    assert masked["objective"] == "mlm" and masked["target_tokens"] != own["target_tokens"]
    trained = json.loads((final / "train_results.json").read_text())["eval"]  # train's last eval: the same batches
    assert trained["loss"] == pytest.approx(own["loss"], abs=1e-5) and trained["target_tokens"] == own["target_tokens"]


def test_one_training_run_validates_and_builds_its_model_config_once(tmp_path, cache_dir, monkeypatch, capsys):
    """`python -m bertode.train` checks its config before Hydra starts, Hydra composes its own
    copy for the run: the checks and the model config are not done again (issue 23)."""
    from bertode.training import loop, run_config
    from test_train import small

    calls = {"build": 0, "check_run": 0}
    build, check_run = run_config.build_model_config, loop.check_run

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(run_config, "build_model_config", counted("build", build))
    monkeypatch.setattr(loop, "check_run", counted("check_run", check_run))
    monkeypatch.setattr(sys, "argv", ["bertode.train", f"hydra.run.dir={tmp_path / 'run'}",
                                      *small(cache_dir, "trainer.max_steps=1")])
    loop.main()
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert calls == {"build": 1, "check_run": 1}
    # A second run in the same process (a notebook's) checks and builds again.
    monkeypatch.setattr(sys, "argv", ["bertode.train", f"hydra.run.dir={tmp_path / 'run2'}",
                                      *small(cache_dir, "trainer.max_steps=1")])
    loop.main()
    assert calls == {"build": 2, "check_run": 2}
    # bertode.evaluate reads and checks its checkpoint once too (Hydra's copy reuses the check).
    from bertode.training import evaluate

    reads = []
    read_checkpoint = evaluate.read_checkpoint
    monkeypatch.setattr(evaluate, "read_checkpoint", lambda cfg: reads.append(1) or read_checkpoint(cfg))
    monkeypatch.setattr(sys, "argv", ["bertode.evaluate", f"checkpoint={tmp_path / 'run' / 'final'}",
                                      f"hydra.run.dir={tmp_path / 'e'}", f"data.cache_dir={cache_dir}",
                                      "data.seq_len=16", "data.vocab_size=500", "max_sequences=4", "solver=rk4"])
    evaluate.main()
    assert len(reads) == 1
    assert json.loads((tmp_path / "e" / "evaluation.json").read_text())["solver"] == "rk4"
