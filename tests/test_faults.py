"""No lost run: damaged checkpoints are named and passed over (never a silent restart from
step 0 over intact ones), a resumed run's metrics.jsonl holds one record per step, a
second run into a live run directory is refused, and a failed checkpoint write (a full
disk) ends the run in one line with the previous checkpoint intact."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bertode.training import checkpoint

COMMON = ["data.seq_len=16", "data.vocab_size=300", "data.max_eval_sequences=4", "trainer.batch_size=4",
          "trainer.warmup_steps=1", "trainer.log_every=1", "trainer.eval_every=1000", "model.hidden_size=32",
          "model.intermediate_size=64", "model.num_attention_heads=2", "model.hidden_dropout_prob=0.1",
          "trainer.checkpoint_every=2", "trainer.keep_checkpoints=3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("faults-cache")


def _train(run_dir: Path, cache: Path, *overrides):
    from bertode.train import compose, train

    train(compose([f"data.cache_dir={cache}", *COMMON, *overrides]), run_dir)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _main(run_dir: Path, cache: Path, monkeypatch, capsys, *overrides):
    """``python -m bertode.train`` in this process: (exit status, stderr)."""
    from bertode.train import main

    monkeypatch.setattr(sys, "argv", ["bertode.train", f"hydra.run.dir={run_dir}", f"data.cache_dir={cache}",
                                      *COMMON, *overrides])
    try:
        main()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err.strip()


def _losses(records):
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    """An uninterrupted 8-step run, and the same run stopped after 6 steps by a token budget
    (the schedule follows max_steps, so its steps are the first six of the other), to damage."""
    root = tmp_path_factory.mktemp("faults")
    reference = _losses(_train(root / "reference", cache, "trainer.max_steps=8"))
    _train(root / "six", cache, "trainer.max_steps=8", f"trainer.max_tokens={6 * 4 * 16}")
    return root, reference


def _copy(runs, name):
    root, _ = runs
    shutil.copytree(root / "six", root / name)
    return root / name


def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_resumes_exactly(runs, cache, capsys):
    _, reference = runs
    run = _copy(runs, "truncated")
    weights = run / "checkpoints" / "step_00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    records = _train(run, cache, "trainer.max_steps=8", "trainer.resume=auto")
    out = capsys.readouterr().out
    assert "skipped a newer checkpoint" in out and "step_00000006" in out and "model.safetensors is damaged" in out
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, 9))  # one history: steps 5 and 6 were redone, not repeated
    losses = _losses(records)
    assert all(abs(losses[s] - reference[s]) <= 1e-6 for s in range(1, 9)), (losses, reference)


def test_skipped_checkpoints_are_said_in_one_line_each(runs, cache, capsys):
    run = _copy(runs, "deleted_state")
    (run / "checkpoints" / "step_00000006" / "state.pt").unlink()
    (run / "checkpoints" / "latest").write_text("step_00000099")  # dangling: ignored
    _train(run, cache, "trainer.max_steps=7", "trainer.resume=auto")
    out = capsys.readouterr().out
    assert "skipped a newer checkpoint: checkpoint" in out and "step_00000006" in out and "state.pt is missing" in out
    assert "resumed from" in out and "step_00000004" in out


def test_a_deleted_newest_checkpoint_resumes_from_the_one_before_exactly(runs, cache, capsys):
    _, reference = runs
    run = _copy(runs, "deleted_newest")
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # `latest` now dangles
    records = _train(run, cache, "trainer.max_steps=8", "trainer.resume=auto")
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    losses = _losses(records)
    assert all(abs(losses[s] - reference[s]) <= 1e-6 for s in range(1, 9)), (losses, reference)


def test_no_usable_checkpoint_refuses_to_start_over_and_touches_nothing(runs, cache, monkeypatch, capsys):
    run = _copy(runs, "garbage")
    for folder in (run / "checkpoints").glob("step_*"):
        (folder / "state.pt").write_bytes(b"garbage")
    before = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    code, error = _main(run, cache, monkeypatch, capsys, "trainer.max_steps=8", "trainer.resume=auto")
    assert code == 2 and error.count("\n") == 0 and error.startswith("error: trainer.resume=auto is invalid here")
    assert "state.pt is damaged" in error and "trainer.resume=never" in error
    assert {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()} == before


def test_an_explicit_damaged_checkpoint_is_named(runs, cache, monkeypatch, capsys):
    run = _copy(runs, "explicit")
    target = run / "checkpoints" / "step_00000004"
    (target / "state.pt").write_bytes(b"\x00" * 10)
    code, error = _main(run, cache, monkeypatch, capsys, f"trainer.resume={target}")
    assert code == 2 and error.count("\n") == 0 and "step_00000004" in error and "state.pt is damaged" in error


def test_staging_leftovers_are_removed(runs, cache, capsys):
    run = _copy(runs, "staging")
    leftover = run / "checkpoints" / ".step_00000008-abc"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    _train(run, cache, "trainer.max_steps=7", "trainer.resume=auto")
    assert not leftover.exists() and "removed .step_00000008-abc" in capsys.readouterr().out


def test_a_second_run_into_a_live_run_directory_is_refused(tmp_path, cache, monkeypatch, capsys):
    run = tmp_path / "live"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from bertode.training import lock; lock.hold(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(120)", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, error = _main(run, cache, monkeypatch, capsys, "trainer.max_steps=2")
        assert code == 2 and error.count("\n") == 0 and f"another run (PID {holder.pid})" in error
        assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed: its lock went with it): the directory is free again
    code, error = _main(run, cache, monkeypatch, capsys, "trainer.max_steps=2")
    assert code == 0, error
    # and a finished run lets go of it, though this process lives on (a notebook, say)
    other = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from bertode.training import lock; "
                            "lock.hold(Path(sys.argv[1])); print('held')", str(run)], capture_output=True, text=True)
    assert other.returncode == 0 and other.stdout.strip() == "held", other.stderr[-500:]


def test_a_full_disk_while_checkpointing_ends_in_one_line_and_keeps_the_previous(runs, tmp_path, cache, monkeypatch, capsys):
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "step" in obj and obj["step"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    run = tmp_path / "full"
    code, error = _main(run, cache, monkeypatch, capsys, "trainer.max_steps=8")
    assert code == 1 and error.count("\n") == 0, error
    assert "step_00000004" in error and "No space left on device" in error and "previous checkpoints are kept" in error
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["latest", "step_00000002"]  # no staging left, the previous one intact
    checkpoint.verify(run / "checkpoints" / "step_00000002")
    monkeypatch.setattr(checkpoint.torch, "save", real_save)  # space again: resume reproduces the uninterrupted run
    records = _train(run, cache, "trainer.max_steps=8", "trainer.resume=auto")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    losses, reference = _losses(records), runs[1]
    assert all(abs(losses[s] - reference[s]) <= 1e-6 for s in range(1, 9)), (losses, reference)


KILLER = '''# A test plugin: SIGKILL this process right after metrics.jsonl receives the train
# record of step BERTODE_TEST_KILL_AT (before the checkpoint of that step, if any).
import os, signal
from bertode.training import run_log

_write = run_log.RunLog.write


def write(self, record):
    _write(self, record)
    if record.get("kind") == "train" and record["step"] == int(os.environ.get("BERTODE_TEST_KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)


run_log.RunLog.write = write
'''


def test_three_kills_and_resumes_leave_one_record_per_step_and_the_uninterrupted_losses(runs, tmp_path, cache):
    (tmp_path / "bertode_test_killer.py").write_text(KILLER)
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "bertode.train", f"hydra.run.dir={run}", f"data.cache_dir={cache}", *COMMON,
               "trainer.max_steps=8", "trainer.resume=auto"]
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               BERTODE_PLUGINS="bertode_test_killer")
    for kill_at in (3, 5, 7):  # each after a checkpoint (every 2 steps): a step is redone each time
        killed = subprocess.run(command, env=dict(env, BERTODE_TEST_KILL_AT=str(kill_at)), capture_output=True,
                                text=True, timeout=300)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resumed from" in finished.stdout and "step_00000006" in finished.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    losses, reference = _losses(records), runs[1]
    assert all(abs(losses[s] - reference[s]) <= 1e-6 for s in range(1, 9)), (losses, reference)
