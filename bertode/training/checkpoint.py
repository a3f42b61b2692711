"""Training checkpoints: written atomically, verified before use, loaded without unpickling
arbitrary objects.

A checkpoint is a directory ``checkpoints/step_00000100/`` holding ``model.safetensors``,
``state.pt`` (optimizer, RNG states, step, tokens, elapsed time: tensors and plain Python
values, read back with ``torch.load(weights_only=True)``), ``config.json`` (the model's
`BertODEConfig`: a resumed run must keep it, `resume.py`) and, written last,
``manifest.json`` (each file's size and SHA-256). It is built in a hidden staging
directory and renamed into place; ``checkpoints/latest`` names the newest. `choose` takes
the newest checkpoint that verifies and says why it passed over newer ones; `load`
verifies before it reads and names the damaged file in one line. A checkpoint without a
manifest (bertode 0.1 wrote none) cannot be verified and is never used silently: it is
refused, or passed over with a line, until its owner vouches for it with `seal`. A
failed write (full or read-only disk, I/O error) raises `CheckpointError` naming the path
and the cause and leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError  # noqa: F401  (raised by safetensors on a failed write)
from safetensors.torch import load_model, save_model

LATEST = "latest"
MANIFEST = "manifest.json"
CONFIG = "config.json"
FILES = ("model.safetensors", "state.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or used; the message names the file and why."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():  # this process's device only (each torchrun rank saves its own view)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _write_text(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def save(folder: Path, step: int, model: torch.nn.Module, state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``folder`` and point ``latest`` at it."""
    target = folder / f"step_{step:08d}"
    staging = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=folder))
        save_model(model, str(staging / "model.safetensors"))  # handles tied (shared) weights
        torch.save(state, staging / "state.pt")
        names = FILES
        if hasattr(getattr(model, "config", None), "to_json_string"):
            _write_text(staging / CONFIG, model.config.to_json_string(use_diff=False))
            names = (*FILES, CONFIG)
        manifest = {"step": step, "files": {}}
        for name in names:
            with open(staging / name, "rb") as stream:
                os.fsync(stream.fileno())
            manifest["files"][name] = {"bytes": (staging / name).stat().st_size, "sha256": _digest(staging / name)}
        _write_text(staging / MANIFEST, json.dumps(manifest, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
        staging = None
        _write_text(folder / LATEST, target.name)
    except (OSError, SafetensorError, RuntimeError) as error:  # safetensors and torch wrap OS errors in their own
        cause = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise CheckpointError(f"checkpoint {str(target)!r} could not be written: {cause} "
                              f"({type(error).__name__}); the previous checkpoints are kept") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    _prune(folder, keep, target)
    return target


def _prune(folder: Path, keep: int, newest: Path) -> None:
    """Keep the ``keep`` newest checkpoints up to ``newest`` (0: all of them); later steps
    belong to a history this run replaced (it started over or resumed from before them)."""
    steps = sorted(p for p in folder.glob("step_*") if p.is_dir())
    replaced = [p for p in steps if p.name > newest.name]
    current = [p for p in steps if p.name <= newest.name]
    for old in replaced + (current[:-keep] if keep > 0 else []):
        shutil.rmtree(old, ignore_errors=True)


def remove_staging(folder: Path) -> list[Path]:
    """Delete what an interrupted `save` left (hidden ``.step_*`` directories); return them."""
    leftovers = [p for p in folder.glob(".step_*") if p.is_dir()] if folder.is_dir() else []
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def verify(target: Path) -> None:
    """Raise `CheckpointError` naming the file that is missing or damaged (a missing
    manifest included: without it no file can be checked)."""
    manifest_path = target / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {str(target)!r}: {MANIFEST} is missing, so its files cannot be verified "
                              "(bertode.train writes one last; a checkpoint of bertode 0.1 has none: vouch for it with "
                              f"bertode.training.checkpoint.seal({str(target)!r}))")
    try:
        files = {name: (int(entry["bytes"]), str(entry["sha256"]))
                 for name, entry in json.loads(manifest_path.read_text())["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        raise CheckpointError(f"checkpoint {str(target)!r}: {MANIFEST} is damaged") from None
    for name, (size, sha256) in files.items():
        path = target / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(target)!r}: {name} is missing")
        try:
            intact = path.stat().st_size == size and _digest(path) == sha256
        except OSError as error:
            raise CheckpointError(f"checkpoint {str(target)!r}: {name} cannot be read ({error.strerror})") from None
        if not intact:
            raise CheckpointError(f"checkpoint {str(target)!r}: {name} is damaged "
                                  f"({path.stat().st_size} bytes, checksum differs from {MANIFEST})")


def seal(target: Path) -> None:
    """Write the manifest of a checkpoint that has none (bertode 0.1's), after checking
    that its files are present and readable: the caller vouches that they are intact."""
    target = Path(target)
    if (target / MANIFEST).is_file():
        raise CheckpointError(f"checkpoint {str(target)!r}: it has its {MANIFEST} already")
    _verify_legacy(target)
    names = [name for name in (*FILES, CONFIG) if (target / name).is_file()]
    manifest = {"step": None, "sealed": True,
                "files": {name: {"bytes": (target / name).stat().st_size, "sha256": _digest(target / name)}
                          for name in names}}
    _write_text(target / MANIFEST, json.dumps(manifest, indent=1))


def saved_config(target: Path) -> dict | None:
    """The model config a (verified) checkpoint was trained with; None if it predates them."""
    try:
        return json.loads((Path(target) / CONFIG).read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as error:
        raise CheckpointError(f"checkpoint {str(target)!r}: {CONFIG} is damaged ({error})") from None


def _verify_legacy(target: Path) -> None:
    """Checkpoints written before manifests: both files must be present and readable."""
    for name in FILES:
        if not (target / name).is_file():
            raise CheckpointError(f"checkpoint {str(target)!r}: {name} is missing")
    try:
        from safetensors import safe_open

        with safe_open(str(target / "model.safetensors"), "pt"):
            pass
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {str(target)!r}: model.safetensors is damaged ({error})") from None
    _read_state(target)


def _read_state(target: Path) -> dict:
    try:
        return torch.load(target / "state.pt", weights_only=True)
    except Exception as error:  # torch raises many kinds on a damaged pickle
        raise CheckpointError(f"checkpoint {str(target)!r}: state.pt is damaged ({type(error).__name__})") from None


def choose(folder: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under ``folder`` that verifies, and a line per newer one skipped."""
    skipped = []
    for target in sorted((p for p in folder.glob("step_*") if p.is_dir()), reverse=True) if folder.is_dir() else []:
        try:
            verify(target)
            return target, skipped
        except CheckpointError as error:
            skipped.append(str(error))
    return None, skipped


def latest(folder: Path) -> Path | None:
    return choose(folder)[0]


def load(target: Path, model: torch.nn.Module) -> dict:
    """Verify, load weights into ``model`` and return the training state.

    Checkpoints written before the DEQ counters were buffers keep them in ``state.pt``
    (``encoder_counters``): they are put into the buffers."""
    verify(target)
    state = _read_state(target)
    try:
        missing, unexpected = load_model(model, str(target / "model.safetensors"), strict=False)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {str(target)!r}: model.safetensors does not load ({error})") from None
    legacy = state.get("encoder_counters", {})
    counters = [key for key in missing if key.rsplit(".", 1)[-1] in legacy]
    missing = [key for key in missing if key not in counters]
    if missing or unexpected:
        raise CheckpointError(f"trainer.resume: checkpoint {str(target)!r} does not fit the model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key in counters:
        model.get_buffer(key).fill_(int(legacy[key.rsplit(".", 1)[-1]]))
    return state


def resume_target(resume, folder: Path, main: bool = True) -> Path | None:
    """What ``trainer.resume`` (``never``, ``auto`` or a directory) resumes from: a verified
    checkpoint, or None to start at step 0. ``main``: this process says what it did."""
    if main:
        for leftover in remove_staging(folder):
            print(f"removed {leftover.name}, what an interrupted checkpoint write left", flush=True)
    if resume == "never":
        return None
    if resume != "auto":
        target = Path(str(resume))
        verify(target)
        return target
    target, skipped = choose(folder)
    if target is None and skipped:
        raise CheckpointError(f"trainer.resume=auto is invalid here: no checkpoint under {str(folder)!r} is usable "
                              f"({len(skipped)} damaged; the newest: {skipped[0]}); allowed: trainer.resume=never "
                              "(start over, replacing them) or a checkpoint directory")
    if main:
        for line in skipped:
            print(f"trainer.resume=auto: skipped a newer checkpoint: {line}", flush=True)
        if target is None:
            print(f"trainer.resume=auto: no checkpoint under {folder}; starting from step 0 "
                  "(give the interrupted run's hydra.run.dir to resume it)", flush=True)
    return target
