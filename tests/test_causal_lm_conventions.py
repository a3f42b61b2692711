"""`BertODEForCausalLM` follows transformers' causal-LM conventions (issue 26), with HF's
`BertLMHeadModel` converted by `bertode.from_bert` at Euler-1 as the oracle: pre-shifted
``shift_labels`` (dense, sparse prediction, ``num_items_in_batch``), ``logits_to_keep``."""

import pytest
import torch

import bertode
from conftest import TINY


def _pair(**overrides):
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    hf = BertLMHeadModel(BertConfig(**{**TINY, **overrides}, is_decoder=True)).eval()
    return hf, bertode.from_bert(hf, solver="euler", steps=1).eval()


def _tokens(shape, seed):
    return torch.randint(5, TINY["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_items_in_batch", [None, 13])
def test_shift_labels_are_the_targets_as_given_as_in_hf(num_items_in_batch):
    hf, ode = _pair()
    ids = _tokens((2, 9), 1)
    labels = ids.masked_fill(torch.rand(2, 9, generator=torch.Generator().manual_seed(2)) < 0.3, -100)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]  # what the internal shift makes
    other = _tokens((2, 9), 3).masked_fill(labels == -100, -100)  # targets that are not labels' shift
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    by_labels = ode(ids, labels=labels, **extra).loss
    assert abs(by_labels - hf(ids, labels=labels, **extra).loss) <= 1e-6
    assert abs(ode(ids, labels=labels, shift_labels=shifted, **extra).loss - by_labels) <= 1e-6
    expected = hf(ids, labels=labels, shift_labels=other, **extra).loss
    got = ode(ids, labels=labels, shift_labels=other, **extra).loss
    assert abs(got - expected) <= 1e-6 and abs(got - by_labels) > 1e-3  # (near-uniform logits at init)
    assert ode(ids, shift_labels=other).loss is None is hf(ids, shift_labels=other).loss  # HF: no labels, no loss


@pytest.mark.parametrize("num_items_in_batch", [None, 13])
def test_sparse_prediction_reads_shift_labels_too(num_items_in_batch):
    hf, dense = _pair()
    sparse = bertode.BertODEForCausalLM(dense.config.__class__(**{**dense.config.to_dict(), "sparse_prediction": True}))
    sparse.load_state_dict(dense.state_dict())
    sparse.train()  # sparse prediction is a training path (dropout is 0 in TINY)
    ids = _tokens((2, 9), 1)
    labels = ids.masked_fill(torch.rand(2, 9, generator=torch.Generator().manual_seed(2)) < 0.3, -100)
    other = _tokens((2, 9), 3).masked_fill(labels == -100, -100)
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    for shift_labels in (None, other):
        got = sparse(ids, labels=labels, shift_labels=shift_labels, **extra)
        expected = hf(ids, labels=labels, shift_labels=shift_labels, **extra).loss
        assert abs(got.loss - expected) <= 1e-5, shift_labels
        targets = other if shift_labels is not None else labels[:, 1:]
        assert got.logits.shape == ((targets != -100).sum(), TINY["vocab_size"])  # the scored rows only


@pytest.mark.parametrize("keep", [0, 1, 4, 9, [0, 4, 8]])
def test_logits_to_keep_equals_hf(keep):
    hf, ode = _pair()
    ids = _tokens((2, 9), 4)
    keep = torch.tensor(keep) if isinstance(keep, list) else keep
    expected = hf(ids, logits_to_keep=keep).logits
    got = ode(ids, logits_to_keep=keep).logits
    assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-5


def test_logits_to_keep_out_of_range_or_with_a_loss_is_refused_in_one_line():
    _, ode = _pair()
    ids = _tokens((2, 9), 4)
    with pytest.raises(ValueError, match=r"^logits_to_keep=10 is invalid .*allowed: an int in \[0, 9\]") as info:
        ode(ids, logits_to_keep=10)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"^logits_to_keep=-1 is invalid"):
        ode(ids, logits_to_keep=-1)
    with pytest.raises(ValueError, match=r"^logits_to_keep=1 with labels is invalid; allowed: 0 or 9"):
        ode(ids, labels=ids, logits_to_keep=1)
