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


def test_generate_runs_the_head_on_the_last_position_only():
    hf, ode = _pair(initializer_range=0.5)
    seen = []
    ode.cls.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[1]))
    prompt = _tokens((2, 4), 5)
    got = ode.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, hf.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert seen == [1, 1, 1, 1]


@pytest.mark.parametrize("use_cache", [False, True])
def test_generate_returns_every_steps_attentions_and_hidden_states_as_hf(use_cache):
    hf, ode = _pair(initializer_range=0.5)
    hf.set_attn_implementation("eager")  # HF's sdpa returns no attention maps
    prompt = _tokens((2, 4), 5)
    flags = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_attentions=True,
                 output_hidden_states=True, return_dict_in_generate=True)
    expected = hf.generate(prompt, use_cache=use_cache, **flags)
    got = ode.generate(prompt, use_cache=use_cache, **flags)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.attentions) == len(got.hidden_states) == 3
    for kind in ("attentions", "hidden_states"):
        for step_got, step_expected in zip(getattr(got, kind), getattr(expected, kind)):
            assert len(step_got) == len(step_expected)
            for a, b in zip(step_got, step_expected):
                assert a.shape == b.shape and (a - b).abs().max() <= 1e-5, kind


def test_generate_from_inputs_embeds_equals_hf_and_generating_from_the_ids():
    hf, ode = _pair(initializer_range=0.5)  # large weights: the next token depends on the whole prefix
    prompt = _tokens((2, 4), 5)
    embeds = ode.get_input_embeddings()(prompt)
    flags = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    got = ode.generate(inputs_embeds=embeds, **flags)
    assert torch.equal(got, hf.generate(inputs_embeds=embeds, **flags))  # HF: with its cache
    assert torch.equal(got, ode.generate(prompt, **flags)[:, 4:])
    both = ode.generate(prompt, inputs_embeds=embeds, **flags)  # HF's "embeddings at the first step" form
    assert torch.equal(both, hf.generate(prompt, inputs_embeds=embeds, **flags))


def test_a_causal_lm_without_is_decoder_warns_and_then_behaves_as_hfs():
    from transformers import BertConfig, BertLMHeadModel
    from transformers.testing_utils import CaptureLogger

    import bertode.causal_lm

    torch.manual_seed(0)
    hf = BertLMHeadModel(BertConfig(**TINY)).eval()  # is_decoder=False: HF warns, attention is bidirectional
    with CaptureLogger(bertode.causal_lm.logger) as captured:
        ode = bertode.from_bert(hf, solver="euler", steps=1).eval()
    assert "add `is_decoder=True.`" in captured.out and isinstance(ode, bertode.BertODEForCausalLM)
    ids = _tokens((2, 9), 6)
    expected, got = hf(ids, labels=ids), ode(ids, labels=ids)
    assert (got.logits - expected.logits).abs().max() <= 1e-5 and abs(got.loss - expected.loss) <= 1e-6
    with CaptureLogger(bertode.causal_lm.logger) as captured:
        bertode.BertODEForCausalLM(ode.config.__class__(**TINY, is_decoder=True))
    assert captured.out == ""
