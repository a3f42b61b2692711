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
from conftest import write_tiny_text

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
    assert manifest == {"step": 3, "files": {
        name: {"bytes": (target / name).stat().st_size, "sha256": _sha(target / name)}
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
    assert str(error.value) == (f"checkpoint {str(tmp_path / 'step_00000002')!r} could not be written: No space "
                                "left on device (OSError); the previous checkpoints are kept")
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
    refused = r"'.*file/step_00000001' could not be written: .*\((FileExists|NotADirectory)"
    with pytest.raises(CheckpointError, match=refused):
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
    assert str(error.value) == (f"checkpoint {name}: state.pt is damaged ({size} bytes, checksum differs from "
                                "manifest.json)")
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
    with pytest.raises(CheckpointError, match=rf"^checkpoint {re.escape(repr(str(target)))}: config.json is damaged "
                                              r"\("):
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
    with pytest.raises(CheckpointError, match=rf"^checkpoint {re.escape(repr(str(target)))}: model.safetensors does not "
                                              r"load \("):
        checkpoint.load(target, bigger)
    deeper = checkpoint.save(tmp_path / "deeper", 1, _model(num_hidden_layers=2), {"step": 1})
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(deeper, _model())
    unexpected = str(error.value).split("(missing [], unexpected ")[1]
    assert unexpected.count("'bert.encoder.layer.1.") == 3 and unexpected.endswith("])")  # the first three
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


def test_temporaries_lie_beside_their_targets_named_for_them(tmp_path, monkeypatch):
    """A rename within one directory is atomic, and `remove_staging` finds a staging by its name."""
    renamed = []
    for name in ("replace", "rename"):
        original = getattr(checkpoint.os, name)
        monkeypatch.setattr(checkpoint.os, name,
                            lambda a, b, original=original: (renamed.append((a, b)), original(a, b))[1])
    checkpoint._write_text(tmp_path / "a.txt", "one")
    (source, target), = renamed
    assert source.startswith(str(tmp_path / ".a.txt-")) and target == tmp_path / "a.txt"
    renamed.clear()
    checkpoint.save(tmp_path, 1, torch.nn.Linear(2, 2), {"step": 1})
    staging = [(a, b) for a, b in renamed if b == tmp_path / "step_00000001"]
    assert len(staging) == 1 and staging[0][0].parent == tmp_path and staging[0][0].name.startswith(".step_00000001-")


def test_cleaning_up_is_best_effort(tmp_path, monkeypatch):
    """A directory that cannot be removed (a busy file system) does not fail a save or a clean-up."""
    model = torch.nn.Linear(2, 2)
    for step in (1, 2):
        checkpoint.save(tmp_path, step, model, {"step": step})
    (tmp_path / ".step_00000009-x").mkdir()

    def rmtree(path, ignore_errors=False):
        if not ignore_errors:
            raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    checkpoint.save(tmp_path, 3, model, {"step": 3}, keep=1)  # prunes steps 1 and 2: busy, left
    assert checkpoint.remove_staging(tmp_path) == [tmp_path / ".step_00000009-x"]
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(CheckpointError, match="No space left on device"):  # its staging cannot be removed either
        checkpoint.save(tmp_path, 4, model, {"step": 4})


def test_the_default_keeps_two_checkpoints(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, torch.nn.Linear(2, 2), {"step": step})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]


def test_a_state_that_is_not_plain_tensors_and_values_is_refused(tmp_path):
    from fractions import Fraction

    target = checkpoint.save(tmp_path, 1, torch.nn.Linear(2, 2), {"step": Fraction(1, 3)})  # torch.save pickles it
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(target, torch.nn.Linear(2, 2))
    assert str(error.value) == f"checkpoint {str(target)!r}: state.pt is damaged (UnpicklingError)"


def test_an_unreadable_file_is_named_with_the_cause(tmp_path, monkeypatch):
    target = _saved(tmp_path)

    def unreadable(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint, "_digest", unreadable)
    with pytest.raises(CheckpointError) as error:
        checkpoint.verify(target)
    assert str(error.value) == f"checkpoint {str(target)!r}: model.safetensors cannot be read (Permission denied)"


def test_the_cuda_rng_state_is_saved_and_restored_where_cuda_is(monkeypatch):
    """This process's CUDA generator (faked here: the machine may have no GPU)."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    state = checkpoint.rng_state()
    assert sorted(state) == ["cuda", "python", "torch"]
    assert torch.equal(state["cuda"], torch.tensor([7], dtype=torch.uint8))
    checkpoint.set_rng_state(state)
    assert len(restored) == 1 and restored[0] is state["cuda"]
    checkpoint.set_rng_state({"torch": state["torch"], "python": state["python"]})  # saved on a machine without
    assert len(restored) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    checkpoint.set_rng_state(state)  # saved with CUDA, resumed without
    assert len(restored) == 1

# --- loop.py: short in-process runs on tiny text, against steps written here ------------------------------

WORDS = "the a whale ship sea captain boat man old white deck rope wind sail harpoon".split()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Tiny train and eval text files and a data cache for them (tokenizer: 100 tokens at most)."""
    return write_tiny_text(tmp_path_factory.mktemp("text"), WORDS, lines=60, length=12, spread=7, held_out=10)


def _overrides(text, *extra):
    solve = [] if {"model=bert", "model=deq"} & set(extra) else ["solver=euler", "solver.steps=1"]
    return [*solve, "data=text", f"data.files=[{text / 'train.txt'}]", f"data.eval_files=[{text / 'eval.txt'}]",
            f"data.cache_dir={text / 'cache'}", "data.seq_len=12", "data.vocab_size=100", "data.max_eval_sequences=3",
            "model.hidden_size=16", "model.intermediate_size=32", "model.num_attention_heads=2",
            "model.num_hidden_layers=1", "model.hidden_dropout_prob=0.0",
            "trainer.batch_size=4", "trainer.log_every=2", "trainer.warmup_steps=1", *extra]


def _train(run_dir, text, *extra):
    from bertode.train import compose, train

    cfg = compose(_overrides(text, *extra))
    result = train(cfg, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return cfg, result, records


STEP_RUN = ("trainer.max_steps=3", "trainer.grad_accumulation=2", "trainer.warmup_steps=2", "trainer.lr=0.02",
            "trainer.grad_clip=0.05", "trainer.weight_decay=0.3", "trainer.betas=[0.8,0.9]",
            "trainer.min_lr_ratio=0.25", "model.hidden_dropout_prob=0.2",
            "trainer.checkpoint_every=1", "trainer.keep_checkpoints=0", "trainer.eval_every=2", "seed=3",
            "data.mlm_probability=0.3")


@pytest.fixture(scope="module")
def step_run(tmp_path_factory, text):
    """A 3-step run, a checkpoint at every step, its stdout in ``run_dir / "stdout"``."""
    import contextlib
    import io

    run_dir = tmp_path_factory.mktemp("steps")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        ran = _train(run_dir, text, *STEP_RUN)
    (run_dir / "stdout").write_text(stdout.getvalue())
    return (run_dir, *ran)


def _hand_gradient(model, micro_batches, clip, noise_seeds=None):
    """The step's gradient written out: the cross-entropy summed over every micro-batch's targets
    over the step's target count, clipped to norm ``clip``; and the unclipped norm, loss, accuracy.
    ``noise_seeds``: each micro-batch's dropout stream (`split_invariant`, its rows 0..n-1)."""
    import contextlib

    import torch.nn.functional as F

    from bertode.layers.dropout import split_invariant

    total = sum(int((labels != -100).sum()) for _, labels in micro_batches)
    model.zero_grad(set_to_none=True)
    ce, right = 0.0, 0
    for a, (inputs, labels) in enumerate(micro_batches):
        rows = torch.arange(len(inputs))
        with split_invariant(noise_seeds[a], rows, len(inputs)) if noise_seeds else contextlib.nullcontext():
            logits = model(input_ids=inputs).logits
        flat, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        loss = F.cross_entropy(flat, targets, ignore_index=-100, reduction="sum")
        (loss / total).backward()
        ce += loss.item()
        right += int((flat.argmax(-1) == targets)[targets != -100].sum())
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    scale = min(1.0, clip / (norm + 1e-6))
    return {name: g * scale for name, g in grads.items()}, norm, ce / total, right / total


def test_each_optimizer_step_is_the_clipped_adamw_step_of_the_mean_target_loss_at_the_scheduled_lr(step_run):
    """Two micro-batches per step: the gradient (read back from AdamW's moments in the
    checkpoints) is the hand-written clipped gradient of total CE / total targets; the weights
    are AdamW's step from it with decay on matrices only; the record's fields are these numbers."""
    from safetensors.torch import load_file

    from bertode.training.corpus import prepare
    from bertode.training.depth import depth_setting
    from bertode.training.distributed import BatchOrder
    from bertode.training.objective import make_objective

    run_dir, cfg, result, records = step_run
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    corpus = prepare(cfg.data)
    objective = make_objective("mlm", corpus.tokenizer, 0.3)
    order = BatchOrder(corpus.train, 2, 3)  # micro-batches of 4 / 2 rows, seed 3
    config = bertode.BertODEConfig.from_pretrained(run_dir / "final")
    torch.manual_seed(3)
    model = bertode.BertODEForMaskedLM(config)  # the run's initial weights: seeded before the model is built
    betas, lr, decay = (0.8, 0.9), 0.02, 0.3
    factors = [1 / 2, 2 / 2, 1.0]  # warm-up (s + 1) / 2, then linear decay from 1 (at step 2: progress 0)
    moments = None
    for step in range(3):
        micro = [order.local_batch(2 * step + a, objective.make_batch) for a in range(2)]
        grads, norm, loss, accuracy = _hand_gradient(model, micro, 0.05, [order.noise_seed(2 * step + a) for a in range(2)])
        saved = torch.load(run_dir / "checkpoints" / f"step_{step + 1:08d}" / "state.pt", weights_only=True)
        names = [name for name, _ in model.named_parameters()]
        decayed = [n for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n.lower()]
        groups = saved["optimizer"]["param_groups"]
        assert [(g["lr"], g["weight_decay"], tuple(g["betas"])) for g in groups] == [
            (pytest.approx(lr * factors[step]), decay, betas), (pytest.approx(lr * factors[step]), 0.0, betas)]
        index_of = dict(zip(decayed + [n for n in names if n not in decayed], range(len(names))))
        state = {n: saved["optimizer"]["state"][index_of[n]] for n in names}
        for n in names:  # m_t = b1 m_(t-1) + (1 - b1) g_t: the step's gradient, as AdamW saw it
            before = moments[n] if moments else torch.zeros_like(grads[n])
            seen = (state[n]["exp_avg"] - betas[0] * before) / (1 - betas[0])
            assert torch.allclose(seen, grads[n], rtol=1e-3, atol=1e-6 * 0.05), (step, n)
        record = train_records[step]
        assert record["loss"] == pytest.approx(loss, rel=1e-5) and record["accuracy"] == pytest.approx(accuracy)
        assert record["grad_norm"] == pytest.approx(norm, rel=1e-4) and norm > 0.05  # clipping acts
        assert record["lr"] == pytest.approx(lr * factors[step]) and record["tokens"] == 4 * 12 * (step + 1)
        optimizer = torch.optim.AdamW([{"params": [p for n, p in model.named_parameters() if n in decayed],
                                        "weight_decay": decay},
                                       {"params": [p for n, p in model.named_parameters() if n not in decayed],
                                        "weight_decay": 0.0}], lr=lr * factors[step], betas=betas)
        if moments:
            for n, p in model.named_parameters():
                optimizer.state[p] = {k: v.clone() for k, v in previous[n].items()}
        for n, p in model.named_parameters():  # AdamW from the gradient it saw, to compare the weights exactly
            before = moments[n] if moments else torch.zeros_like(grads[n])
            p.grad = (state[n]["exp_avg"] - betas[0] * before) / (1 - betas[0])
        optimizer.step()
        weights = load_file(run_dir / "checkpoints" / f"step_{step + 1:08d}" / "model.safetensors")
        for n, p in model.named_parameters():
            assert torch.allclose(p.detach(), weights[n], rtol=1e-5, atol=1e-7), (step, n)
            with torch.no_grad():
                p.copy_(weights[n])
        moments = {n: state[n]["exp_avg"] for n in names}
        previous = {n: {k: v.clone() for k, v in state[n].items()} for n in names}
        assert saved["step"] == step + 1 and saved["tokens"] == record["tokens"] and saved["objective"] == "mlm"
        assert saved["elapsed"] == pytest.approx(record["elapsed"]) and saved["data"] is None
        assert saved["memory"] is None and sorted(saved["rng"]) == ["python", "torch"]
        assert sorted(saved) == ["data", "depth", "elapsed", "memory", "objective", "optimizer", "rng", "step", "tokens"]
        assert saved["depth"] == depth_setting(cfg.get("depth")).describe
    _check_the_runs_records_evaluations_files_and_prints(step_run)


def _hand_eval(model, batches):
    """Total cross-entropy over total targets, and accuracy, recomputed from the logits."""
    import torch.nn.functional as F

    total, right, count = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for inputs, labels in batches:
            logits = model(input_ids=inputs).logits.reshape(-1, model.config.vocab_size).double()
            targets = labels.reshape(-1)
            total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            right += int((logits.argmax(-1) == targets)[targets != -100].sum())
            count += int((targets != -100).sum())
    return total / count, right / count, count


def _check_the_runs_records_evaluations_files_and_prints(step_run):
    """(Called by the step test, which builds ``step_run``: mutmut maps a module-scoped fixture's
    work to the first test that uses it, and runs only that test against the loop's mutants.)"""
    from safetensors.torch import load_file

    from bertode.training.corpus import prepare, unigram_cross_entropy
    from bertode.training.lm import fixed_eval_batches
    from bertode.training.objective import make_objective

    run_dir, cfg, result, records = step_run
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("eval", 3)]
    base = {"step", "kind", "loss", "accuracy", "lr", "grad_norm", "tokens", "elapsed", "nfe_forward", "nfe_backward",
            "depth"}
    assert {k for k in records[0] if k not in ("tokens_per_s", "peak_memory_mb")} >= base
    assert "tokens_per_s" in records[0] and "tokens_per_s" in records[1] and "tokens_per_s" not in records[3]
    assert records[1]["peak_memory_mb"] > 1 and records[0]["depth"] is None and records[0]["nfe_forward"] == 2
    assert 0 < records[0]["elapsed"] < records[1]["elapsed"] < records[3]["elapsed"]
    corpus = prepare(cfg.data)
    objective = make_objective("mlm", corpus.tokenizer, 0.3)
    baseline = unigram_cross_entropy(corpus.counts, corpus.eval[:3])
    model = bertode.BertODEForMaskedLM.from_pretrained(run_dir / "final")
    weights = load_file(run_dir / "checkpoints" / "step_00000003" / "model.safetensors")
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    loss, accuracy, count = _hand_eval(model, fixed_eval_batches(corpus.eval, objective, 3, 4, 3))
    final = records[4]
    assert final["loss"] == pytest.approx(loss, rel=1e-5) and final["accuracy"] == pytest.approx(accuracy)
    assert final["target_tokens"] == count and final["unigram_baseline"] == pytest.approx(baseline)
    assert result == {"eval": {k: v for k, v in final.items() if k not in ("step", "kind", "unigram_baseline")},
                      "unigram_baseline": final["unigram_baseline"], "step": 3, "run_dir": str(run_dir)}
    written = (run_dir / "final" / "train_results.json").read_text()
    summary = json.loads(written)
    assert written == json.dumps(summary, indent=2)  # the file is for people to read too
    assert summary["step"] == 3 and summary["tokens"] == 144 and summary["eval"] == result["eval"]
    assert summary["elapsed"] == pytest.approx(records[3]["elapsed"]) and summary["unigram_baseline"] == baseline
    assert summary["solver_stats"]["nfe_forward"] == 2
    assert f"(ode mode, 3 steps, eval MLM loss {final['loss']:.4f};" in (run_dir / "final" / "README.md").read_text()
    assert (run_dir / "final" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [f"step_{s:08d}" for s in (1, 2, 3)]
    lines = (run_dir / "stdout").read_text().splitlines()
    rows = len(corpus.train)
    assert lines[0] == (f"bertode.train: ode model, 0.01 M parameters, 1 process(es) on cpu, {rows} train rows x 12 "
                        f"tokens, run dir {run_dir}")
    assert re.fullmatch(rf"step 1/3 \| loss {records[0]['loss']:.4f} \| lr 1\.00e-02 \| [\d,]+ tok/s \| NFE 2/0 "
                        r"\| ETA \d+\.\d min", lines[1]), lines[1]
    assert lines[2].startswith(f"step 2/3 | loss {records[1]['loss']:.4f} | lr 2.00e-02 |")
    for line, record in zip((lines[3], lines[4]), (records[2], records[4])):
        assert line == (f"eval @ step {record['step']}: MLM loss {record['loss']:.4f}, perplexity "
                        f"{record['perplexity']:.2f} per token, accuracy {record['accuracy']:.3f} (unigram baseline "
                        f"loss {baseline:.4f})")
    assert lines[5:] == [f"final model: {run_dir / 'final'}"]


def test_a_resumed_run_continues_with_the_uninterrupted_losses_and_weights(step_run, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    run_dir, cfg, result, records = step_run
    shutil.copytree(run_dir / "checkpoints" / "step_00000001", tmp_path / "checkpoints" / "step_00000001")
    shutil.copy(run_dir / "metrics.jsonl", tmp_path / "metrics.jsonl")  # the history after step 1 is redone
    _, resumed, again = _train(tmp_path, cfg.data.files and _text_of(cfg), *STEP_RUN, "trainer.resume=auto")
    assert [(r["kind"], r["step"]) for r in again] == [(r["kind"], r["step"]) for r in records]
    assert again[0] == records[0]
    for new, old in zip([r for r in again if r["kind"] == "train"][1:], records[1::2][:1] + [records[3]]):
        assert (new["loss"], new["grad_norm"], new["lr"], new["tokens"]) == (old["loss"], old["grad_norm"], old["lr"],
                                                                             old["tokens"])
    assert resumed["eval"]["loss"] == result["eval"]["loss"]
    ours, theirs = (load_file(d / "final" / "model.safetensors") for d in (tmp_path, run_dir))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    out = capsys.readouterr().out
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000001'} at step 1\n" in out


def _text_of(cfg):
    from pathlib import Path

    return Path(cfg.data.files[0]).parent


def test_a_resume_with_another_objective_or_data_stream_is_one_line(step_run, tmp_path, capsys, monkeypatch):
    import shutil

    from bertode.training.objective import OBJECTIVES, MaskedLanguageModel, register_objective

    monkeypatch.setattr(OBJECTIVES, "_entries", dict(OBJECTIVES._entries))
    register_objective("mlm_twin")(type("Twin", (MaskedLanguageModel,), {}))  # the same attention as mlm's
    run_dir, cfg, _, _ = step_run
    text = _text_of(cfg)
    for case, extra, expected in [
            ("clm", ["objective=mlm_twin"], "objective='mlm_twin' is invalid for resuming {target}: it was trained "
                                            "with objective='mlm'; allowed: the run's own objective"),
            ("stream", ["data.streaming=true"], "data.streaming=True is invalid for resuming {target}: it was trained "
                                                "with data.streaming=False; allowed: the run's own setting"),
            ("vocab", ["data.vocab_size=40"], "data.vocab_size=40 is invalid: the run being resumed ({target}) was "
                                              "trained with 73; allowed: 73 (or a new run directory)")]:
        target = tmp_path / case / "checkpoints" / "step_00000001"
        shutil.copytree(run_dir / "checkpoints" / "step_00000001", target)
        if case == "clm":  # a config saved before configs named their objective: state.pt's is checked at load
            config = json.loads((target / "config.json").read_text())
            del config["objective"]
            (target / "config.json").write_text(json.dumps(config))
            (target / "manifest.json").unlink()
            checkpoint.seal(target)
        with pytest.raises(SystemExit) as exit_info:
            _train(tmp_path / case, text, *STEP_RUN, "trainer.resume=auto", *extra)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip() == "error: " + expected.format(target=target)


def test_max_tokens_and_max_time_stop_the_run(tmp_path, text, capsys):
    threads = torch.get_num_threads()
    try:
        _, result, records = _train(tmp_path / "tokens", text, "trainer.max_steps=10", "trainer.max_tokens=96",
                                    "trainer.eval_every=100", "trainer.checkpoint_every=100", "trainer.num_threads=1",
                                    "trainer.deterministic=true", "trainer.resume=auto")
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2] and result["step"] == 2
    assert f"trainer.resume=auto: no checkpoint under {tmp_path / 'tokens' / 'checkpoints'}; starting from step 0" in \
        capsys.readouterr().out
    _, result, records = _train(tmp_path / "time", text, "trainer.max_steps=10", "trainer.max_time=1e-9",
                                "trainer.eval_every=100", "trainer.checkpoint_every=100")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1] and result["step"] == 1


def test_the_loop_refuses_settings_it_cannot_run_in_one_line(text):
    from bertode.train import compose
    from bertode.training.loop import validate

    for extra, expected in [
            (["depth=uniform", "depth.low=1", "depth.high=2", "trainer.compile=true"],
             "trainer.compile=True is invalid with depth='uniform'"),
            (["model=bert", "trainer.dynamics_every=2"], "trainer.dynamics_every=2 is invalid with mode='discrete' and "
                                                          "untied layers (no flow, no iterated map to read); allowed: 0, "
                                                          "or an ODE, DEQ or weight-tied model"),
            (["objective=clm", "model.position_scheme=transformer_xl", "model.mem_len=4", "data.streaming=true"],
             "data.streaming=true is invalid with model.mem_len=4"),
            (["data.seq_len=20"], "data.seq_len=20 is invalid; allowed: <= model.max_position_embeddings=16")]:
        with pytest.raises(ValueError) as error:
            validate(compose(_overrides(text, "model.max_position_embeddings=16", *extra)))
        assert str(error.value).startswith(expected), (extra, str(error.value))


# --- evaluate.py: in-process evaluations of the step run's final model, and its refusals ------------------

def _evaluate(step_run, *extra):
    from bertode.training.cli import compose
    from bertode.training.evaluate import run

    run_dir, cfg = step_run[:2]
    text = _text_of(cfg)
    evaluation = compose("evaluate", [f"checkpoint={run_dir / 'final'}", "data=text", f"data.files=[{text / 'train.txt'}]",
                                      f"data.eval_files=[{text / 'eval.txt'}]", f"data.cache_dir={text / 'cache'}",
                                      "data.seq_len=12", "data.vocab_size=60", "data.mlm_probability=0.3",
                                      "max_sequences=3", "batch_size=2", "seed=5", *extra])  # the checkpoint's vocabulary
    out = run_dir / "evaluations" / "_".join(extra or ["default"])
    return run(evaluation, out), out


@pytest.mark.parametrize("split", ["eval", "train"])
def test_evaluate_is_the_total_cross_entropy_over_the_total_targets_of_batches_of_unequal_counts(step_run, split,
                                                                                                 capsys):
    from bertode.training.corpus import prepare
    from bertode.training.lm import fixed_eval_batches
    from bertode.training.objective import make_objective

    run_dir, cfg, _, _ = step_run
    result, out = _evaluate(step_run, f"split={split}")
    corpus = prepare(cfg.data)
    objective = make_objective("mlm", corpus.tokenizer, 0.3)
    batches = fixed_eval_batches(corpus.eval if split == "eval" else corpus.train, objective, 5, 2, 3)
    assert len({int((labels != -100).sum()) for _, labels in batches}) > 1  # unequal target counts
    model = bertode.BertODEForMaskedLM.from_pretrained(run_dir / "final")
    loss, accuracy, count = _hand_eval(model, batches)
    assert result["loss"] == pytest.approx(loss, rel=1e-5) and result["accuracy"] == pytest.approx(accuracy)
    assert result["perplexity"] == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-5)
    assert result["target_tokens"] == count and result["sequences"] == 3 and result["nfe_forward"] == 2
    expected = dict(perplexity_per="token", checkpoint=str(run_dir / "final"), split=split, objective="mlm",
                    overrides={}, mode="ode", solver="euler", steps=1, deq_max_iter=None, depth=None,
                    exit="none", exit_threshold=None)
    assert {k: result[k] for k in expected} == expected and 0 < result["seconds"] < 60
    assert (out / "evaluation.json").read_text() == json.dumps(result, indent=2)
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{run_dir / 'final'} [{split}]: MLM loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} per "
        f"token, accuracy {result['accuracy']:.3f} over {count} target tokens, nfe_forward 2")


def test_an_evaluation_with_another_solve_says_so(step_run, capsys):
    result, _ = _evaluate(step_run, "solver.steps=2")
    assert result["overrides"] == {"steps": 2} and result["steps"] == 2 and result["nfe_forward"] == 4
    assert capsys.readouterr().out.splitlines()[-1].endswith(", nfe_forward 4 with {'steps': 2}")
    again, _ = _evaluate(step_run, "solver.steps=2")  # into the same run directory: it is overwritten
    assert again["loss"] == result["loss"]


def test_the_curve_of_a_looped_core_is_the_loss_of_separate_evaluations_at_each_depth(step_run, tmp_path, capsys):
    """A weight-tied discrete core of 3 applications: curve point n equals the evaluation at depth.steps=n."""
    import shutil

    run_dir = step_run[0]
    tied = tmp_path / "final"
    shutil.copytree(run_dir / "final", tied)
    config = json.loads((tied / "config.json").read_text())
    config.update(mode="discrete", weight_tying=True, num_hidden_layers=3, solver=None, steps=None, sensitivity=None)
    (tied / "config.json").write_text(json.dumps(config))
    tied_run = (tmp_path, *step_run[1:])
    capsys.readouterr()
    result, out = _evaluate(tied_run, "curve=true")
    assert [point["depth"] for point in result["curve"]] == [1, 2, 3]
    assert capsys.readouterr().out.splitlines()[-3:] == [
        f"  depth {p['depth']}: loss {p['loss']:.4f}, perplexity {p['perplexity']:.2f}, accuracy {p['accuracy']:.3f}"
        for p in result["curve"]]
    assert (result["mode"], result["steps"], result["deq_max_iter"], result["depth"]) == ("discrete", None, None, None)
    for point in result["curve"]:
        alone, _ = _evaluate(tied_run, f"depth.steps={point['depth']}")
        assert alone["depth"] == point["depth"]
        assert point["loss"] == pytest.approx(alone["loss"], rel=1e-5), point
        assert point["accuracy"] == pytest.approx(alone["accuracy"]) and point["perplexity"] == pytest.approx(
            alone["perplexity"], rel=1e-5)
    assert result["curve"][-1]["loss"] == pytest.approx(result["loss"], rel=1e-5)
    exiting, _ = _evaluate(tied_run, "exit=latent_diff", "exit.threshold=0.5")
    assert (exiting["exit"], exiting["exit_threshold"], exiting["depth"]) == ("latent_diff", 0.5, None)
    assert exiting["exit_depth_mean"] < 3  # tokens exit before the third application


class _Config:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def test_the_depth_curve_repeats_a_converged_solves_last_iterate_and_reduces_as_the_loss():
    """Batch 1 reports iterates 1, 2 (converged) of depth 3; batch 2 reports 2, 3 (none at 1):
    depth n's loss is the summed cross-entropy over every batch's targets."""
    import torch.nn.functional as F

    from bertode.training.evaluate import DepthCurve
    from bertode.training.objective import MaskedLanguageModel

    model = torch.nn.Module()
    model.config = _Config(mode="deq", deq_max_iter=3)
    model.readout = lambda hidden: hidden * 2.0  # the head: logits from the hidden states
    curve = DepthCurve(model, MaskedLanguageModel(None), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    labels = [torch.tensor([[1, -100, 3], [0, 2, -100]]), torch.tensor([[4, 4, -100]])]
    hidden = {(b, n): torch.randn(len(labels[b]), 3, 5, generator=generator) for b in (0, 1) for n in (1, 2, 3)}
    reported = {0: (1, 2), 1: (2, 3)}
    batches = [(torch.zeros_like(y), y) for y in labels]
    feed = curve.batches(batches)
    assert len(feed) == 2
    for b, (inputs, y) in enumerate(feed):
        assert y is labels[b] and torch.equal(curve.labels, y)
        for n in reported[b]:
            curve.on_iterate(n, hidden[(b, n)])
    def scored(b, n):
        logits, y = (hidden[(b, n)] * 2.0).reshape(-1, 5), labels[b].reshape(-1)
        return F.cross_entropy(logits, y, ignore_index=-100, reduction="sum").item(), int(
            (logits.argmax(-1) == y)[y != -100].sum())
    used = {1: [(0, 1)], 2: [(0, 2), (1, 2)], 3: [(0, 2), (1, 3)]}  # batch 2 has nothing at depth 1
    expected = []
    for n, parts in used.items():
        loss = sum(scored(b, m)[0] for b, m in parts) / 6
        expected.append({"depth": n, "loss": pytest.approx(loss, rel=1e-6),
                         "perplexity": pytest.approx(float(torch.tensor(loss).exp()), rel=1e-6),
                         "accuracy": pytest.approx(sum(scored(b, m)[1] for b, m in parts) / 6)})
    assert curve.result() == expected
    with pytest.raises(RuntimeError) as error:
        curve.close(labels[0])
    assert str(error.value) == ("curve=true: the model's encoder reported no iterates (it does not call "
                                "current_dial().on_iterate); allowed: curve=false")


def test_the_depth_curve_goes_to_the_dialled_depth_and_caps_the_perplexity():
    from bertode.solve.dial import dialed
    from bertode.training.evaluate import DepthCurve
    from bertode.training.objective import MaskedLanguageModel

    model = torch.nn.Module()
    model.config = _Config(mode="discrete", num_hidden_layers=5, prelude_layers=1, coda_layers=1)
    model.readout = lambda hidden: hidden
    curve = DepthCurve(model, MaskedLanguageModel(None), torch.device("cpu"))
    y = torch.tensor([[0, -100]])  # one target
    logits = torch.tensor([[[-100.0, 100.0], [100.0, -100.0]]])  # wrong by 200 nats
    for _ in curve.batches([(y, y)]):
        with dialed(depth=4):
            curve.on_iterate(1, logits)
    assert curve.result() == [{"depth": n, "loss": 200.0, "perplexity": pytest.approx(float(torch.tensor(50.0).exp())),
                               "accuracy": 0.0} for n in (1, 2, 3, 4)]
    empty = DepthCurve(model, MaskedLanguageModel(None), torch.device("cpu"))
    assert empty.result() == []


def test_the_configured_depth_is_a_deqs_iterations_or_the_cores_applications():
    from bertode.training.evaluate import configured_depth

    assert configured_depth(_Config(mode="deq", deq_max_iter="7")) == 7
    assert configured_depth(_Config(mode="discrete", num_hidden_layers=6, prelude_layers=2, coda_layers=1)) == 3
    assert configured_depth(_Config(mode="discrete", num_hidden_layers=6, prelude_layers=None, coda_layers=None)) == 6
    assert configured_depth(_Config(mode="ode", num_hidden_layers=4)) == 4


def _cfg(**fields):
    from omegaconf import OmegaConf

    return OmegaConf.create(fields)


def test_curve_needs_an_iterated_depth_in_one_line(tmp_path):
    from bertode.training.evaluate import check_curve

    for fields in ({"mode": "deq"}, {"mode": "ode", "weight_tying": True}, {"mode": "discrete", "weight_tying": True}):
        check_curve(_cfg(curve=True), tmp_path, fields)
    for curve in (False, None):
        check_curve(_cfg(curve=False), tmp_path, {"mode": "ode"})
    check_curve(_cfg(), tmp_path, {})
    for value in ("yes", 1):
        with pytest.raises(ValueError) as error:
            check_curve(_cfg(curve=value), tmp_path, {"mode": "deq"})
        assert str(error.value) == f"curve={value!r} is invalid; allowed: true, false"
    where = repr(str(tmp_path))
    for fields in ({}, {"mode": "ode"}):
        with pytest.raises(ValueError) as error:
            check_curve(_cfg(curve=True), tmp_path, fields)
        assert str(error.value) == (f"curve=true is invalid for checkpoint={where}: the model's mode='ode' with untied "
                                    "layers has no iterated depth to score per iterate; allowed: curve=false, and sweep "
                                    "the solve instead with -m solver.steps=1,2,4,8")
    with pytest.raises(ValueError) as error:
        check_curve(_cfg(curve=True), tmp_path, {"mode": "discrete"})
    assert str(error.value) == (f"curve=true is invalid for checkpoint={where}: the model's mode='discrete' with untied "
                                "layers has a fixed depth; allowed: curve=false (a curve needs mode='deq' or "
                                "weight_tying=true)")


def test_the_rows_must_fit_the_checkpoints_positions():
    from bertode.training.evaluate import check_positions

    check_positions(512, {})
    check_positions(30, {"max_position_embeddings": 32, "position_scheme": "after_padding", "pad_token_id": 1})
    with pytest.raises(ValueError) as error:
        check_positions(513, {})
    assert str(error.value) == ("data.seq_len=513 is invalid: the checkpoint's model has 512 positions; allowed: "
                                "<= 512")
    with pytest.raises(ValueError) as error:
        check_positions(31, {"max_position_embeddings": 32, "position_scheme": "after_padding", "pad_token_id": 1},
                        key="seq_len")
    assert str(error.value) == "seq_len=31 is invalid: the checkpoint's model has 30 positions; allowed: <= 30"
    with pytest.raises(ValueError, match="has 31 positions"):
        check_positions(32, {"max_position_embeddings": 32, "position_scheme": "after_padding", "pad_token_id": None})
    check_positions(32, {"max_position_embeddings": 32, "position_scheme": "absolute", "pad_token_id": 1})


def test_the_objective_is_the_checkpoints_or_one_with_its_attention(tmp_path, monkeypatch):
    from bertode.training.evaluate import checkpoint_objective
    from bertode.training.objective import OBJECTIVES, MaskedLanguageModel, register_objective

    monkeypatch.setattr(OBJECTIVES, "_entries", dict(OBJECTIVES._entries))
    register_objective("mlm_twin")(type("Twin", (MaskedLanguageModel,), {}))
    assert checkpoint_objective(_cfg(objective=None), tmp_path, {"objective": "mlm"}) == "mlm"
    assert checkpoint_objective(_cfg(), tmp_path, {"is_decoder": True}) == "clm"
    assert checkpoint_objective(_cfg(objective="mlm_twin"), tmp_path, {"objective": "mlm"}) == "mlm_twin"
    with pytest.raises(ValueError) as error:
        checkpoint_objective(_cfg(objective="clm"), tmp_path, {"objective": "mlm"})
    assert str(error.value) == (f"objective='clm' is invalid for checkpoint={str(tmp_path)!r}: it was trained with "
                                "objective='mlm' and causal attention would ask another model; allowed: objective=mlm "
                                "or null (train a causal one with bertode.train objective=clm)")
    with pytest.raises(ValueError, match="'mlm' is invalid for checkpoint=.*objective='clm' and bidirectional attention"
                                         r".*\(train a bidirectional one with bertode.train objective=mlm\)"):
        checkpoint_objective(_cfg(objective="mlm"), tmp_path, {"objective": "clm"})


def test_a_checkpoint_folder_is_read_or_refused_in_one_line(step_run, tmp_path):
    import shutil

    from omegaconf import OmegaConf

    from bertode.training.evaluate import check_weights, read_checkpoint

    final = step_run[0] / "final"
    folder, saved = read_checkpoint(_cfg(checkpoint=str(final)))
    assert folder == final and saved == json.loads((final / "config.json").read_text())
    with pytest.raises(ValueError) as error:
        read_checkpoint(OmegaConf.create({"checkpoint": "???"}))
    assert str(error.value) == "checkpoint is missing; allowed: checkpoint=DIR, a directory written by save_pretrained"
    copy = tmp_path / "copy"
    shutil.copytree(final, copy)
    where = repr(str(copy))
    for text, expected in [
            ("{not json", f"checkpoint={where} is invalid: its config.json is not JSON ("),
            (b"\xff\xfe", f"checkpoint={where} is invalid: its config.json is not JSON ("),
            ('{"model_type": "bert"}', f"checkpoint={where} is invalid: its model_type is 'bert'; allowed: a bertode "
                                       "model's directory ('bertode'; convert others with bertode.from_bert)"),
            ("[1]", f"checkpoint={where} is invalid: its model_type is None; allowed: a bertode")]:
        (copy / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ValueError) as error:
            read_checkpoint(_cfg(checkpoint=str(copy)))
        assert str(error.value).startswith(expected), str(error.value)
        assert str(error.value).count("\n") == 0
    (copy / "config.json").unlink()
    with pytest.raises(ValueError) as error:
        read_checkpoint(_cfg(checkpoint=str(copy)))
    assert str(error.value) == (f"checkpoint={where} is invalid; allowed: a directory written by save_pretrained "
                                "(e.g. a run's final/)")
    shutil.copy(final / "config.json", copy / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (copy / name).unlink(missing_ok=True)
    with pytest.raises(ValueError) as error:
        read_checkpoint(_cfg(checkpoint=str(copy)))
    assert str(error.value) == (f"checkpoint={where} is invalid: it holds no tokenizer; allowed: a directory with the "
                                "model and its tokenizer (a bertode.train run's final/)")
    (copy / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ValueError) as error:
        check_weights(copy)
    message = str(error.value)
    assert message.startswith(f"checkpoint={where} is invalid: its model.safetensors is damaged (") and message.endswith(
        "); allowed: a directory written by save_pretrained") and "\n" not in message
    (copy / "model.safetensors").unlink()
    with pytest.raises(ValueError) as error:
        check_weights(copy)
    assert str(error.value) == (f"checkpoint={where} is invalid: it holds no weights (model.safetensors); allowed: a "
                                "directory written by save_pretrained")
    (copy / "pytorch_model.bin").write_bytes(b"x")
    check_weights(copy)  # another weights file: read at load


def test_evaluate_refuses_a_split_it_cannot_read_in_one_line(step_run):
    from bertode.training.cli import compose
    from bertode.training.evaluate import validate

    final = step_run[0] / "final"
    for extra, expected in [(["split=test"], "split='test' is invalid; allowed: 'eval', 'train'"),
                            (["batch_size=0"], "batch_size=0 is invalid; allowed: an integer >= 1"),
                            (["split=train", "data.streaming=true"], "split='train' is invalid with data.streaming=true "
                             "(a stream has no fixed train rows); allowed: split=eval, or data.streaming=false")]:
        with pytest.raises(ValueError) as error:
            validate(compose("evaluate", [f"checkpoint={final}", *extra]))
        assert str(error.value) == expected
    folder, saved, name, fields = validate(compose("evaluate", [f"checkpoint={final}", "solver.steps=3"]))
    assert (folder, name, fields) == (final, "mlm", {"steps": 3}) and saved["hidden_size"] == 16



def test_the_optimizer_decays_matrices_but_not_vectors_or_norms():
    from omegaconf import OmegaConf

    from bertode.training.loop import _numeric_stats, _optimizer

    model = torch.nn.Module()
    model.dense = torch.nn.Linear(3, 4)
    model.NormScale = torch.nn.Linear(3, 4, bias=False)  # a matrix, but a norm's: no decay
    model.frozen = torch.nn.Linear(2, 2)
    model.frozen.requires_grad_(False)
    trainer = OmegaConf.create({"weight_decay": 0.3, "lr": 0.02, "betas": [0.8, 0.9]})
    optimizer = _optimizer(model, trainer, torch.device("cpu"))
    (decay, no_decay) = optimizer.param_groups
    assert decay["params"] == [model.dense.weight] and decay["weight_decay"] == 0.3
    assert no_decay["params"] == [model.dense.bias, model.NormScale.weight] and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.8, 0.9) and decay["lr"] == 0.02
    assert optimizer.defaults["fused"] is False  # the fused kernel on CUDA only (the CPU's is slower here)
    assert _optimizer(model, trainer, torch.device("cuda")).defaults["fused"] is True
    assert _numeric_stats({"a": 1, "b": 2.5, "c": True, "d": "x", "e": None}) == {"a": 1, "b": 2.5}


def test_a_run_keeps_the_lock_it_was_given_and_lets_go_of_its_own(tmp_path, text, monkeypatch, capsys):
    from bertode.training import lock

    quick = ("trainer.max_steps=1", "trainer.eval_every=100", "trainer.checkpoint_every=100")
    capsys.readouterr()
    lock.hold(tmp_path / "given")  # as `cli.hydra_entry` does before Hydra runs the task
    try:
        _train(tmp_path / "given", text, *quick)
        assert lock.holds(tmp_path / "given")
    finally:
        lock.release_all()
    _train(tmp_path / "own", text, *quick)
    assert not lock.holds(tmp_path / "own")

    def live(run_dir):
        raise ValueError(f"hydra.run.dir={str(run_dir)!r} is invalid: another run is live in it")

    monkeypatch.setattr(lock, "hold", live)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        _train(tmp_path / "live", text, *quick)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: hydra.run.dir={str(tmp_path / 'live')!r} is invalid: another "
                                               "run is live in it")


def test_a_run_checks_its_config_before_reading_data(tmp_path, text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _train(tmp_path / "bad", text, "model=bert", "trainer.dynamics_every=2")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: trainer.dynamics_every=2 is invalid with mode='discrete'")


def test_each_step_runs_at_the_depth_drawn_for_it(tmp_path, text, capsys):
    """The depth drawn for each step is logged, printed, and run: step 1's loss is the first
    model's at that depth (written out here), not at its own depth of 3."""
    import torch.nn.functional as F

    from bertode.training.corpus import prepare
    from bertode.training.depth import depth_setting
    from bertode.training.distributed import BatchOrder
    from bertode.training.objective import make_objective

    cfg, _, records = _train(tmp_path, text, "model=bert", "model.weight_tying=true", "model.num_hidden_layers=3",
                             "depth=uniform", "depth.low=1", "depth.high=3", "trainer.max_steps=4",
                             "trainer.eval_every=100", "trainer.checkpoint_every=100", "seed=6")
    drawn = depth_setting(cfg.depth)
    depths = [r["depth"] for r in records if r["kind"] == "train"]
    assert depths == [drawn.draw(6, step) for step in (1, 2, 3, 4)] and len(set(depths)) > 1
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.rsplit(" | ", 1)[1] for line in printed] == [f"depth {depths[s - 1]}" for s in (1, 2, 4)]
    corpus = prepare(cfg.data)
    objective = make_objective("mlm", corpus.tokenizer, cfg.data.mlm_probability)
    inputs, labels = BatchOrder(corpus.train, 4, 6).local_batch(0, objective.make_batch)
    torch.manual_seed(6)
    model = bertode.BertODEForMaskedLM(bertode.BertODEConfig.from_pretrained(tmp_path / "final"))
    losses = {}
    with torch.no_grad():
        for depth in {depths[0], 3}:
            with drawn.dial(depth):
                logits = model(input_ids=inputs).logits
            losses[depth] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            ignore_index=-100).item()
    assert depths[0] != 3 and records[0]["loss"] == pytest.approx(losses[depths[0]], rel=1e-6)
    assert abs(losses[3] - losses[depths[0]]) > 2e-5  # 8e-5 at these first weights


@pytest.mark.parametrize("case", ["clm_saved_before_configs_named_it", "stream", "memory"])
def test_a_resumed_clm_or_stream_continues_where_it_stopped(tmp_path, text, case, capsys):
    """A causal LM whose checkpoint's config names no objective (state.pt's says clm), and a
    streamed run (state.pt holds the stream's position): step 2 resumed is step 2 uninterrupted."""
    import shutil

    extra = {"stream": ["data.streaming=true"], "memory": ["objective=clm", "model.position_scheme=transformer_xl",
                                                           "model.mem_len=8"]}.get(case, ["objective=clm"]) + [
        "trainer.max_steps=2", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=0", "trainer.eval_every=100"]
    _, _, records = _train(tmp_path / "whole", text, *extra)
    rows = re.search(r"1 process\(es\) on cpu, (\w+) train rows x 12 tokens, run dir", capsys.readouterr().out)[1]
    assert rows == "streamed" if case == "stream" else rows.isdigit()  # a stream's rows are not counted ahead
    target = tmp_path / "resumed" / "checkpoints" / "step_00000001"
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step_00000001", target)
    if case.startswith("clm"):
        config = json.loads((target / "config.json").read_text())
        del config["objective"]
        (target / "config.json").write_text(json.dumps(config))
        (target / "manifest.json").unlink()
        checkpoint.seal(target)
    else:  # the stream's position, or the segment memory carried into step 2
        assert torch.load(target / "state.pt", weights_only=True)["data" if case == "stream" else "memory"] is not None
    _, _, again = _train(tmp_path / "resumed", text, *extra, "trainer.resume=auto")
    assert [(r["step"], r["loss"]) for r in again if r["kind"] == "train"] == [
        (r["step"], r["loss"]) for r in records if r["kind"] == "train"][1:]



def test_evaluate_refuses_a_tokenizer_without_cls_or_sep_in_one_line(step_run, monkeypatch, capsys):
    from bertode.training import evaluate

    load = evaluate.load_tokenizer

    def without_cls(folder):
        tokenizer = load(folder)
        tokenizer.cls_token = None
        return tokenizer

    monkeypatch.setattr(evaluate, "load_tokenizer", without_cls)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        _evaluate(step_run, "split=eval")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: checkpoint={str(step_run[0] / 'final')!r} is invalid for bertode.evaluate: its tokenizer has no "
        "[CLS]/[SEP] tokens, which every packed row starts and ends with; allowed: a checkpoint with a BERT-style "
        "tokenizer (a bertode.train run's final/)")


def test_evaluate_scores_a_causal_lm_by_its_next_tokens(tmp_path, text):
    """A CLM checkpoint is evaluated as one: each position's logits against the next token."""
    import torch.nn.functional as F

    from bertode.training.corpus import prepare
    from bertode.training.lm import fixed_eval_batches
    from bertode.training.objective import make_objective

    cfg, _, _ = _train(tmp_path, text, "objective=clm", "trainer.max_steps=1", "trainer.eval_every=100")
    result, _ = _evaluate((tmp_path, cfg), "split=eval")
    corpus = prepare(cfg.data)
    model = bertode.BertODEForCausalLM.from_pretrained(tmp_path / "final").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, labels in fixed_eval_batches(corpus.eval, make_objective("clm", corpus.tokenizer), 5, 2, 3):
            logits = model(input_ids=inputs).logits[:, :-1].double()
            targets = labels[:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum",
                                     ignore_index=-100).item()
            count += int((targets != -100).sum())
    assert result["objective"] == "clm" and result["target_tokens"] == count
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)



def test_the_trainers_graph_scope_and_backend_options_are_handed_on_and_its_logger_chosen(tmp_path, text,
                                                                                          monkeypatch):
    """trainer.compile's scope and options reach `compile_model` (faked; the name avoids "compile", which the
    mutation script deselects: real torch.compile recompiles mutmut's trampolines)."""
    from bertode.training import loop

    calls = []

    def compiled(model, scope, **options):  # torch.compile itself is compile.py's to test
        calls.append((scope, options))
        return model

    monkeypatch.setattr(loop, "compile_model", compiled)
    quick = ("trainer.max_steps=1", "trainer.eval_every=100", "trainer.checkpoint_every=100",
             "trainer.compile_backend=inductor", "trainer.compile_mode=max-autotune")
    for setting, scope in (("true", "auto"), ("model", "model")):
        _train(tmp_path / setting, text, *quick, f"trainer.compile={setting}")
        assert calls.pop() == (scope, {"backend": "inductor", "mode": "max-autotune"})
    _train(tmp_path / "false", text, *quick, "trainer.compile=false", "logger=tensorboard")
    assert calls == [] and any((tmp_path / "false" / "tensorboard").iterdir())  # the logger chosen


def test_a_model_the_trained_vocabulary_cannot_hold_is_refused_and_its_cache_entry_dropped(tmp_path, text, capsys):
    """The vocabulary trained on this text has 73 tokens, under data.vocab_size=100: cutoffs at 90 pass the
    config's check and are refused once the tokenizer is known, leaving no cache entry behind."""
    from bertode.train import compose, train

    overrides = [o for o in _overrides(text) if not o.startswith("data.cache_dir=")]
    cfg = compose([*overrides, f"data.cache_dir={tmp_path / 'cache'}", "model.lm_head_type=adaptive",
                   "model.adaptive_cutoffs=[40,90]", "trainer.max_steps=1"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train(cfg, tmp_path / "run")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith(
        "error: model.adaptive_cutoffs=[40, 90] is invalid with data.vocab_size=73; allowed: a list of increasing")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_peak_memory_is_the_processes_resident_peak_in_mib_or_cudas_allocated_peak(monkeypatch):
    import resource

    from bertode.training import loop

    for _ in range(5):  # the peak (KiB on Linux) rarely moves between the readings; when it did, read again
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        measured = loop._peak_memory_mb(torch.device("cpu"))
        if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss == before:
            break
    assert measured == before / 1024
    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: asked.append(device) or 3 * 2**20 + 2**19)
    assert loop._peak_memory_mb(torch.device("cuda", 1)) == 3.5 and asked == [torch.device("cuda", 1)]


def test_validate_refuses_each_setting_in_its_own_line(text, tmp_path, monkeypatch):
    """Every refusal of `loop.validate`, word for word; the settings next to each refusal pass."""
    from bertode.train import compose
    from bertode.training.loop import validate

    def check(*extra, world=1):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        overrides = _overrides(text, "model.max_position_embeddings=16", *extra)
        adaptive = "solver=dopri5" in extra  # no steps to set
        return validate(compose([o for o in overrides if not (adaptive and o.startswith(("solver=euler", "solver.st")))]))

    for extra, world, expected in [
            (["depth=uniform", "depth.low=1", "depth.high=2", "trainer.compile=true"], 1,
             "trainer.compile=True is invalid with depth='uniform': each drawn depth compiles a graph of its own, and "
             "torch.compile falls back to eager after 8; allowed: trainer.compile=false, or depth=fixed"),
            (["objective=clm", "model.position_scheme=transformer_xl", "model.mem_len=4", "data.streaming=true"], 1,
             "data.streaming=true is invalid with model.mem_len=4 (a segment memory reads each batch row's text in "
             "order, from packed rows); allowed: data.streaming=false"),
            (["data.streaming=true", "data.stream_shards=3"], 2,
             "data.stream_shards=3 is invalid with 2 processes; allowed: a multiple of the process count (each rank "
             "packs its own shards)"),
            ([], 3, "trainer.batch_size=4 is invalid; allowed: a multiple of grad_accumulation x processes = 3"),
            (["trainer.eval_mem_len=8"], 1,
             "trainer.eval_mem_len=8 is invalid with model.mem_len=0; allowed: null, or an integer >= 0 for a model "
             "trained with a segment memory (model.mem_len > 0)"),
            (["trainer.compile=bogus"], 1,
             "trainer.compile='bogus' is invalid; allowed: true, false, 'auto', 'model', 'fields'"),
            (["model=bert", "trainer.compile=fields"], 1,
             "trainer.compile='fields' is invalid for a discrete model (no ODE sites or DEQ map); allowed: 'model' or "
             "'auto'"),
            (["solver=dopri5", "depth=uniform", "depth.low=1", "depth.high=2"], 1,
             "depth='uniform' is invalid with solver='dopri5': an adaptive solver chooses its own steps"),
            (["data.seq_len=17"], 1, "data.seq_len=17 is invalid; allowed: <= model.max_position_embeddings=16")]:
        with pytest.raises(ValueError) as error:
            check(*extra, world=world)
        assert str(error.value).startswith(expected), (extra, str(error.value))
    # what sits next to each refusal passes: 2 shards over 2 processes, a discrete model without the probe,
    # a row as long as the positions, the scopes that apply
    check("data.streaming=true", "data.stream_shards=2", world=2)
    check("model=bert", "trainer.dynamics_every=0")
    check("data.seq_len=16")
    check("trainer.compile=model")
    assert check("solver=rk4", "depth=uniform", "depth.low=1", "depth.high=2").solver == "rk4"


def test_validate_reads_the_sources_unless_told_and_setup_leaves_them_to_prepare(text, tmp_path, monkeypatch):
    from bertode.train import compose
    from bertode.training import loop
    from bertode.training.distributed import Distributed
    from bertode.training.sources import DataError

    (tmp_path / "empty.txt").write_text("\n\n")
    cfg = compose(_overrides(text, f"data.files=[{tmp_path / 'empty.txt'}]"))
    with pytest.raises(DataError, match=r"^data.files: \[.*empty.txt'\] contain no text$"):
        loop.validate(cfg)
    assert loop.validate(cfg, read_sources=False).hidden_size == 16
    read = []
    monkeypatch.setattr(loop, "check_sources", lambda data: read.append(data))
    corpus, config, resume_from = loop.setup(compose(_overrides(text)), tmp_path / "run", Distributed("cpu"))
    assert read == [] and resume_from is None  # prepare() reads (and checks) the text once
    assert (config.vocab_size, config.pad_token_id) == (len(corpus.tokenizer), corpus.tokenizer.pad_token_id)


def test_a_plugin_is_imported_and_the_objectives_own_head_checked_before_any_data(text, tmp_path, monkeypatch,
                                                                                   request):
    """``plugins=`` is imported by validate, and the head of the objective it registers is built on
    the meta device: its own refusal stops the run before any data is read."""
    import sys

    from bertode.train import compose
    from bertode.training import loop
    from bertode.training.objective import OBJECTIVES

    monkeypatch.setattr(OBJECTIVES, "_entries", dict(OBJECTIVES._entries))
    request.addfinalizer(lambda: sys.modules.pop("refusing_head_plugin", None))
    (tmp_path / "refusing_head_plugin.py").write_text(
        "import bertode\n"
        "from bertode.training.objective import MaskedLanguageModel, register_objective\n\n\n"
        "class RefusingHead(bertode.BertODEForMaskedLM):\n"
        "    def __init__(self, config):\n"
        "        super().__init__(config)\n"
        "        if next(self.parameters()).device.type == 'meta':\n"
        "            raise ValueError(f'refusing_head: hidden_size={config.hidden_size} is refused on the meta device')\n\n\n"
        "@register_objective('refusing_head')\n"
        "class Refusing(MaskedLanguageModel):\n"
        "    model_class = RefusingHead\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    read = []
    monkeypatch.setattr(loop, "check_sources", lambda data: read.append(data))
    cfg = compose(_overrides(text, "objective=refusing_head"))  # compose imports plugins= itself: named after it
    cfg.plugins = ["refusing_head_plugin"]
    with pytest.raises(ValueError, match=r"^refusing_head: hidden_size=16 is refused on the meta device$"):
        loop.validate(cfg)
    assert read == []


class _Clock:
    """loop.py's clock in the tests below: each reading a quarter second after the last, from 100."""

    def __init__(self):
        self.now = 99.75

    def perf_counter(self):
        self.now += 0.25
        return self.now


def _fake_wandb(monkeypatch):
    """A stand-in for the ``wandb`` package (not installed here): what the run hands it."""
    import importlib.machinery
    import sys
    import types

    calls = []
    run = types.SimpleNamespace(log=lambda scalars, step: calls.append(("log", step, scalars)),
                                finish=lambda: calls.append(("finish",)))
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = lambda **kwargs: calls.append(("init", kwargs)) or run
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_a_clocked_run_logs_its_elapsed_time_throughput_probe_and_evaluations(tmp_path, text, monkeypatch, capsys):
    """On a clock that reads 100, 100.25, 100.5, ... the loop's times are known: started at the first
    reading, throughput over the log window's readings, elapsed carried across a resume; the
    dynamics probe is the Lyapunov exponent of the model after its step, on that step's first row;
    wandb receives the project and the resolved config; the last step's evaluation is not repeated."""
    import shutil

    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from bertode.analysis import dynamics_probe
    from bertode.training import loop
    from bertode.training.corpus import prepare
    from bertode.training.distributed import BatchOrder
    from bertode.training.lm import fixed_eval_batches
    from bertode.training.objective import make_objective
    from bertode.training.schedule import lr_factor

    calls = _fake_wandb(monkeypatch)
    monkeypatch.setattr(loop, "time", _Clock())
    run = ("trainer.max_steps=3", "trainer.log_every=3", "trainer.eval_every=3", "trainer.checkpoint_every=1",
           "trainer.keep_checkpoints=0", "trainer.grad_clip=0", "trainer.dynamics_every=2", "seed=4",
           "logger=wandb", "logger.project=run-${seed}", "data.max_eval_sequences=5")
    cfg, result, records = _train(tmp_path / "whole", text, *run)
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    train = records[:3]
    assert [r["elapsed"] for r in train] == [0.5, 1.0, 1.25]
    assert train[0]["tokens_per_s"] == 48 / 0.5 and train[2]["tokens_per_s"] == 96 / 0.75  # readings 100.75-101.5
    assert "tokens_per_s" not in train[1] and train[0]["peak_memory_mb"] > 1
    stats = ["accepted_steps", "nfe_backward", "nfe_forward", "rejected_steps", "solves"]  # the solves' summary
    assert sorted(train[0]) == sorted(["accuracy", "depth", "elapsed", "grad_norm", "kind", "loss", "lr",
                                       "peak_memory_mb", "step", "tokens", "tokens_per_s", *stats])
    assert sorted(train[1]) == sorted(["accuracy", "depth", "dynamics_lyapunov_max", "elapsed", "grad_norm", "kind",
                                       "loss", "lr", "step", "tokens", *stats])
    corpus = prepare(cfg.data)
    objective = make_objective("mlm", corpus.tokenizer, cfg.data.mlm_probability)
    inputs = BatchOrder(corpus.train, 4, 4).local_batch(1, objective.make_batch)[0]  # step 2's micro-batch
    model = bertode.BertODEForMaskedLM.from_pretrained(tmp_path / "whole" / "final")
    weights = load_file(tmp_path / "whole" / "checkpoints" / "step_00000002" / "model.safetensors")
    model.load_state_dict(weights, strict=False)
    assert train[1]["dynamics_lyapunov_max"] == pytest.approx(dynamics_probe(model, inputs[:1])["lyapunov_max"],
                                                              rel=1e-6)
    assert calls[0] == ("init", {"project": "run-4", "dir": str(tmp_path / "whole"),
                                 "config": OmegaConf.to_container(cfg, resolve=True)})
    assert calls[0][1]["config"]["logger"]["project"] == "run-4"
    fixed = fixed_eval_batches(corpus.eval, objective, 4, 4, 5)  # all 5 rows (in order, 4 a batch: 4 of them)
    assert records[3]["target_tokens"] == sum(int((labels != -100).sum()) for _, labels in fixed)
    assert [c[1] for c in calls[1:-1]] == [1, 2, 3, 3] and calls[-1] == ("finish",)
    assert calls[1][2]["train/loss"] == train[0]["loss"] and calls[4][2]["eval/loss"] == records[3]["loss"]
    # resumed after step 1 on a fresh clock: started = 100 - 0.5 (its saved elapsed), so step 2 ends at 1.0
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step_00000001",
                    tmp_path / "resumed" / "checkpoints" / "step_00000001")
    monkeypatch.setattr(loop, "time", _Clock())
    _, _, again = _train(tmp_path / "resumed", text, *run[1:], "trainer.max_steps=2", "trainer.resume=auto")
    assert [(r["step"], r["elapsed"]) for r in again if r["kind"] == "train"] == [(2, 1.0)]
    assert again[0]["loss"] == train[1]["loss"] and again[0]["grad_norm"] == train[1]["grad_norm"]
    # by time: the schedule reads the elapsed seconds, and the run stops once max_time is reached
    monkeypatch.setattr(loop, "time", _Clock())
    cfg, result, timed = _train(tmp_path / "timed", text, "trainer.max_steps=10", "trainer.max_time=1",
                                "trainer.eval_every=100", "trainer.checkpoint_every=100", "trainer.warmup_steps=0")
    assert [(r["step"], r["elapsed"]) for r in timed if r["kind"] == "train"] == [(1, 0.5), (2, 1.0)]
    assert [r["lr"] for r in timed if r["kind"] == "train"] == pytest.approx(
        [cfg.trainer.lr * lr_factor(0, 0.0, cfg.trainer), cfg.trainer.lr * lr_factor(1, 0.5, cfg.trainer)])
    assert lr_factor(1, 0.5, cfg.trainer) == pytest.approx(0.5 + 0.5 * cfg.trainer.min_lr_ratio)  # half-way


def test_a_one_target_step_of_a_discrete_model_in_bf16_is_that_targets_cross_entropy(tmp_path, text, monkeypatch):
    """Eight tokens and one row a step, seed 1: its step masks one target. The record's loss, accuracy
    and gradient norm are that target's, recomputed here under the same bf16 autocast (a divisor of
    2 for one target would halve them); the discrete model's statistics count no solve; the
    evaluation is bf16's too (fp32's differs)."""
    import torch.nn.functional as F

    from bertode.training.corpus import prepare
    from bertode.training.distributed import BatchOrder
    from bertode.training.lm import fixed_eval_batches
    from bertode.training.objective import make_objective

    from bertode.training import loop

    calls = _fake_wandb(monkeypatch)
    masked_ce_sum = loop.masked_ce_sum  # the step's count of right predictions is one more than the model's
    monkeypatch.setattr(loop, "masked_ce_sum", lambda *scored: (lambda ce, right: (ce, right + 1))(*masked_ce_sum(*scored)))
    cfg, result, records = _train(tmp_path, text, "model=bert", "data.seq_len=8", "data.mlm_probability=0.15",
                                  "trainer.batch_size=1", "trainer.max_steps=1", "trainer.precision=bf16",
                                  "trainer.checkpoint_every=100", "trainer.grad_clip=1e6", "seed=1", "logger=wandb",
                                  "~logger.project")
    assert calls[0][1]["project"] == "bertode"  # a logger config without a project: wandb's is bertode
    corpus = prepare(cfg.data)
    objective = make_objective("mlm", corpus.tokenizer, 0.15)
    inputs, labels = BatchOrder(corpus.train, 1, 1).local_batch(0, objective.make_batch)
    assert int((labels != -100).sum()) == 1
    config = bertode.BertODEConfig.from_pretrained(tmp_path / "final")
    torch.manual_seed(1)
    model = bertode.BertODEForMaskedLM(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=inputs).logits.float()
    at = labels != -100
    loss = F.cross_entropy(logits[at], labels[at])
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()
    step = records[0]
    assert step["loss"] == pytest.approx(loss.item(), rel=1e-6) and step["grad_norm"] == pytest.approx(norm, rel=1e-3)
    assert step["accuracy"] == float(logits[at].argmax(-1) == labels[at]) + 1  # over its one target
    assert (step["nfe_forward"], step["nfe_backward"]) == (0, 0)  # a discrete model's statistics: no solve
    trained = bertode.BertODEForMaskedLM.from_pretrained(tmp_path / "final").eval()
    batches = fixed_eval_batches(corpus.eval, objective, 1, 1, cfg.data.max_eval_sequences)
    with torch.no_grad():
        sums = {}
        for precision in ("bf16", "fp32"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                sums[precision] = sum(F.cross_entropy(trained(input_ids=rows).logits.float().reshape(-1, config.vocab_size),
                                                      targets.reshape(-1), ignore_index=-100, reduction="sum").item()
                                      for rows, targets in batches)
    count = sum(int((targets != -100).sum()) for _, targets in batches)
    assert result["eval"]["loss"] == pytest.approx(sums["bf16"] / count, rel=1e-6)
    assert abs(sums["fp32"] / count - result["eval"]["loss"]) > 1e-4


def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_its_reason_and_status_1(tmp_path, text, monkeypatch,
                                                                                         capsys):
    from bertode.training import loop

    def full(folder, step, model, state, keep):
        raise CheckpointError(f"cannot write {folder / f'step_{step:08d}'}: No space left on device")

    monkeypatch.setattr(loop.checkpoint, "save", full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        _train(tmp_path, text, "trainer.max_steps=3", "trainer.checkpoint_every=2", "trainer.eval_every=100")
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert err == f"error: cannot write {tmp_path / 'checkpoints' / 'step_00000002'}: No space left on device\n"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and not (tmp_path / "final").exists()


def test_a_memory_run_carries_each_rows_memory_into_its_next_step_and_evaluates_at_eval_mem_len(tmp_path, text):
    """A causal Transformer-XL run with a segment memory: step 2's loss is the step-1 model's on
    micro-batch 1 read after the memory saved at step 1 (written out here: the shifted
    cross-entropy over its targets); its evaluation reads the eval text in order
    (`ordered_eval_batches`) with ``trainer.eval_mem_len`` positions of memory, which differs from
    the model's own length; the model card says causal."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from bertode.training.corpus import prepare
    from bertode.training.lm import evaluate
    from bertode.training.objective import make_objective
    from bertode.training.segments import SegmentOrder, memory_length, ordered_eval_batches

    cfg, result, records = _train(tmp_path, text, "objective=clm", "model.position_scheme=transformer_xl",
                                  "model.mem_len=8", "trainer.eval_mem_len=4", "trainer.max_steps=2", "+model.initializer_range=0.5",
                                  "trainer.checkpoint_every=1", "trainer.keep_checkpoints=0", "trainer.eval_every=100",
                                  "data.max_eval_sequences=8", "seed=6")
    corpus = prepare(cfg.data)
    objective = make_objective("clm", corpus.tokenizer, cfg.data.mlm_probability)
    order = SegmentOrder(corpus.train, 4, 6)
    assert not order.starts_over(1)  # step 2 continues step 1's rows
    inputs, labels = order.local_batch(1, objective.make_batch)
    model = bertode.BertODEForCausalLM.from_pretrained(tmp_path / "final")
    model.load_state_dict(load_file(tmp_path / "checkpoints" / "step_00000001" / "model.safetensors"), strict=False)
    memory = torch.load(tmp_path / "checkpoints" / "step_00000001" / "state.pt", weights_only=True)["memory"]
    with torch.no_grad():
        logits = model(input_ids=inputs, mems=tuple(memory["mems"])).logits
        alone = model(input_ids=inputs).logits
    targets = labels[:, 1:].reshape(-1)
    count = int((targets != -100).sum())

    def loss(scores):
        return F.cross_entropy(scores[:, :-1].reshape(-1, scores.shape[-1]), targets, ignore_index=-100,
                               reduction="sum").item() / count

    assert records[1]["loss"] == pytest.approx(loss(logits), rel=1e-6, abs=0)
    assert abs(loss(alone) - loss(logits)) > 2e-5  # the memory changes it (by 5e-5 at these first weights)
    final = bertode.BertODEForCausalLM.from_pretrained(tmp_path / "final")
    batches = ordered_eval_batches(corpus.eval, objective, 6, 4, 8)
    evaluations = {}
    for length in (4, 8):
        with memory_length(final, length):
            evaluations[length] = evaluate(final, batches, objective, torch.device("cpu"))["loss"]
    assert result["eval"]["loss"] == pytest.approx(evaluations[4], rel=1e-6)
    assert abs(evaluations[8] - evaluations[4]) > 1e-4 and final.config.mem_len == 8
    assert "A bertode causal language model" in (tmp_path / "final" / "README.md").read_text()


def test_each_micro_batchs_penalty_enters_with_its_share_of_the_steps_rows(tmp_path, text, capsys, monkeypatch):
    """regularizer=rnode at weight 100, two micro-batches of 2 rows a step: the step's gradient is
    that of each part's cross-entropy over the step's targets plus half (its 2 of 4 rows) of its
    penalty, under its own noise stream, written out here; a whole penalty per part differs. (A word
    vocabulary: its perplexity is printed per word. The record's loss and accuracy sum both parts' cross-entropy
    and correct predictions, here one more each than the model's, which gets none right yet.)"""
    from bertode.layers.dropout import split_invariant
    from bertode.training.corpus import prepare
    from bertode.training.distributed import BatchOrder
    from bertode.training.objective import make_objective

    from bertode.training import loop

    scored_parts = []

    def one_more_right(logits, labels):
        ce, right = masked_ce_sum(logits, labels)
        scored_parts.append((ce.item(), int(right) + 1))
        return ce, right + 1

    masked_ce_sum = loop.masked_ce_sum
    monkeypatch.setattr(loop, "masked_ce_sum", one_more_right)
    cfg, _, records = _train(tmp_path, text, "regularizer=rnode", "regularizer.weight=100.0", "trainer.max_steps=1",
                             "trainer.grad_accumulation=2", "trainer.grad_clip=1e6", "trainer.eval_every=100",
                             "trainer.checkpoint_every=100", "seed=8", "data.vocabulary=word")
    printed = capsys.readouterr().out
    assert re.search(r"^eval @ step 1: MLM loss [\d.]+, perplexity [\d.]+ per word, accuracy", printed, re.M)
    corpus = prepare(cfg.data)
    objective = make_objective("mlm", corpus.tokenizer, cfg.data.mlm_probability)
    order = BatchOrder(corpus.train, 2, 8)
    parts = [order.local_batch(a, objective.make_batch) for a in range(2)]
    total = sum(int((labels != -100).sum()) for _, labels in parts)
    config = bertode.BertODEConfig.from_pretrained(tmp_path / "final")

    def gradient_norm(share):
        torch.manual_seed(8)
        model = bertode.BertODEForMaskedLM(config)
        for a, (inputs, labels) in enumerate(parts):
            with split_invariant(order.noise_seed(a), torch.arange(2), 2):
                model(input_ids=inputs, labels=labels, num_items_in_batch=torch.tensor(float(total)),
                      penalty_share=share).loss.backward()
        return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()

    assert len(scored_parts) == 2  # the two parts (evaluate scores its own)
    assert records[0]["loss"] == pytest.approx(sum(ce for ce, _ in scored_parts[:2]) / total, rel=1e-6)
    assert records[0]["accuracy"] == sum(right for _, right in scored_parts[:2]) / total
    assert records[0]["grad_norm"] == pytest.approx(gradient_norm(0.5), rel=1e-5)
    assert abs(gradient_norm(1.0) - gradient_norm(0.5)) > 1e-4 * gradient_norm(0.5)  # 7.6e-4 here


def test_the_models_padding_id_is_the_given_tokenizers(tmp_path, text):
    """A saved tokenizer (``data.tokenizer``) whose [PAD] is not token 0: the model trained on it
    pads with its id."""
    from transformers import BertTokenizerFast

    words = ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "[PAD]", *sorted(set(WORDS))]
    BertTokenizerFast(vocab={word: i for i, word in enumerate(words)}).save_pretrained(tmp_path / "tokenizer")
    _train(tmp_path / "run", text, f"data.tokenizer={tmp_path / 'tokenizer'}", "trainer.max_steps=1",
           "trainer.eval_every=100", "trainer.checkpoint_every=100")
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert (config["pad_token_id"], config["vocab_size"]) == (4, len(words))


def test_a_step_with_a_skipped_deq_batch_is_skipped_whole(tmp_path, text, monkeypatch):
    """deq.on_nonfinite=skip, two micro-batches a step, the first one's solve poisoned: step 1
    leaves the weights at their initial values and AdamW without state (its other micro-batch's
    gradient is dropped too); step 2 steps."""
    from safetensors.torch import load_file

    from bertode.layers.deq import BertDEQEncoder

    forward, calls = BertDEQEncoder.forward, []

    def poisoned_first(self, embeddings, *args, **kwargs):
        calls.append(self.training)
        if len(calls) == 1:
            embeddings = torch.full_like(embeddings, float("nan"))
        return forward(self, embeddings, *args, **kwargs)

    monkeypatch.setattr(BertDEQEncoder, "forward", poisoned_first)
    cfg, _, records = _train(tmp_path, text, "model=deq", "deq.on_nonfinite=skip", "trainer.grad_accumulation=2",
                             "trainer.max_steps=2", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=0",
                             "trainer.eval_every=100", "trainer.weight_decay=0.1", "seed=9")
    assert calls[:4] == [True] * 4
    torch.manual_seed(9)
    initial = bertode.BertODEForMaskedLM(bertode.BertODEConfig.from_pretrained(tmp_path / "final")).state_dict()
    steps = [tmp_path / "checkpoints" / f"step_{s:08d}" for s in (1, 2)]
    first, second = (load_file(folder / "model.safetensors") for folder in steps)
    parameters = [name for name, _ in bertode.BertODEForMaskedLM(bertode.BertODEConfig.from_pretrained(
        tmp_path / "final")).named_parameters()]
    assert all(torch.equal(first[name], initial[name]) for name in parameters)
    assert torch.load(steps[0] / "state.pt", weights_only=True)["optimizer"]["state"] == {}
    assert not all(torch.equal(second[name], initial[name]) for name in parameters)
    assert records[0]["grad_norm"] == 0.0 and records[1]["grad_norm"] > 0
