"""The WordPiece tokenizer a run trains is a function of the text: byte-identical files
and identical first losses in fresh processes with empty caches and different
`PYTHONHASHSEED` (`tokenizers`' own trainer breaks ties by a per-process hash-map order),
and a vocabulary close to `tokenizers`' trainer's (the same algorithm up to tie-breaking)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from bertode.training.corpus import SPECIAL_TOKENS
from bertode.training.documents import _file_lines
from bertode.training.sources import SAMPLE_FILES
from bertode.training.wordpiece import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _fresh_run(tmp_path: Path, name: str, seed: str) -> tuple[str, list[float]]:
    run = tmp_path / name
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run(
        [sys.executable, "-m", "bertode.train", f"hydra.run.dir={run}", f"data.cache_dir={run / 'cache'}",
         "trainer.max_steps=3", "trainer.log_every=1", "trainer.eval_every=1000", "trainer.checkpoint_every=1000"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    files = sorted((run / "final").glob("tokenizer*.json")) + sorted((run / "final").glob("vocab.txt"))
    digest = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return digest, [r["loss"] for r in records if r["kind"] == "train"]


def test_two_fresh_processes_train_the_same_tokenizer_and_losses(tmp_path):
    one = _fresh_run(tmp_path, "one", "1")
    two = _fresh_run(tmp_path, "two", "2")
    assert one[0] == two[0]  # tokenizer.json, tokenizer_config.json, vocab files: byte-identical
    assert len(one[1]) == 3 and one[1] == two[1]


def test_the_vocabulary_matches_the_tokenizers_trainer_up_to_ties():
    from tokenizers import BertWordPieceTokenizer

    lines = list(_file_lines(SAMPLE_FILES["train"]))
    ours = train_tokenizer(lines, 2000, SPECIAL_TOKENS)
    reference = BertWordPieceTokenizer(lowercase=True, strip_accents=True)
    reference.train_from_iterator(lines, vocab_size=2000, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    theirs = reference.get_vocab()
    assert len(ours.get_vocab()) == len(theirs) == 2000
    assert [ours.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    overlap = len(set(ours.get_vocab()) & set(theirs)) / len(theirs)
    assert overlap >= 0.9, overlap  # measured 0.963
    text = "Call me Ishmael. Some years ago, never mind how long precisely, having little money in my purse."
    assert ours.tokenize(text) == reference.encode(text, add_special_tokens=False).tokens
    assert ours.decode(ours(text)["input_ids"], skip_special_tokens=True) == text.lower()
