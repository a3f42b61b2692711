"""One run per run directory, and a refused run leaves the directory as it found it.

`hold` takes an exclusive lock on ``<run_dir>/.lock`` (the operating system releases it
when the process ends, however it ends, so a dead run's lock is never stale); a second
run into the same directory fails at once with one line naming the holder's PID.
`release` (or `release_all`, at the end of a run however it ends) removes the file and
lets go. The file is removed while still locked, and a run that locked a file no longer
at the path (its holder removed it meanwhile) takes the new one, so two runs never both
hold a directory.

`RunDirectory` records what Hydra is about to write into a run directory (``.hydra/``,
the job's log file, the directory itself) so that a refused run (exit status 2) puts it
back: `guarded_run` (`cli.hydra_entry`'s Hydra run) takes the lock and the record in a
Hydra callback, `RunDirectoryCallback`, once the run directory is known and before Hydra
writes anything, then runs the command's checks that need the directory (a resume's).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

LOCK = ".lock"
_HELD: dict[str, int] = {}  # run directory -> open file descriptor, for this process


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        here, there = os.fstat(descriptor), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def hold(run_dir: Path) -> bool:
    """Take the run directory's lock (True; False: this process holds it already);
    ValueError naming the holder if another process holds it."""
    key = str(run_dir.resolve())
    if key in _HELD:
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 64).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise ValueError(f"hydra.run.dir={str(run_dir)!r} is invalid: another run (PID {holder}) is using it; "
                             "allowed: a directory no live run holds") from None
        if _same_file(descriptor, path):
            break
        os.close(descriptor)  # its holder removed it as it finished: lock the file now at the path
    os.ftruncate(descriptor, 0)
    os.write(descriptor, str(os.getpid()).encode())
    _HELD[key] = descriptor
    return True


def holds(run_dir: Path) -> bool:
    return str(run_dir.resolve()) in _HELD


def release(run_dir: Path) -> None:
    """Remove ``.lock`` (while still holding it) and let go; nothing if not held here."""
    key = str(run_dir.resolve())
    descriptor = _HELD.pop(key, None)
    if descriptor is None:
        return
    path = Path(key) / LOCK
    try:
        if _same_file(descriptor, path):
            path.unlink()
    except OSError:
        pass  # the directory went away (a refused run's, removed) or is read-only now
    finally:
        os.close(descriptor)


def release_all() -> None:
    """Let go of every run directory this process holds (the end of a run, however it ends)."""
    for key in list(_HELD):
        release(Path(key))


class RunDirectory:
    """What a run directory held before Hydra writes ``paths`` (files) into it: `restore`
    puts it back after a refused run (the directory and the parents this run created
    removed; overwritten files rewritten; appended files cut back; new files removed)."""

    def __init__(self, run_dir: Path, paths: list[Path]):
        self.run_dir = Path(os.path.abspath(run_dir))
        created = []  # the directories this run will create, deepest first
        folder = self.run_dir
        while not folder.exists() and folder != folder.parent:
            created.append(folder)
            folder = folder.parent
        self.created = created
        self.files: dict[Path, bytes | int | None] = {}
        self.folders: dict[Path, bool] = {}
        if created:
            return
        for path in paths:
            path = Path(os.path.abspath(path))
            if path.suffix == ".log":  # appended to: keep its length
                self.files[path] = path.stat().st_size if path.is_file() else None
            else:
                self.files[path] = path.read_bytes() if path.is_file() else None
            for parent in path.parents:
                if parent == self.run_dir or self.run_dir not in parent.parents:
                    break
                self.folders.setdefault(parent, parent.is_dir())

    def restore(self) -> None:
        if self.created:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            for folder in self.created[1:]:
                try:
                    folder.rmdir()
                except OSError:  # not empty: another run writes there too
                    break
            return
        for path, before in self.files.items():
            try:
                if before is None:
                    path.unlink(missing_ok=True)
                elif isinstance(before, int):
                    if path.is_file() and path.stat().st_size > before:
                        os.truncate(path, before)
                elif not path.is_file() or path.read_bytes() != before:  # rewritten (untouched: left as it is)
                    path.write_bytes(before)
            except OSError:
                pass
        for folder, existed in sorted(self.folders.items(), key=lambda item: -len(item[0].parts)):
            if not existed:
                try:
                    folder.rmdir()
                except OSError:
                    pass


_ENTRY: dict = {}  # the command running in this process: its checks and its run directory's record


def guarded_run(run, cfg, prerun, take_lock: bool):
    """``run()`` (Hydra's main, `cli.hydra_entry`) with `RunDirectoryCallback` added: on exit
    status 2 the run directory is put back as it was; the lock is let go however the run ends."""
    callback = f"+hydra.callbacks.bertode_run_directory._target_={__name__}.RunDirectoryCallback"
    argv = sys.argv
    _ENTRY.clear()
    _ENTRY.update(cfg=cfg, prerun=prerun, lock=take_lock)
    sys.argv = [*argv, callback]
    try:
        return run()
    except SystemExit as exit_info:
        if exit_info.code == 2 and "record" in _ENTRY:
            _ENTRY["record"].restore()
        raise
    finally:
        sys.argv = argv
        if "run_dir" in _ENTRY:
            release(_ENTRY["run_dir"])
        _ENTRY.clear()


class RunDirectoryCallback:
    """Hydra calls `on_run_start` with the composed config before it creates the run
    directory and writes ``.hydra/`` and the job's log there (`guarded_run` adds it)."""

    def on_run_start(self, config, **kwargs) -> None:
        try:
            _start_run(config)
        except (ValueError, OSError) as error:
            print(f"error: {_one_line(error)}", file=sys.stderr, flush=True)
            sys.exit(2)
        except Exception:  # Hydra would turn it into a warning and run on unlocked
            import traceback

            traceback.print_exc()
            sys.exit(1)

    def _nothing(self, *args, **kwargs) -> None:
        return None

    on_run_end = on_multirun_start = on_multirun_end = on_job_start = on_job_end = on_compose_config = _nothing


def _one_line(error: Exception) -> str:
    if isinstance(error, OSError):  # e.g. no permission to create the directory or its lock
        where = f" ({error.filename})" if error.filename else ""
        return (f"hydra.run.dir={str(_ENTRY.get('dir'))!r} is invalid: {error.strerror or error}{where}; allowed: a "
                "directory this process can write")
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _start_run(config) -> None:
    """The run directory Hydra is about to write: what it holds now (`RunDirectory`), its
    lock, then the command's checks that need it."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict, read_write

    if not _ENTRY:  # a Hydra run not started by `guarded_run` (e.g. a copied config)
        return
    HydraConfig.instance().set_config(config)
    run_dir = Path(os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir"))))  # `now` is cached: Hydra's too
    _ENTRY["dir"] = run_dir
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = str(run_dir)  # what Hydra sets next, for the log file's name
    written = []
    if config.hydra.output_subdir is not None:
        written += [run_dir / str(config.hydra.output_subdir) / name for name in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    for handler in (OmegaConf.select(config, "hydra.job_logging.handlers") or {}).values():
        if "filename" in handler:
            written.append(Path(os.path.abspath(str(handler.filename))))
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"hydra.run.dir={str(run_dir)!r} is invalid: it is a file; allowed: a directory (or a path "
                         "to create)")
    _ENTRY["record"] = RunDirectory(run_dir, written)
    if _ENTRY["lock"]:
        hold(run_dir)
        _ENTRY["run_dir"] = run_dir
    if _ENTRY["prerun"] is not None:
        _ENTRY["prerun"](_ENTRY["cfg"], run_dir)
