"""The training data order (`bertode/training/distributed.py`'s `BatchOrder`) and one process's `Distributed`.

Each epoch is a permutation of the rows seeded by (seed, epoch); micro-batch m is positions m*B .. m*B+B-1 of the
epochs' permutations laid end to end; its masks and dropout are seeded by (seed, m); each rank takes its rows
``rank::world`` of the global batch. The seed formulas are written out here (a checkpoint of an earlier version
resumes on the same rows and masks). The multi-process collectives are tested by the torchrun runs (test_train.py,
test_oracles_training.py)."""

from __future__ import annotations

import pytest
import torch

from bertode.training.distributed import BatchOrder, Distributed


def epoch_permutation(seed: int, epoch: int, rows: int) -> torch.Tensor:
    return torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def noisy_batch(rows, generator):
    """A make_batch whose output shows the generator it was given."""
    return rows + 1000 * torch.randint(1, 1000, rows.shape, generator=generator), rows.clone()


def test_micro_batches_are_consecutive_slices_of_the_epochs_permutations_as_a_pure_function_of_m():
    rows = torch.arange(30).reshape(10, 3)
    stream = torch.cat([epoch_permutation(3, epoch, 10) for epoch in range(3)])  # row indices, epoch after epoch
    assert all(sorted(stream[10 * e:10 * e + 10].tolist()) == list(range(10)) for e in range(3))
    assert not torch.equal(stream[:10], stream[10:20])  # a new order each epoch
    order = BatchOrder(rows, micro_batch=4, seed=3)
    for m in (0, 1, 2, 3, 6, 4, 1):  # in any order; m = 2 and 4 straddle an epoch's end
        expected = rows[stream[4 * m:4 * m + 4]]
        assert torch.equal(order.micro_batch_rows(m), expected)
        assert torch.equal(BatchOrder(rows, 4, seed=3).micro_batch_rows(m), expected)  # a resumed run's fresh order
    assert order.state(None) is None


def test_a_micro_batch_is_masked_with_its_seeded_generator_and_sliced_by_rank():
    rows = torch.arange(40).reshape(8, 5)
    order = BatchOrder(rows, micro_batch=6, seed=2)
    for m in range(3):
        expected = noisy_batch(order.micro_batch_rows(m), torch.Generator().manual_seed(2 * 7_919 + m + 1))
        whole = order.batch(m, noisy_batch)
        assert torch.equal(whole[0], expected[0]) and torch.equal(whole[1], expected[1])
        alone = order.local_batch(m, noisy_batch)  # by default rank 0 of 1: the whole batch
        assert torch.equal(alone[0], expected[0]) and torch.equal(alone[1], expected[1])
        for world in (1, 2, 3):
            for rank in range(world):
                inputs, labels = BatchOrder(rows, 6, 2, rank, world).local_batch(m, noisy_batch)
                assert torch.equal(inputs, expected[0][rank::world]) and torch.equal(labels, expected[1][rank::world])


def test_dropout_noise_seeds_are_the_formula_and_differ_by_step_and_seed():
    seeds = {(seed, m): BatchOrder(torch.zeros(4, 2), 2, seed).noise_seed(m) for seed in (0, 1, 5) for m in range(50)}
    assert all(value == seed * 2_654_435_761 + 104_729 * m + 17 for (seed, m), value in seeds.items())
    assert len(set(seeds.values())) == len(seeds) and BatchOrder.noise_seed_of(1, 2) == 2_654_435_761 + 209_458 + 17


def test_one_process_is_rank_zero_of_one_and_its_collectives_return_their_input(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    dist = Distributed("cpu")
    assert (dist.world, dist.rank, dist.device, dist.main) == (1, 0, torch.device("cpu"), True)
    value = {"rows": [1, 2]}
    assert dist.broadcast(value) is value and dist.gather(value) == [value] and dist.all_sum([1.5, -2.0]) == [1.5, -2.0]
    dist.barrier()
    dist.close()
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("RANK", "1")
    assert Distributed("auto").main is False  # only rank 0 is the main process
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:  # a process group this process did not make is not this one-process Distributed's to end
        Distributed("cpu").close()
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()
    with pytest.raises(ValueError) as error:
        Distributed("tpu")
    assert str(error.value) == "trainer.device='tpu' is invalid; allowed: 'auto', 'cpu', 'cuda'"


def _two_ranks_child(rank: int, port: int, results, flag):
    import os
    import signal
    import time

    signal.alarm(20)  # a collective that hangs (a mutant's) ends the child, not gloo's 30-minute timeout
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        dist = Distributed("cpu")
        got = dict(world=dist.world, rank=dist.rank, main=dist.main, backend=torch.distributed.get_backend(),
                   broadcast=dist.broadcast({"from": rank}), gather=dist.gather(("rank", rank)),
                   all_sum=dist.all_sum([1.0 + 1e-12 * (rank + 1), 0.5 * rank]))
        if rank == 0:
            time.sleep(0.3)
            flag.value = 1
        dist.barrier()  # rank 1 passes it only after rank 0 has set the flag
        got["flag_after_barrier"] = flag.value
        dist.close()
        got["closed"] = not torch.distributed.is_initialized()
        results.put((rank, got))
    except BaseException as error:  # noqa: BLE001 (the parent asserts on it)
        results.put((rank, repr(error)))


def test_two_processes_broadcast_from_rank_zero_gather_in_rank_order_and_sum_in_float64(monkeypatch):
    """Two forked processes on gloo (torchrun's environment variables): each collective against its definition."""
    import multiprocessing
    import socket

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    # the same calls in this process first (one rank), which is also how mutmut sees this test reach them
    alone = Distributed("cpu")
    assert (alone.broadcast(1), alone.gather(1), alone.all_sum([0.5])) == (1, [1], [0.5])
    alone.barrier()
    alone.close()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("fork")
    results, flag = context.Queue(), context.Value("i", 0)
    children = [context.Process(target=_two_ranks_child, args=(rank, port, results, flag)) for rank in range(2)]
    try:
        for child in children:
            child.start()
        got = dict(results.get(timeout=30) for _ in children)
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
    for rank in range(2):
        assert got[rank] == dict(world=2, rank=rank, main=rank == 0, backend="gloo", broadcast={"from": 0},
                                 gather=[("rank", 0), ("rank", 1)],
                                 all_sum=[(1.0 + 1e-12) + (1.0 + 2e-12), 0.5], flag_after_barrier=1, closed=True), got
