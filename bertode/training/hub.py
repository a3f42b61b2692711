"""`datasets` sources (``data.source=hub``): a hub name or a local builder (``json``,
``parquet``, ``csv``, ``text``) with ``data.data_files``; the text in
``data.text_column`` of ``data.train_split`` (and ``data.eval_split``).

`load_hub` opens one; `check_hub` proves, before anything is written, that it opens
(streamed into a temporary cache that is removed), that the splits and the column exist
and that the train split is not empty, and otherwise says in one line what exists.
A hub name is first probed with one request (`hub_unreachable`): without a network the
refusal is one line at once, not datasets' five retries (about 23 s) and their warnings;
``HF_HUB_OFFLINE`` is honoured also when it was set after huggingface_hub was imported.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile

from .errors import DataError

OFFLINE_HINT = ("for local files use data.hub_path=json (or parquet, csv, text) "
                "data.data_files='[/path/*.jsonl]' data.text_column=<column>")


def expand_data_files(data_files):
    """Local globs resolved here and sorted (a fixed file order whatever the file system's)."""
    def one(pattern):
        pattern = str(pattern)
        if "://" in pattern:  # hf://, s3://, https://: resolved by datasets itself
            return [pattern]
        pattern = os.path.expanduser(pattern)
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"data.data_files: {pattern!r} matches no file")
        return matches

    if isinstance(data_files, dict):
        return {split: [f for p in (v if isinstance(v, list) else [v]) for f in one(p)] for split, v in data_files.items()}
    return [f for p in ([data_files] if isinstance(data_files, str) else data_files) for f in one(p)]


def data_files_of(cfg):
    files = cfg.get("data_files")
    if files is None:
        return None
    if not isinstance(files, (str, list, dict)):
        from omegaconf import OmegaConf

        files = OmegaConf.to_container(files)
    return expand_data_files(files)


def load_hub(cfg, split: str | None, streaming: bool, cache_dir: str | None = None):
    """``datasets.load_dataset`` for this data config (a dict of splits when ``split`` is None)."""
    import datasets

    cache = cache_dir or os.path.join(os.path.expanduser(str(cfg.cache_dir)), "datasets")
    with _offline_as_set():
        return datasets.load_dataset(cfg.hub_path, cfg.hub_name, split=split, data_files=data_files_of(cfg),
                                     streaming=streaming, cache_dir=cache)


def _names_the_hub(cfg) -> bool:
    """A hub dataset name: neither one of datasets' packaged builders (json, parquet, ...) nor a local folder."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    path = str(cfg.hub_path)
    return path not in _PACKAGED_DATASETS_MODULES and not os.path.exists(os.path.expanduser(path))


def _offline_by_environment() -> bool:
    """``HF_HUB_OFFLINE`` as the environment says now (the libraries read it once, at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or _offline_by_environment()


@contextlib.contextmanager
def _offline_as_set():
    """huggingface_hub's and datasets' offline switches on while the environment asks for it, then as they were."""
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    if _offline_by_environment():
        constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """The error's type name when one request to the hub's endpoint (no retry) cannot connect, else None.
    Any HTTP answer, even an error status, means the hub is reachable (proxies come from the environment)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # noqa: BLE001 - httpx's and requests' errors have no common base
        return type(error).__name__
    return None


def _unreachable(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(word in text for word in ("connection", "offline", "couldn't reach", "could not reach", "timed out",
                                         "name resolution", "max retries", "localentrynotfound", "network"))


def _describe(cfg) -> str:
    return f"data.hub_path={cfg.hub_path!r}" + (f" (name {cfg.hub_name!r})" if cfg.hub_name else "")


def check_hub(cfg) -> None:
    """One line naming the field and what exists, or nothing (module docstring)."""
    for field in ("text_column", "train_split"):
        if not isinstance(cfg.get(field), str) or not cfg.get(field):
            raise DataError(f"data.{field}={cfg.get(field)!r} is invalid; allowed: a non-empty name")
    if cfg.get("eval_split") is not None and (not isinstance(cfg.eval_split, str) or not cfg.eval_split):
        raise DataError(f"data.eval_split={cfg.eval_split!r} is invalid; allowed: null (hold out every "
                        "1/eval_fraction-th document) or a split name")
    files = data_files_of(cfg)
    listed = [f for v in (files.values() if isinstance(files, dict) else [files or []]) for f in v]
    for path in listed:
        if "://" not in path and not os.path.isfile(path):
            raise DataError(f"data.data_files: {path!r} matches no file")
    if not _offline() and _names_the_hub(cfg) and (error_name := hub_unreachable()):
        raise DataError(f"{_describe(cfg)}: the Hugging Face hub is unreachable ({error_name}); {OFFLINE_HINT}")
    with tempfile.TemporaryDirectory(prefix="bertode-check-") as scratch:
        try:
            splits = load_hub(cfg, None, streaming=True, cache_dir=scratch)
        except Exception as error:  # datasets' errors have no common base
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            if isinstance(error, StopIteration):  # datasets infers the features from a first example
                raise DataError(f"{_describe(cfg)}: the {cfg.train_split!r} split is empty "
                                "(no document to train on)") from None
            if _unreachable(error):
                raise DataError(f"{_describe(cfg)}: the Hugging Face hub is unreachable ({type(error).__name__}); "
                                f"{OFFLINE_HINT}") from None
            raise DataError(f"{_describe(cfg)} could not be loaded: {type(error).__name__}: {first}") from None
        names = list(splits)
        for field in ("train_split", "eval_split"):
            if cfg.get(field) and cfg.get(field) not in names:
                raise DataError(f"data.{field}={cfg.get(field)!r} is not a split of {_describe(cfg)}; "
                                f"splits: {', '.join(names)}")
        try:
            first = next(iter(splits[cfg.train_split]), None)
        except Exception as error:  # noqa: BLE001 - a file the builder cannot parse
            raise DataError(f"{_describe(cfg)}: the {cfg.train_split!r} split could not be read: "
                            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
        if first is None:
            raise DataError(f"{_describe(cfg)}: the {cfg.train_split!r} split is empty (no document to train on)")
        if cfg.text_column not in first:
            raise DataError(f"data.text_column={cfg.text_column!r} is not a column of {_describe(cfg)}; "
                            f"columns: {', '.join(first)}")
