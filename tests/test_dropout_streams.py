"""`bertode.layers.dropout`: each row's masks come from its own counter-based stream.

Oracles: a pure-Python splitmix64 of (seed, draw, global row, element) for the bits; the
binomial bounds for the keep rate, the mask's mean and pairwise independence; the world-1
draw for every split of the rows, with no tensor larger than this rank's share made; the
same block redrawn for a resume and under `restored` for a checkpointed recomputation;
eager masks for compiled ones; ``F.dropout`` itself outside a split.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bertode
from bertode.layers.dropout import current_split, dropout, keep_mask, mix64, restored, split_invariant
from conftest import tiny_ode_config

M64 = (1 << 64) - 1
GAMMA, ROW_GAMMA = 0x9E3779B97F4A7C15, 0xD1B54A32D192ED03


def reference_keep(seed: int, draw: int, row: int, element: int, p: float) -> bool:
    """Element ``element`` of global row ``row`` in the ``draw``-th draw (1, 2, ...) of a block
    seeded ``seed``, from the documented construction in Python integers."""
    stream = mix64(mix64(seed) + draw * GAMMA)
    row_seed = mix64(stream + (row + 1) * ROW_GAMMA)
    word = mix64(row_seed + (element // 2 + 1) * GAMMA)
    half = (word >> (32 * (element % 2))) & 0xFFFFFFFF  # little-endian: the low half first
    signed = half - 2**32 if half >= 2**31 else half  # compared as an int32: an interval of (1 - p) 2^32 words
    return signed < int((1 - p) * 2**32) - 2**31


# Shapes a tiny model draws in order: embeddings, attention probabilities, a hidden residual.
DRAWS = [(6, 16), (3, 6, 6), (6, 16)]


def _masks(seed, rows, global_rows, p=0.1, batch=None):
    with split_invariant(seed, rows, global_rows):
        return [keep_mask(torch.empty(len(rows), *shape), p) for shape in (batch or DRAWS)]


def test_masks_are_the_python_reference_bit_for_bit():
    rows = torch.tensor([5, 2, 7])
    masks = _masks(1234567, rows, 8, p=0.3, batch=[(4, 512), (2, 32, 32)])  # 12288 elements
    for draw, mask in enumerate(masks, start=1):
        assert torch.equal(mask.unique(), torch.tensor([0.0, 1 / 0.7]))
        kept = (mask.flatten(1) > 0).tolist()
        expected = [[reference_keep(1234567, draw, row, element, 0.3) for element in range(len(kept[0]))]
                    for row in rows.tolist()]
        assert kept == expected, draw


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_draws_are_bernoulli_with_mean_one_and_independent(p):
    with split_invariant(3, torch.arange(64), 64):
        mask = keep_mask(torch.empty(64, 4, 32, 32), p)  # 262144 elements
    n, q = mask.numel(), 1 - p
    kept = (mask > 0).double()
    assert abs(kept.mean().item() - q) <= 5 * math.sqrt(p * q / n)
    assert abs(mask.double().mean().item() - 1) <= 5 * math.sqrt(p / q / n)  # E[mask] = 1 after the 1/(1-p) scale
    per_row = kept.flatten(1).mean(1)  # each row's own stream keeps 1 - p of its elements
    assert (per_row - q).abs().max().item() <= 5 * math.sqrt(p * q / 4096)
    # Neighbours (the two halves of one word, and the next word), the same element of two
    # rows: P(both kept) = q^2 within 5 sigma.
    flat = kept.flatten(1)
    for a, b in ((flat[:, 0::2], flat[:, 1::2]), (flat[:, 0:-2:2], flat[:, 2::2]), (flat[:-1], flat[1:])):
        both = (a * b).mean().item()
        assert abs(both - q * q) <= 5 * math.sqrt(q * q * (1 - q * q) / a.numel()), both


def test_rows_draws_and_seeds_give_different_masks():
    first, second, third = _masks(11, torch.arange(6), 6, batch=[(64, 64)] * 3)
    other_seed = _masks(12, torch.arange(6), 6, batch=[(64, 64)])[0]
    agree = (1 - 0.1) ** 2 + 0.1**2  # two independent Bernoulli(0.9) masks agree this often
    pairs = [(first[0], first[1]), (first, second), (second, third), (first, other_seed)]
    for a, b in pairs:
        assert not torch.equal(a, b)
        assert abs((a == b).double().mean().item() - agree) <= 5 * math.sqrt(agree * (1 - agree) / a.numel())


class _LargestOutput(TorchDispatchMode):
    """The most bytes of any tensor an op made."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel() * tensor.element_size())
        return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_rank_draws_only_its_rows_and_the_world_one_masks(world):
    whole = _masks(99, torch.arange(8), 8)
    for rank in range(world):
        rows = torch.arange(8)[rank::world]
        with _LargestOutput() as made:
            masks = _masks(99, rows, 8)
        for mask, expected in zip(masks, whole):
            assert torch.equal(mask, expected[rows])
        # O(local): nothing larger than this rank's float32 mask (the global draw was world times that)
        local = max(len(rows) * math.prod(shape) for shape in DRAWS) * 4
        assert made.largest <= local, (made.largest, local)


def _forward_rows(model, ids, rows, seed):
    with split_invariant(seed, rows, len(ids)):
        return model(input_ids=ids[rows]).last_hidden_state


def test_a_model_with_attention_dropout_gives_the_same_rows_at_world_sizes_one_two_and_four():
    torch.manual_seed(0)
    model = bertode.BertODEModel(tiny_ode_config(solver="rk4", steps=2, hidden_dropout_prob=0.1,
                                                 attention_probs_dropout_prob=0.1)).train()
    ids = torch.randint(5, 64, (8, 10), generator=torch.Generator().manual_seed(0))
    whole = _forward_rows(model, ids, torch.arange(8), seed=7)
    for world in (2, 4):
        for rank in range(world):
            rows = torch.arange(8)[rank::world]
            torch.manual_seed(100 + rank)  # torch's generator plays no part
            assert (_forward_rows(model, ids, rows, seed=7) - whole[rows]).abs().max().item() <= 1e-5
    # the masks matter: another seed moves the outputs by far more than that bound
    assert (_forward_rows(model, ids, torch.arange(8), seed=8) - whole).abs().max().item() > 1e-2


def test_a_resumed_block_redraws_the_same_masks_and_leaves_torchs_generator_alone():
    rows = torch.tensor([1, 3])
    uninterrupted = [_masks(seed, rows, 4) for seed in (20, 21, 22)]  # micro-batches 0, 1, 2
    torch.manual_seed(5)
    state = torch.get_rng_state()
    resumed = _masks(22, rows, 4)  # a fresh process starting at micro-batch 2
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[2]))
    with split_invariant(22, rows, 4):  # the masks do not consume the generator the block seeds
        first = torch.rand(3)
        keep_mask(torch.empty(2, 8), 0.1)
        second = torch.rand(3)
    torch.manual_seed(22)
    assert torch.equal(torch.cat([first, second]), torch.rand(6))


def test_restored_snapshots_redraw_the_forwards_masks_and_the_block_moves_on():
    shape = torch.empty(2, 5, 8)
    with split_invariant(4, torch.tensor([0, 1]), 2):
        straight = [keep_mask(shape, 0.2) for _ in range(3)]
    with split_invariant(4, torch.tensor([0, 1]), 2):
        first = keep_mask(shape, 0.2)
        snapshot = current_split()
        with restored(snapshot):  # the checkpointed layer's forward
            forward = keep_mask(shape, 0.2)
        after = keep_mask(shape, 0.2)  # the next layer: the block's counter moved past the layer's draw
        with restored(snapshot):  # the backward's recomputation
            recomputed = keep_mask(shape, 0.2)
        later = keep_mask(shape, 0.2)  # the recomputation does not rewind the block
    assert torch.equal(first, straight[0]) and torch.equal(forward, straight[1]) and torch.equal(after, straight[2])
    assert torch.equal(recomputed, forward)
    assert not any(torch.equal(later, m) for m in straight)
    assert current_split() is None


def test_outside_a_split_dropout_is_exactly_f_dropout():
    x = torch.randn(3, 7, 9)
    torch.manual_seed(1)
    ours = dropout(x, 0.3, True)
    torch.manual_seed(1)
    assert torch.equal(ours, F.dropout(x, 0.3, True))
    assert dropout(x, 0.3, False) is x


def test_rows_outside_the_global_batch_are_refused_in_one_line():
    with pytest.raises(ValueError) as error:
        with split_invariant(1, torch.tensor([0, 4]), 4):
            pass
    message = str(error.value)
    assert "rows" in message and "in [0, 4]" in message and "allowed: 1-d row indices in [0, 4)" in message
    assert "\n" not in message


def test_a_compiled_model_draws_the_eager_masks_without_recompiling():
    from test_compile import CountingBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = tiny_ode_config(solver="euler", steps=1, num_hidden_layers=1, hidden_dropout_prob=0.1,
                             attention_probs_dropout_prob=0.1)
    model = bertode.BertODEForMaskedLM(config).train()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    ids = torch.randint(5, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([1, 3])
    compiled_by_step = []
    for step in range(3):
        backend.calls = 0
        with split_invariant(step, rows, 4):
            ours = compiled(input_ids=ids[rows], labels=ids[rows]).loss
        with split_invariant(step, rows, 4):
            eager = model(input_ids=ids[rows], labels=ids[rows]).loss
        assert abs(ours.item() - eager.item()) <= 1e-6
        assert backend.calls == 1  # one graph: no break at the draws
        compiled_by_step.append(backend.compiled)
    # the model recompiles once after its first forward (observe's global); a new seed (a
    # new micro-batch) and the advanced draw counter compile nothing new
    assert compiled_by_step[2] == compiled_by_step[1], compiled_by_step
