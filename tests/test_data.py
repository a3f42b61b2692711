"""Pretraining data at any scale (issue 12): token shards equal the tokenizer's own packing
on WikiText-2 and read with flat resident memory; `datasets` sources by files (JSONL,
Parquet, a non-`text` column) train streamed and from shards; the stream's rows are
disjoint across ranks and the same at any world size; packing restarts exactly from a
recorded position with bounded look-ahead; killed streaming and sharded runs resume to
the uninterrupted losses; bad sources are refused in one line with nothing written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import _losses, _python, _snapshot, compose_train, run_train, small

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT / ".." / "shared" / "data" / "wikitext-2"
needs_wikitext = pytest.mark.skipif(not WIKITEXT.is_dir(), reason="../shared/data/wikitext-2 is not beside the repository")


def _lines(name, limit=None):
    lines = [line for line in (WIKITEXT / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:limit]


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    """WikiText-2 valid lines as two JSONL shards and one Parquet file, text in column "body"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("corpus")
    lines = _lines("valid.txt", 1200)
    for part, chunk in enumerate((lines[:600], lines[600:])):
        with open(folder / f"part-{part}.jsonl", "w", encoding="utf-8") as handle:
            for i, line in enumerate(chunk):
                handle.write(json.dumps({"id": i, "body": line}) + "\n")
    pq.write_table(pa.table({"id": list(range(len(lines))), "body": lines}), folder / "all.parquet")
    (folder / "empty.jsonl").write_text("")
    return folder


@needs_wikitext
def test_prepare_shards_equal_the_tokenizers_own_packing_on_wikitext(tmp_path):
    """`python -m bertode.prepare` on the shared WikiText-2 files: every shard row is
    [CLS] + the next T-2 ids of the concatenated, per-line tokenization + [SEP] (the oracle,
    computed here from the tokenizer alone), and bertode.train's preparation finds them."""
    from bertode.training.corpus import prepare

    cache = tmp_path / "cache"
    overrides = ["data=text", f"data.files=[{WIKITEXT / 'valid.txt'}]", f"data.eval_files=[{WIKITEXT / 'test.txt'}]",
                 "data.seq_len=64", "data.vocab_size=4000", f"data.cache_dir={cache}"]
    done = _python("-m", "bertode.prepare", *overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    corpus = prepare(compose_train(overrides).data)
    assert str(corpus.cache) in done.stdout and sorted(p.name for p in cache.iterdir()) == [corpus.cache.name]
    for split, rows in (("valid.txt", corpus.train[:]), ("test.txt", corpus.eval)):
        ids = [i for row in corpus.tokenizer(_lines(split), add_special_tokens=False)["input_ids"] for i in row]
        body = torch.tensor(ids[: len(ids) // 62 * 62]).view(-1, 62)
        assert rows.shape == (len(body), 64) and rows.dtype == torch.long
        assert torch.equal(rows[:, 1:-1], body)
        assert (rows[:, 0] == corpus.tokenizer.cls_token_id).all() and (rows[:, -1] == corpus.tokenizer.sep_token_id).all()
    assert int(corpus.counts.sum()) == corpus.train[:].shape[0] * 62
    assert json.loads((corpus.cache / "train" / "index.json").read_text())["dtype"] == "uint16"


def _rss_kib():
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmRSS")))


def test_reading_token_shards_keeps_resident_memory_flat(tmp_path):
    """Random-access reads of 400k rows (~100 MB of shards) move resident memory by far
    less than the shards' size, and by about what reads of a 5,000-row shard move it."""
    from bertode.training.shards import SHARD_ROWS, ShardRows, write_rows

    generator = np.random.default_rng(0)

    def build(name, rows):
        data = generator.integers(0, 30000, size=(rows, 128), dtype=np.uint16)
        assert write_rows(tmp_path / name, (r for r in data.tolist()), 128, 30522) == rows
        return ShardRows(tmp_path / name), data

    growth = {}
    for name, rows in (("small", 5000), ("large", 400_000)):
        shards, data = build(name, rows)
        assert len(shards.files) == -(-rows // SHARD_ROWS)
        before = _rss_kib()
        for _ in range(300):
            index = torch.from_numpy(generator.integers(0, rows, size=64))
            got = shards[index]
            assert torch.equal(got, torch.from_numpy(data[index.numpy()].astype(np.int64)))
        growth[name] = _rss_kib() - before
        del data
    size_kib = 400_000 * 128 * 2 // 1024
    assert growth["large"] < size_kib / 10 and growth["large"] < growth["small"] + 8 * 1024, growth


def test_packer_resumes_exactly_from_every_recorded_position_with_bounded_lookahead():
    """Row n+1 onwards from the position recorded after row n equals the uninterrupted
    rows; no row is cut with more than BATCH_DOCUMENTS documents read ahead."""
    from bertode.training.shards import BATCH_DOCUMENTS, Packer
    from bertode.training.wordpiece import train_tokenizer

    texts = [f"document {i} " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(1 + (i * 13) % 40)) for i in range(600)]
    tokenizer = train_tokenizer(texts, 300, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], True)
    packer = Packer(tokenizer, iter(texts), 24)
    rows, positions, ahead = [], [], []
    for row in packer:
        rows.append(row)
        positions.append(packer.position())
        ahead.append(packer.lookahead())
    assert len(rows) > 100 and max(ahead) <= BATCH_DOCUMENTS + 1
    assert len({p for p in positions}) == len(positions)  # each position names one token
    for n in range(0, len(rows) - 1, 7):
        document, offset = positions[n]
        again = list(Packer(tokenizer, iter(texts[document:]), 24, start=(document, offset)))
        assert again == rows[n + 1:], n


def test_stream_ranks_read_disjoint_shards_and_together_give_the_one_process_rows(corpus_files, tmp_path):
    """Rank r of 2 (2 workers each) yields exactly the one-process rows k ≡ r (mod 2), from
    its own shards only; resuming from recorded positions continues the same sequence."""
    from bertode.training.corpus import prepare
    from bertode.training.objective import make_objective
    from bertode.training.stream import StreamOrder

    cfg = compose_train(_hub(corpus_files, tmp_path / "cache", "data.stream_shards=4")).data
    tokenizer = prepare(cfg).tokenizer
    mlm = make_objective("mlm", tokenizer, 0.15)
    cfg.num_workers = 0
    one = StreamOrder(cfg, tokenizer, 8, 0, 0, 1)
    global_rows = [one.local_batch(m, mlm.make_batch) for m in range(6)]
    cfg.num_workers = 2
    ranks = [StreamOrder(cfg, tokenizer, 8, 0, r, 2) for r in range(2)]
    for m in range(6):
        for r, order in enumerate(ranks):
            inputs, labels = order.local_batch(m, mlm.make_batch)
            assert torch.equal(inputs, global_rows[m][0][r::2]) and torch.equal(labels, global_rows[m][1][r::2])
    assert set(ranks[0].positions) == {0, 2} and set(ranks[1].positions) == {1, 3}  # disjoint shards
    state = {"positions": {**ranks[0].positions, **ranks[1].positions}, "stream_shards": 4}
    resumed = StreamOrder(cfg, tokenizer, 8, 0, 1, 2, first_micro_batch=6, state=state)
    further = StreamOrder(cfg, tokenizer, 8, 0, 1, 2)
    for m in range(8):
        expected = further.local_batch(m, mlm.make_batch)
        if m >= 6:
            assert torch.equal(resumed.local_batch(m, mlm.make_batch)[0], expected[0])


def _hub(files, cache, *extra):
    return small(cache, "data=hub", "data.hub_path=json", f"data.data_files=[{files / 'part-*.jsonl'}]",
                 "data.text_column=body", "data.eval_split=null", "data.streaming=true", "data.num_workers=0",
                 "data.stream_shards=2", *extra)


def test_jsonl_and_parquet_with_another_column_train_streamed_and_from_shards(corpus_files, tmp_path):
    for name, overrides in {
        "jsonl_streamed": _hub(corpus_files, tmp_path / "cache", "data.num_workers=2"),
        "jsonl_shards": _hub(corpus_files, tmp_path / "cache", "data.streaming=false"),
        "parquet_streamed": _hub(corpus_files, tmp_path / "cache", "data.hub_path=parquet",
                                 f"data.data_files=[{corpus_files / 'all.parquet'}]"),
    }.items():
        result, records = run_train(tmp_path / name, overrides)
        assert [r["step"] for r in records] == [1, 2, 3], name
        assert all(np.isfinite(r["loss"]) for r in records) and np.isfinite(result["eval"]["loss"]), name
        assert 0 < result["unigram_baseline"] < np.log(500) + 1, name


@pytest.mark.parametrize("streaming", ["true", "false"])
def test_sigkill_then_resume_gives_the_uninterrupted_losses(corpus_files, tmp_path, streaming):
    overrides = _hub(corpus_files, tmp_path / "cache", f"data.streaming={streaming}", "trainer.max_steps=40",
                     "trainer.checkpoint_every=5", "trainer.keep_checkpoints=10", "trainer.eval_every=1000", "model.hidden_dropout_prob=0.1",
                     *(["data.num_workers=2"] if streaming == "true" else []))
    straight = _python("-m", "bertode.train", f"hydra.run.dir={tmp_path / 'straight'}", *overrides, cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bertode.train", f"hydra.run.dir={run}", *overrides], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "checkpoints" / "step_00000010").is_dir():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its DataLoader workers
    proc.wait()
    assert not (run / "final").exists()  # killed mid-run
    resumed = _python("-m", "bertode.train", f"hydra.run.dir={run}", *overrides, "trainer.resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 41)), steps  # no step duplicated or missing
    a, b = _losses(tmp_path / "straight"), _losses(run)
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)


def test_torchrun_streams_two_ranks_to_the_one_process_losses(corpus_files, tmp_path):
    overrides = _hub(corpus_files, tmp_path / "cache", "trainer.device=cpu", "trainer.max_steps=6", "trainer.batch_size=8",
                     "data.stream_shards=4", "data.num_workers=2", "model.hidden_dropout_prob=0.1",
                     "trainer.eval_every=1000")
    one = _python("-m", "bertode.train", f"hydra.run.dir={tmp_path / 'one'}", *overrides, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _python("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29561", "-m", "bertode.train",
                  f"hydra.run.dir={tmp_path / 'two'}", *overrides, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (a, b)


def test_bad_sources_give_one_line_and_write_nothing(corpus_files, tmp_path, monkeypatch, capsys):
    from bertode.train import main

    cache = tmp_path / "cache"
    cache.mkdir()
    jsonl = f"data.data_files=[{corpus_files / 'part-*.jsonl'}]"
    base = ["data=hub", "data.hub_path=json", jsonl, "data.text_column=body", "data.eval_split=null"]
    cases = [
        (base[:-2] + ["data.text_column=content", "data.eval_split=null"],
         "data.text_column='content' is not a column of data.hub_path='json'; columns: id, body"),
        (base + ["data.train_split=training"], "data.train_split='training' is not a split of data.hub_path='json'; splits: train"),
        (base[:-1] + ["data.eval_split=validation"], "data.eval_split='validation' is not a split of data.hub_path='json'; splits: train"),
        (["data=hub", "data.hub_path=json", f"data.data_files=[{corpus_files / 'empty.jsonl'}]"],
         "the 'train' split is empty"),
        (["data=hub", "data.hub_path=json", f"data.data_files=[{corpus_files / 'missing-*.jsonl'}]"], "matches no file"),
        (["data=c4"], "the Hugging Face hub is unreachable"),
        (["data=hub", "data.hub_path=someone/no-such-dataset"], "for local files use data.hub_path=json"),
        (base + ["data.streaming=true", "data.stream_shards=0"], "data.stream_shards=0 is invalid; allowed: null (one per worker of every rank) or an integer >= 1"),
        (base + ["data.streaming=true", "data.stream_shards=4", "data.num_workers=3"],
         "data.num_workers=3 is invalid with data.stream_shards=4 over 1 process(es); allowed: a divisor of 4"),
        (base + ["data.streaming=maybe"], "data.streaming='maybe' is invalid; allowed: true, false"),
        (base + ["data.text_column="], "data.text_column='' is invalid; allowed: a non-empty name"),
    ]
    # set after huggingface_hub was imported (it reads the variable at import): the data layer honours it,
    # so no request is made (datasets' five retries took 23 s and their warnings broke the one line)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub.utils import _http

    def network_request(*args, **kwargs):
        raise AssertionError("a hub request was sent")  # words _unreachable would not take for a refusal

    monkeypatch.setattr(_http, "_http_backoff_base", network_request)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = _snapshot(tmp_path, cache)
    for index, (overrides, expected) in enumerate(cases):
        monkeypatch.setattr(sys, "argv", ["bertode.train", f"hydra.run.dir={tmp_path / f'run{index}'}",
                                          f"data.cache_dir={cache}", *overrides])
        with pytest.raises(SystemExit) as exit_info:
            main()
        error = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2, (overrides, error)
        assert error.count("\n") == 0 and error.startswith("error: ") and expected in error, (overrides, error)
        assert _snapshot(tmp_path, cache) == before, overrides


def test_without_a_network_a_hub_name_is_refused_by_one_probe_before_datasets_retries(tmp_path, monkeypatch, capsys):
    """No HF_HUB_OFFLINE and an endpoint that refuses connections (a closed local port): one line, and
    datasets.load_dataset (five retries with back-off, their warnings on stderr) is never called."""
    import datasets
    from huggingface_hub import constants

    from bertode.train import main

    def retrying_load(*args, **kwargs):
        raise AssertionError("datasets.load_dataset was called: the hub was not probed first")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(datasets, "load_dataset", retrying_load)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bertode.train", f"hydra.run.dir={tmp_path / 'run'}", "data=c4",
                                      f"data.cache_dir={tmp_path / 'cache'}"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.count("\n") == 0, error
    assert error.startswith("error: data.hub_path='allenai/c4'") and "the Hugging Face hub is unreachable (" in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing written"


def test_a_shard_too_small_for_one_row_is_a_data_error_and_a_resume_at_a_documents_tail_is_not(corpus_files, tmp_path):
    from bertode.training.corpus import prepare
    from bertode.training.errors import DataError
    from bertode.training.stream import check_shards, shard_rows

    cfg = compose_train(_hub(corpus_files, tmp_path / "cache")).data
    tokenizer = prepare(cfg).tokenizer
    cfg.stream_shards = 5000  # more shards than documents
    with pytest.raises(DataError, match="data.stream_shards=5000 is invalid: shard 0 holds less than one row"):
        check_shards(cfg, tokenizer, 1)
    cfg.stream_shards = 1
    stream = shard_rows(cfg, tokenizer, 0, 1, (0, 0, 0))
    rows = [next(stream) for _ in range(40)]
    for (_, after, _), (row, _, _) in zip(rows, rows[1:]):  # each position restarts at the next row
        assert next(shard_rows(cfg, tokenizer, 0, 1, after))[0] == row
