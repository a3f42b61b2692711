"""Checks of the training options that `BertODEConfig` does not own (the trainer group,
the seed): each bad value is one line naming the key, the value and what is allowed,
raised before anything is written."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import ListConfig, OmegaConf

from ..compile import SCOPES


def _real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _plain(value):
    return OmegaConf.to_container(value) if isinstance(value, ListConfig) else value


def _number(key: str, value, low, high, allowed: str | None = None, strict: bool = False) -> None:
    ok = _real(value) and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        span = f"a number >= {low}" if high is None else f"a number in [{low}, {high}]"
        raise ValueError(f"trainer.{key}={_plain(value)!r} is invalid; allowed: {allowed or span}")


def torch_device(choice: str, key: str = "device") -> torch.device:
    """``auto`` or any device string torch understands (``cpu``, ``cuda:1``, ``mps``), if present here."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(choice))
    except (RuntimeError, ValueError):
        raise ValueError(f"{key}={choice!r} is invalid; allowed: 'auto' or a torch device ('cpu', 'cuda', 'cuda:1', ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={choice!r} is invalid here: no CUDA device is visible; allowed: 'auto', 'cpu'")
    return device


def resolve_device(choice: str, key: str = "trainer.device") -> str:
    """``auto``/``cpu``/``cuda`` -> ``cpu`` or ``cuda`` (training picks the GPU by local rank)."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{key}={choice!r} is invalid; allowed: 'auto', 'cpu', 'cuda'")
    return torch_device(choice, key).type


def check_count(key: str, value, minimum: int, nullable: bool = False) -> None:
    """An integer option (``null`` allowed when ``nullable``)."""
    if nullable and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} is invalid; allowed: {'null or ' if nullable else ''}an integer >= {minimum}")


def check_run(cfg, world: int) -> None:
    """The run-level options: the seed and the trainer group."""
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"seed={cfg.seed!r} is invalid; allowed: an integer >= 0")
    resolve_device(cfg.trainer.device)
    check_trainer(cfg.trainer, world)


COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_trainer(trainer, world: int) -> None:
    for key in ("batch_size", "grad_accumulation", "max_steps", "log_every", "eval_every", "checkpoint_every"):
        value = trainer[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"trainer.{key}={value!r} is invalid; allowed: an integer >= 1")
    every = trainer.get("dynamics_every", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"trainer.dynamics_every={every!r} is invalid; allowed: 0 (off) or an integer >= 1")
    if trainer.batch_size % (trainer.grad_accumulation * world) != 0:
        raise ValueError(f"trainer.batch_size={trainer.batch_size} is invalid; allowed: a multiple of "
                         f"grad_accumulation x processes = {trainer.grad_accumulation * world}")
    if not (_real(trainer.lr) and trainer.lr > 0):
        raise ValueError(f"trainer.lr={trainer.lr!r} is invalid; allowed: a number > 0")
    for key, minimum in (("warmup_steps", 0), ("keep_checkpoints", 0)):  # keep_checkpoints 0: keep all
        value = trainer[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"trainer.{key}={value!r} is invalid; allowed: an integer >= {minimum}")
    for key in ("max_tokens", "num_threads"):
        value = trainer[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"trainer.{key}={value!r} is invalid; allowed: null or an integer >= 1")
    _number("weight_decay", trainer.weight_decay, 0, None)
    _number("min_lr_ratio", trainer.min_lr_ratio, 0, 1)
    if trainer.grad_clip is not None:  # null or 0: no clipping; a negative norm would flip the gradient
        _number("grad_clip", trainer.grad_clip, 0, None, "null, 0 (no clipping) or a number > 0")
    if trainer.max_time:  # null or 0: no time budget
        _number("max_time", trainer.max_time, 0, None, "null, 0 (no limit) or a number of seconds > 0", strict=True)
    betas = list(trainer.betas) if isinstance(trainer.betas, (list, tuple, ListConfig)) else None
    if betas is None or len(betas) != 2 or not all(_real(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"trainer.betas={_plain(trainer.betas)!r} is invalid; allowed: two numbers in [0, 1)")
    if not isinstance(trainer.deterministic, bool):
        raise ValueError(f"trainer.deterministic={trainer.deterministic!r} is invalid; allowed: true, false")
    for key, allowed in (("precision", ("fp32", "bf16")), ("schedule", ("linear", "cosine"))):
        if trainer[key] not in allowed:
            raise ValueError(f"trainer.{key}={trainer[key]!r} is invalid; allowed: {', '.join(map(repr, allowed))}")
    if not isinstance(trainer.compile, bool) and trainer.compile not in SCOPES:
        raise ValueError(f"trainer.compile={trainer.compile!r} is invalid; allowed: true, false, "
                         f"{', '.join(map(repr, SCOPES))}")
    backends = sorted(set(torch._dynamo.list_backends()) | {"eager", "aot_eager"})
    if trainer.compile_backend not in backends:
        raise ValueError(f"trainer.compile_backend={trainer.compile_backend!r} is invalid; allowed: "
                         f"{', '.join(map(repr, backends))}")
    if trainer.compile_mode not in COMPILE_MODES:
        raise ValueError(f"trainer.compile_mode={trainer.compile_mode!r} is invalid; allowed: "
                         f"{', '.join(map(repr, COMPILE_MODES))}")
    if trainer.compile_mode is not None and trainer.compile_backend != "inductor":
        raise ValueError(f"trainer.compile_mode={trainer.compile_mode!r} is invalid with "
                         f"trainer.compile_backend={trainer.compile_backend!r}; allowed: null (modes are Inductor's)")
    if trainer.resume not in ("never", "auto") and not Path(str(trainer.resume)).is_dir():
        raise ValueError(f"trainer.resume={trainer.resume!r} is invalid; allowed: 'never', 'auto' or a checkpoint directory")
