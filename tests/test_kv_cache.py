"""Key/value caches (`bertode.layers.kv_cache`, issue 26 part 1): with a cache, a decoder that is fed
its tokens a few at a time computes the logits of one forward over the whole sequence, in every mode
where caching is exact (discrete, fixed-step solvers, blocks, looped cores, DEQ to its tolerance);
``generate`` gives the same tokens with and without it (greedy and beams); HF's own cached
`BertLMHeadModel` is the oracle at Euler-1; and what cannot be cached is refused in one line."""

import pytest
import torch

import bertode
from bertode.causal_lm import BertODEForCausalLM
from conftest import TINY, refused_line

# Each: the config fields of one mode, and the bound the cached logits meet (a DEQ: its solve's tolerance).
MODES = {
    "discrete": (dict(mode="discrete"), 1e-5),
    "euler-1": (dict(mode="ode", solver="euler", steps=1), 1e-5),
    "rk4-2-steps": (dict(mode="ode", solver="rk4", steps=2), 1e-5),
    "midpoint-time_weights": (dict(mode="ode", solver="midpoint", steps=3, vector_field="time_weights"), 1e-5),
    "rk2-block": (dict(mode="discrete", block="rk2"), 1e-5),
    "rk2_gated-ode-block": (dict(mode="ode", solver="euler", steps=2, block="rk2_gated"), 1e-5),
    "weight-tied-injected": (dict(mode="discrete", weight_tying=True, core_injection="add", num_hidden_layers=3), 1e-5),
    "deq": (dict(mode="deq", deq_tol=1e-7, deq_max_iter=100), 1e-5),
    "deq-qkv-prelude-coda": (dict(mode="deq", deq_injection="qkv", deq_tol=1e-7, deq_max_iter=100, prelude_layers=1,
                                  coda_layers=1, num_hidden_layers=3), 1e-5),
}


def _decoder(initializer_range=0.3, **fields):
    torch.manual_seed(0)
    config = bertode.BertODEConfig(**{**TINY, **fields}, is_decoder=True, initializer_range=initializer_range)
    return BertODEForCausalLM(config).eval()


def _tokens(shape, seed=1):
    return torch.randint(5, TINY["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def _fed_in_pieces(model, ids, pieces, attention_mask=None):
    """The logits of ``ids`` fed ``pieces`` tokens at a time through one cache."""
    cache, logits, start = None, [], 0
    for size in pieces:
        end = start + size
        mask = attention_mask[:, :end] if attention_mask is not None else None
        out = model(ids[:, start:end], attention_mask=mask, cache=cache, use_cache=True)
        cache, start = out.cache, end
        logits.append(out.logits)
    assert start == ids.shape[1]
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("name", list(MODES))
def test_a_sequence_fed_through_the_cache_has_the_logits_of_one_forward(name):
    fields, bound = MODES[name]
    model = _decoder(**fields)
    ids = _tokens((2, 9))
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        pieces, cache = _fed_in_pieces(model, ids, [4, 1, 2, 1, 1])
    assert (pieces - whole).abs().max() <= bound
    assert cache.get_seq_length() == 9
    assert (whole - model(_tokens((2, 9), 2), use_cache=False).logits).abs().max() > 1e-3  # the logits do vary


def test_the_cache_holds_one_slot_per_attention_evaluation():
    rk4 = _decoder(mode="ode", solver="rk4", steps=2)  # 2 layers x 2 steps x 4 stages
    with torch.no_grad():
        cache = rk4(_tokens((1, 5)), use_cache=True).cache
    assert len([layer for layer in cache.layers if layer.is_initialized]) == 16
    assert cache.layers[0].keys.shape == (1, TINY["num_attention_heads"], 5, TINY["hidden_size"] // 4)


@pytest.mark.parametrize("name", ["discrete", "rk4-2-steps", "rk2_gated-ode-block", "weight-tied-injected", "deq"])
def test_greedy_and_beam_search_give_the_same_tokens_with_and_without_the_cache(name):
    # Large weights, so that the next token depends on the whole prefix; a DEQ's map stays a contraction
    # (with several fixed points the past's own equilibrium and a joint solve's may be different ones).
    model = _decoder(initializer_range=0.1 if name == "deq" else 0.5, **MODES[name][0])
    prompt, mask = _tokens((2, 5)), torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded prompt
    for search in (dict(do_sample=False), dict(do_sample=False, num_beams=3, num_return_sequences=2)):
        flags = dict(max_new_tokens=6, attention_mask=mask, pad_token_id=0, output_scores=True,
                     return_dict_in_generate=True, **search)
        cached, plain = model.generate(prompt, use_cache=True, **flags), model.generate(prompt, use_cache=False, **flags)
        assert torch.equal(cached.sequences, plain.sequences), search
        for a, b in zip(cached.scores, plain.scores):  # 1e-5 of the scores' scale (logits of tens; beams add up)
            finite = b > -1e8  # beam search's excluded candidates
            assert (a - b)[finite].abs().max() <= 1e-5 * max(1.0, b[finite].abs().max().item())
    assert model.generation_config.use_cache is True  # generate's default: the cache


@pytest.mark.parametrize("fields", [dict(mode="discrete"), dict(solver="euler", steps=1)])
def test_cached_logits_equal_hf_bert_decoders_with_their_own_cache(fields):
    from transformers import BertConfig, BertLMHeadModel, DynamicCache

    torch.manual_seed(0)
    hf = BertLMHeadModel(BertConfig(**TINY, is_decoder=True, initializer_range=0.3)).eval()
    ode = bertode.from_bert(hf, **fields).eval()
    ids, mask = _tokens((2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    hf_cache, start, expected = DynamicCache(), 0, []
    with torch.no_grad():
        for size in (5, 1, 2):
            out = hf(ids[:, start:start + size], attention_mask=mask[:, :start + size], cache=hf_cache, use_cache=True)
            expected.append(out.logits)
            start += size
        got, _ = _fed_in_pieces(ode, ids, [5, 1, 2], attention_mask=mask)
    expected = torch.cat(expected, dim=1)
    real = mask.bool()  # padded positions' outputs are not compared (each library fills them its own way)
    assert (got - expected)[real].abs().max() <= 1e-5


def test_positions_after_padding_continue_after_the_cache():
    """RoBERTa's position scheme (from pad_token_id + 1 over real tokens) counts the cached positions too."""
    model = _decoder(mode="discrete", position_scheme="after_padding", pad_token_id=1,
                     max_position_embeddings=TINY["max_position_embeddings"] + 2)
    ids = _tokens((2, 7))
    with torch.no_grad():
        got, _ = _fed_in_pieces(model, ids, [3, 1, 3])
        assert (got - model(ids, use_cache=False).logits).abs().max() <= 1e-5


def test_the_deq_cache_is_exact_to_the_solves_tolerance():
    """The past's equilibrium is the one its own solve reached: at a loose tolerance the cached logits
    differ from one joint solve's by about that tolerance, and at a tight one they agree."""
    ids = _tokens((2, 9))
    gaps = {}
    for tol in (1e-3, 1e-9):
        model = _decoder(mode="deq", deq_tol=tol, deq_max_iter=300)
        with torch.no_grad():
            got, _ = _fed_in_pieces(model, ids, [4, 1, 4])
            gaps[tol] = (got - model(ids, use_cache=False).logits).abs().max().item()
    assert gaps[1e-9] <= 1e-5 and gaps[1e-9] < gaps[1e-3] <= 0.1, gaps


def test_adaptive_solvers_generate_without_a_cache_and_refuse_one_in_one_line():
    model = _decoder(mode="ode", solver="dopri5")
    assert model.generation_config.use_cache is False
    ids = _tokens((1, 5))
    assert model(ids).cache is None  # the config's use_cache=True: no cache where it would not be exact
    with torch.no_grad():
        assert model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 8)
    with pytest.raises(ValueError, match=r"^use_cache=True is invalid with solver='dopri5' \(adaptive") as info:
        model(ids, use_cache=True)
    assert "\n" not in str(info.value)


def test_calls_that_disagree_with_the_cache_are_refused_in_one_line():
    model = _decoder(mode="ode", solver="euler", steps=2)
    ids = _tokens((1, 6))
    with torch.no_grad():
        cache = model(ids[:, :4], use_cache=True).cache
        with bertode.dialed(depth=3):  # three steps per solve: not the evaluations the cache holds
            with pytest.raises(ValueError, match=r"^cache holds the keys and values of 4 attention evaluations, "
                                                 r"but this forward ran more; allowed: the same depth"):
                model(ids[:, 4:5], cache=cache)
        with bertode.dialed(depth=1):
            with pytest.raises(ValueError, match=r"^cache holds .* 4 attention evaluations, but this forward ran 2;"):
                model(ids[:, 4:5], cache=cache)
        assert cache.get_seq_length() == 4  # the refused calls left the cache as it was
        expected = model(ids, use_cache=False).logits[:, 4:]
        assert (model(ids[:, 4:], cache=cache).logits - expected).abs().max() <= 1e-5
        with pytest.raises(ValueError, match=r"^attention_mask of length 1 is invalid with 6 cached positions"):
            model(ids[:, 4:5], cache=cache, attention_mask=torch.ones(1, 1, dtype=torch.long))


def test_per_token_exit_refuses_a_cache():
    model = _decoder(mode="discrete", weight_tying=True, num_hidden_layers=3)
    with torch.no_grad(), bertode.dialed(exit=bertode.make_exit_criterion("latent_diff", 0.01)):
        with pytest.raises(ValueError, match=r"^use_cache=True is invalid with exit='latent_diff' \(per-token exit\)"):
            model(_tokens((1, 4)), use_cache=True)


def test_fixed_length_caches_are_refused_in_one_line():
    """A StaticCache (``generate(cache_implementation="static")``) has num_hidden_layers layers of a fixed length;
    bertode needs one growing slot per attention evaluation: refused before anything is written."""
    from transformers import StaticCache

    model = _decoder(mode="discrete")
    ids = _tokens((2, 5))
    line = r"^cache=StaticCache is invalid: its layers \(StaticLayer\) have a fixed length; allowed: a DynamicCache"
    static = StaticCache(config=model.config, max_cache_len=12)
    with torch.no_grad():
        with pytest.raises(ValueError, match=line) as info:
            model(ids, cache=static, use_cache=True)
        assert "\n" not in str(info.value)
        assert static.get_seq_length() == 0
        with pytest.raises(ValueError, match=line):
            model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")


def test_bertode_generate_refuses_use_cache_with_an_adaptive_solver(tmp_path, capsys):
    from transformers import BertTokenizerFast

    folder = tmp_path / "clm"
    _decoder(mode="ode", solver="euler", steps=1).save_pretrained(folder)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    error = refused_line(capsys, "generate", f"checkpoint={folder}", "prompt=a", "use_cache=true", "solver=dopri5")
    assert "use_cache=true is invalid with solver='dopri5' (adaptive" in error
    error = refused_line(capsys, "generate", f"checkpoint={folder}", "prompt=a", "use_cache=maybe")
    assert "use_cache='maybe' is invalid; allowed: null (wherever exact), true, false" in error
