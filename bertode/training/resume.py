"""What a resumed run must keep: the model the checkpoint was trained as.

`bertode.train trainer.resume=...` with a model setting other than the checkpoint's
(``solver=rk4`` on an Euler run, ``solver.steps=4``, a dropout, the objective, the mode:
any `BertODEConfig` field but the `NEUTRAL_FIELDS`) is refused in one line naming the key
a user types, before Hydra rewrites the run directory's ``.hydra/`` (`check_resume`, run
by `cli.hydra_entry` once the directory is locked), and again with the data's vocabulary
once it is prepared (`check_settings`). The checkpoint's ``config.json`` says what it was
trained as (`checkpoint.saved_config`); the command line's model config comes from
`run_config.model_config`, as for a new run.

The depth drawn per optimizer step (``depth=``, `depth.py`) is a training setting too: the
checkpoint's ``state.pt`` keeps it (``depth``: the distribution, its arguments as used and
``backprop``; a checkpoint without one was trained at the model's own depth), and a resume
with another is refused the same way (`changed_depth`).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ..configuration import BertODEConfig
from . import checkpoint
from .depth import DEPTH_DISTRIBUTIONS, depth_setting
from .groups import typed_key
from .run_config import model_config, model_kwargs

# BertODEConfig fields a resumed run may change: they change neither what the model
# computes nor how it trains (outputs asked for, bookkeeping, the initialisation of the
# weights the checkpoint replaces, an evaluation-time diagnostic, the two fixed-step loops
# documented to give the same numbers, sparse prediction: the same loss up to summation order, and
# absent from checkpoints written before it). Any other field that differs is refused.
NEUTRAL_FIELDS = frozenset({
    "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "model_type", "output_attentions",
    "output_hidden_states", "return_dict", "use_cache", "id2label", "label2id", "num_labels", "problem_type",
    "classifier_dropout", "bos_token_id", "eos_token_id", "initializer_range", "chunk_size_feed_forward",
    "deq_spectral_radius", "fixed_step_loop", "sparse_prediction"})


def check_resume(cfg: DictConfig, run_dir: Path) -> None:
    """Before Hydra rewrites the run directory's ``.hydra/`` (`cli.hydra_entry`'s prerun):
    the checkpoint a resume would read verifies, and the command line keeps the settings
    it was trained with."""
    target = checkpoint.resume_target(cfg.trainer.resume, run_dir / "checkpoints", main=False)
    if target is not None:
        check_settings(cfg, target)


def check_settings(cfg: DictConfig, target: Path, config=None) -> None:
    """One line naming the first model setting that ``cfg`` (``config``: its model config;
    None: built with the checkpoint's vocabulary) changes on the checkpoint ``target``'s,
    other than those that change neither the model's function nor its training
    (`NEUTRAL_FIELDS`), or the ``depth`` group (`changed_depth`). A checkpoint written
    before checkpoints kept their config is not compared."""
    changed_depth(cfg, target)
    saved = checkpoint.saved_config(target)
    if saved is None:
        return
    try:
        before = BertODEConfig.from_dict(saved)
    except ValueError as error:
        raise checkpoint.CheckpointError(f"checkpoint {str(target)!r}: its {checkpoint.CONFIG} does not load "
                                         f"({str(error).splitlines()[0]})") from None
    if config is None:
        config = model_config(cfg, vocab_size=before.vocab_size, pad_token_id=before.pad_token_id)
    change = changed_setting(before, config)
    if change is None:
        return
    field, old, new = change
    where = f"the run being resumed ({target})"
    if field == "is_decoder":
        raise ValueError(f"objective={cfg.objective!r} is invalid: {where} was trained with "
                         f"{'causal' if old else 'bidirectional'} attention; allowed: its own objective (or a new run "
                         "directory)")
    origin = model_kwargs(cfg, config.vocab_size, config.pad_token_id)[1]
    raise ValueError(f"{origin.get(field) or _typed_key(cfg, field)}={new!r} is invalid: {where} was trained with "
                     f"{old!r}; allowed: {old!r} (or a new run directory)")


# What a checkpoint written before ``depth=`` existed was trained with: the model's own depth.
OWN_DEPTH = {"name": DEPTH_DISTRIBUTIONS.default, "steps": None, "backprop": None}


def saved_depth(target: Path) -> dict:
    """The ``depth`` setting the checkpoint ``target`` (verified) was trained with."""
    import torch

    try:  # mapped, not read: only the small ``depth`` entry is used
        state = torch.load(Path(target) / "state.pt", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many kinds on a damaged pickle
        raise checkpoint.CheckpointError(f"checkpoint {str(target)!r}: state.pt is damaged "
                                         f"({type(error).__name__})") from None
    return dict(state.get("depth") or OWN_DEPTH) if isinstance(state, dict) else dict(OWN_DEPTH)


def changed_depth(cfg: DictConfig, target: Path) -> None:
    """One line naming the ``depth`` key whose value differs from the checkpoint's: the
    distribution (``depth=``), one of its arguments as used, or ``depth.backprop``."""
    before, now = saved_depth(target), depth_setting(cfg.get("depth")).describe
    where = f"the run being resumed ({target})"
    if before.get("name") != now["name"]:
        raise ValueError(f"depth={now['name']!r} is invalid: {where} was trained with depth={before.get('name')!r} "
                         f"({_spelled(before)}); allowed: {_spelled(before)} (or a new run directory)")
    for key in [*now, *(k for k in before if k not in now)]:
        if before.get(key) != now.get(key):
            raise ValueError(f"depth.{key}={now.get(key)!r} is invalid: {where} was trained with "
                             f"{before.get(key)!r}; allowed: {before.get(key)!r} (or a new run directory)")


def _spelled(depth: dict) -> str:
    """A depth setting as typed on the command line."""
    settings = " ".join(f"depth.{k}={'null' if v is None else v}" for k, v in depth.items() if k != "name")
    return f"depth={depth.get('name')}" + (f" {settings}" if settings else "")


def _typed_key(cfg: DictConfig, field: str) -> str:
    """The command-line key of a `BertODEConfig` field that ``cfg`` leaves to its default."""
    return typed_key(field) or (f"model.{field}" if field in cfg.model else f"model_overrides.{field}")


def changed_setting(saved, config) -> tuple[str, object, object] | None:
    """The first field (objective and mode first) in which ``config`` (a `BertODEConfig`)
    differs from ``saved`` (the checkpoint's config, as a `BertODEConfig`), other than the
    `NEUTRAL_FIELDS`: (field, saved value, new value); None if none does."""
    known = saved.to_dict()
    fields = [*known, *(k for k in config.to_dict() if k not in known)]
    first = [f for f in ("objective", "is_decoder", "mode") if f in fields]
    for field in first + [f for f in fields if f not in first and f not in NEUTRAL_FIELDS]:
        before, now = getattr(saved, field, None), getattr(config, field, None)
        if field == "objective" and before is None:
            continue  # saved before configs named their objective (state.pt's is checked at load)
        if before != now:
            return field, before, now
    return None
