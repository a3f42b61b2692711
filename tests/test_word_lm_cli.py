"""A word-level causal LM through the command line (issue 25 part 3): ``bertode.train objective=clm
data.vocabulary=word model.lm_head_type=adaptive`` on WikiText-2 text trains (the loss falls), and
``bertode.evaluate`` loads the saved model and tokenizer and reports the per-word perplexity exp(loss) over
every word and ``<eos>`` of the packed eval rows (Transformer-XL's count: words + lines). Bad settings are
refused in one line, exit status 2, nothing written (no run directory, no cache entry)."""

import json
import math
from pathlib import Path

import pytest

from conftest import file_tree, refused_line, run_command

WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2"
pytestmark = [pytest.mark.skipif(not WIKITEXT.is_dir(), reason="../shared/data/wikitext-2 is not beside the repository"),
              pytest.mark.usefixtures("restore_logging")]

SEQ, EVAL_ROWS = 34, 24
COMMON = ["objective=clm", "model=bert", "data=text", "data.vocabulary=word", "data.vocab_size=null",
          "data.lowercase=false", f"data.seq_len={SEQ}", f"data.max_eval_sequences={EVAL_ROWS}", "model.hidden_size=32",
          "model.intermediate_size=64", "model.num_attention_heads=2", "model.max_position_embeddings=64",
          "trainer.batch_size=16", "trainer.lr=3e-3", "trainer.warmup_steps=5", "trainer.log_every=1",
          "trainer.checkpoint_every=1000"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    lines = (WIKITEXT / "valid.txt").read_text(encoding="utf-8").split("\n")[:-1]
    folder = tmp_path_factory.mktemp("word-lm")
    (folder / "train.txt").write_text("\n".join(lines[:600]) + "\n", encoding="utf-8")
    (folder / "eval.txt").write_text("\n".join(lines[600:800]) + "\n", encoding="utf-8")
    return folder, lines[600:800]


def test_train_then_evaluate_reports_per_word_perplexity(texts, tmp_path, capsys):
    folder, evaluation = texts
    run, cache = tmp_path / "run", tmp_path / "cache"
    data = [f"data.files=[{folder / 'train.txt'}]", f"data.eval_files=[{folder / 'eval.txt'}]", f"data.cache_dir={cache}"]
    code = run_command("train", [f"hydra.run.dir={run}", *COMMON, *data, "model.lm_head_type=adaptive",
                                 "model.adaptive_cutoffs=[100,1000]", "trainer.max_steps=40", "trainer.eval_every=40"])
    assert code == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r.get("kind") == "train"]
    final = [r for r in records if r.get("kind") == "eval"][-1]
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 1.0, train  # the loss falls (by more than a nat)
    assert final["loss"] < final["unigram_baseline"]

    capsys.readouterr()
    assert run_command("evaluate", [f"checkpoint={run / 'final'}", "data=text", *data, f"data.seq_len={SEQ}",
                                    f"data.max_eval_sequences={EVAL_ROWS}"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(next((run / "evaluate").rglob("evaluation.json")).read_text())
    assert result["perplexity_per"] == "word" and " per word, " in line and "target words" in line
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert result["loss"] == pytest.approx(final["loss"], abs=1e-6)  # the saved model and tokenizer, as trained
    # every target is a word or a line's <eos>, as Transformer-XL counts WikiText: rows of SEQ - 2 of them
    stream = sum(len(line.split()) + 1 for line in evaluation)
    assert result["target_tokens"] == min(EVAL_ROWS, stream // (SEQ - 2)) * (SEQ - 2)


@pytest.mark.parametrize("overrides, expected", [
    (["data.vocabulary=wordpiece", "data.vocab_size=300", "model.lm_head_type=adaptive"],
     "model.adaptive_cutoffs=None is invalid with model.lm_head_type='adaptive'; allowed: a list of increasing"),
    (["model.lm_head_type=adaptive", "model.adaptive_cutoffs=[500,100]"],
     "model.adaptive_cutoffs=[500, 100] is invalid; allowed: a list of increasing integers"),
    (["data.vocab_size=300", "model.lm_head_type=adaptive", "model.adaptive_cutoffs=[100,300]"],
     "model.adaptive_cutoffs=[100, 300] is invalid with data.vocab_size=300; allowed: "),
    (["model.lm_head_type=adaptive", "model.adaptive_cutoffs=[100,50000]"],  # beyond the counted words
     "model.adaptive_cutoffs=[100, 50000] is invalid with data.vocab_size="),
    (["data.vocabulary=bogus"], "data.vocabulary='bogus' is invalid; allowed: 'wordpiece', 'word'"),
    (["data.min_count=0"], "data.min_count=0 is invalid with data.vocabulary='word'; allowed: an integer >= 1"),
])
def test_bad_word_lm_settings_are_one_line_and_write_nothing(texts, tmp_path, capsys, overrides, expected):
    folder, _ = texts
    run, cache = tmp_path / "outputs" / "run", tmp_path / "cache"
    before = file_tree(tmp_path)
    error = refused_line(capsys, "train", f"hydra.run.dir={run}", f"data.cache_dir={cache}", *COMMON,
                         f"data.files=[{folder / 'train.txt'}]", f"data.eval_files=[{folder / 'eval.txt'}]",
                         "trainer.max_steps=2", *overrides)
    assert expected in error, error
    assert file_tree(tmp_path) == before  # no run directory, no cache entry
