"""`python -m bertode.evaluate checkpoint=DIR`: language-model loss, perplexity and accuracy
of a saved model on a split: MLM with the masking fixed by ``seed``, or next-token (CLM).

DIR is a model directory with its tokenizer (a training run's ``final/``, or any
`save_pretrained` output of a bertode model). The objective is the one saved in its config
(``BertODEConfig.objective``: a registered objective, a plugin's too with
``plugins=[module]``); ``objective=`` may name another with the same attention (``mlm``
for a span-masking model), and is refused in one line otherwise. The data group chooses
the text (``data=text data.files=[...] data.eval_files=[...]``); ``split=eval`` (default)
or ``train``. The groups ``solver``, ``sensitivity``, ``vector_field``, ``block`` and
``deq`` choose the trained model's solve again, spelled as for `bertode.train`
(`solve_overrides.py`): ``-m solver.steps=1,2,4,8,16`` sweeps inference-time compute; ``model.mem_len=N``
sets a causal LM's segment memory (`segments.py`: the rows are then read in text order, the memory carried). Prints one line
and writes ``evaluation.json`` (loss; perplexity, per word with a word vocabulary (``perplexity_per``:
`words.py`), else per token; accuracy, mean forward NFE or DEQ iterations per batch, seconds, the
overrides) into the Hydra run directory; `bertode.report` tabulates and plots a sweep.

``curve=true`` (a DEQ, or a weight-tied looped core) reads the whole quality-versus-depth
curve from one evaluation: after each iteration n = 1..max of the iterated depth (a DEQ's
forward solve: the best iterate so far; a looped core: the state after n applications)
the encoder hands its output to `dialed(on_iterate=...)`, and `DepthCurve` scores it
through the head (``model.readout``) with the main loss's reduction (the cross-entropy
summed over every batch, over the targets counted over every batch). The result adds
``curve: [{depth, loss, perplexity, accuracy}, ...]`` for n = 1..max (max: the dialled
depth, else ``deq_max_iter`` or the core's applications). A solve that stopped early at n0
(converged) is scored at n0 for every later depth: what a separate evaluation with that
budget gives. An untied ODE model has no iterated depth: ``curve=true`` is refused, and
``-m solver.steps=1,2,4,8`` sweeps it instead.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .. import modeling  # noqa: F401  (registers the Auto classes)
from ..solve.dial import current_dial, dialed
from ..solve.exits import EXIT_CRITERIA
from . import solve_overrides
from .run_config import checkpoint_fields
from .cli import hydra_entry, import_plugins, prechecked, usage_errors
from .checks import check_count, torch_device
from .corpus import check_data, holds_tokenizer, load_tokenizer, prepare
from .sources import check_sources
from .words import perplexity_unit
from .lm import evaluate as evaluate_batches
from .lm import fixed_eval_batches, masked_ce_sum
from .segments import ordered_eval_batches
from .objective import check_objective, get_objective, make_objective, objective_of
from .depth import inference_dial, inference_dialed


def checkpoint_objective(cfg: DictConfig, folder: Path, saved: dict) -> str:
    """The objective to evaluate: the checkpoint's own (saved in its config), or
    ``cfg.objective`` where it uses the same attention; one line otherwise."""
    own = objective_of(saved)
    if cfg.get("objective") is None:
        return check_objective(own)
    chosen = get_objective(cfg.objective)
    if chosen.causal != get_objective(own).causal:
        attention = "causal" if chosen.causal else "bidirectional"
        raise ValueError(f"objective={cfg.objective!r} is invalid for checkpoint={str(folder)!r}: it was trained with "
                         f"objective={own!r} and {attention} attention would ask another model; allowed: "
                         f"objective={own} or null (train a {attention} one with bertode.train objective={cfg.objective})")
    return chosen.registry_name


def read_checkpoint(cfg: DictConfig) -> tuple[Path, dict]:
    """``cfg.checkpoint``: a bertode model's directory with its tokenizer, and its config.json
    (also `bertode.generate`'s); one line otherwise."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ValueError("checkpoint is missing; allowed: checkpoint=DIR, a directory written by save_pretrained")
    folder = Path(str(cfg.checkpoint))
    if not (folder / "config.json").is_file():
        raise ValueError(f"checkpoint={str(folder)!r} is invalid; allowed: a directory written by save_pretrained "
                         "(e.g. a run's final/)")
    try:
        saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"checkpoint={str(folder)!r} is invalid: its config.json is not JSON ({error}); allowed: a "
                         "directory written by save_pretrained") from None
    if not isinstance(saved, dict) or saved.get("model_type") != "bertode":
        kind = saved.get("model_type") if isinstance(saved, dict) else None
        raise ValueError(f"checkpoint={str(folder)!r} is invalid: its model_type is {kind!r}; allowed: a bertode "
                         "model's directory ('bertode'; convert others with bertode.from_bert)")
    if not holds_tokenizer(folder):
        raise ValueError(f"checkpoint={str(folder)!r} is invalid: it holds no tokenizer; allowed: a directory with "
                         "the model and its tokenizer (a bertode.train run's final/)")
    check_weights_header(folder)
    return folder, saved


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_weights_header(folder: Path) -> None:
    """A ``model.safetensors`` whose header does not parse (a garbage or truncated file) is
    refused in one line, before anything is written (its tensors are read at load)."""
    path = folder / "model.safetensors"
    if not path.is_file():
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except Exception as error:  # SafetensorError (not an OSError), or an OSError reading it
        raise ValueError(f"checkpoint={str(folder)!r} is invalid: its model.safetensors is damaged "
                         f"({str(error).splitlines()[0]}); allowed: a directory written by save_pretrained") from None


def check_weights(folder: Path) -> None:
    """The checkpoint holds weights, and a ``model.safetensors`` among them parses."""
    if not any((folder / name).is_file() for name in WEIGHTS):
        raise ValueError(f"checkpoint={str(folder)!r} is invalid: it holds no weights ({WEIGHTS[0]}); allowed: a "
                         "directory written by save_pretrained")
    check_weights_header(folder)


def check_positions(seq_len: int, saved: dict, key: str = "data.seq_len") -> None:
    """``seq_len`` must fit the checkpoint's position embeddings (RoBERTa's numbering after
    the padding index leaves ``pad_token_id + 1`` fewer)."""
    positions = int(saved.get("max_position_embeddings", 512))
    if saved.get("position_scheme") == "after_padding":
        positions -= (saved.get("pad_token_id") or 0) + 1
    if seq_len > positions:
        raise ValueError(f"{key}={seq_len} is invalid: the checkpoint's model has {positions} positions; allowed: "
                         f"<= {positions}")


def validate(cfg: DictConfig) -> tuple[Path, dict, str, dict]:
    """The checks that need no data (also run before Hydra creates the run directory):
    the checkpoint's folder, its config, the objective to evaluate and the fields the
    command line changes (`run_config.checkpoint_fields`)."""
    import_plugins(cfg.get("plugins"))
    folder, saved = read_checkpoint(cfg)
    if cfg.split not in ("eval", "train"):
        raise ValueError(f"split={cfg.split!r} is invalid; allowed: 'eval', 'train'")
    if cfg.split == "train" and cfg.data.get("streaming"):
        raise ValueError("split='train' is invalid with data.streaming=true (a stream has no fixed train rows); "
                         "allowed: split=eval, or data.streaming=false")
    check_count("batch_size", cfg.batch_size, 1)
    check_count("seed", cfg.seed, 0)
    check_count("max_sequences", cfg.max_sequences, 1, nullable=True)
    torch_device(cfg.device)
    check_data(cfg.data, trains_tokenizer=False)  # the checkpoint brings its tokenizer
    check_positions(cfg.data.seq_len, saved)
    check_sources(cfg.data)
    check_weights(folder)
    name = checkpoint_objective(cfg, folder, saved)
    memory = (cfg.get("model") or {}).get("mem_len")
    fields = checkpoint_fields(cfg, saved, {"mem_len": (memory, "model.mem_len")} if memory is not None else None)
    solve_overrides.check_parameters(get_objective(name)(None).model_class, folder, saved, fields)
    inference_dial(cfg, {**saved, **fields}, "evaluate")  # depth.steps=N and exit=: checked against the model
    check_curve(cfg, folder, {**saved, **fields})
    return folder, saved, name, fields


def check_curve(cfg: DictConfig, folder: Path, fields: dict) -> None:
    """``curve=true`` needs an iterated depth (a DEQ, or ``weight_tying``); one line otherwise."""
    curve = cfg.get("curve", False)
    if not isinstance(curve, bool):
        raise ValueError(f"curve={curve!r} is invalid; allowed: true, false")
    mode = fields.get("mode", "ode")
    if not curve or mode == "deq" or fields.get("weight_tying"):
        return
    if mode == "ode":
        raise ValueError(f"curve=true is invalid for checkpoint={str(folder)!r}: the model's mode='ode' with untied "
                         "layers has no iterated depth to score per iterate; allowed: curve=false, and sweep the "
                         "solve instead with -m solver.steps=1,2,4,8")
    raise ValueError(f"curve=true is invalid for checkpoint={str(folder)!r}: the model's mode={mode!r} with untied "
                     "layers has a fixed depth; allowed: curve=false (a curve needs mode='deq' or weight_tying=true)")


def configured_depth(config) -> int:
    """The iterated depth a forward runs when nothing is dialled: a DEQ's ``deq_max_iter``, a
    looped core's applications (``num_hidden_layers`` less prelude and coda)."""
    if config.mode == "deq":
        return int(config.deq_max_iter)
    return int(config.num_hidden_layers) - int(getattr(config, "prelude_layers", 0) or 0) \
        - int(getattr(config, "coda_layers", 0) or 0)


class DepthCurve:
    """The loss at every depth n = 1..max from one pass over the batches.

    ``on_iterate(n, hidden)`` (registered with `dialed`) scores ``model.readout(hidden)``
    against the labels of the batch being evaluated; `batches` wraps the evaluation's batches
    so that it knows them (and closes each batch after its forward: depths past the last
    iterate reported, a converged solve's, repeat its value). `result` reduces as the main
    loss: the summed cross-entropy over the summed target count."""

    def __init__(self, model, objective, device):
        self.model, self.objective, self.device = model, objective, device
        self.depth = 0  # the deepest n asked for: the dialled depth or the configured one
        self.sums: dict[int, list] = {}  # n -> [cross-entropy sum, correct] over the closed batches
        self.count = 0
        self.labels, self.batch = None, {}

    @torch.no_grad()
    def on_iterate(self, n: int, hidden: torch.Tensor) -> None:
        self.depth = max(self.depth, current_dial().steps(configured_depth(self.model.config)), int(n))
        logits = self.model.readout(hidden)
        loss, right = masked_ce_sum(*self.objective.aligned(logits, self.labels))
        self.batch[int(n)] = (loss.item(), int(right))

    def batches(self, batches: list) -> "_Feed":
        return _Feed(self, batches)

    def close(self, labels) -> None:
        if not self.batch:
            raise RuntimeError("curve=true: the model's encoder reported no iterates (it does not call "
                               "current_dial().on_iterate); allowed: curve=false")
        value = None
        for n in range(1, max(self.depth, max(self.batch)) + 1):
            value = self.batch.get(n, value)
            if value is None:  # the first iterate reported is n > 1: nothing to score below it
                continue
            total = self.sums.setdefault(n, [0.0, 0])
            total[0] += value[0]
            total[1] += value[1]
        self.count += self.objective.targets(labels)
        self.labels, self.batch = None, {}

    def result(self) -> list[dict]:
        count = max(self.count, 1)
        return [{"depth": n, "loss": total / count, "perplexity": math.exp(min(total / count, 50.0)),
                 "accuracy": correct / count} for n, (total, correct) in sorted(self.sums.items())]


class _Feed:
    """The batches, as `lm.evaluate` iterates them, telling a `DepthCurve` which labels the
    next forward scores (and closing each batch once its forward is done)."""

    def __init__(self, curve: DepthCurve, batches: list):
        self.curve, self.items = curve, batches

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        for inputs, labels in self.items:
            self.curve.labels, self.curve.batch = labels.to(self.curve.device), {}
            yield inputs, labels
            self.curve.close(labels)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    with usage_errors():
        folder, saved, name, chosen = prechecked(cfg, validate)
        tokenizer = load_tokenizer(folder)
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:  # e.g. a converted GPT-2's
            raise ValueError(f"checkpoint={str(folder)!r} is invalid for bertode.evaluate: its tokenizer has no "
                             "[CLS]/[SEP] tokens, which every packed row starts and ends with; allowed: a checkpoint "
                             "with a BERT-style tokenizer (a bertode.train run's final/)")
        corpus = prepare(cfg.data, tokenizer=tokenizer)
    device = torch_device(cfg.device)
    objective = make_objective(name, tokenizer, cfg.data.mlm_probability)
    with usage_errors():
        model = solve_overrides.load(objective.model_class, folder, chosen).to(device)
    rows = corpus.eval if cfg.split == "eval" else corpus.train
    with usage_errors():  # with a segment memory: the rows in text order, the memory carried (`segments.py`)
        batches = (ordered_eval_batches if model.config.mem_len else fixed_eval_batches)(
            rows, objective, cfg.seed, cfg.batch_size, cfg.max_sequences)
    depth, criterion = inference_dial(cfg, {**saved, **chosen}, "evaluate")
    started = time.perf_counter()
    with inference_dialed(depth, criterion):  # every forward at depth.steps (null: the model's own), exit=
        if cfg.get("curve"):
            curve = DepthCurve(model, objective, device)
            with dialed(on_iterate=curve.on_iterate):
                result = evaluate_batches(model, curve.batches(batches), objective, device)
            result["curve"] = curve.result()
        else:
            result = evaluate_batches(model, batches, objective, device)
    config = model.config
    unit = perplexity_unit(tokenizer)  # a target is a word with a word vocabulary (`words.py`), else a token
    result.update(perplexity_per=unit, checkpoint=str(folder), split=cfg.split, objective=name,
                  sequences=sum(len(b[0]) for b in batches),
                  seconds=time.perf_counter() - started, overrides=chosen, mode=config.mode, solver=config.solver,
                  steps=config.steps if config.mode == "ode" else None,
                  deq_max_iter=config.deq_max_iter if config.mode == "deq" else None)
    result.update(depth=depth, exit=getattr(criterion, "registry_name", EXIT_CRITERIA.default),
                  exit_threshold=getattr(criterion, "threshold", None))
    compute = "".join(f", {key} {result[key]:g}" for key in ("nfe_forward", "forward_iterations") if key in result)
    print(f"{folder} [{cfg.split}]: {objective.label} loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
          f"per {unit}, accuracy {result['accuracy']:.3f} over {result['target_tokens']} target {unit}s{compute}"
          f"{' with ' + str(chosen) if chosen else ''}", flush=True)
    for point in result.get("curve", ()):
        print(f"  depth {point['depth']}: loss {point['loss']:.4f}, perplexity {point['perplexity']:.2f}, "
              f"accuracy {point['accuracy']:.3f}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "evaluation.json").write_text(json.dumps(result, indent=2))
    return result


main = hydra_entry("evaluate", run, precheck=validate)

if __name__ == "__main__":
    main()
