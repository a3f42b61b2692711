"""``data.vocabulary=word`` (issue 25 part 3, "Word tokenizer") on WikiText-2's ``valid.txt``: the vocabulary is
Transformer-XL's rule (words by count, ties by first occurrence: `collections.Counter.most_common` over
``line.split()``, written here independently), ``<unk>`` stands for the words outside it, and the packed rows
are the text's words with ``<eos>`` at every line end (blank lines too), as Transformer-XL reads WikiText."""

from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bertode.training import words
from bertode.training.corpus import prepare

WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2"
pytestmark = pytest.mark.skipif(not WIKITEXT.is_dir(), reason="../shared/data/wikitext-2 is not beside the repository")


def _lines(limit=None) -> list[str]:
    with open(WIKITEXT / "valid.txt", encoding="utf-8") as handle:
        return handle.read().split("\n")[:-1][:limit]  # the file ends with a newline


def _transformer_xl_vocabulary(lines, max_size=None, min_freq=1) -> list[str]:
    """Transformer-XL's ``Vocab.count_file`` + ``build_vocab`` (specials first, then ``most_common``)."""
    counter = Counter()
    for line in lines:
        counter.update(line.strip().split())
    symbols = list(words.SPECIAL_TOKENS)
    for symbol, count in counter.most_common():
        if count < min_freq or (max_size is not None and len(symbols) >= max_size):
            break
        if symbol not in symbols:
            symbols.append(symbol)
    return symbols


@pytest.mark.parametrize("vocab_size, min_count", [(None, 1), (2000, 1), (None, 3)])
def test_the_vocabulary_is_transformer_xls_rule_on_wikitext(vocab_size, min_count):
    lines = _lines()
    vocabulary = words.train_vocabulary(lines, vocab_size, min_count)
    assert vocabulary == _transformer_xl_vocabulary(lines, vocab_size, min_count)
    if vocab_size is None and min_count == 1:
        assert len(vocabulary) == len({w for line in lines for w in line.split()} | set(words.SPECIAL_TOKENS))
    counts = Counter(w for line in lines for w in line.split())
    ties = [(a, b) for a, b in zip(vocabulary[6:], vocabulary[7:]) if counts[a] == counts[b]]
    assert len(ties) > 100  # many equal counts: the tie rule decides much of the order


def test_ties_go_by_first_occurrence_not_by_spelling():
    vocabulary = words.train_vocabulary(["zebra apple", "apple mango zebra", "kiwi"], None)
    assert vocabulary[6:] == ["zebra", "apple", "mango", "kiwi"]


def _data(tmp_path, train: str, evaluation: str, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "train.txt").write_text(train, encoding="utf-8")
    (tmp_path / "eval.txt").write_text(evaluation, encoding="utf-8")
    return OmegaConf.create({**OmegaConf.to_container(OmegaConf.load(
        Path(__file__).resolve().parents[1] / "bertode" / "configs" / "data" / "sample.yaml")),
        "source": "text", "files": [str(tmp_path / "train.txt")], "eval_files": [str(tmp_path / "eval.txt")],
        "vocabulary": "word", "vocab_size": None, "lowercase": False, "seq_len": 34, "max_eval_sequences": None,
        "cache_dir": str(tmp_path / "cache"), **overrides})


def test_packed_rows_are_the_words_with_eos_at_every_line_end(tmp_path):
    lines = _lines()
    train, evaluation = lines[:1500], lines[1500:1900]
    corpus = prepare(_data(tmp_path, "\n".join(train) + "\n", "\n".join(evaluation) + "\n", vocab_size=3000))
    tokenizer = corpus.tokenizer
    vocabulary = _transformer_xl_vocabulary(train, 3000)
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) == vocabulary
    unk, eos = tokenizer.convert_tokens_to_ids(["<unk>", "<eos>"])
    assert tokenizer.unk_token == "<unk>" and tokenizer.eos_token == "<eos>"
    ids = {w: i for i, w in enumerate(vocabulary)}
    for split, rows in (("train", corpus.train[:]), ("eval", corpus.eval)):
        text = train if split == "train" else evaluation
        stream = [ids.get(w, unk) for line in text for w in line.split() + ["<eos>"]]  # blank lines: one <eos>
        body = rows[:, 1:-1].reshape(-1).tolist()
        assert body == stream[:len(body)] and len(stream) - len(body) < 32, split
        assert rows[:, 0].eq(tokenizer.cls_token_id).all() and rows[:, -1].eq(tokenizer.sep_token_id).all()
    assert sum(t == eos for t in stream) == len(evaluation) > sum(1 for line in evaluation if line.strip())
    assert (corpus.eval == unk).sum() > 0 and sum(w not in ids for line in evaluation for w in line.split()) > 0


def test_the_saved_tokenizer_loads_with_the_auto_classes_and_ends_a_line_with_eos(tmp_path):
    from transformers import AutoTokenizer

    corpus = prepare(_data(tmp_path, "the cat sat\n\nthe dog sat on the mat\n" * 20, "a cat sat\n" * 40))
    loaded = AutoTokenizer.from_pretrained(next(corpus.cache.glob("tokenizer")))
    encoded = loaded("the cat flew")["input_ids"]
    assert loaded.convert_ids_to_tokens(encoded) == ["the", "cat", "<unk>", "<eos>"]
    assert words.perplexity_unit(loaded) == "word" and words.line_end_id(loaded) == encoded[-1]
    # byte-identical tokenizer files from the same text in a new cache (determinism, as WordPiece's)
    again = prepare(_data(tmp_path / "again", "the cat sat\n\nthe dog sat on the mat\n" * 20, "a cat sat\n" * 40))
    assert (again.cache / "tokenizer" / "tokenizer.json").read_bytes() == \
        (corpus.cache / "tokenizer" / "tokenizer.json").read_bytes()


def test_a_wordpiece_corpus_is_unchanged_by_the_word_path(tmp_path):
    """The default vocabulary keeps dropping blank lines and appends nothing: rows as the tokenizer's own packing."""
    corpus = prepare(_data(tmp_path, "the cat sat\n\nthe dog sat\n" * 40, "a cat sat\n" * 40, vocabulary="wordpiece",
                           vocab_size=60, lowercase=True))
    assert words.line_end_id(corpus.tokenizer) is None and words.perplexity_unit(corpus.tokenizer) == "token"
    expected = corpus.tokenizer(["the cat sat", "the dog sat"] * 40, add_special_tokens=False)["input_ids"]
    stream = [t for ids in expected for t in ids]
    body = corpus.train[:][:, 1:-1].reshape(-1).tolist()
    assert body == stream[:len(body)]
    assert torch.is_tensor(corpus.eval)
