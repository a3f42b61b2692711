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
(`solve_overrides.py`): ``-m solver.steps=1,2,4,8,16`` sweeps inference-time compute. Prints one line and writes ``evaluation.json`` (loss, perplexity, accuracy, mean
forward NFE or DEQ iterations per batch, seconds, the overrides) into the Hydra run
directory; `bertode.report` tabulates and plots a sweep.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .. import modeling  # noqa: F401  (registers the Auto classes)
from . import solve_overrides
from .run_config import checkpoint_fields
from .cli import hydra_entry, import_plugins, prechecked, usage_errors
from .checks import check_count, torch_device
from .corpus import check_data, holds_tokenizer, load_tokenizer, prepare
from .sources import check_sources
from .lm import evaluate as evaluate_batches
from .lm import fixed_eval_batches
from .objective import check_objective, get_objective, make_objective, objective_of


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
    fields = checkpoint_fields(cfg, saved)
    solve_overrides.check_parameters(get_objective(name)(None).model_class, folder, saved, fields)
    return folder, saved, name, fields


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
    batches = fixed_eval_batches(rows, objective, cfg.seed, cfg.batch_size, cfg.max_sequences)
    started = time.perf_counter()
    result = evaluate_batches(model, batches, objective, device)
    config = model.config
    result.update(checkpoint=str(folder), split=cfg.split, objective=name, sequences=sum(len(b[0]) for b in batches),
                  seconds=time.perf_counter() - started, overrides=chosen, mode=config.mode, solver=config.solver,
                  steps=config.steps if config.mode == "ode" else None,
                  deq_max_iter=config.deq_max_iter if config.mode == "deq" else None)
    compute = "".join(f", {key} {result[key]:g}" for key in ("nfe_forward", "forward_iterations") if key in result)
    print(f"{folder} [{cfg.split}]: {objective.label} loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
          f"accuracy {result['accuracy']:.3f} over {result['target_tokens']} target tokens{compute}"
          f"{' with ' + str(chosen) if chosen else ''}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "evaluation.json").write_text(json.dumps(result, indent=2))
    return result


main = hydra_entry("evaluate", run, precheck=validate)

if __name__ == "__main__":
    main()
