"""One run per run directory: an exclusive lock on ``<run_dir>/.lock`` for the life of the
process (the operating system releases it when the process ends, however it ends, so a
dead run's lock is never stale). A second run into the same directory fails at once with
one line naming the holder's PID."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

_HELD: dict[str, int] = {}  # run directory -> open file descriptor, for this process


def hold(run_dir: Path) -> None:
    """Take the run directory's lock (again: no-op); ValueError naming the holder if taken."""
    key = str(run_dir.resolve())
    if key in _HELD:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 64).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise ValueError(f"hydra.run.dir={str(run_dir)!r} is invalid: another run (PID {holder}) is using it; "
                         "allowed: a directory no live run holds") from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, str(os.getpid()).encode())
    _HELD[key] = descriptor


def release_all() -> None:
    """Let go of every run directory this process holds (the end of a run, however it ends)."""
    for key in list(_HELD):
        os.close(_HELD.pop(key))
