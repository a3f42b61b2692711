"""Labelled data for `bertode.finetune` (the ``task`` group), read and checked before
anything is written.

``task.source``:

* ``sentiment`` (default): the shipped Sentiment Labelled Sentences (Kotzias et al., KDD
  2015; CC BY 4.0; `bertode/task_data/README.md`): train on Amazon, evaluate on Yelp.
* ``files``: local ``train_file`` and ``eval_file`` (``.csv``, ``.tsv``, ``.json`` as a
  list of objects, ``.jsonl``) with named ``text_column`` (and ``text_pair_column``)
  and ``label_column``.
* ``glue``: a GLUE task by ``name`` through `datasets` (where the hub is reachable).

``task.problem`` is ``classification`` (labels are the train split's distinct values,
ints or strings; an eval label outside them is an error), ``regression`` (numbers) or
``token_classification`` (a row's text is a list of words, or a string split on
spaces, and its label a list of tags of the same length).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

TASK_DATA = Path(__file__).resolve().parents[1] / "task_data"
SOURCES = ("sentiment", "files", "glue")
PROBLEMS = ("classification", "regression", "token_classification")
# GLUE task -> (text column, pair column, eval split, problem)
GLUE = {"cola": ("sentence", None, "validation", "classification"),
        "sst2": ("sentence", None, "validation", "classification"),
        "mrpc": ("sentence1", "sentence2", "validation", "classification"),
        "qqp": ("question1", "question2", "validation", "classification"),
        "stsb": ("sentence1", "sentence2", "validation", "regression"),
        "mnli": ("premise", "hypothesis", "validation_matched", "classification"),
        "qnli": ("question", "sentence", "validation", "classification"),
        "rte": ("sentence1", "sentence2", "validation", "classification"),
        "wnli": ("sentence1", "sentence2", "validation", "classification")}


class TaskError(ValueError):
    """Bad task input: one line naming the field, the value and what is allowed."""


@dataclass
class Task:
    name: str
    problem: str
    train: list[tuple]  # (text, text_pair or None, label); token classification: (words, None, tags)
    eval: list[tuple]
    classes: list | None  # the label values, in label-id order (classification)

    def label_id(self, value):
        if self.problem == "token_classification":
            return [self.classes.index(tag) for tag in value]
        return self.classes.index(value) if self.classes is not None else float(value)


def _sentiment(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            text, label = line.rsplit("\t", 1)
            rows.append({"sentence": text.strip(), "label": int(label)})
    return rows


def _read_file(key: str, path) -> list[dict]:
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise TaskError(f"task.{key}={str(path)!r} is invalid; allowed: an existing .csv, .tsv, .json or .jsonl file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix in (".csv", ".tsv"):
            rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif suffix == ".json":
            rows = json.loads(text)
        else:
            raise TaskError(f"task.{key}={str(path)!r} is invalid; allowed: a .csv, .tsv, .json or .jsonl file")
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
        raise TaskError(f"task.{key}={str(path)!r} could not be read: {type(error).__name__}: "
                        f"{str(error).splitlines()[0]}") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(row, dict) for row in rows):
        raise TaskError(f"task.{key}={str(path)!r} is invalid: no rows; allowed: a table with a header, or JSON objects")
    return rows


def _glue(cfg) -> tuple[list[dict], list[dict], str | None, str]:
    if cfg.name not in GLUE:
        raise TaskError(f"task.name={cfg.name!r} is invalid with task.source='glue'; allowed: "
                        f"{', '.join(map(repr, GLUE))}")
    text, pair, split, problem = GLUE[cfg.name]
    try:
        import datasets

        data = datasets.load_dataset("glue", cfg.name)
    except Exception as error:  # the hub is often unreachable: say which dataset
        raise TaskError(f"task.name={cfg.name!r} (GLUE through datasets) could not be loaded: "
                        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    return list(data["train"]), list(data[split]), (text, pair), problem


def _column(key: str, column, rows: list[dict], where: str) -> None:
    if column not in rows[0]:
        raise TaskError(f"task.{key}={column!r} is invalid: {where} has no such column; allowed: "
                        f"{', '.join(map(repr, rows[0].keys()))}")


def load_task(cfg) -> Task:
    """The task's train and eval rows and its label set; TaskError for bad input."""
    if cfg.source not in SOURCES:
        raise TaskError(f"task.source={cfg.source!r} is invalid; allowed: {', '.join(map(repr, SOURCES))}")
    if cfg.problem not in PROBLEMS:
        raise TaskError(f"task.problem={cfg.problem!r} is invalid; allowed: {', '.join(map(repr, PROBLEMS))}")
    text, pair, problem = cfg.text_column, cfg.text_pair_column, cfg.problem
    if cfg.source == "sentiment":
        train, evaluation = _sentiment(TASK_DATA / "amazon_cells_labelled.txt"), _sentiment(TASK_DATA / "yelp_labelled.txt")
        name, text, pair = "sentiment (Amazon -> Yelp)", "sentence", None
    elif cfg.source == "files":
        if not cfg.train_file or not cfg.eval_file:
            raise TaskError(f"task.train_file={cfg.train_file!r}, task.eval_file={cfg.eval_file!r} are invalid with "
                            "task.source='files'; allowed: two existing .csv, .tsv, .json or .jsonl files")
        train, evaluation = _read_file("train_file", cfg.train_file), _read_file("eval_file", cfg.eval_file)
        name = Path(str(cfg.train_file)).stem
    else:
        train, evaluation, (text, pair), problem = _glue(cfg)
        name = f"glue/{cfg.name}"
    label = cfg.label_column if cfg.source != "sentiment" else "label"
    for where, rows in (("the train file", train), ("the eval file", evaluation)):
        for key, column in (("text_column", text), ("text_pair_column", pair), ("label_column", label)):
            if column is not None:
                _column(key, column, rows, where)
                missing = next((i for i, row in enumerate(rows) if row.get(column) in (None, "")), None)
                if missing is not None:
                    raise TaskError(f"task.{key}={column!r} is invalid: row {missing} of {where} has no value there; "
                                    "allowed: a value in every row")

    def rows_of(rows):
        return [(str(row[text]), None if pair is None else str(row[pair]), row[label]) for row in rows]

    train_rows, eval_rows = rows_of(train), rows_of(evaluation)
    if problem == "token_classification":
        return _token_task(name, label, train, evaluation, text)
    classes = None
    if problem == "classification":
        classes = sorted({row[2] for row in train_rows}, key=_label_order)
        if len(classes) < 2:
            raise TaskError(f"task.label_column={label!r} is invalid: the train split has {len(classes)} class(es); "
                            "allowed: a column with at least 2 classes")
        unknown = sorted({str(row[2]) for row in eval_rows if row[2] not in classes})
        if unknown:
            raise TaskError(f"task.label_column={label!r} is invalid: the eval split has labels outside the train "
                            f"split's classes ({', '.join(unknown[:5])}); allowed: {', '.join(map(str, classes[:10]))}")
    else:
        for rows in (train_rows, eval_rows):
            bad = next((row[2] for row in rows if not _is_number(row[2])), None)
            if bad is not None:
                raise TaskError(f"task.label_column={label!r} is invalid: {bad!r} is not a number; allowed: numbers "
                                "with task.problem='regression'")
    return Task(name, problem, train_rows, eval_rows, classes)


def _label_order(value):
    """Numbers (or numeric strings: CSV labels) in numeric order, so label id k is label k
    where labels are 0..n-1; other labels after them, alphabetically."""
    return (0, float(value), "") if _is_number(value) else (1, 0.0, str(value))


def _words(value) -> list[str]:
    return [str(w) for w in value] if isinstance(value, list) else str(value).split()


def _token_task(name: str, label: str, train: list[dict], evaluation: list[dict], text: str) -> Task:
    splits = []
    for where, rows in (("train", train), ("eval", evaluation)):
        pairs = [(_words(row[text]), _words(row[label])) for row in rows]
        bad = next((i for i, (words, tags) in enumerate(pairs) if len(words) != len(tags) or not words), None)
        if bad is not None:
            raise TaskError(f"task.label_column={label!r} is invalid: {where} row {bad} has {len(pairs[bad][0])} words "
                            f"and {len(pairs[bad][1])} tags; allowed: one tag per word")
        splits.append([(words, None, tags) for words, tags in pairs])
    classes = sorted({tag for _, _, tags in splits[0] for tag in tags}, key=_label_order)
    unknown = sorted({tag for _, _, tags in splits[1] for tag in tags} - set(classes))
    if unknown:
        raise TaskError(f"task.label_column={label!r} is invalid: the eval split has tags outside the train split's "
                        f"({', '.join(unknown[:5])}); allowed: {', '.join(classes[:10])}")
    return Task(name, "token_classification", splits[0], splits[1], classes)


def _is_number(value) -> bool:
    try:
        float(value)
        return not isinstance(value, bool)
    except (TypeError, ValueError):
        return False


def metrics(problem: str, predictions, labels, classes: int | None = None) -> dict:
    """scikit-learn's accuracy, F1 (of class 1 for two classes, else macro over all
    ``classes``) and Matthews correlation for classification; scipy's Pearson and
    Spearman correlations for regression."""
    if problem == "regression":
        from scipy.stats import pearsonr, spearmanr

        return {"pearson": float(pearsonr(predictions, labels)[0]), "spearman": float(spearmanr(predictions, labels)[0])}
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    classes = classes or len(set(labels) | set(predictions))
    if classes == 2:
        f1 = f1_score(labels, predictions, average="binary", pos_label=1, labels=[0, 1], zero_division=0)
    else:
        f1 = f1_score(labels, predictions, average="macro", labels=list(range(classes)), zero_division=0)
    return {"accuracy": float(accuracy_score(labels, predictions)), "f1": float(f1),
            "matthews": float(matthews_corrcoef(labels, predictions))}
