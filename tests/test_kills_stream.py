"""Fast unit tests of the streamed data order (`bertode/training/stream.py`) for mutation testing
(issue 29), against rows packed by hand here: the shard rule (document i goes to shard i mod S,
each shard's documents concatenated and cut every T-2 tokens between [CLS] and [SEP], epoch after
epoch), global row k = row k // S of shard k mod S, rank r's rows k = r (mod W) split over its
workers round-robin, a resumed position reproducing the uninterrupted rows, masks keyed by k, and
the layout refusals word for word. Local text files, a tokenizer trained here, no process."""

import os
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from bertode.training import stream
from bertode.training.errors import DataError
from bertode.training.shards import BATCH_DOCUMENTS

SEQ_LEN = 8
BODY = SEQ_LEN - 2
DOCS = [" ".join(f"w{(i * 5 + j) % 23}" for j in range(2 + (i * 7) % 11)) for i in range(16)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(config, tokenizer): the 16 documents as a train file (one line each), a tokenizer trained on them."""
    from bertode.training.wordpiece import train_tokenizer

    folder = tmp_path_factory.mktemp("stream")
    (folder / "train.txt").write_text("\n".join(DOCS) + "\n")
    (folder / "eval.txt").write_text("w1 w2 w3\n")
    tokenizer = train_tokenizer(DOCS, 60, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], True)
    cfg = OmegaConf.create(dict(source="text", files=[str(folder / "train.txt")], eval_files=[str(folder / "eval.txt")],
                                eval_fraction=0.05, seq_len=SEQ_LEN, vocabulary="wordpiece", streaming=True,
                                stream_shards=4, num_workers=0))
    return cfg, tokenizer


def _shard(tokenizer, shard, shards):
    """Shard ``shard``'s rows packed by hand and the position (document of the shard, offset) after each."""
    docs = DOCS[shard::shards]
    ids, where = [], []
    for d, text in enumerate(docs):
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += tokens
        where += [(d, o) for o in range(len(tokens))]
    count = len(ids) // BODY
    rows = [[tokenizer.cls_token_id, *ids[n * BODY:(n + 1) * BODY], tokenizer.sep_token_id] for n in range(count)]
    after = [where[(n + 1) * BODY] if (n + 1) * BODY < len(ids) else (len(docs), 0) for n in range(count)]
    return rows, after


def _shard_row(tokenizer, shard, shards, j):
    """Row j of shard ``shard``'s endless stream (its epochs one after another) and the position after it."""
    rows, after = _shard(tokenizer, shard, shards)
    return rows[j % len(rows)], (j // len(rows), *after[j % len(rows)])


def _global_row(tokenizer, k, shards):
    """Global row k: row k // S of shard k mod S."""
    return (k % shards, *_shard_row(tokenizer, k % shards, shards, k // shards))


def test_a_shard_is_every_shards_th_document_packed_epoch_after_epoch_with_its_positions(data):
    cfg, tokenizer = data
    for shard, shards in [(0, 1), (1, 3), (2, 3), (3, 4)]:
        rows, _ = _shard(tokenizer, shard, shards)
        assert len(rows) >= 2, (shard, shards)
        rows_stream = stream.shard_rows(cfg, tokenizer, shard, shards, (0, 0, 0))
        got = [next(rows_stream) for _ in range(2 * len(rows) + 1)]  # two epochs and the third's first row
        for j, (row, position, lookahead) in enumerate(got):
            assert (row, position) == _shard_row(tokenizer, shard, shards, j), (shard, shards, j)
            assert isinstance(lookahead, int) and 0 <= lookahead <= BATCH_DOCUMENTS + 1
        for j in range(len(got) - 3):  # each recorded position restarts the stream at the next row
            again = stream.shard_rows(cfg, tokenizer, shard, shards, got[j][1])
            assert [next(again)[:2] for _ in range(3)] == [g[:2] for g in got[j + 1:j + 4]], (shard, shards, j)


def test_the_lookahead_is_the_packers(data):
    """Every row's look-ahead is what a `Packer` over the same documents reports after that row."""
    from bertode.training.shards import Packer

    cfg, tokenizer = data
    packer = Packer(tokenizer, DOCS[1::2], SEQ_LEN)
    expected = [packer.lookahead() for _ in packer]
    rows_stream = stream.shard_rows(cfg, tokenizer, 1, 2, (0, 0, 0))
    assert [next(rows_stream)[2] for _ in expected] == expected and max(expected) > 0


def test_a_shard_without_a_row_is_refused_in_one_line_and_check_shards_reads_every_shard(data):
    cfg, tokenizer = data
    with pytest.raises(DataError) as error:
        next(stream.shard_rows(cfg, tokenizer, 20, 21, (0, 0, 0)))  # no document at all
    assert str(error.value) == ("data.stream_shards=21 is invalid: shard 20 holds less than one row of 8 tokens; "
                                "allowed: fewer shards or a shorter data.seq_len")
    # resumed at an epoch's tail (the position after its last row): the next epoch, no refusal
    rows, after = _shard(tokenizer, 0, 1)
    assert next(stream.shard_rows(cfg, tokenizer, 0, 1, (2, *after[-1])))[:2] == (rows[0], (3, *after[0]))
    for shards, world in [(4, 1), (6, 2), (7, 1)]:
        stream.check_shards(OmegaConf.merge(cfg, {"stream_shards": shards}), tokenizer, world)  # every shard has rows
    assert all(len(_shard(tokenizer, s, 9)[0]) for s in range(8)) and not _shard(tokenizer, 8, 9)[0]
    with pytest.raises(DataError, match=r"^data.stream_shards=9 is invalid: shard 8 holds less than one row"):
        stream.check_shards(OmegaConf.merge(cfg, {"stream_shards": 9}), tokenizer, 1)  # only the last is empty
    with pytest.raises(DataError, match=r"^data.stream_shards=8 is invalid: shard 0 holds less than one row"):
        stream.check_shards(OmegaConf.merge(cfg, {"stream_shards": None, "num_workers": 4}), tokenizer, 2)


def test_the_shards_are_the_configured_count_or_one_per_worker_of_every_rank():
    def resolve(shards, workers, world):
        return stream.resolve_shards(SimpleNamespace(stream_shards=shards, num_workers=workers), world)

    assert resolve(6, 2, 3) == 6 and resolve(None, 0, 3) == 3 and resolve(None, 1, 3) == 3 and resolve(None, 2, 3) == 6
    assert resolve(None, "2", 1) == 2  # a string from the command line


@pytest.mark.parametrize("shards, workers, world, expected", [
    (0, 0, 1, "data.stream_shards=0 is invalid; allowed: null (one per worker of every rank) or an integer >= 1"),
    (-2, 0, 1, "data.stream_shards=-2 is invalid; allowed: null (one per worker of every rank) or an integer >= 1"),
    (True, 0, 1, "data.stream_shards=True is invalid; allowed: null (one per worker of every rank) or an integer >= 1"),
    (2.0, 0, 1, "data.stream_shards=2.0 is invalid; allowed: null (one per worker of every rank) or an integer >= 1"),
    (2, -1, 1, "data.num_workers=-1 is invalid; allowed: an integer >= 0"),
    (2, True, 1, "data.num_workers=True is invalid; allowed: an integer >= 0"),
    (2, "1", 1, "data.num_workers='1' is invalid; allowed: an integer >= 0"),
    (3, 0, 2, "data.stream_shards=3 is invalid with 2 processes; allowed: a multiple of the process count (each rank "
              "packs its own shards)"),
    (6, 4, 2, "data.num_workers=4 is invalid with data.stream_shards=6 over 2 process(es); allowed: a divisor of 3 "
              "(the shards of one rank)"),
    (None, 0, 2, None), (None, 3, 2, None), (1, 0, 1, None), (1, 1, 1, None), (6, 3, 2, None), (6, 0, 3, None),
    (12, 2, 3, None), (4, 2, 2, None)])
def test_the_layout_is_checked_in_one_line(shards, workers, world, expected):
    assert stream.check_layout(shards, workers, world) == expected


def _interleave(iterators, count):
    """A DataLoader's round-robin over its workers' iterators."""
    return [next(iterators[i % len(iterators)]) for i in range(count)]


@pytest.mark.parametrize("world, workers, first", [(1, 1, 0), (1, 2, 0), (1, 4, 3), (2, 2, 1), (2, 1, 5), (4, 1, 2)])
def test_a_ranks_workers_together_give_its_rows_from_its_first(data, monkeypatch, world, workers, first):
    """Rank r's workers, read round-robin, give its local rows first, first + 1, ...: global rows (first + i) W + r,
    each from shard k mod S, resumed from the positions the uninterrupted stream had reached there."""
    cfg, tokenizer = data
    shards = 4
    for rank in range(world):
        before = [_global_row(tokenizer, k, shards) for k in range(rank, first * world, world)]  # rows consumed
        positions = {s: p for s, _, p in before}
        fed = []
        for worker in range(workers):  # each worker's rows, read while get_worker_info names it
            monkeypatch.setattr(stream, "get_worker_info", lambda w=worker: SimpleNamespace(num_workers=workers, id=w))
            rows = iter(stream.StreamRows(cfg, tokenizer, rank, world, first, positions, shards))
            fed.append(iter([next(rows) for _ in range(10)]))
        got = _interleave(fed, 10)
        for i, (shard, row, position, lookahead) in enumerate(got):
            k = (first + i) * world + rank
            assert (shard, row, position) == _global_row(tokenizer, k, shards), (rank, i)
    monkeypatch.setattr(stream, "get_worker_info", lambda: None)  # no worker: the rank's whole sequence
    got = list(zip(range(6), stream.StreamRows(cfg, tokenizer, 0, 2, 1, {0: (0, *_shard(tokenizer, 0, 4)[1][0])}, 4)))
    assert [g[1][:3] for g in got] == [_global_row(tokenizer, k, 4) for k in range(2, 14, 2)]


def _make_batch(rows, generator):
    """The rows as inputs; labels drawn from the generator (they show which seed it had)."""
    return rows, torch.randint(0, 1000, (1, 3), generator=generator)


def _expected(tokenizer, seed, m, micro, rank, world, shards=4):
    ks = [m * micro + j for j in range(rank, micro, world)]
    inputs = torch.tensor([_global_row(tokenizer, k, shards)[1] for k in ks])
    labels = torch.cat([torch.randint(0, 1000, (1, 3), generator=torch.Generator().manual_seed(seed * 1_000_003 + k))
                        for k in ks])
    return inputs, labels


def test_stream_order_gives_each_ranks_rows_masked_by_their_global_index_and_resumes(data):
    cfg, tokenizer = data
    seed, micro = 5, 4
    for world in (1, 2):
        for rank in range(world):
            order = stream.StreamOrder(cfg, tokenizer, micro, seed, rank, world)
            assert order.lookahead == 0 and order.positions == {}
            for m in range(5):
                inputs, labels = order.local_batch(m, _make_batch)
                expected = _expected(tokenizer, seed, m, micro, rank, world)
                assert torch.equal(inputs, expected[0]) and torch.equal(labels, expected[1]), (world, rank, m)
                assert order.noise_seed(m) == seed * 2_654_435_761 + 104_729 * m + 17
            assert set(order.positions) == set(range(rank, 4, world))
            last = {s: (20 - 1 - s) // 4 for s in order.positions}  # each shard's last row of the 20 read
            assert order.positions == {s: list(_shard_row(tokenizer, s, 4, j)[1]) for s, j in last.items()}
            ahead = [stream.shard_rows(cfg, tokenizer, s, 4, (0, 0, 0)) for s in range(4)]
            lookaheads = [next(ahead[k % 4])[2] for k in range(20) if k % world == rank]
            assert order.lookahead == max(lookaheads) > 0
            # the saved state (string keys, lists, as a checkpoint reads back) resumes at micro-batch 5
            state = {"positions": {str(s): list(p) for s, p in order.positions.items()}, "stream_shards": 4}
            resumed = stream.StreamOrder(cfg, tokenizer, micro, seed, rank, world, first_micro_batch=5, state=state)
            with pytest.raises(RuntimeError, match=r"^stream micro-batch 4 requested, 5 expected$"):
                resumed.local_batch(4, _make_batch)
            for m in (5, 6, 7):
                inputs, labels = resumed.local_batch(m, _make_batch)
                expected = _expected(tokenizer, seed, m, micro, rank, world)
                assert torch.equal(inputs, expected[0]) and torch.equal(labels, expected[1]), (world, rank, m)


def test_a_row_from_another_shard_and_a_state_of_another_shard_count_are_refused(data):
    cfg, tokenizer = data
    order = stream.StreamOrder(cfg, tokenizer, 4, 0, 0, 1)
    order.loader = iter([(1, [2, 3], (0, 0, 0), 0)])
    with pytest.raises(RuntimeError) as error:
        order.local_batch(0, _make_batch)
    assert str(error.value) == "stream row 0 came from shard 1, expected 0"
    for state in ({"positions": {}, "stream_shards": 2}, {"positions": {}}):
        with pytest.raises(DataError) as error:
            stream.StreamOrder(cfg, tokenizer, 4, 0, 0, 1, state=state)
        assert str(error.value) == (f"data.stream_shards=4 is invalid for this resume: the checkpoint's stream has "
                                    f"{state.get('stream_shards')} shards; allowed: the run's own value")


def test_the_state_gathers_every_ranks_positions(data):
    cfg, tokenizer = data
    order = stream.StreamOrder(cfg, tokenizer, 4, 0, 1, 2)
    order.positions = {1: (0, 2, 1), 3: (1, 0, 4)}
    dist = SimpleNamespace(gather=lambda mine: [{0: (2, 1, 0), 2: (0, 3, 3)}, mine])
    assert order.state(dist) == {"positions": {0: [2, 1, 0], 1: [0, 2, 1], 2: [0, 3, 3], 3: [1, 0, 4]},
                                 "stream_shards": 4}


def test_the_loader_is_a_per_row_dataloader_whose_workers_tokenize_alone(data, monkeypatch):
    cfg, tokenizer = data
    made = []

    class Loader:
        def __init__(self, dataset, **options):
            made.append((dataset, options))

        def __iter__(self):
            return iter(())

    monkeypatch.setattr(stream, "DataLoader", Loader)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    stream.StreamOrder(cfg, tokenizer, 4, 0, 0, 1)
    assert made[-1][1] == dict(batch_size=None, num_workers=0, prefetch_factor=None, persistent_workers=False)
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    workers = OmegaConf.merge(cfg, {"num_workers": 2})
    order = stream.StreamOrder(workers, tokenizer, 8, 0, 1, 2, first_micro_batch=3)
    dataset, options = made[-1]
    assert options == dict(batch_size=None, num_workers=2, prefetch_factor=2, persistent_workers=False)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert (dataset.rank, dataset.world, dataset.first, dataset.shards, dataset.positions) == (1, 2, 12, 4, {})
    assert dataset.positions is order.positions and order.shards == 4 and order.next_micro_batch == 3
    one_per_worker = OmegaConf.merge(cfg, {"stream_shards": None, "num_workers": 3})
    assert stream.StreamOrder(one_per_worker, tokenizer, 8, 0, 1, 2).shards == made[-1][0].shards == 6


def test_batch_order_is_the_stream_or_the_token_shards_order(data):
    from bertode.training.distributed import BatchOrder

    cfg, tokenizer = data
    dist = SimpleNamespace(rank=1, world=2)
    corpus = SimpleNamespace(tokenizer=tokenizer, train=torch.arange(40).reshape(10, 4))
    state = {"positions": {1: [0, 1, 0], 3: [0, 1, 0]}, "stream_shards": 4}
    order = stream.batch_order(cfg, corpus, 4, 7, dist, 2, state)
    assert isinstance(order, stream.StreamOrder) and (order.rank, order.world, order.seed, order.micro) == (1, 2, 7, 4)
    assert order.next_micro_batch == 2 and order.positions == {1: (0, 1, 0), 3: (0, 1, 0)}
    assert order.tokenizer is tokenizer and order.cfg is cfg
    rows = stream.batch_order(OmegaConf.merge(cfg, {"streaming": False}), corpus, 4, 7, dist, 2, None)
    assert isinstance(rows, BatchOrder) and rows.rows is corpus.train
    expected = BatchOrder(corpus.train, 4, 7, 1, 2)
    assert (rows.micro_batch, rows.seed, rows.rank, rows.world) == (4, 7, 1, 2)
    assert torch.equal(rows.micro_batch_rows(3), expected.micro_batch_rows(3))


def test_a_word_tokenizer_reads_blank_lines_whatever_the_config_says(tmp_path):
    """A word vocabulary's documents are every line (a blank one is its <eos> alone), also under a config that
    says wordpiece (a checkpoint's or ``data.tokenizer``'s vocabulary): rows of the lines' words, <eos> after each."""
    from bertode.training.words import EOS, train_tokenizer

    lines = ["a b c", "", "d e", "", "", "f g h i", "b"]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "eval.txt").write_text("a b\n")
    tokenizer = train_tokenizer(lines, None)
    cfg = OmegaConf.create(dict(source="text", files=[str(tmp_path / "train.txt")], seq_len=6, vocabulary="wordpiece",
                                eval_files=[str(tmp_path / "eval.txt")], eval_fraction=0.05))
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids = [i for line in lines for i in [*tokenizer(line, add_special_tokens=False)["input_ids"], eos]]
    assert len(ids) == 17 and ids.count(eos) == 7
    expected = [[tokenizer.cls_token_id, *ids[n * 4:n * 4 + 4], tokenizer.sep_token_id] for n in range(4)]
    rows_stream = stream.shard_rows(cfg, tokenizer, 0, 1, (0, 0, 0))
    assert [next(rows_stream)[0] for _ in range(5)] == expected + expected[:1]
