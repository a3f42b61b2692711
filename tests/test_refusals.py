"""Refused runs leave nothing behind (issue 23, "Silent nonsense and tracebacks", items 2-6):
each bad input below is one line on stderr, exit status 2, and the run directory and the
data cache are exactly as they were (absent where they were); no run leaves its ``.lock``.

- Resuming with a model setting other than the checkpoint's (``solver=rk4`` on an Euler
  run, ``solver.steps``, a dropout, the objective, the mode) is refused naming the key,
  before Hydra rewrites the run's ``.hydra/``; a setting that changes nothing the model
  computes (``initializer_range``) resumes.
- A checkpoint without its manifest (flipped bytes, manifest deleted) is never resumed.
- A second run refused by the run directory's lock leaves the live run's ``.hydra/`` alone.
- Data errors found only after Hydra started (a text too short for one row, a stream
  shard without a row) leave no ``.hydra/``, ``cli.log``, ``.lock`` or cache entry.
- Tracebacks that became one line: evaluate with damaged weights or ``data.seq_len``
  beyond the model's positions, prepare into a ``data.cache_dir`` that is a file, train
  with ``model.max_position_embeddings=1e11``.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bertode.training import checkpoint
from conftest import file_tree, refused_line, run_command

pytestmark = pytest.mark.usefixtures("restore_logging")  # in-process Hydra runs move the root logger

COMMON = ["data.seq_len=16", "data.vocab_size=300", "data.max_eval_sequences=4", "trainer.batch_size=4",
          "trainer.warmup_steps=1", "trainer.log_every=1", "trainer.eval_every=1000", "model.hidden_size=32",
          "model.intermediate_size=64", "model.num_attention_heads=2", "model.hidden_dropout_prob=0.1",
          "trainer.checkpoint_every=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A 2-step run through the command line (so it has ``.hydra/``), checkpointed at step 2."""
    run = tmp_path_factory.mktemp("refusals") / "run"
    code = run_command("train", [f"hydra.run.dir={run}", f"data.cache_dir={cache_dir}", *COMMON, "trainer.max_steps=2"])
    assert code == 0
    assert (run / ".hydra" / "overrides.yaml").is_file() and (run / "checkpoints" / "step_00000002").is_dir()
    assert not (run / ".lock").exists()  # a finished run removes its lock file
    return run


def _stamps(run: Path) -> dict:
    """When Hydra's files of a run were last written: unchanged means not rewritten (and put back)."""
    return {p.name: p.stat().st_mtime_ns for p in [*(run / ".hydra").iterdir(), run / "cli.log"]}


def _copy(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


@pytest.mark.parametrize("change, expected", [
    (["solver=rk4"], "solver='rk4' is invalid: the run being resumed ({}) was trained with 'euler'; allowed: 'euler' "
                     "(or a new run directory)"),
    (["solver.steps=4"], "solver.steps=4 is invalid: the run being resumed ({}) was trained with 1; allowed: 1"),
    (["model.hidden_dropout_prob=0.2"], "model.hidden_dropout_prob=0.2 is invalid: the run being resumed ({}) was "
                                        "trained with 0.1; allowed: 0.1"),
    (["objective=clm"], "objective='clm' is invalid: the run being resumed ({}) was trained with 'mlm'"),
    (["model=deq"], "model.mode='deq' is invalid: the run being resumed ({}) was trained with 'ode'"),
])
def test_resuming_with_another_model_setting_is_refused_before_hydra_rewrites_the_run(
        trained, tmp_path, cache_dir, capsys, change, expected):
    run = _copy(trained, tmp_path)
    before, stamps = file_tree(run, cache_dir), _stamps(run)
    for resume in ("auto", str(run / "checkpoints" / "step_00000002")):
        error = refused_line(capsys, "train", f"hydra.run.dir={run}", f"data.cache_dir={cache_dir}", *COMMON,
                         "trainer.max_steps=4", f"trainer.resume={resume}", *change)
        assert expected.format(run / "checkpoints" / "step_00000002") in error, error
        assert file_tree(run, cache_dir) == before, change  # .hydra/overrides.yaml still says what ran
        assert _stamps(run) == stamps  # refused before Hydra wrote them


def test_resuming_with_a_setting_that_changes_nothing_computed_continues(trained, tmp_path, cache_dir, capsys):
    run = _copy(trained, tmp_path)
    code = run_command("train", [f"hydra.run.dir={run}", f"data.cache_dir={cache_dir}", *COMMON, "trainer.max_steps=3",
                              "trainer.resume=auto", "+model_overrides.initializer_range=0.5"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert "resumed from" in capsys.readouterr().out
    assert "initializer_range=0.5" in (run / ".hydra" / "overrides.yaml").read_text()
    assert not (run / ".lock").exists()


def test_a_checkpoint_without_its_manifest_is_never_resumed(trained, tmp_path, cache_dir, capsys):
    run = _copy(trained, tmp_path)
    target = run / "checkpoints" / "step_00000002"
    weights = bytearray((target / "model.safetensors").read_bytes())
    for offset in range(len(weights) - 4000, len(weights) - 3000):  # tensor data, past the header
        weights[offset] ^= 0xFF
    (target / "model.safetensors").write_bytes(bytes(weights))
    (target / "manifest.json").unlink()
    before = file_tree(run, cache_dir)
    error = refused_line(capsys, "train", f"hydra.run.dir={run}", f"data.cache_dir={cache_dir}", *COMMON,
                     "trainer.max_steps=4", f"trainer.resume={target}")
    assert f"checkpoint {str(target)!r}: manifest.json is missing, so its files cannot be verified" in error, error
    error = refused_line(capsys, "train", f"hydra.run.dir={run}", f"data.cache_dir={cache_dir}", *COMMON,
                     "trainer.max_steps=4", "trainer.resume=auto")
    assert error.startswith("error: trainer.resume=auto is invalid here: no checkpoint") and "step_00000002" in error
    assert "manifest.json is missing" in error
    assert file_tree(run, cache_dir) == before


def test_a_run_refused_by_the_lock_leaves_the_live_runs_directory_alone(trained, tmp_path, cache_dir, capsys):
    run = _copy(trained, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from bertode.training import lock; lock.hold(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(120)", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before, stamps = file_tree(run, cache_dir), _stamps(run)
        error = refused_line(capsys, "train", f"hydra.run.dir={run}", f"data.cache_dir={cache_dir}", *COMMON,
                         "trainer.max_steps=4", "trainer.lr=0.5")
        assert f"hydra.run.dir={str(run)!r} is invalid: another run (PID {holder.pid}) is using it" in error
        assert file_tree(run, cache_dir) == before  # .hydra/ (config.yaml, overrides.yaml), cli.log and the holder's .lock
        assert "trainer.lr=0.5" not in (run / ".hydra" / "overrides.yaml").read_text()
        assert _stamps(run) == stamps  # the lock was taken before Hydra wrote anything
    finally:
        holder.kill()
        holder.wait()


def _short_text(tmp_path: Path) -> Path:
    path = tmp_path / "short.txt"
    path.write_text("".join(f"line {i} of a short text\n" for i in range(40)))
    return path


@pytest.mark.parametrize("case", ["too_short_for_a_row", "a_stream_shard_without_a_row"])
def test_data_errors_found_after_hydra_started_leave_no_run_directory(tmp_path, cache_dir, capsys, case):
    text = _short_text(tmp_path)
    overrides, expected = {
        "too_short_for_a_row": (["data.seq_len=512", "model.max_position_embeddings=512"],
                                "data.seq_len=512 is invalid: the whole eval split holds less than one row of 512 tokens"),
        "a_stream_shard_without_a_row": (["data.streaming=true", "data.stream_shards=64"],
                                         "data.stream_shards=64 is invalid: shard "),
    }[case]
    run, cache = tmp_path / "outputs" / "day" / "run", tmp_path / "new" / "cache"
    before = file_tree(tmp_path)
    error = refused_line(capsys, "train", f"hydra.run.dir={run}", f"data.cache_dir={cache}", *COMMON,
                     "data=text", f"data.files=[{text}]", "data.eval_fraction=0.5", "trainer.max_steps=2", *overrides)
    assert expected in error, error
    assert file_tree(tmp_path) == before  # no run directory (nor its parents), .hydra/, cli.log, .lock, nor cache


def test_a_data_error_after_hydra_started_leaves_an_existing_run_directory_as_it_was(trained, tmp_path, cache_dir, capsys):
    run = _copy(trained, tmp_path)
    text = _short_text(tmp_path)
    before = file_tree(run, cache_dir)
    error = refused_line(capsys, "train", f"hydra.run.dir={run}", f"data.cache_dir={cache_dir}", *COMMON, "data=text",
                     f"data.files=[{text}]", "trainer.max_steps=2", "data.seq_len=512", "model.max_position_embeddings=512")
    assert "data.seq_len=512 is invalid" in error
    assert file_tree(run, cache_dir) == before  # the old .hydra/ and cli.log, byte for byte


def test_evaluate_with_damaged_weights_is_one_line(trained, tmp_path, cache_dir, capsys):
    model = tmp_path / "final"
    shutil.copytree(trained / "final", model)
    (model / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}" * 8)  # "header too large"
    before = file_tree(tmp_path, cache_dir)
    error = refused_line(capsys, "evaluate", f"checkpoint={model}", f"data.cache_dir={cache_dir}", "data.seq_len=16")
    assert f"checkpoint={str(model)!r} is invalid: its model.safetensors is damaged (" in error, error
    assert "header too large" in error
    assert file_tree(tmp_path, cache_dir) == before  # no evaluate/ beside it


def test_evaluate_beyond_the_models_positions_is_one_line_and_writes_no_cache_entry(trained, tmp_path, cache_dir, capsys):
    model = tmp_path / "final"
    shutil.copytree(trained / "final", model)
    before = file_tree(tmp_path, cache_dir)
    error = refused_line(capsys, "evaluate", f"checkpoint={model}", f"data.cache_dir={cache_dir}", "data.seq_len=1000")
    assert "data.seq_len=1000 is invalid: the checkpoint's model has 512 positions; allowed: <= 512" in error, error
    assert file_tree(tmp_path, cache_dir) == before


def test_prepare_into_a_cache_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    before = file_tree(tmp_path)
    for cache in (blocker, blocker / "below"):
        error = refused_line(capsys, "prepare", f"data.cache_dir={cache}")
        assert f"data.cache_dir={str(cache)!r} is invalid: {str(blocker)!r} is a file" in error, error
    assert file_tree(tmp_path) == before


def test_prepare_refused_by_its_data_removes_the_cache_dir_it_created(tmp_path, capsys):
    cache = tmp_path / "new" / "cache"
    before = file_tree(tmp_path)
    error = refused_line(capsys, "prepare", f"data.cache_dir={cache}", "data=text", f"data.files=[{_short_text(tmp_path)}]",
                     "data.seq_len=512")
    assert "data.seq_len=512 is invalid: the whole eval split holds less than one row" in error, error
    assert file_tree(tmp_path) == {**before, tmp_path: {**before[tmp_path], "short.txt": (tmp_path / "short.txt").read_bytes()}}


@pytest.mark.parametrize("value, expected", [
    ("1e11", "model.max_position_embeddings=100000000000.0 is invalid; allowed: an integer"),
    ("100000000000", "model.max_position_embeddings=100000000000 is invalid; allowed: an integer >= 1 and <= 1,048,576"),
])
def test_absurd_model_sizes_are_one_line_not_an_allocation(tmp_path, cache_dir, capsys, value, expected):
    before = file_tree(tmp_path, cache_dir)
    error = refused_line(capsys, "train", f"hydra.run.dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}",
                     f"model.max_position_embeddings={value}")
    assert expected in error, error
    assert file_tree(tmp_path, cache_dir) == before


def test_the_lock_is_taken_in_the_directory_hydra_writes_and_removed_after(trained, tmp_path, cache_dir, capsys,
                                                                           monkeypatch):
    """The default run directory holds the time (``evaluate/${now:...}``): the lock is taken in
    the one Hydra then writes, though a second passes in between, and is gone after the run."""
    import time

    from bertode.training import lock

    model = tmp_path / "final"
    shutil.copytree(trained / "final", model)
    start = lock._start_run

    def slow(config):
        start(config)
        time.sleep(1.1)

    monkeypatch.setattr(lock, "_start_run", slow)
    code = run_command("evaluate", [f"checkpoint={model}", f"data.cache_dir={cache_dir}", "data.seq_len=16"])
    assert code == 0, capsys.readouterr().err[-3000:]
    runs = list((tmp_path / "evaluate").iterdir())
    assert len(runs) == 1 and (runs[0] / "evaluation.json").is_file(), runs
    assert not list(tmp_path.rglob(".lock"))
