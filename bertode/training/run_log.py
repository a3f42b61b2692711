"""Where a training run's numbers go: the console (`progress_line`), ``metrics.jsonl`` in
the run directory, optionally TensorBoard (``logger=tensorboard``) or Weights & Biases
(``logger=wandb``), and the model card written beside the final model.

One record per call; every record carries ``step`` and a ``kind`` (``train`` or ``eval``).
Only rank 0 of a distributed run writes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}{key}/", inner, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix.rstrip("/")] = value


LOGGERS = ("jsonl", "tensorboard", "wandb")


def _step(line: str):
    """A record's step, or None for a line that is not a record (a write cut short)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return None


def keep_until(path: Path, step: int) -> int:
    """Drop the records after ``step`` (a resumed run writes them again); return how many.
    The file is rewritten beside itself and renamed, so a kill leaves one of the two."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = [line for line in lines if _step(line) is not None and _step(line) <= step]
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    temporary.replace(path)
    return len(lines) - len(kept)


LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_logger(kind) -> None:
    """The logger is one bertode knows and its package is installed (one line otherwise)."""
    if kind not in LOGGERS:
        raise ValueError(f"logger.kind={kind!r} is invalid; allowed: {', '.join(map(repr, LOGGERS))}")
    package = LOGGER_PACKAGES.get(kind)
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(f"logger.kind={kind!r} is invalid here: the {package!r} package is not installed "
                         f"(pip install {package}); allowed: 'jsonl'"
                         + "".join(f", {k!r}" for k, pkg in LOGGER_PACKAGES.items()
                                   if k != kind and importlib.util.find_spec(pkg) is not None))


class RunLog:
    def __init__(self, run_dir: Path, kind: str = "jsonl", enabled: bool = True, project: str = "bertode", config=None):
        self.enabled = enabled
        self.stream = None
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.stream = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        elif kind == "wandb":
            import wandb

            self.wandb = wandb.init(project=project, dir=str(run_dir), config=config)
        else:
            check_logger(kind)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.stream.write(json.dumps(record, default=float) + "\n")
        self.stream.flush()
        scalars: dict = {}
        for key, value in record.items():
            if key not in ("step", "kind"):
                _flatten(f"{record['kind']}/{key}/", value, scalars)
        if self.tensorboard is not None:
            for key, value in scalars.items():
                if math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


MODEL_CARD = """# A bertode {kind} model

Trained by `python -m bertode.train` ({mode} mode, {step} steps, eval {label} loss {loss:.4f}; the
composed config is in the run directory's `.hydra/`, the numbers in `train_results.json`).

`model_type` is `bertode`: transformers knows it once bertode is imported, which registers
the configuration and models with the Auto classes:

```python
import bertode  # registers model_type "bertode"
from transformers import {auto}, AutoTokenizer
model = {auto}.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```
"""


def write_model_card(folder: Path, causal: bool = False, **facts) -> None:
    """``README.md`` beside a saved model: what it is and how to load it."""
    kind = dict(kind="causal language", label="CLM", auto="AutoModelForCausalLM") if causal else \
        dict(kind="masked-language", label="MLM", auto="AutoModelForMaskedLM")
    (folder / "README.md").write_text(MODEL_CARD.format(**kind, **facts), encoding="utf-8")


def progress_line(record: dict, trainer, elapsed: float) -> str:
    """The console line of a logged training step: loss, lr, throughput, solve cost, ETA."""
    step = record["step"]
    remaining = []
    if trainer.max_steps:
        remaining.append(elapsed / step * (trainer.max_steps - step))
    if trainer.max_time:
        remaining.append(trainer.max_time - elapsed)
    eta = max(0.0, min(remaining)) if remaining else float("nan")
    extra = ""
    if "nfe_forward" in record:
        extra = f" | NFE {record['nfe_forward']}/{record.get('nfe_backward', 0)}"
    elif "forward_iterations" in record:
        extra = f" | iters {record['forward_iterations']} res {record.get('forward_rel_residual', float('nan')):.1e}"
    return (f"step {step}/{trainer.max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"{record['tokens_per_s']:,.0f} tok/s{extra} | ETA {eta / 60:.1f} min")
