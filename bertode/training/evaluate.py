"""`python -m bertode.evaluate checkpoint=DIR`: language-model loss, perplexity and accuracy
of a saved model on a split: MLM with the masking fixed by ``seed``, or next-token (CLM).

DIR is a model directory with its tokenizer (a training run's ``final/``, or any
`save_pretrained` output of a bertode model). ``objective`` (null: the checkpoint's own:
``clm`` for a `BertODEForCausalLM`, else ``mlm``) is refused in one line where the
checkpoint's head cannot do it (``clm`` on a bidirectional masked LM). The data group chooses the
text (``data=text data.files=[...] data.eval_files=[...]``); ``split=eval`` (default) or
``train``. ``solver.*`` and ``deq.*`` choose the trained model's solve again for this
evaluation (`solve_overrides.py`): ``-m solver.steps=1,2,4,8,16`` sweeps inference-time
compute. Prints one line and writes ``evaluation.json`` (loss, perplexity, accuracy, mean
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
from .cli import hydra_entry, import_plugins, usage_errors
from .checks import check_count, torch_device
from .corpus import check_data, holds_tokenizer, load_tokenizer, prepare
from .sources import check_sources
from .lm import evaluate as evaluate_batches
from .lm import fixed_eval_batches
from .objective import Objective, check_objective


def checkpoint_objective(cfg: DictConfig, folder: Path, saved: dict) -> str:
    """The objective to evaluate: ``cfg.objective``, or the checkpoint's; one line where its head cannot."""
    causal = "BertODEForCausalLM" in (saved.get("architectures") or [])
    own = "clm" if causal else "mlm"
    if cfg.get("objective") is None:
        return own
    if check_objective(cfg.objective) != own:
        head = "a causal LM (BertODEForCausalLM)" if causal else "a bidirectional masked LM, an MLM-only head"
        raise ValueError(f"objective={cfg.objective!r} is invalid for checkpoint={str(folder)!r}: it is {head}; "
                         f"allowed: objective={own}" + ("" if causal else " (train a causal one with objective=clm)"))
    return own


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
    return folder, saved


def validate(cfg: DictConfig) -> tuple[Path, str]:
    """The checks that need no data (also run before Hydra creates the run directory):
    the checkpoint's folder and the objective to evaluate."""
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
    check_sources(cfg.data)
    solve_overrides.check(cfg, saved.get("mode", "ode"))
    return folder, checkpoint_objective(cfg, folder, saved)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    with usage_errors():
        folder, name = validate(cfg)
        tokenizer = load_tokenizer(folder)
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:  # e.g. a converted GPT-2's
            raise ValueError(f"checkpoint={str(folder)!r} is invalid for bertode.evaluate: its tokenizer has no "
                             "[CLS]/[SEP] tokens, which every packed row starts and ends with; allowed: a checkpoint "
                             "with a BERT-style tokenizer (a bertode.train run's final/)")
        corpus = prepare(cfg.data, tokenizer=tokenizer)
    device = torch_device(cfg.device)
    chosen = solve_overrides.overrides(cfg)
    auto = AutoModelForCausalLM if name == "clm" else AutoModelForMaskedLM
    model = auto.from_pretrained(folder, **chosen).to(device)
    rows = corpus.eval if cfg.split == "eval" else corpus.train
    objective = Objective(name, tokenizer, cfg.data.mlm_probability)
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
