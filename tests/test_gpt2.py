"""GPT-2 converts exactly at Euler-1 (issue 15 item 3): pre-LN sites, causal attention, no
embedding LayerNorm, Conv1D weights transposed, the fused Q/K/V split, learned positions
and the bare tied decoder. The oracle is transformers' `GPT2LMHeadModel` / `GPT2Model`."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model

import bertode
from bertode.families import FAMILIES, gpt2_state

SMALL = dict(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=24)


def _gpt2(cls=GPT2LMHeadModel, **overrides):
    torch.manual_seed(0)
    return cls(GPT2Config(**{**SMALL, **overrides})).eval()


def _batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SMALL["vocab_size"], (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("source", ["object", "directory", "from_pretrained"])
def test_euler_1_equals_gpt2_lm_head_model_in_logits_loss_and_every_gradient(tmp_path, source):
    hf = _gpt2()
    if source != "object":
        hf.save_pretrained(tmp_path / "gpt2")
    if source == "from_pretrained":
        ode = bertode.BertODEForCausalLM.from_pretrained(tmp_path / "gpt2", solver="euler", steps=1).eval()
    else:
        ode = bertode.from_bert(hf if source == "object" else tmp_path / "gpt2", solver="euler", steps=1).eval()
    assert isinstance(ode, bertode.BertODEForCausalLM)
    config = ode.config
    assert (config.norm_position, config.is_decoder, config.embedding_norm, config.lm_head_type) == \
        ("pre", True, False, "linear")
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    hf_out = hf(ids, attention_mask=mask, labels=labels)
    ode_out = ode(ids, attention_mask=mask, labels=labels)
    keep = mask.bool()
    assert (hf_out.logits - ode_out.logits)[keep].abs().max() <= 1e-5
    assert abs(hf_out.loss.item() - ode_out.loss.item()) <= 1e-6
    hf_out.loss.backward()
    ode_out.loss.backward()
    # HF's gradients laid out as bertode's parameters: Conv1D transposed, c_attn split.
    expected = gpt2_state({name: p.grad for name, p in hf.named_parameters()})
    ours = dict(ode.named_parameters())
    assert set(ours) == {bertode.convert.rename_key(name, FAMILIES["gpt2"]) for name in expected}  # no extra parameter
    for name, grad in expected.items():
        mine = ours[bertode.convert.rename_key(name, FAMILIES["gpt2"])].grad
        assert (mine - grad).abs().max() <= 1e-5, name
    # One mapping written out by hand: the key projection is the middle third of c_attn, transposed.
    c_attn = hf.transformer.h[1].attn.c_attn
    key = ode.bert.encoder.layer[1].attention.branch.key
    assert torch.equal(key.weight, c_attn.weight[:, 32:64].t()) and torch.equal(key.bias, c_attn.bias[32:64])
    assert (key.weight.grad - c_attn.weight.grad[:, 32:64].t()).abs().max() <= 1e-5


def test_the_base_gpt2_model_converts_to_its_last_hidden_state():
    hf = _gpt2(GPT2Model)
    ode = bertode.from_bert(hf).eval()
    assert type(ode) is bertode.BertODEModel and ode.pooler is None
    ids, mask = _batch()
    expected = hf(ids, attention_mask=mask).last_hidden_state
    assert (ode(ids, attention_mask=mask).last_hidden_state - expected)[mask.bool()].abs().max() <= 1e-5


def test_generate_greedy_and_seeded_sampling_equal_gpt2s_and_survive_save_and_load(tmp_path):
    hf = _gpt2()
    ode = bertode.from_bert(hf).eval()
    prompt = torch.randint(0, SMALL["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(5))
    expected = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ode.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0), expected)
    samples = []
    for model in (hf, ode):
        torch.manual_seed(11)
        samples.append(model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=10, pad_token_id=0))
    assert torch.equal(*samples)
    ode.save_pretrained(tmp_path / "ode")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ode").eval()
    assert isinstance(loaded, bertode.BertODEForCausalLM) and loaded.cls.predictions.bias is None
    assert loaded.cls.predictions.decoder.weight.data_ptr() == loaded.bert.embeddings.word_embeddings.weight.data_ptr()
    assert torch.equal(loaded.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0), expected)


def test_a_converted_gpt2_integrates_its_pre_ln_residuals():
    """rk4 with 4 steps on dz/dt = G(LN(z)) differs from GPT-2's single step, stays causal and trains."""
    hf = _gpt2()
    ode = bertode.from_bert(hf, solver="rk4", steps=4).eval()
    ids, mask = _batch()
    logits = ode(ids).logits
    assert (logits - hf(ids).logits).abs().max() > 1e-3
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % SMALL["vocab_size"]
    assert (ode(changed).logits[:, :7] - logits[:, :7]).abs().max() <= 1e-5
    ode.train()
    out = ode(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in ode.parameters())


@pytest.mark.parametrize("overrides, message", [
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True is not supported"),
    (dict(scale_attn_weights=False), "scale_attn_weights=False is not supported"),
    (dict(embd_pdrop=0.2), "embd_pdrop=0.2 is not supported; allowed: 0.1"),
])
def test_gpt2_variants_bertode_cannot_express_are_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        bertode.from_bert(_gpt2(**overrides))
    assert "\n" not in str(error.value)


def test_a_gpt2_head_without_a_bertode_class_and_gpt2_as_a_deq_are_refused():
    with pytest.raises(ValueError, match="architecture 'GPT2ForSequenceClassification' is not supported; "
                                         "allowed: GPT2Model, GPT2LMHeadModel"):
        bertode.from_bert(_gpt2(GPT2ForSequenceClassification, pad_token_id=0))
    with pytest.raises(ValueError, match="norm_position='pre' is invalid with mode='deq'"):
        bertode.from_bert(_gpt2(), mode="deq")


def test_a_named_pad_token_and_left_padded_generation_match_gpt2():
    """Fine-tuned GPT-2s often name a pad (the eos id): its embedding row still learns, and a
    left-padded batch generates what GPT-2 generates (positions counted over real tokens)."""
    hf = _gpt2(pad_token_id=5)
    ode = bertode.from_bert(hf).eval()
    ids = torch.full((2, 8), 5)
    ids[:, 2:] = torch.randint(6, SMALL["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(2))
    hf(ids, labels=ids).loss.backward()
    ode(ids, labels=ids).loss.backward()
    row = hf.transformer.wte.weight.grad[5]
    assert row.abs().max() > 0 and (ode.bert.embeddings.word_embeddings.weight.grad[5] - row).abs().max() <= 1e-5
    prompt = torch.randint(6, SMALL["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    prompt[0, :2], mask[0, :2] = 5, 0  # left padding
    expected = hf.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=5)
    assert torch.equal(ode.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=5),
                       expected)
