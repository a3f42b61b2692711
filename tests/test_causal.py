"""Causal attention (``is_decoder=True``, issue 15 item 2): every evaluation of a sublayer
gets the causal mask (`sublayers.sdpa_mask`), so changing the tokens after position i
leaves every output at positions <= i unchanged, in every mode. Fixed-step solves are
causal exactly; an adaptive solve shares its step control across positions, and a DEQ
solver its mixing, so those are causal to their tolerance (tight here, fp64)."""

import pytest
import torch

import bertode
from conftest import TINY, tiny_ode_config

TIGHT = dict(atol=1e-10, rtol=1e-10)
MODES = {
    "discrete": dict(mode="discrete"),
    "euler": dict(solver="euler", steps=2),
    "rk4": dict(solver="rk4", steps=2),
    "dopri5": dict(solver="dopri5", **TIGHT),
    "dopri5_adjoint": dict(solver="dopri5", sensitivity="adjoint", adjoint_atol=1e-10, adjoint_rtol=1e-10, **TIGHT),
    "block_rk2": dict(block="rk2"),
    "pre_ln_rk4": dict(solver="rk4", steps=2, norm_position="pre"),
    "deq_ift": dict(mode="deq", num_hidden_layers=1, deq_tol=1e-11, deq_max_iter=200, deq_backward_tol=1e-11,
                    deq_backward_max_iter=200),
}


@pytest.mark.parametrize("name", list(MODES))
def test_outputs_and_gradients_before_position_i_ignore_the_tokens_after_it(name):
    torch.manual_seed(0)
    model = bertode.BertODEForMaskedLM(tiny_ode_config(is_decoder=True, **MODES[name])).double()
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(5, TINY["vocab_size"], (2, 10), generator=generator)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 8:] = 0  # padding at the end of the second row
    changed = ids.clone()
    changed[:, 6:] = torch.randint(5, TINY["vocab_size"], (2, 4), generator=generator)
    outputs, grads = [], []
    for inputs in (ids, changed):
        model.zero_grad()
        logits = model(inputs, attention_mask=mask).logits
        logits[:, :6].sum().backward()  # a loss of the first 6 positions only
        outputs.append(logits[:, :6].detach())
        grads.append(model.bert.embeddings.word_embeddings.weight.grad.clone())
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-6, name
    assert (grads[0] - grads[1]).abs().max() <= 1e-6, name  # and nothing after i reaches their gradients
    bidirectional = bertode.BertODEForMaskedLM(tiny_ode_config(**MODES[name])).double()
    bidirectional.load_state_dict(model.state_dict())
    before, after = (bidirectional(x, attention_mask=mask).logits[:, :6] for x in (ids, changed))
    assert (before - after).abs().max() > 1e-3, name  # without is_decoder the future leaks in


def test_a_converted_decoder_keeps_its_causal_attention():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    hf = BertModel(BertConfig(**TINY, is_decoder=True)).eval()
    ode = bertode.from_bert(hf, solver="euler", steps=1).eval()
    assert ode.config.is_decoder
    ids = torch.randint(5, TINY["vocab_size"], (2, 9))
    expected = hf(ids).last_hidden_state
    assert (ode(ids).last_hidden_state - expected).abs().max() <= 1e-5


def _hf_decoder():
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    return BertLMHeadModel(BertConfig(**TINY, is_decoder=True)).eval()


@pytest.mark.parametrize("source", ["object", "directory"])
def test_euler_1_causal_lm_equals_hf_bert_lm_head_model_in_logits_and_every_gradient(tmp_path, batch, source):
    hf = _hf_decoder()
    if source == "directory":
        hf.save_pretrained(tmp_path / "hf")
    ode = bertode.from_bert(hf if source == "object" else tmp_path / "hf", solver="euler", steps=1).eval()
    assert isinstance(ode, bertode.BertODEForCausalLM)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    hf_out = hf(batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    ode_out = ode(batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    keep = batch["attention_mask"].bool()
    assert (hf_out.logits - ode_out.logits)[keep].abs().max() <= 1e-5
    assert abs(hf_out.loss.item() - ode_out.loss.item()) <= 1e-6
    hf_out.loss.backward()
    ode_out.loss.backward()
    ours = dict(ode.named_parameters())
    compared = 0
    for name, parameter in hf.named_parameters():
        if parameter.grad is not None:
            mine = ours[bertode.convert.rename_bert_key(name)].grad
            assert (mine - parameter.grad).abs().max() <= 1e-5, name
            compared += 1
    assert compared == sum(1 for p in hf.parameters() if p.grad is not None) >= 40


def test_generate_greedy_equals_hf():
    hf = _hf_decoder()
    ode = bertode.from_bert(hf, solver="euler", steps=1).eval()
    prompt = torch.randint(5, TINY["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(5))
    expected = hf.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = ode.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected) and got.shape == (2, 10)
    sampled = ode.generate(prompt, max_new_tokens=3, do_sample=True, top_k=5, pad_token_id=0)
    assert sampled.shape == (2, 7) and torch.equal(sampled[:, :4], prompt)
    rk4 = bertode.BertODEForCausalLM(tiny_ode_config(is_decoder=True, solver="rk4", steps=2)).eval()
    assert rk4.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (2, 6)


def test_left_padding_keeps_every_output_finite():
    model = bertode.BertODEForCausalLM(tiny_ode_config(is_decoder=True, solver="rk4", steps=1)).eval()
    ids = torch.randint(5, TINY["vocab_size"], (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # the first query has no key left but itself
    logits = model(ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
