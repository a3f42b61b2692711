"""`python -m bertode.finetune`: sentence(-pair) classification and regression with
`transformers.Trainer` (no second training loop), Hydra-configured like `bertode.train`.

    python -m bertode.finetune                                    # shipped sentiment task, model from scratch
    python -m bertode.finetune checkpoint=outputs/.../final            # a bertode.train model
    python -m bertode.finetune checkpoint=/path/to/roberta solver=rk4 solver.steps=2   # converted on the fly
    python -m bertode.finetune model=deq deq.max_iter=12                   # bertode.train's groups, same spellings
    python -m bertode.finetune eval_solve.solver=rk4 eval_solve.steps=4   # another solve at evaluation only
    python -m bertode.finetune task.source=files task.train_file=a.csv task.eval_file=b.csv task.text_column=text

The groups ``model`` (the mode), ``solver``, ``sensitivity``, ``vector_field``, ``block``,
``deq`` and ``regularizer`` are `bertode.train`'s, with null values meaning the
checkpoint's (`run_config`). A causal language model (``objective=clm``) is refused: its
[CLS] would see only itself. Every input is checked before Hydra writes anything (one
line, exit 2). The run
directory receives ``metrics.jsonl`` (Trainer's logs with ``solver/`` statistics),
``final/`` (model and tokenizer) and ``results.json``: the eval metrics of ``final/``
reloaded with ``eval_solve``, its forward NFE, and the majority-class baseline.

``depth=`` draws the depth of each optimizer step as in `bertode.train` (the step logged as
``step: s`` runs at ``draw(seed, s)``; its records carry ``depth``); the evaluation of
``final/`` runs at the model's own depth.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback

from ..callbacks import SolverStatsCallback
from ..configuration import BertODEConfig
from ..families import FAMILIES
from ..heads import BertODEForSequenceClassification, BertODEForTokenClassification
from .checks import check_count, resolve_device
from . import solve_overrides
from .run_config import check_changes, checkpoint_fields, group_fields, rename
from .cli import hydra_entry, import_plugins, prechecked, usage_errors
from .corpus import SPECIAL_TOKENS, holds_tokenizer
from .depth import DepthSetting, check_for_model, depth_setting
from .tasks import load_task, metrics
from .wordpiece import train_tokenizer



def _set(section: DictConfig) -> dict:
    return {key: value for key, value in OmegaConf.to_container(section).items() if value is not None}


def _mode_choice(cfg: DictConfig) -> dict:
    """``model=deq`` (and ``model.*`` keys), as `checkpoint_fields`' extra fields."""
    node = cfg.get("model") or {}
    return {key: (value, "model" if key == "mode" else f"model.{key}") for key, value in node.items() if value is not None}


def _check_model(path, max_length: int) -> dict:
    """The checkpoint's config fields (a BERT family's as converted); one line for a
    directory that is neither, holds no tokenizer, is a causal LM, cannot be converted or is too short."""
    folder = Path(str(path))
    where = f"checkpoint={str(folder)!r} is invalid"
    if not (folder / "config.json").is_file():
        raise ValueError(f"{where}; allowed: null, a bertode directory (a run's final/) or a BERT-family directory "
                         "written by save_pretrained")
    try:
        saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        model_type = saved.get("model_type")
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise ValueError(f"{where}: its config.json is not a JSON object") from None
    encoders = [name for name, family in FAMILIES.items() if "ForSequenceClassification" in family.heads]  # not GPT-2
    if model_type != "bertode" and model_type not in encoders:
        raise ValueError(f"{where}: model_type={model_type!r} is not supported; allowed: 'bertode', "
                         f"{', '.join(map(repr, encoders))} (encoders with a classification head)")
    if not holds_tokenizer(folder):
        raise ValueError(f"{where}: it holds no tokenizer; allowed: a directory with its tokenizer")
    if model_type == "bertode":
        fields = saved
    else:
        from transformers import AutoConfig

        try:
            fields = FAMILIES[model_type].config(AutoConfig.from_pretrained(folder))
        except ValueError as error:  # e.g. relative positions, ALBERT layer groups
            raise ValueError(f"{where}: {str(error).removeprefix('from_bert: ')}") from None
    positions = fields.get("max_position_embeddings", 512)
    if fields.get("position_scheme") == "after_padding" or model_type in ("roberta", "xlm-roberta", "camembert"):
        positions -= (fields.get("pad_token_id") or 0) + 1  # RoBERTa numbers positions after padding_idx
    if max_length > positions:
        raise ValueError(f"task.max_length={max_length} is invalid with {str(folder)!r}; allowed: <= {positions} "
                         "(its position embeddings)")
    if fields.get("is_decoder"):
        raise ValueError(f"{where}: it is a causal language model (objective={fields.get('objective')!r}, causal "
                         "attention), whose [CLS] sees only itself, so a classifier on it ignores the sentence; allowed: "
                         "a bidirectional checkpoint (bertode.train objective=mlm, a BERT-family encoder)")
    return fields


def _scratch_config(cfg: DictConfig, vocab_size: int, pad_token_id: int = 0, **labels) -> BertODEConfig:
    """The from-scratch model's config: ``scratch.*``, then the groups; one line naming the key."""
    fields, origin = group_fields(cfg)
    for field, (value, key) in _mode_choice(cfg).items():
        fields[field], origin[field] = value, key
    scratch = OmegaConf.to_container(cfg.scratch)
    origin.update({key: f"scratch.{key}" for key in scratch})
    try:
        config = BertODEConfig(**scratch | {"vocab_size": vocab_size}, pad_token_id=pad_token_id, **labels, **fields)
        config.validate_ode()  # the pairings too (construction checks each field alone), before anything is written
        return config
    except ValueError as error:
        raise ValueError(rename(str(error), origin)) from None


def validate(cfg: DictConfig):
    """Every check, before anything is written; returns the loaded `Task`."""
    import_plugins(cfg.get("plugins"))
    check_count("seed", cfg.seed, 0)
    trainer = cfg.trainer
    check_count("trainer.epochs", trainer.epochs, 1)
    check_count("trainer.batch_size", trainer.batch_size, 1)
    check_count("trainer.num_threads", trainer.num_threads, 1, nullable=True)
    for key, low, high in (("lr", 0.0, None), ("weight_decay", 0.0, None), ("warmup_ratio", 0.0, 1.0)):
        value = trainer[key]
        if key == "lr" and value is None:
            continue  # the default for the model: from scratch or pretrained
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low \
                or (key == "lr" and value == 0) or (high is not None and value >= high):
            span = "a number > 0" if key == "lr" else f"a number in [{low}, {high})" if high else f"a number >= {low}"
            raise ValueError(f"trainer.{key}={value!r} is invalid; allowed: {span}")
    resolve_device(trainer.device)
    check_count("task.max_length", cfg.task.max_length, 8)
    if cfg.checkpoint is not None:
        saved = _check_model(cfg.checkpoint, cfg.task.max_length)
        fields = checkpoint_fields(cfg, saved, _mode_choice(cfg))
    else:
        check_count("scratch.vocab_size", cfg.scratch.vocab_size, len(SPECIAL_TOKENS) + 1)
        check_count("scratch.max_position_embeddings", cfg.scratch.max_position_embeddings, 8)
        if cfg.task.max_length > cfg.scratch.max_position_embeddings:
            raise ValueError(f"task.max_length={cfg.task.max_length} is invalid; allowed: <= "
                             f"scratch.max_position_embeddings={cfg.scratch.max_position_embeddings}")
        config = _scratch_config(cfg, cfg.scratch.vocab_size)
        saved, fields = config.to_dict(), {}
    check_for_model(depth_setting(cfg.get("depth")), {**saved, **fields})
    eval_solve = _set(cfg.eval_solve)
    check_changes({**saved, **fields}, eval_solve, {field: f"eval_solve.{field}" for field in eval_solve})
    return load_task(cfg.task)


def _learning_rate(cfg: DictConfig) -> float:
    """``trainer.lr``, or by default 2e-3 for a model from scratch and 5e-5 (BERT's
    fine-tuning rate) for a pretrained checkpoint."""
    if cfg.trainer.lr is not None:
        return float(cfg.trainer.lr)
    return 2e-3 if cfg.checkpoint is None else 5e-5


def _head(task):
    return BertODEForTokenClassification if task.problem == "token_classification" else BertODEForSequenceClassification


def _model_and_tokenizer(cfg: DictConfig, task):
    from transformers import AutoTokenizer

    labels = {"num_labels": 1, "problem_type": "regression"} if task.classes is None else {
        "num_labels": len(task.classes), "problem_type": "single_label_classification",
        "id2label": {i: str(c) for i, c in enumerate(task.classes)}, "label2id": {str(c): i for i, c in enumerate(task.classes)}}
    if cfg.checkpoint is None:
        lines = [" ".join(text) if isinstance(text, list) else text for row in task.train for text in row[:2] if text]
        tokenizer = train_tokenizer(lines, cfg.scratch.vocab_size, SPECIAL_TOKENS)
        config = _scratch_config(cfg, len(tokenizer), tokenizer.pad_token_id, **labels)
        return _head(task)(config), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.checkpoint))
    fields = checkpoint_fields(cfg, _check_model(cfg.checkpoint, cfg.task.max_length), _mode_choice(cfg))
    return _head(task).from_pretrained(str(cfg.checkpoint), **labels, **fields), tokenizer


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows, tokenizer, task, max_length: int):
        texts, pairs = [r[0] for r in rows], [r[1] for r in rows]
        tokens = task.problem == "token_classification"
        self.encoded = tokenizer(texts, pairs if pairs[0] is not None else None, truncation=True, max_length=max_length,
                                 is_split_into_words=tokens)
        self.labels = [task.label_id(r[2]) for r in rows]
        if tokens:  # a word's tag on its first piece; -100 (ignored) on the rest and on special tokens
            self.labels = [[tags[word] if word is not None and word != previous else -100
                            for word, previous in zip(self.encoded.word_ids(i), [None] + self.encoded.word_ids(i)[:-1])]
                           for i, tags in enumerate(self.labels)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {**{k: v[index] for k, v in self.encoded.items()}, "labels": self.labels[index]}


class _DialledTrainer(Trainer):
    """`transformers.Trainer` whose every optimizer step runs at the depth drawn for it
    (`depth.DepthSetting`): each micro-batch's forward and backward inside its dial."""

    def __init__(self, *args, depth: DepthSetting, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.depth, self.depth_seed = depth, seed

    def training_step(self, model, inputs, num_items_in_batch=None):
        drawn = self.depth.draw(self.depth_seed, self.state.global_step + 1)  # the step logged as global_step + 1
        with self.depth.dial(drawn):
            return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:  # a training record: the depth of the step logged (null: the model's own)
            logs = {**logs, "depth": self.depth.draw(self.depth_seed, self.state.global_step)}
        return super().log(logs, *args, **kwargs)


class _JsonlLog(TrainerCallback):
    """Trainer's logs (with the solver statistics) appended to ``metrics.jsonl`` and printed
    as one line of numbers (Trainer's own printer, which quotes them, is removed)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            with open(self.path, "a", encoding="utf-8") as stream:
                stream.write(json.dumps({"step": state.global_step, **logs}, default=float) + "\n")
            numbers = ", ".join(f"{key} {value:.4g}" for key, value in logs.items()
                                if isinstance(value, (int, float)) and not isinstance(value, bool))
            print(f"step {state.global_step}: {numbers}", flush=True)


@torch.no_grad()
def _predict(model, dataset, collator, batch_size: int, device) -> tuple[list, float]:
    model.eval().to(device)
    predictions, nfe = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        if logits.dim() == 3:  # token classification: the tagged pieces, flattened
            predictions += logits.argmax(-1).cpu()[labels != -100].tolist()
        else:
            predictions += (logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)).tolist()
        nfe.append(model.solver_stats().get("nfe_forward", 0))
    return predictions, sum(nfe) / max(len(nfe), 1)


def _readable(folder: Path) -> None:
    """Files as the user's umask would make them (Trainer writes the weights through a private
    temporary file, mode 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    with usage_errors():
        task = prechecked(cfg, validate)
    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    torch.manual_seed(cfg.seed)
    model, tokenizer = _model_and_tokenizer(cfg, task)
    train = _Rows(task.train, tokenizer, task, cfg.task.max_length)
    evaluation = _Rows(task.eval, tokenizer, task, cfg.task.max_length)
    tokens = task.problem == "token_classification"
    collator = DataCollatorForTokenClassification(tokenizer) if tokens else DataCollatorWithPadding(tokenizer)
    device = resolve_device(cfg.trainer.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    args = TrainingArguments(output_dir=str(run_dir / "trainer"), num_train_epochs=cfg.trainer.epochs,
                             per_device_train_batch_size=cfg.trainer.batch_size, learning_rate=_learning_rate(cfg),
                             weight_decay=cfg.trainer.weight_decay, warmup_steps=float(cfg.trainer.warmup_ratio), seed=cfg.seed,
                             use_cpu=device == "cpu", save_strategy="no", report_to=[], logging_steps=10,
                             disable_tqdm=True)
    trainer = _DialledTrainer(model=model, args=args, train_dataset=train, data_collator=collator,
                              callbacks=[SolverStatsCallback(), _JsonlLog(run_dir / "metrics.jsonl")],
                              depth=depth_setting(cfg.get("depth")), seed=cfg.seed)
    trainer.remove_callback(PrinterCallback)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"bertode.finetune: {model.config.mode} model, {parameters / 1e6:.2f} M parameters, {task.name}: "
          f"{len(train)} train rows, {len(evaluation)} eval rows, {cfg.trainer.epochs} epochs on {device}, run dir "
          f"{run_dir}", flush=True)
    trainer.train()
    final = run_dir / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(final)
    _readable(final)

    eval_solve = _set(cfg.eval_solve)
    evaluated = _head(task).from_pretrained(final, **eval_solve)
    predictions, nfe = _predict(evaluated, evaluation, collator, cfg.trainer.batch_size, torch.device(device))
    truth, seen = evaluation.labels, train.labels
    if tokens:
        truth = [tag for tags in truth for tag in tags if tag != -100]
        seen = [tag for tags in seen for tag in tags if tag != -100]
    result = metrics("regression" if task.classes is None else "classification", predictions, truth,
                     len(task.classes) if task.classes is not None else None)
    if task.classes is not None:
        majority = Counter(seen).most_common(1)[0][0]
        result["majority_baseline"] = sum(label == majority for label in truth) / len(truth)
    result.update(task=task.name, eval_rows=len(evaluation), nfe_forward=nfe, solver=evaluated.config.solver,
                  steps=evaluated.config.steps, mode=evaluated.config.mode, eval_solve=eval_solve)
    (run_dir / "results.json").write_text(json.dumps(result, indent=2, default=float))
    (run_dir / "metrics.jsonl").open("a", encoding="utf-8").write(json.dumps({"kind": "eval", **result}, default=float) + "\n")
    scores = ", ".join(f"{k} {result[k]:.3f}" for k in ("accuracy", "f1", "matthews", "pearson", "spearman",
                                                        "majority_baseline") if k in result)
    print(f"bertode.finetune {task.name}: {scores} | forward NFE {nfe:g} ({result['mode']}, solver "
          f"{result['solver']}, steps {result['steps']}) | final model: {final}", flush=True)
    return result


main = hydra_entry("finetune", run, precheck=validate)
