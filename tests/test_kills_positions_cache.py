"""Oracle tests that kill mutants of the position schemes, the key/value cache and the adaptive head
(`layers/positions.py`, `kv_cache.py`, `adaptive.py`) (issue 29).

Oracles: sinusoids and RoPE angles in closed form (float64) and transformers' Llama rotary helpers; Transformer-XL's
initialisation (normal, std ``initializer_range``); torch's `AdaptiveLogSoftmaxWithLoss` with the same cutoffs and
div_value, and Transformer-XL's adaptive embedding written per token; HF's `DynamicCache`; one forward over the
whole sequence against cached decoding; the exact one-line refusals."""

import math
from types import SimpleNamespace

import pytest
import torch

import bertode
from bertode.layers import adaptive
from bertode.layers.positions import RotaryPositions, TransformerXLPositions, positions_from, relative_positions
from bertode.layers.positions import sinusoid

SCHEME = dict(hidden_size=32, num_attention_heads=4, rope_theta=10000.0, initializer_range=0.02)


# --- positions.py -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_sinusoid_is_sin_then_cos_of_distance_times_vaswanis_frequencies_in_the_asked_dtype(dtype):
    distances, width = torch.tensor([-3, 0, 2, 7]), 8
    encoded = sinusoid(distances, width, dtype)
    expected = torch.empty(4, width, dtype=torch.float64)
    for row, d in enumerate(distances.tolist()):
        for k in range(width // 2):
            w = 1.0 / 10000 ** (2 * k / width)
            expected[row, k], expected[row, width // 2 + k] = math.sin(d * w), math.cos(d * w)
    assert encoded.dtype == dtype and encoded.shape == (4, width)
    bound = {torch.float64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 4e-3}[dtype]
    assert (encoded.double() - expected).abs().max() <= bound


def test_rope_angles_are_llamas_in_fp32_for_fp32_and_bf16_inputs_and_rotate_keeps_the_inputs_dtype():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    rotary = RotaryPositions(SimpleNamespace(**SCHEME))
    positions = torch.arange(3, 9)
    config = llama.LlamaConfig(hidden_size=32, num_attention_heads=4, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0})
    x = torch.randn(2, 4, 6, 8)
    cos, sin = llama.LlamaRotaryEmbedding(config)(x, positions[None])  # fp32
    for dtype in (torch.float32, torch.bfloat16):
        ours_cos, ours_sin = rotary.angles(positions, dtype)
        assert ours_cos.dtype == ours_sin.dtype == torch.float32  # fp32 angles under bf16 too, as Llama's
        assert (ours_cos - cos[0]).abs().max() <= 1e-6 and (ours_sin - sin[0]).abs().max() <= 1e-6
    assert rotary.angles(positions, torch.float64)[0].dtype == torch.float64
    rotated = rotary.rotate(x.bfloat16(), positions)
    expected, _ = llama.apply_rotary_pos_emb(x.bfloat16().float(), x.bfloat16().float(), cos, sin)
    assert rotated.dtype == torch.bfloat16 and (rotated.float() - expected).abs().max() <= 2e-2


def test_per_token_exit_offsets_are_positions_after_the_past():
    offsets = torch.tensor([[0, 2, 3], [1, 1, 4]])
    assert torch.equal(positions_from(5, 3, None, offsets), offsets + 5)
    assert torch.equal(positions_from(5, 3, None), torch.tensor([5, 6, 7]))


def test_relative_positions_is_none_for_absolute_schemes_and_configs_without_the_field():
    assert relative_positions(SimpleNamespace(**SCHEME)) is None
    assert relative_positions(SimpleNamespace(position_scheme="absolute", **SCHEME)) is None
    assert relative_positions(SimpleNamespace(position_scheme="after_padding", **SCHEME)) is None
    assert isinstance(relative_positions(SimpleNamespace(position_scheme="rotary", **SCHEME)), RotaryPositions)


def test_transformer_xl_draws_u_v_and_w_kr_with_std_initializer_range_and_the_models_rule_redraws_them():
    torch.manual_seed(0)
    config = SimpleNamespace(**{**SCHEME, "hidden_size": 64, "initializer_range": 0.05})
    positions = TransformerXLPositions(config)
    for parameter in (positions.content_bias, positions.position_bias, positions.position_key.weight):
        assert 0.035 <= parameter.std().item() <= 0.065 and abs(parameter.mean().item()) <= 0.02
    model = bertode.BertODEModel(bertode.BertODEConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        position_scheme="transformer_xl", initializer_range=0.3))
    positions = next(m for m in model.modules() if isinstance(m, TransformerXLPositions))
    with torch.no_grad():
        for parameter in positions.parameters():
            parameter.zero_()
    model._init_weights(positions)  # as from_pretrained does for u, v missing from a checkpoint
    for parameter in (positions.content_bias, positions.position_bias, positions.position_key.weight):
        assert 0.2 <= parameter.std().item() <= 0.4


def test_transformer_xl_queries_default_to_no_past_and_keep_the_queries_dtype_under_autocast():
    torch.manual_seed(0)
    positions = TransformerXLPositions(SimpleNamespace(**SCHEME))
    q = torch.randn(2, 4, 5, 8)
    default = positions.queries(q, torch.arange(5), 5)
    given = positions.queries(q, torch.arange(5), 5, 0)
    assert torch.equal(default[0], given[0]) and torch.equal(default[1], given[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        content, bias = positions.queries(q.bfloat16(), torch.arange(5), 5, 0)
    assert content.dtype == bias.dtype == torch.bfloat16  # u and v enter in the queries' dtype
    assert torch.equal(content, q.bfloat16() + positions.content_bias[:, None].bfloat16())


# --- adaptive.py --------------------------------------------------------------------------------------------------
ADAPTIVE = dict(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=32, mode="discrete", lm_head_type="adaptive", adaptive_cutoffs=[10, 40, 90])


def _adaptive_config(**overrides):
    return bertode.BertODEConfig(**{**ADAPTIVE, "adaptive_div_value": 2.0, **overrides})


@pytest.mark.parametrize("div_value", [2.0, 3.0])
def test_the_head_has_torchs_adaptive_softmax_widths_parameters_and_log_probabilities_untied(div_value):
    torch.manual_seed(0)
    config = _adaptive_config(adaptive_div_value=div_value)
    ours = adaptive.AdaptivePredictions(config)
    oracle = torch.nn.AdaptiveLogSoftmaxWithLoss(32, 120, [10, 40, 90], div_value=div_value, head_bias=True)
    assert adaptive.cluster_widths(config) == [32] + [tail[0].out_features for tail in oracle.tail]
    names = {"head.shortlist.weight", "head.shortlist.bias", "head.clusters.weight", "head.clusters.bias",
             *(f"tail.{i}.{j}.weight" for i in range(3) for j in range(2))}
    assert set(ours.state_dict()) == names  # no tail bias, as torch's
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.normal_(0, 0.3)
        oracle.head.weight.copy_(torch.cat([ours.head.shortlist.weight, ours.head.clusters.weight]))
        oracle.head.bias.copy_(torch.cat([ours.head.shortlist.bias, ours.head.clusters.bias]))
        for mine, theirs in zip(ours.tail, oracle.tail):
            theirs[0].weight.copy_(mine[0].weight.t())
            theirs[1].weight.copy_(mine[1].weight)
        hidden = torch.randn(7, 32)
        assert (ours(hidden) - oracle.log_prob(hidden)).abs().max() <= 1e-5
    assert ours.loss_kernel is None  # no `scored` call yet
    ours.scored(hidden, torch.tensor([0, 9, 10, 39, 40, 89, 119]), "mean")
    assert ours.loss_kernel == "adaptive"


@pytest.mark.parametrize("pad, cluster", [(0, 0), (40, 2), (10, 1)])
def test_the_padding_id_has_a_zero_embedding_without_gradient_in_its_own_cluster(pad, cluster):
    torch.manual_seed(0)
    embedding = adaptive.AdaptiveEmbedding(_adaptive_config(pad_token_id=pad))
    low = [0, 10, 40, 90][cluster]
    assert [c.padding_idx for c in embedding.clusters] == [pad - low if j == cluster else None for j in range(4)]
    assert set(embedding.state_dict()) == {*(f"clusters.{j}.weight" for j in range(4)),
                                           *(f"projections.{i}.weight" for i in range(3))}  # no projection bias
    ids = torch.tensor([[pad, 5, 20, 60, 100, pad]])
    out = embedding(ids)
    assert not out[0, 0].any() and not out[0, -1].any() and out[0, 1:5].abs().sum(-1).min() > 0
    out.sum().backward()
    assert not embedding.clusters[cluster].weight.grad[pad - low].any()


def test_the_embeddings_gradient_is_transformer_xls_written_per_token():
    """Token t of cluster j embeds as E_j[t - c_j] P_j^T: the gradient of sum(output * g) reaches E_j's row by
    g P_j (cluster 0: g) and P_j by g^T E_j[t - c_j], and no other row."""
    torch.manual_seed(0)
    embedding = adaptive.AdaptiveEmbedding(_adaptive_config(pad_token_id=None)).double()
    ids = torch.tensor([[0, 9, 10, 39, 40, 89, 90, 119, 5, 95]])
    g = torch.randn(1, ids.shape[1], 32, dtype=torch.float64)
    (embedding(ids) * g).sum().backward()
    edges = [0, 10, 40, 90, 120]
    cluster_grads = [torch.zeros_like(c.weight) for c in embedding.clusters]
    projection_grads = [torch.zeros_like(p.weight) for p in embedding.projections]
    for position, token in enumerate(ids[0].tolist()):
        j = max(i for i, edge in enumerate(edges[:-1]) if token >= edge)
        row = embedding.clusters[j].weight[token - edges[j]].detach()
        if j == 0:
            cluster_grads[0][token] += g[0, position]
        else:
            cluster_grads[j][token - edges[j]] += embedding.projections[j - 1].weight.detach().t() @ g[0, position]
            projection_grads[j - 1] += torch.outer(g[0, position], row)
    for ours, expected in zip([c.weight.grad for c in embedding.clusters], cluster_grads):
        assert (ours - expected).abs().max() <= 1e-12
    for ours, expected in zip([p.weight.grad for p in embedding.projections], projection_grads):
        assert (ours - expected).abs().max() <= 1e-12


# --- kv_cache.py --------------------------------------------------------------------------------------------------
def _decoder(**fields):
    from bertode.causal_lm import BertODEForCausalLM
    from conftest import TINY

    torch.manual_seed(0)
    config = bertode.BertODEConfig(**{**TINY, "mode": "discrete", **fields}, is_decoder=True, initializer_range=0.3)
    return BertODEForCausalLM(config).eval()


def _ids(length, seed=1):
    return torch.randint(5, 64, (2, length), generator=torch.Generator().manual_seed(seed))


def test_a_one_layer_decoders_cache_and_a_given_cache_with_use_cache_unset_continue_one_forward():
    """A cache of one slot (one attention evaluation) reads its past from that slot; a cache passed with
    ``use_cache`` unset is read and extended even where the config says ``use_cache=False`` (HF BERT's rule)."""
    from transformers.cache_utils import DynamicCache

    ids = _ids(7)
    for model in (_decoder(num_hidden_layers=1), _decoder(use_cache=False)):
        with torch.no_grad():
            whole = model(ids, use_cache=False).logits
            cache = DynamicCache()
            first = model(ids[:, :4], cache=cache).logits
            rest = model(ids[:, 4:], cache=cache).logits
        assert cache.get_seq_length() == 7
        assert (torch.cat([first, rest], dim=1) - whole).abs().max() <= 1e-5


def test_the_cache_is_dropped_with_a_warning_only_while_training_with_checkpointing_and_no_deprecated_alias_read():
    import logging
    import warnings

    from transformers.testing_utils import CaptureLogger

    from bertode.layers import kv_cache

    model, ids = _decoder(), _ids(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' deprecated `is_gradient_checkpointing`
        assert model(ids, use_cache=True).cache is not None
        model.train()
        assert model(ids, use_cache=True).cache is not None  # training alone keeps the cache
        model.gradient_checkpointing_enable()
        logging.Logger.warning_once.cache_clear()
        with CaptureLogger(kv_cache.logger) as captured:
            assert model(ids, use_cache=True).cache is None
        assert captured.out == "use_cache=True is incompatible with activation checkpointing; using no cache\n"
        model.eval()
        assert model(ids, use_cache=True).cache is not None  # checkpointing saves nothing at eval


def test_calls_that_disagree_with_the_cache_are_refused_in_the_whole_line():
    model, ids = _decoder(mode="ode", solver="euler", steps=2), _ids(6)
    with torch.no_grad():
        cache = model(ids[:, :4], use_cache=True).cache
        with bertode.dialed(depth=1):
            with pytest.raises(ValueError) as error:
                model(ids[:, 4:5], cache=cache)
    assert str(error.value) == ("cache holds the keys and values of 4 attention evaluations, but this forward ran 2; "
                                "allowed: the same depth, solver, steps and block in every call that shares a cache "
                                "(or a new cache)")


def test_fixed_length_and_too_short_caches_are_refused_in_their_whole_lines():
    from transformers import StaticCache
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache, StaticLayer

    from bertode.layers.kv_cache import CacheSession

    model, ids = _decoder(), _ids(3)
    tail = ("have a fixed length; allowed: a DynamicCache (generate's default, one growing slot per attention "
            "evaluation), or an EncoderDecoderCache of two")
    cross = EncoderDecoderCache(DynamicCache(), StaticCache(config=model.config, max_cache_len=8))
    with pytest.raises(ValueError) as error:
        CacheSession(cross)
    assert str(error.value) == f"cache=EncoderDecoderCache is invalid: its layers (StaticLayer) {tail}"
    with pytest.raises(ValueError) as error:
        CacheSession(Cache(layers=[DynamicLayer(), StaticLayer(max_cache_len=8)]))
    assert str(error.value) == f"cache=Cache is invalid: its layers (StaticLayer) {tail}"
    with torch.no_grad(), pytest.raises(ValueError) as error:
        model(ids, cache=Cache(layers=[DynamicLayer()]), use_cache=True)
    assert str(error.value) == ("cache=Cache is invalid: it has 1 layers and this model evaluates attention more "
                                "often per forward; allowed: a DynamicCache")


def test_a_slot_holds_a_cache_only_with_positions_in_it():
    from transformers.cache_utils import DynamicCache

    from bertode.layers.kv_cache import CacheSession

    one = DynamicCache()
    one.update(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1), 0)  # one position of one element
    session = CacheSession(one)
    assert (session.past, session.filled) == (1, 1)
    emptied = DynamicCache()
    emptied.update(torch.ones(2, 4, 3, 8), torch.ones(2, 4, 3, 8), 0)
    layer = emptied.layers[0]
    layer.keys, layer.values = layer.keys[..., :0, :], layer.values[..., :0, :]  # initialised, no positions
    session = CacheSession(emptied)
    assert (session.past, session.filled) == (0, 0)


def test_cross_attention_slots_are_counted_one_per_evaluation_flagged_as_hf_does_and_read_after():
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from bertode.layers.kv_cache import CacheSession, new_cache

    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    encoded = [(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)) for _ in range(2)]
    session = CacheSession(cache)
    for keys, values in encoded:
        got = session.cross_keys_values(lambda: (keys, values))
        assert torch.equal(got[0], keys) and torch.equal(got[1], values)
    assert cache.is_updated == {0: True, 1: True}  # as HF's cross-attention marks a filled layer
    assert len(cache.cross_attention_cache.layers) == 2

    def refuse():
        raise AssertionError("the encoder's keys are in the cache")

    later = CacheSession(cache)
    for keys, values in encoded:
        got = later.cross_keys_values(refuse)
        assert torch.equal(got[0], keys) and torch.equal(got[1], values)
    made = new_cache(True)
    assert isinstance(made, EncoderDecoderCache) and made.self_attention_cache is not made.cross_attention_cache
    assert type(made.self_attention_cache) is type(made.cross_attention_cache) is DynamicCache
    assert type(new_cache(False)) is DynamicCache


def test_config_refusal_names_a_segment_memory_or_an_adaptive_solver_and_passes_tableaus_and_other_modes():
    from bertode.layers.kv_cache import config_refusal
    from bertode.solve.solvers import HEUN

    assert config_refusal(SimpleNamespace(mem_len=8, mode="discrete")) == (
        "mem_len=8 (a segment memory; pass the output's mems instead)")
    assert config_refusal(SimpleNamespace(mode="discrete")) is None  # a config without the field: no memory
    assert config_refusal(SimpleNamespace(mode="ode", solver="dopri5")) == (
        "solver='dopri5' (adaptive: its step grid depends on the whole sequence)")
    assert config_refusal(SimpleNamespace(mode="ode", solver="rk4")) is None
    assert config_refusal(SimpleNamespace(mode="ode", solver=HEUN)) is None  # a tableau given as an object


def test_an_adaptive_solvers_cache_is_refused_in_the_whole_line():
    model = _decoder(mode="ode", solver="dopri5")
    with pytest.raises(ValueError) as error:
        model(_ids(3), use_cache=True)
    assert str(error.value) == (
        "use_cache=True is invalid with solver='dopri5' (adaptive: its step grid depends on the whole sequence); "
        "allowed: use_cache=False, or a fixed-step solver without per-token exit (a key/value cache must see the "
        "same evaluations at every call)")


def test_a_new_cache_holds_the_encoders_keys_apart_only_when_the_forward_has_encoder_states():
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    model, ids = _decoder(add_cross_attention=True), _ids(4)
    states = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert type(model(ids, encoder_hidden_states=states, use_cache=True).cache) is EncoderDecoderCache
        assert type(model(ids, use_cache=True).cache) is DynamicCache
        assert type(_decoder()(ids, use_cache=True).cache) is DynamicCache
