"""Training checkpoints: written atomically, loaded without unpickling arbitrary objects.

A checkpoint is a directory ``checkpoints/step_00000100/`` holding ``model.safetensors``
and ``state.pt`` (optimizer, scheduler, RNG states, step, tokens, elapsed time: tensors
and plain Python values, read back with ``torch.load(weights_only=True)``). It is built
in a hidden staging directory and renamed into place, and ``checkpoints/latest`` (a text
file naming it) is replaced with ``os.replace`` afterwards, so a process killed at any
moment leaves the previous checkpoint complete and ``latest`` pointing at it.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

LATEST = "latest"


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


def _write_text(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def save(folder: Path, step: int, model: torch.nn.Module, state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``folder`` and point ``latest`` at it."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step_{step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=folder))
    save_model(model, str(staging / "model.safetensors"))  # handles tied (shared) weights
    torch.save(state, staging / "state.pt")
    for name in ("model.safetensors", "state.pt"):
        with open(staging / name, "rb") as stream:
            os.fsync(stream.fileno())
    if target.exists():
        shutil.rmtree(target)
    os.rename(staging, target)
    _write_text(folder / LATEST, target.name)
    _prune(folder, keep)
    return target


def _prune(folder: Path, keep: int) -> None:
    steps = sorted(p for p in folder.glob("step_*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest(folder: Path) -> Path | None:
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    target = folder / pointer.read_text().strip()
    return target if (target / "state.pt").is_file() else None


def load(target: Path, model: torch.nn.Module) -> dict:
    """Load weights into ``model`` and return the training state (no arbitrary unpickling).

    Checkpoints written before the DEQ counters were buffers keep them in ``state.pt``
    (``encoder_counters``): they are put into the buffers."""
    missing, unexpected = load_model(model, str(target / "model.safetensors"), strict=False)
    state = torch.load(target / "state.pt", weights_only=True)
    legacy = state.get("encoder_counters", {})
    counters = [key for key in missing if key.rsplit(".", 1)[-1] in legacy]
    missing = [key for key in missing if key not in counters]
    if missing or unexpected:
        raise ValueError(f"trainer.resume: checkpoint {str(target)!r} does not fit the model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key in counters:
        model.get_buffer(key).fill_(int(legacy[key.rsplit(".", 1)[-1]]))
    return state
