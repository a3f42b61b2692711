"""`python -m bertode.finetune`: the offline default (shipped sentiment data, a model from
scratch) beats the majority baseline on Yelp by a clear margin and leaves a loadable
model; a solve chosen at evaluation time changes the NFE; a converted RoBERTa directory
fine-tunes on local CSV files; bad input gives one line, exit 2 and writes nothing."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import bertode
from bertode.training.corpus import SPECIAL_TOKENS
from bertode.training.wordpiece import train_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "sentiment-labelled-sentences"


def _finetune(*overrides, cwd):
    return subprocess.run([sys.executable, "-m", "bertode.finetune", *overrides], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finetune") / "default"
    done = _finetune(f"hydra.run.dir={run}", cwd=run.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done.stdout


def test_the_offline_default_beats_the_majority_baseline_and_saves_a_loadable_model(default_run):
    run, stdout = default_run
    result = json.loads((run / "results.json").read_text())
    assert result["majority_baseline"] == 0.5 and result["eval_rows"] == 1000  # Yelp: 500 / 500
    assert result["accuracy"] >= result["majority_baseline"] + 0.1, result  # measured 0.694
    assert "accuracy" in stdout and "majority_baseline 0.500" in stdout
    assert stdout.startswith("bertode.finetune: ode model, 0.20 M parameters, sentiment (Amazon -> Yelp): 1000 train rows")
    assert "step 10: loss 0." in stdout and "'loss': '" not in stdout  # numbers, not Trainer's quoted strings
    umask = os.umask(0)
    os.umask(umask)
    assert {path.name: path.stat().st_mode & 0o777 for path in (run / "final").iterdir()}["model.safetensors"] == \
        0o666 & ~umask
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("solver/nfe_forward" in record for record in logs)  # SolverStatsCallback in Trainer's logs
    model = transformers.AutoModelForSequenceClassification.from_pretrained(run / "final")
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "final")
    assert isinstance(model, bertode.BertODEForSequenceClassification)
    logits = model.eval()(**tokenizer(["great phone, works well", "terrible, broke in a day"], return_tensors="pt",
                                      padding=True)).logits
    assert logits.shape == (2, 2)


def test_a_solve_chosen_at_evaluation_time_changes_the_nfe(default_run, tmp_path):
    run, _ = default_run
    base = json.loads((run / "results.json").read_text())
    done = _finetune(f"checkpoint={run / 'final'}", "trainer.epochs=1", "eval_solve.solver=rk4", "eval_solve.steps=2",
                     f"hydra.run.dir={tmp_path / 'rk4'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "rk4" / "results.json").read_text())
    assert base["nfe_forward"] == 4  # 2 layers x 2 residuals x 1 Euler step
    assert result["nfe_forward"] == 32 and result["solver"] == "rk4" and result["steps"] == 2  # x 4 stages x 2 steps
    assert result["accuracy"] >= result["majority_baseline"] + 0.05, result
    saved = json.loads((tmp_path / "rk4" / "final" / "config.json").read_text())
    assert saved["steps"] == 1  # the evaluation's solve is not the fine-tuned model's


def _csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["text", "sentiment"])
        writer.writerows(rows)


def _sentiment_rows(name, limit):
    lines = (SHARED / name).read_text(encoding="utf-8").splitlines()[:limit]
    return [(line.rsplit("\t", 1)[0].strip(), "pos" if line.rsplit("\t", 1)[1] == "1" else "neg") for line in lines]


def test_a_converted_roberta_directory_fine_tunes_on_local_csv_files(tmp_path):
    train, evaluation = tmp_path / "train.csv", tmp_path / "eval.csv"
    _csv(train, _sentiment_rows("amazon_cells_labelled.txt", 200))
    _csv(evaluation, _sentiment_rows("yelp_labelled.txt", 100))
    tokenizer = train_tokenizer([r[0] for r in _sentiment_rows("amazon_cells_labelled.txt", 200)], 300, SPECIAL_TOKENS)
    roberta = transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=80, pad_token_id=tokenizer.pad_token_id, type_vocab_size=1))
    roberta.save_pretrained(tmp_path / "roberta")
    tokenizer.save_pretrained(tmp_path / "roberta")
    done = _finetune(f"checkpoint={tmp_path / 'roberta'}", "task.source=files", f"task.train_file={train}",
                     f"task.eval_file={evaluation}", "task.text_column=text", "task.label_column=sentiment",
                     "trainer.epochs=1", "solver=rk4", "solver.steps=2", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["eval_rows"] == 100 and 0 <= result["accuracy"] <= 1 and result["solver"] == "rk4"
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["model_type"] == "bertode" and saved["position_scheme"] == "after_padding"
    assert saved["id2label"] == {"0": "neg", "1": "pos"}


def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from bertode.finetune import main

    train = tmp_path / "train.csv"
    _csv(train, [("good", "pos"), ("bad", "neg")])
    other = tmp_path / "other.csv"
    _csv(other, [("fine", "pos"), ("meh", "neutral")])
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Model(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4)).save_pretrained(gpt2)
    holes = tmp_path / "holes.jsonl"
    holes.write_text('{"text": "good", "sentiment": "pos"}\n{"text": "bad"}\n')
    discrete = tmp_path / "discrete"
    bertode.BertODEForSequenceClassification(bertode.BertODEConfig(
        mode="discrete", vocab_size=64, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64)).save_pretrained(discrete)
    train_tokenizer(["good bad fine"], 40, SPECIAL_TOKENS).save_pretrained(discrete)
    causal = tmp_path / "causal"  # a bertode.train objective=clm model: its [CLS] sees only itself
    bertode.BertODEForCausalLM(bertode.BertODEConfig(
        vocab_size=64, hidden_size=32, num_attention_heads=4, intermediate_size=64, is_decoder=True,
        objective="clm")).save_pretrained(causal)
    train_tokenizer(["good bad fine"], 40, SPECIAL_TOKENS).save_pretrained(causal)
    files = ["task.source=files", f"task.train_file={train}", "task.text_column=text"]
    cases = [
        (["task.source=imdb"], "task.source='imdb' is invalid; allowed: 'sentiment', 'files', 'glue'"),
        (["task.source=glue", "task.name=squad"], "task.name='squad' is invalid with task.source='glue'"),
        ([*files, f"task.eval_file={train}"], "task.label_column='label' is invalid: the train file has no such column; "
                                              "allowed: 'text', 'sentiment'"),
        ([*files, f"task.eval_file={other}", "task.label_column=sentiment"],
         "the eval split has labels outside the train split's classes (neutral)"),
        ([*files, f"task.eval_file={tmp_path / 'missing.csv'}", "task.label_column=sentiment"],
         "task.eval_file="),
        ([f"checkpoint={gpt2}"], "model_type='gpt2' is not supported; allowed: 'bertode', 'bert', 'roberta'"),
        ([f"checkpoint={tmp_path / 'nowhere'}"], "is invalid; allowed: null, a bertode directory"),
        (["eval_solve.solver=heun3"], "eval_solve.solver='heun3' is invalid"),
        (["solver.steps=0"], "solver.steps=0 is invalid"),
        (["model=deq", "solver=rk4"], "solver='rk4' is invalid with model='deq'"),
        ([f"checkpoint={causal}"], "it is a causal language model (objective='clm', causal attention)"),
        (["scratch.num_attention_heads=3"], "scratch.num_attention_heads=3 is invalid; allowed: a divisor of hidden_size"),
        (["task.max_length=100000"], "task.max_length=100000 is invalid; allowed: <= scratch.max_position_embeddings=512"),
        (["trainer.lr=0"], "trainer.lr=0 is invalid; allowed: a number > 0"),
        (["trainer.epochs=0"], "trainer.epochs=0 is invalid"),
        (["task.problem=ranking"], "task.problem='ranking' is invalid; allowed: 'classification', 'regression', "
                                   "'token_classification'"),
        (["trainer.device=tpu"], "trainer.device='tpu' is invalid"),
        (["task.max_lenght=32"], "task.max_lenght=32 is invalid: no such option (did you mean task.max_length?)"),
        ([*files, f"task.eval_file={holes}", "task.label_column=sentiment"],
         "task.label_column='sentiment' is invalid: row 1 of the eval file has no value there"),
        ([f"checkpoint={discrete}", "eval_solve.steps=4"], "eval_solve.steps=4 is invalid with the model's mode='discrete'"),
        ([f"checkpoint={discrete}", "task.max_length=100"], "task.max_length=100 is invalid with"),
    ]
    if not torch.cuda.is_available():
        cases.append((["trainer.device=cuda"], "trainer.device='cuda' is invalid here: no CUDA device is visible"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    capsys.readouterr()  # save_pretrained's progress bars above
    for index, (overrides, expected) in enumerate(cases):
        monkeypatch.setattr(sys, "argv", ["bertode.finetune", f"hydra.run.dir={tmp_path / f'run{index}'}", *overrides])
        with pytest.raises(SystemExit) as exit_info:
            main()
        error = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and error.count("\n") == 0 and expected in error, (overrides, error)
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before, overrides
    from bertode.evaluate import main as evaluate_main

    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: these commands run in one process
    for command, entry in (("finetune", main), ("evaluate", evaluate_main)):
        monkeypatch.setattr(sys, "argv", [f"bertode.{command}", f"hydra.run.dir={tmp_path / 'torchrun'}"])
        with pytest.raises(SystemExit) as exit_info:
            entry()
        error = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and error == f"error: torchrun is invalid for bertode.{command}: it runs in " \
            f"one process; allowed: python -m bertode.{command}"
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_token_classification_from_jsonl_files_beats_the_majority_tag(tmp_path):
    """Word-level tags (here: stop word or not, on real sentences) through
    BertODEForTokenClassification: a word's tag sits on its first piece."""
    stop = {"the", "a", "and", "i", "it", "is", "this", "was", "to", "of"}
    for name, source, count in (("train", "amazon_cells_labelled.txt", 600), ("eval", "yelp_labelled.txt", 200)):
        with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as stream:
            for text, _ in _sentiment_rows(source, count):
                words = text.split()
                stream.write(json.dumps({"tokens": words, "tags": ["STOP" if w.lower() in stop else "W" for w in words]})
                             + "\n")
    done = _finetune("task.source=files", f"task.train_file={tmp_path / 'train.jsonl'}",
                     f"task.eval_file={tmp_path / 'eval.jsonl'}", "task.text_column=tokens", "task.label_column=tags",
                     "task.problem=token_classification", "trainer.epochs=3", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["accuracy"] >= result["majority_baseline"] + 0.1, result  # measured 0.985 against 0.756
    model = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "run" / "final")
    assert isinstance(model, bertode.BertODEForTokenClassification) and model.config.id2label == {0: "STOP", 1: "W"}


def test_an_unreachable_glue_task_is_one_line(tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "bertode.finetune", "task.source=glue", "task.name=sst2",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr[-2000:]
    assert "task.name='sst2' (GLUE through datasets) could not be loaded" in done.stderr
    assert not (tmp_path / "run").exists()
