"""Segment memory (``mem_len``, `bertode/layers/segment_memory.py`): causality across segment boundaries in
every mode, the recurrence equal to the whole text's causal forward where the paper says it is (one attention
evaluation per layer: discrete, Euler-1; and a DEQ's equilibrium), memory 0 equal to the model without it, the
window of ``mem_len`` positions, and one-line refusals."""

from __future__ import annotations

import pytest
import torch

from bertode import BertODEConfig
from bertode.causal_lm import BertODEForCausalLM

MODES = {
    "discrete": dict(mode="discrete"),
    "euler": dict(mode="ode", solver="euler"),
    "rk4": dict(mode="ode", solver="rk4", steps=2),
    "dopri5": dict(mode="ode", solver="dopri5", atol=1e-10, rtol=1e-10),  # its step grid reads every token
    "deq": dict(mode="deq", deq_tol=1e-9, deq_max_iter=100, deq_stop_mode="abs"),
    "deq_qkv": dict(mode="deq", deq_injection="qkv", deq_tol=1e-9, deq_max_iter=100, deq_stop_mode="abs"),
}


def causal_lm(mem_len=8, seed=0, **fields) -> BertODEForCausalLM:
    base = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                is_decoder=True, position_scheme="transformer_xl", hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, max_position_embeddings=64, mem_len=mem_len,
                initializer_range=0.2)
    base.update(fields)
    torch.manual_seed(seed)
    return BertODEForCausalLM(BertODEConfig(**base)).double().eval()


def by_segments(model, tokens: torch.Tensor, length: int, mems=None):
    """The logits of ``tokens`` read ``length`` at a time, the memory carried; and the last mems."""
    logits = []
    for start in range(0, tokens.shape[1], length):
        out = model(tokens[:, start:start + length], mems=mems)
        logits.append(out.logits)
        mems = out.mems
    return torch.cat(logits, dim=1), mems


@pytest.mark.parametrize("mode", sorted(MODES))
def test_changing_a_token_leaves_every_earlier_logit_unchanged_across_segment_boundaries(mode):
    model = causal_lm(**MODES[mode])
    tokens = torch.randint(0, 50, (2, 18), generator=torch.Generator().manual_seed(1))
    reference, _ = by_segments(model, tokens, 6)
    for changed in (4, 7, 13):  # in the first segment, just after a boundary, in the last segment
        edited = tokens.clone()
        edited[:, changed] = (edited[:, changed] + 1) % 50
        logits, _ = by_segments(model, edited, 6)
        assert (logits[:, :changed] - reference[:, :changed]).abs().max() <= 1e-6, (mode, changed)
        assert (logits[:, changed:] - reference[:, changed:]).abs().max() > 1e-4, (mode, changed)  # read from there on


@pytest.mark.parametrize("mode, scheme", [("discrete", "transformer_xl"), ("euler", "transformer_xl"),
                                          ("deq", "transformer_xl"), ("deq_qkv", "transformer_xl"),
                                          ("discrete", "rotary"), ("discrete", "deberta")])
def test_reading_by_segments_equals_the_whole_text_where_attention_is_evaluated_once_per_layer(mode, scheme):
    """Transformer-XL's recurrence with a memory as long as the text so far is the causal forward of the whole
    text when each layer evaluates attention once at its input (discrete, Euler-1); a DEQ's equilibrium of the
    whole text, restricted to a segment, solves that segment's equation with the earlier positions' layer inputs
    at z* as memory."""
    model = causal_lm(mem_len=18, position_scheme=scheme, **MODES[mode])
    tokens = torch.randint(0, 50, (2, 18), generator=torch.Generator().manual_seed(2))
    config = model.config
    config.mem_len = 0
    whole = model(tokens).logits
    config.mem_len = 18
    logits, mems = by_segments(model, tokens, 6)
    tolerance = 1e-6 if mode.startswith("deq") else 1e-10
    assert (logits - whole).abs().max() <= tolerance
    width = 4 * 32 if mode == "deq_qkv" else 32  # the states, then their Q/K/V injection
    assert [tuple(m.shape) for m in mems] == [(2, 18, width)] * 2  # every layer input of the text: mem_len 18
    assert not any(m.requires_grad for m in mems)


def test_memory_keeps_the_last_mem_len_positions_of_each_layer():
    model = causal_lm(mem_len=8)
    tokens = torch.randint(0, 50, (3, 15), generator=torch.Generator().manual_seed(3))
    first = model(tokens[:, :5])
    assert [tuple(m.shape) for m in first.mems] == [(3, 5, 32)] * 2
    second = model(tokens[:, 5:10], mems=first.mems)
    states = model.bert(tokens[:, 5:10], mems=first.mems, output_hidden_states=True).hidden_states
    for layer, memory in enumerate(second.mems):  # the window: 3 of the old positions, then the 5 new layer inputs
        assert torch.equal(memory[:, :3], first.mems[layer][:, 2:])
        assert torch.allclose(memory[:, 3:], states[layer], atol=1e-12)


def test_memory_zero_is_the_model_without_memory():
    with_memory, without = causal_lm(mem_len=8), causal_lm(mem_len=0)
    without.load_state_dict(with_memory.state_dict())
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(4))
    assert torch.equal(with_memory(tokens).logits, without(tokens).logits)  # a first segment: nothing remembered
    assert without(tokens).mems is None
    with pytest.raises(ValueError, match=r"^mems is invalid with BertODEConfig.mem_len=0; allowed: None"):
        without(tokens, mems=with_memory(tokens).mems)


def test_the_weights_get_gradients_through_the_memory_and_the_states_none():
    model = causal_lm(mem_len=8).train()
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(5))
    mems = model(tokens[:, :6]).mems
    key = model.bert.encoder.layer[0].attention.branch.key.weight
    grad_with = torch.autograd.grad(model(tokens[:, 6:], mems=mems, labels=tokens[:, 6:]).loss, key)[0]
    grad_without = torch.autograd.grad(model(tokens[:, 6:], labels=tokens[:, 6:]).loss, key)[0]
    assert (grad_with - grad_without).abs().max() > 1e-8  # the remembered keys are W_k m: part of the graph


def test_a_padding_mask_over_the_new_tokens_spans_the_memory():
    model = causal_lm(mem_len=8)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(6))
    mems = model(tokens[:, :6]).mems
    plain = model(tokens[:, 6:], mems=mems).logits
    ones = torch.ones(2, 6, dtype=torch.long)
    assert torch.allclose(model(tokens[:, 6:], mems=mems, attention_mask=ones).logits, plain, atol=1e-12)
    both = torch.ones(2, 12, dtype=torch.long)
    assert torch.allclose(model(tokens[:, 6:], mems=mems, attention_mask=both).logits, plain, atol=1e-12)


@pytest.mark.parametrize("fields, message", [
    (dict(is_decoder=False), r"mem_len=8 is invalid with is_decoder=False"),
    (dict(position_scheme="absolute"), r"mem_len=8 is invalid with position_scheme='absolute'"),
    (dict(mem_len=-1), r"mem_len=-1 is invalid; allowed: an integer >= 0"),
    (dict(mode="ode", solver="rk4", sensitivity="adjoint", attention_probs_dropout_prob=0.0),
     r"mem_len=8 is invalid with sensitivity='adjoint'"),
    (dict(num_hidden_layers=3, prelude_layers=1), r"mem_len=8 is invalid with prelude_layers=1, coda_layers=0"),
])
def test_settings_a_memory_cannot_serve_are_refused_in_one_line(fields, message):
    base = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                is_decoder=True, position_scheme="transformer_xl", mem_len=8)
    with pytest.raises(ValueError, match=message) as error:
        BertODEConfig(**{**base, **fields}).validate_ode()
    assert "\n" not in str(error.value)


def test_mems_of_another_batch_or_a_cache_are_refused_in_one_line():
    model = causal_lm(mem_len=8)
    tokens = torch.randint(0, 50, (2, 6))
    mems = model(tokens).mems
    with pytest.raises(ValueError, match=r"^mems\[0\] of shape \(2, 6, 32\) is invalid; allowed: \(batch=3"):
        model(torch.randint(0, 50, (3, 6)), mems=mems)
    with pytest.raises(ValueError, match=r"use_cache=True is invalid with mem_len=8"):
        model(tokens, use_cache=True)
    assert model.generation_config.use_cache is False


def test_per_token_exit_of_a_looped_core_stays_causal_across_segment_boundaries():
    """Each token of a weight-tied core stops on its own latent change (``exit=latent_diff``); an exited token
    keeps supplying its keys, and the remembered states are each application's inputs (segments may run different
    numbers of applications: the missing ones read the last one's): still causal."""
    import bertode

    model = causal_lm(mode="discrete", weight_tying=True, core_injection="add", num_hidden_layers=4)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(7))
    edited = tokens.clone()
    edited[:, 8] = (edited[:, 8] + 1) % 50
    with bertode.dialed(exit=bertode.make_exit_criterion("latent_diff", 0.05), depth=8):
        reference, mems = by_segments(model, tokens, 6)
        exited = model.solver_stats()["exit_depth_mean"]
        logits, _ = by_segments(model, edited, 6)
    assert 1 < exited < 8  # tokens left at different depths
    assert len({tuple(m.shape) for m in mems}) == 1  # every application remembers as many positions
    assert (logits[:, :8] - reference[:, :8]).abs().max() <= 1e-6
    assert (logits[:, 8:] - reference[:, 8:]).abs().max() > 1e-4
