"""Fast in-process tests of the training core for mutation testing (issue 29): checkpoint.py's
atomic write, manifest, verification, pruning, sealing and resume choice; evaluate.py's run
and refusals against losses recomputed here from the logits; loop.py's optimizer steps
against a step written here (loss, accumulation over ``num_items_in_batch``, clipping, the
schedule's lr, the logged record). Tiny models (hidden 16, 1 layer), tiny data, < 1 s each."""

import hashlib
import json
import random
import re

import pytest
import torch

import bertode
from bertode.training import checkpoint
from bertode.training.checkpoint import CheckpointError

TINY = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _model(seed=0, **fields):
    torch.manual_seed(seed)
    return bertode.BertODEForMaskedLM(bertode.BertODEConfig(**{**TINY, **fields}))


def _state(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[2, 5, 7, 3]]), labels=torch.tensor([[-100, 5, -100, -100]])).loss.backward()
    optimizer.step()
    return {"optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state(), "step": 3, "tokens": 96,
            "elapsed": 1.5, "data": None}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- checkpoint.py ----------------------------------------------------------------------------

def test_a_checkpoint_round_trip_keeps_every_tensor_and_counter_and_its_manifest_hashes_every_file(tmp_path):
    model = _model()
    state = _state(model)
    target = checkpoint.save(tmp_path, 3, model, state)
    assert target == tmp_path / "step_00000003" and target.is_dir()
    assert (tmp_path / "latest").read_text() == "step_00000003"
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "manifest.json", "model.safetensors", "state.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003"]  # no staging, no temporary
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest == {"step": 3, "files": {name: {"bytes": (target / name).stat().st_size, "sha256": _sha(target / name)}
                                             for name in ("model.safetensors", "state.pt", "config.json")}}
    assert list(manifest["files"]) == ["model.safetensors", "state.pt", "config.json"]
    assert (target / "manifest.json").read_text() == json.dumps(manifest, indent=1)
    assert checkpoint.saved_config(target) == json.loads(model.config.to_json_string(use_diff=False))
    fresh = _model(seed=1)
    loaded = checkpoint.load(target, fresh)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert (loaded["step"], loaded["tokens"], loaded["elapsed"], loaded["data"]) == (3, 96, 1.5, None)
    for key, value in state["optimizer"]["state"][0].items():
        assert torch.equal(loaded["optimizer"]["state"][0][key], value), key
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert checkpoint.latest(tmp_path) == target and checkpoint.choose(tmp_path) == (target, [])


def test_a_model_without_a_config_is_saved_without_one(tmp_path):
    target = checkpoint.save(tmp_path, 1, torch.nn.Linear(2, 2), {"step": 1})
    assert sorted(json.loads((target / "manifest.json").read_text())["files"]) == ["model.safetensors", "state.pt"]
    assert checkpoint.saved_config(target) is None


def test_the_rng_state_round_trips_torch_and_python():
    state = checkpoint.rng_state()
    assert sorted(state) == ["python", "torch"]  # no CUDA here
    expected = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(5)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    listed = {"torch": state["torch"], "python": [state["python"][0], list(state["python"][1]), state["python"][2]]}
    checkpoint.set_rng_state(listed)  # torch.load(weights_only) gives back lists where Python gave tuples
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_a_file_is_hashed_whole_across_read_blocks(tmp_path):
    data = bytes(range(256)) * (5 * 4096 + 7)  # 5 MiB and a bit: several 1 MiB blocks and a short last one
    (tmp_path / "big").write_bytes(data)
    assert checkpoint._digest(tmp_path / "big") == hashlib.sha256(data).hexdigest()


def test_the_newest_keep_checkpoints_are_kept_and_a_replaced_history_is_removed(tmp_path):
    model = torch.nn.Linear(2, 2)
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, model, {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    checkpoint.save(tmp_path, 3, model, {"step": 30}, keep=2)  # resumed from before step 4: step 4 is replaced
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003"]
    assert torch.load(tmp_path / "step_00000003" / "state.pt")["step"] == 30
    assert (tmp_path / "latest").read_text() == "step_00000003"
    for step in (5, 6, 7):
        checkpoint.save(tmp_path, step, model, {"step": step}, keep=0)  # 0: every one
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [f"step_{s:08d}" for s in (3, 5, 6, 7)]
    checkpoint.save(tmp_path, 8, model, {"step": 8}, keep=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000008"]


def test_a_failed_write_names_the_path_and_cause_and_keeps_the_previous(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    checkpoint.save(tmp_path, 1, model, {"step": 1})

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError) as error:
        checkpoint.save(tmp_path, 2, model, {"step": 2})
    assert str(error.value) == (f"checkpoint {str(tmp_path / 'step_00000002')!r} could not be written: No space left on "
                                "device (OSError); the previous checkpoints are kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]  # the staging is removed
    assert (tmp_path / "latest").read_text() == "step_00000001"
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError("disk I/O failed\nat offset 7")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(CheckpointError, match=r"could not be written: disk I/O failed \(RuntimeError\); the prev"):
        checkpoint.save(tmp_path, 2, model, {"step": 2})
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"'.*file/step_00000001' could not be written: .*\((FileExists|NotADirectory)"):
        checkpoint.save(tmp_path / "file", 1, model, {"step": 1})


def test_a_checkpoint_saved_again_at_its_step_replaces_it(tmp_path):
    model = torch.nn.Linear(2, 2)
    checkpoint.save(tmp_path, 1, model, {"step": 1})
    (tmp_path / "step_00000001" / "stale").write_text("x")
    target = checkpoint.save(tmp_path, 1, model, {"step": 11})
    assert not (target / "stale").exists() and torch.load(target / "state.pt")["step"] == 11
    checkpoint.verify(target)


def _saved(tmp_path, step=1, keep=0):
    return checkpoint.save(tmp_path, step, _model(), {"step": step}, keep=keep)


def test_verify_names_the_missing_or_damaged_file_in_one_line(tmp_path):
    target = _saved(tmp_path)
    checkpoint.verify(target)
    name = repr(str(target))
    size = (target / "state.pt").stat().st_size
    data = bytearray((target / "state.pt").read_bytes())
    data[-3] ^= 1  # same size, another checksum
    (target / "state.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as error:
        checkpoint.verify(target)
    assert str(error.value) == f"checkpoint {name}: state.pt is damaged ({size} bytes, checksum differs from manifest.json)"
    (target / "state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"state.pt is damaged \(0 bytes, checksum differs"):
        checkpoint.verify(target)
    (target / "state.pt").unlink()
    with pytest.raises(CheckpointError) as error:
        checkpoint.verify(target)
    assert str(error.value) == f"checkpoint {name}: state.pt is missing"
    for damaged in ("{not json", '{"files": {"state.pt": {"bytes": 1}}}', '{"step": 1}', '{"files": {"a": 3}}', "[]"):
        (target / "manifest.json").write_text(damaged)
        with pytest.raises(CheckpointError) as error:
            checkpoint.verify(target)
        assert str(error.value) == f"checkpoint {name}: manifest.json is damaged", damaged
    (target / "manifest.json").unlink()
    with pytest.raises(CheckpointError) as error:
        checkpoint.verify(target)
    assert str(error.value) == (f"checkpoint {name}: manifest.json is missing, so its files cannot be verified "
                                "(bertode.train writes one last; a checkpoint of bertode 0.1 has none: vouch for it with "
                                f"bertode.training.checkpoint.seal({name}))")


def test_choose_takes_the_newest_that_verifies_and_says_why_it_passed_over_newer(tmp_path):
    assert checkpoint.choose(tmp_path / "none") == (None, [])
    assert checkpoint.choose(tmp_path) == (None, [])
    first, second, third = (_saved(tmp_path, step) for step in (1, 2, 10))
    (third / "model.safetensors").unlink()
    (second / "manifest.json").unlink()
    (tmp_path / "step_00000011").write_text("a file, not a checkpoint")
    target, skipped = checkpoint.choose(tmp_path)
    assert target == first and checkpoint.latest(tmp_path) == first
    assert skipped == [f"checkpoint {str(third)!r}: model.safetensors is missing",
                       f"checkpoint {str(second)!r}: manifest.json is missing, so its files cannot be verified "
                       f"(bertode.train writes one last; a checkpoint of bertode 0.1 has none: vouch for it with "
                       f"bertode.training.checkpoint.seal({str(second)!r}))"]


def test_seal_vouches_for_a_checkpoint_without_a_manifest_after_checking_its_files(tmp_path):
    target = _saved(tmp_path)
    with pytest.raises(CheckpointError) as error:
        checkpoint.seal(target)
    assert str(error.value) == f"checkpoint {str(target)!r}: it has its manifest.json already"
    (target / "manifest.json").unlink()
    (target / "config.json").unlink()
    checkpoint.seal(str(target))  # a str is taken as a path
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest == {"step": None, "sealed": True, "files": {
        name: {"bytes": (target / name).stat().st_size, "sha256": _sha(target / name)}
        for name in ("model.safetensors", "state.pt")}}
    assert (target / "manifest.json").read_text() == json.dumps(manifest, indent=1)
    checkpoint.verify(target)
    for name, damage, expected in [
            ("state.pt", None, "state.pt is missing"), ("model.safetensors", None, "model.safetensors is missing"),
            ("state.pt", b"garbage", "state.pt is damaged (UnpicklingError)"),
            ("model.safetensors", b"garbage", "model.safetensors is damaged (")]:
        legacy = _saved(tmp_path / name / str(bool(damage)))
        (legacy / "manifest.json").unlink()
        if damage is None:
            (legacy / name).unlink()
        else:
            (legacy / name).write_bytes(damage)
        with pytest.raises(CheckpointError) as error:
            checkpoint.seal(legacy)
        assert str(error.value).startswith(f"checkpoint {str(legacy)!r}: {expected}"), str(error.value)
        assert not (legacy / "manifest.json").exists()


def test_saved_config_is_the_models_config_or_one_line(tmp_path):
    target = _saved(tmp_path)
    assert checkpoint.saved_config(str(target))["hidden_size"] == 16
    (target / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=rf"^checkpoint {re.escape(repr(str(target)))}: config.json is damaged \("):
        checkpoint.saved_config(target)


def test_load_refuses_a_model_it_does_not_fit_and_a_damaged_weights_file(tmp_path):
    target = _saved(tmp_path)
    other = _model(num_hidden_layers=2)
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(target, other)
    message = str(error.value)
    assert message.startswith(f"trainer.resume: checkpoint {str(target)!r} does not fit the model (missing [")
    assert message.count("bert.encoder.layer.1.") == 3 and "unexpected [])" in message
    bigger = _model(intermediate_size=48)
    with pytest.raises(CheckpointError, match=r"model.safetensors does not load \("):
        checkpoint.load(target, bigger)
    (target / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors is damaged"):
        checkpoint.load(target, _model())
    (target / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        checkpoint.load(target, _model())


def test_load_puts_a_legacy_checkpoints_counters_into_the_buffers(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model(mode="deq", deq_pretrain_steps=5)
    target = checkpoint.save(tmp_path, 3, model, {"step": 3, "encoder_counters": {
        "training_forwards": 4, "nonconverged_solves": 2, "skipped_batches": 1}})
    weights = {k: v for k, v in load_file(target / "model.safetensors").items()
               if not k.endswith(("training_forwards", "skipped_batches", "nonconverged_solves"))}
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    (target / "manifest.json").unlink()
    checkpoint.seal(target)
    fresh = _model(mode="deq", deq_pretrain_steps=5)
    assert checkpoint.load(target, fresh)["step"] == 3
    assert fresh.bert.encoder.counters() == {"training_forwards": 4, "skipped_batches": 1, "nonconverged_solves": 2}


def test_remove_staging_deletes_only_what_an_interrupted_save_left(tmp_path):
    assert checkpoint.remove_staging(tmp_path / "none") == []
    target = _saved(tmp_path)
    (tmp_path / ".step_00000002-abc").mkdir()
    (tmp_path / ".step_00000002-abc" / "state.pt").write_text("x")
    (tmp_path / ".step_file").write_text("x")
    assert checkpoint.remove_staging(tmp_path) == [tmp_path / ".step_00000002-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_file", "latest", target.name]


def test_resume_target_never_auto_or_a_directory(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".step_00000001-x").mkdir()
    assert checkpoint.resume_target("never", folder) is None
    assert capsys.readouterr().out == "removed .step_00000001-x, what an interrupted checkpoint write left\n"
    assert checkpoint.resume_target("auto", folder) is None
    assert capsys.readouterr().out == (f"trainer.resume=auto: no checkpoint under {folder}; starting from step 0 "
                                       "(give the interrupted run's hydra.run.dir to resume it)\n")
    assert checkpoint.resume_target("auto", folder, main=False) is None
    assert capsys.readouterr().out == ""
    first, second = _saved(folder, 1), _saved(folder, 2)
    (second / "state.pt").unlink()
    (folder / ".step_00000003-y").mkdir()
    assert checkpoint.resume_target("auto", folder, main=False) == first
    assert capsys.readouterr().out == "" and (folder / ".step_00000003-y").is_dir()
    assert checkpoint.resume_target("auto", folder) == first
    assert capsys.readouterr().out == (
        "removed .step_00000003-y, what an interrupted checkpoint write left\n"
        f"trainer.resume=auto: skipped a newer checkpoint: checkpoint {str(second)!r}: state.pt is missing\n")
    assert checkpoint.resume_target(first, folder) == first
    assert checkpoint.resume_target(str(first), folder) == first
    with pytest.raises(CheckpointError, match="state.pt is missing"):
        checkpoint.resume_target(str(second), folder)
    (first / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError) as error:
        checkpoint.resume_target("auto", folder)
    assert str(error.value) == (
        f"trainer.resume=auto is invalid here: no checkpoint under {str(folder)!r} is usable (2 damaged; the newest: "
        f"checkpoint {str(second)!r}: state.pt is missing); allowed: trainer.resume=never (start over, replacing them) "
        "or a checkpoint directory")


def test_text_is_written_whole_and_atomically(tmp_path):
    checkpoint._write_text(tmp_path / "a.txt", "one")
    checkpoint._write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
