"""Shared tiny configurations and inputs: hidden 16-32, 1-2 layers, seq <= 12, on CPU; commands run in-process."""

import logging
import os
import sys

# pytest-xdist (setup.cfg's addopts run two workers): each worker, and the commands it starts, gets its share of
# the cores, so two workers do not oversubscribe them. Set before torch is imported (OpenMP reads it once).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, CORES // WORKERS)))

import pytest  # noqa: E402
import torch  # noqa: E402

if WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from transformers import BertConfig

TINY = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)


def tiny_bert_config(**overrides) -> BertConfig:
    return BertConfig(**{**TINY, **overrides})


@pytest.fixture
def batch():
    """Two sequences, the second padded after 7 tokens, with two token types."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, TINY["vocab_size"], (2, 10), generator=generator)
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, 7:] = 0
    token_type_ids = torch.zeros(2, 10, dtype=torch.long)
    token_type_ids[:, 5:] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def projection_loss(hidden: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient reaches every position (sum(LN(z)^2) would be constant)."""
    weights = torch.linspace(-1.0, 1.0, hidden.numel(), dtype=hidden.dtype, device=hidden.device)
    return (hidden * weights.view_as(hidden)).sum()


def tiny_ode_config(**overrides):
    import bertode

    return bertode.BertODEConfig(**{**TINY, **overrides})


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One data cache (tokenizer, token shards) shared by the short training runs."""
    return tmp_path_factory.mktemp("bertode-cache")


# --- commands run in this process (refusal tests): their exit status, their one error line, the files they left ---
@pytest.fixture(autouse=True)
def restore_logging():
    """In-process Hydra runs point the root logger at the run's log file and pytest's streams: put it back
    after every test (a later test's warnings would otherwise go to a closed stream, or into its one-line stderr,
    depending on which tests ran before it in the same process: pytest-xdist changes that order)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def write_tiny_text(folder, words, lines: int, length: int, spread: int, held_out: int):
    """Random sentences of ``words`` (seed 0; line i has ``length + i % spread`` words) in
    ``folder/train.txt``, and the last ``held_out`` of them reversed in ``folder/eval.txt``."""
    import random

    draw = random.Random(0)
    text = [" ".join(draw.choice(words) for _ in range(length + i % spread)) for i in range(lines)]
    (folder / "train.txt").write_text("\n".join(text))
    (folder / "eval.txt").write_text("\n".join(text[-held_out:][::-1]))  # rows unlike the train split's first ones
    return folder


def run_command(name: str, argv: list[str]) -> int:
    """``python -m bertode.<name> <argv>`` in this process: its exit status."""
    import importlib

    main = importlib.import_module(f"bertode.{name}").main
    saved = sys.argv
    sys.argv = [f"bertode.{name}", *argv]
    try:
        main()
        return 0
    except SystemExit as exit_info:
        return exit_info.code
    finally:
        sys.argv = saved


def refused_line(capsys, name: str, *argv: str) -> str:
    """The one stderr line of a refused command (asserted: exit status 2, one line)."""
    capsys.readouterr()
    code = run_command(name, list(argv))
    error = capsys.readouterr().err.strip()
    assert code == 2, (argv, error[-3000:])
    assert error.count("\n") == 0 and error.startswith("error: "), error
    return error


def file_tree(*roots) -> dict:
    """Every file (hidden ones included) under ``roots`` with its bytes; folders as None."""
    return {root: None if not root.exists() else {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
                                                  for p in sorted(root.rglob("*"))} for root in roots}


def pytest_configure(config):
    """The marks transformers' vendored common tests use (tests/transformers_common)."""
    marks = ("flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test", "accelerate_tests", "slow")
    for mark in marks:
        config.addinivalue_line("markers", f"{mark}: transformers' common tests' own mark")
