"""Cross-attention (issue 26 part 4): a decoder's ``add_cross_attention`` site converts exactly from HF
BERT decoders (logits, cross-attention maps and every gradient, the encoder states' included, at Euler-1
and in discrete mode), is a residual site like the others (an ODE solve in ``mode="ode"``), reads the
encoder through the cache once, and works inside `transformers.EncoderDecoderModel`; what it cannot
pair with is refused in one line."""

import pytest
import torch

import bertode
from bertode.causal_lm import BertODEForCausalLM
from conftest import TINY, refused_line


def _hf_decoder():
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    config = BertConfig(**TINY, is_decoder=True, add_cross_attention=True, initializer_range=0.2)
    config._attn_implementation = "eager"  # HF's sdpa returns no attention maps
    return BertLMHeadModel(config)


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TINY["vocab_size"], (2, 7), generator=generator)
    states = torch.randn(2, 5, TINY["hidden_size"], generator=generator)
    source_mask = torch.ones(2, 5, dtype=torch.long)
    source_mask[1, 3:] = 0  # a padded source sequence
    return ids, states, source_mask


@pytest.mark.parametrize("fields", [dict(mode="discrete"), dict(solver="euler", steps=1)])
def test_cross_attention_converts_exactly_from_hf_bert_decoders(fields):
    hf = _hf_decoder()
    ode = bertode.from_bert(hf, **fields)
    ids, states, source_mask = _inputs()
    outputs = {}
    for name, model in (("hf", hf), ("ode", ode)):
        model.zero_grad()
        memory = states.clone().requires_grad_(True)
        out = model(ids, encoder_hidden_states=memory, encoder_attention_mask=source_mask, labels=ids,
                    output_attentions=True)
        out.loss.backward()
        outputs[name] = (out, memory.grad, {k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    (hf_out, hf_memory_grad, hf_grads), (out, memory_grad, grads) = outputs["hf"], outputs["ode"]
    assert (out.logits - hf_out.logits).abs().max() <= 1e-5
    assert len(out.cross_attentions) == TINY["num_hidden_layers"]
    for got, expected in zip(out.cross_attentions, hf_out.cross_attentions):
        assert got.shape == expected.shape == (2, TINY["num_attention_heads"], 7, 5)
        assert (got - expected).abs().max() <= 1e-6
    assert (memory_grad - hf_memory_grad).abs().max() <= 1e-5 and memory_grad.abs().max() > 1e-4
    by_shape = {}
    for name, grad in hf_grads.items():  # every HF gradient has its bertode twin (the conversion's renaming)
        by_shape.setdefault(tuple(grad.shape), []).append(grad)
    cross = [k for k in grads if ".cross_attention." in k]
    assert len(cross) == TINY["num_hidden_layers"] * 10  # Q, K, V, O weights and biases, LayerNorm's two
    for name, grad in grads.items():
        assert any((grad - other).abs().max() <= 1e-5 for other in by_shape[tuple(grad.shape)]), name


def test_the_output_depends_on_the_encoder_states_and_ignores_padded_ones():
    decoder = bertode.from_bert(_hf_decoder(), solver="rk4", steps=2).eval()
    ids, states, source_mask = _inputs()
    with torch.no_grad():
        base = decoder(ids, encoder_hidden_states=states, encoder_attention_mask=source_mask).logits
        changed = states.clone()
        changed[1, 3:] += 5.0  # the padded source positions of sequence 1
        same = decoder(ids, encoder_hidden_states=changed, encoder_attention_mask=source_mask).logits
        changed[0, 0] += 1.0  # a real source position of sequence 0
        other = decoder(ids, encoder_hidden_states=changed, encoder_attention_mask=source_mask).logits
        alone = decoder(ids).logits  # no encoder states: HF's rule, the cross-attention site is skipped
    assert (same - base).abs().max() <= 1e-6
    assert (other[0] - base[0]).abs().max() > 1e-3 and (other[1] - base[1]).abs().max() <= 1e-6
    assert (alone - base).abs().max() > 1e-3


def test_in_ode_mode_the_cross_attention_site_is_a_solve():
    decoder = bertode.from_bert(_hf_decoder(), solver="rk4", steps=2).eval()
    ids, states, source_mask = _inputs()
    with torch.no_grad():
        decoder(ids, encoder_hidden_states=states, encoder_attention_mask=source_mask)
    names = [row["name"] for row in decoder.solver_stats()["layers"]]
    assert [n for n in names if "cross_attention" in n] == ["layer.0.cross_attention", "layer.1.cross_attention"]


def test_the_cache_reads_the_encoder_once_and_generation_equals_no_cache():
    decoder = bertode.from_bert(_hf_decoder(), solver="rk4", steps=2).eval()
    ids, states, source_mask = _inputs()
    calls = []
    for layer in decoder.bert.encoder.layer:
        layer.cross_attention.branch.key.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[1]))
    flags = dict(encoder_hidden_states=states, encoder_attention_mask=source_mask, max_new_tokens=5,
                 do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = decoder.generate(ids, use_cache=False, **flags)
        calls.clear()
        from transformers import DynamicCache, EncoderDecoderCache

        cached = decoder.generate(ids, cache=EncoderDecoderCache(DynamicCache(), DynamicCache()), **flags)
    assert torch.equal(plain, cached)
    # keys of the 5 source positions: once per stage of the first forward (2 layers x 2 steps x 4 stages), never after
    assert calls == [5] * 16


def test_an_encoder_decoder_model_of_bertode_models_trains_and_generates_alike_with_and_without_cache():
    from transformers import EncoderDecoderModel

    torch.manual_seed(0)
    fields = dict(**TINY, mode="ode", solver="euler", steps=2, block="rk2_gated", initializer_range=0.3)
    encoder = bertode.BertODEModel(bertode.BertODEConfig(**fields), add_pooling_layer=False)
    decoder = BertODEForCausalLM(bertode.BertODEConfig(**fields, is_decoder=True, add_cross_attention=True))
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id, config.pad_token_id = 2, 0
    ids, _, _ = _inputs()
    source_mask = torch.ones_like(ids)
    source_mask[1, 5:] = 0  # a padded source sequence
    targets = ids.flip(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, attention_mask=source_mask, labels=targets).loss
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < losses[0] - 0.5
    assert encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0  # the encoder learns through cross-attention
    model.eval()
    with torch.no_grad():
        for search in (dict(do_sample=False), dict(num_beams=3, do_sample=False)):
            flags = dict(attention_mask=source_mask, max_new_tokens=6, **search)
            assert torch.equal(model.generate(ids, use_cache=True, **flags), model.generate(ids, use_cache=False, **flags))


def test_cross_attention_pairings_are_refused_in_one_line(capsys, tmp_path):
    for fields, message in (
            (dict(mode="deq"), r"^BertODEConfig.add_cross_attention=True is invalid with BertODEConfig.mode='deq'"),
            (dict(sensitivity="adjoint"), r"^BertODEConfig.sensitivity='adjoint' is invalid; allowed: a method that "
                                          r"backpropagates"),
            (dict(is_decoder=False), r"^BertODEConfig.add_cross_attention=True is invalid with is_decoder=False")):
        config = bertode.BertODEConfig(**TINY, **{"is_decoder": True, "add_cross_attention": True, **fields})
        with pytest.raises(ValueError, match=message) as info:
            config.validate_ode()
        assert "\n" not in str(info.value)
    error = refused_line(capsys, "train", "objective=clm", "model=deq", "+model.add_cross_attention=true",
                         f"hydra.run.dir={tmp_path / 'run'}")
    assert "model.add_cross_attention=True is invalid with" in error and "mode='deq'" in error
    assert not (tmp_path / "run").exists()
