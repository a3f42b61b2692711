"""Relative positions (`bertode.layers.positions`, issue 25 part 2): ``position_scheme="rotary"`` and
``"transformer_xl"``. Oracles: Transformer-XL's score written from Dai et al. 2019's equations (loops over
i and j, float64), a RoPE rotation written pair by pair and transformers' Llama `apply_rotary_pos_emb`;
translation invariance (scores depend on i - j only); the cached decoder against one forward over the
whole sequence; and the one-line refusals (a converted model cannot lose its absolute positions)."""

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM
from transformers.cache_utils import DynamicCache

import bertode
from bertode.causal_lm import BertODEForCausalLM
from bertode.layers import kv_cache
from bertode.layers.disentangled import share_relative_embeddings
from bertode.layers.loop import ActiveTokens
from bertode.layers.sublayers import AttentionBranch, sdpa_mask
from conftest import TINY, file_tree, refused_line

HEADS, WIDTH = TINY["num_attention_heads"], TINY["hidden_size"]
HEAD = WIDTH // HEADS


def _branch(scheme, **fields):
    torch.manual_seed(0)
    config = bertode.BertODEConfig(**{**TINY, **fields}, position_scheme=scheme)
    holder = share_relative_embeddings(nn.ModuleList([AttentionBranch(config)]), config)  # DeBERTa's table
    return holder.double().eval()[0]


def _cache_of(past_k, past_v):
    """A cache whose one slot holds ``past`` positions' keys and values (batch, heads, past, head_size)."""
    cache = DynamicCache()
    cache.update(past_k, past_v, 0)
    return cache


def _run(branch, x, past_kv=None, mask=None, active=None):
    """The branch on x, after the cached ``past_kv`` (keys, values) when given."""
    if past_kv is None:
        return branch(x, mask, active=active)
    with kv_cache.caching(kv_cache.CacheSession(_cache_of(*past_kv))):
        return branch(x, mask, active=active)


def _split(t):  # (batch, n, hidden) -> (batch, heads, n, head_size)
    return t.view(t.shape[0], t.shape[1], HEADS, HEAD).transpose(1, 2)


def _reference_attention(branch, x, scores, past_v):
    """softmax(scores) V, merged, through W_O: the branch's output from its score matrix."""
    v = _split(branch.value(x))
    v = v if past_v is None else torch.cat([past_v, v], dim=2)
    context = scores.softmax(-1) @ v
    return branch.dense(context.transpose(1, 2).reshape(x.shape[0], x.shape[1], WIDTH))


def _relative_encoding(distance: int) -> torch.Tensor:
    """R_{i-j} of Vaswani et al.'s sinusoids as Transformer-XL lays them out: [sin(d w_k) ..., cos(d w_k) ...],
    w_k = 1 / 10000^(2k / d_model)."""
    k = torch.arange(WIDTH // 2, dtype=torch.float64)
    w = 1.0 / 10000 ** (2 * k / WIDTH)
    return torch.cat([torch.sin(distance * w), torch.cos(distance * w)])


def _transformer_xl_scores(branch, x, past, past_k, causal):
    """A_{i,j} = (q_i + u) . k_j + (q_i + v) . W_{k,R} R_{i-j}, over sqrt(head_size), query i at position
    past + i, key j at j; masked (causal) entries -inf. Loops over i and j, per head."""
    positions = branch.positions
    q, k = _split(branch.query(x)), _split(branch.key(x))
    k = k if past_k is None else torch.cat([past_k, k], dim=2)
    batch, n, keys = x.shape[0], x.shape[1], k.shape[2]
    u, v, w_kr = positions.content_bias, positions.position_bias, positions.position_key.weight
    scores = torch.full((batch, HEADS, n, keys), -math.inf, dtype=torch.float64)
    for i in range(n):
        for j in range(keys):
            if causal and j > past + i:
                continue
            relative = (w_kr @ _relative_encoding(past + i - j)).view(HEADS, HEAD)  # W_{k,R} R_{i-j}, per head
            ac = torch.einsum("bhd,bhd->bh", q[:, :, i] + u, k[:, :, j])  # (a) + (c)
            bd = torch.einsum("bhd,hd->bh", q[:, :, i] + v, relative)  # (b) + (d)
            scores[:, :, i, j] = (ac + bd) / math.sqrt(HEAD)
    return scores


CASES = {"bidirectional": (False, 0), "causal": (True, 0), "causal-cached": (True, 3), "bidirectional-cached": (False, 3)}


@pytest.mark.parametrize("case", list(CASES))
def test_transformer_xl_scores_and_attention_equal_the_papers_equations(case):
    causal, past = CASES[case]
    branch = _branch("transformer_xl")
    x = torch.randn(2, 5, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    past_kv = tuple(torch.randn(2, HEADS, past, HEAD, dtype=torch.float64) for _ in range(2)) if past else None
    mask = sdpa_mask(None, causal=True, length=5, past=past) if causal else None
    reference = _transformer_xl_scores(branch, x, past, None if past_kv is None else past_kv[0], causal)
    # the scores the branch attends with: content query against the keys, plus the position bias
    q, k = _split(branch.query(x)), _split(branch.key(x))
    k = k if past_kv is None else torch.cat([past_kv[0], k], dim=2)
    content, bias = branch.positions.queries(q, torch.arange(past, past + 5), k.shape[2], past)
    scores = content @ k.transpose(-1, -2) / math.sqrt(HEAD) + bias
    kept = reference > -math.inf
    assert (scores - reference)[kept].abs().max() <= 1e-6
    expected = _reference_attention(branch, x, reference, None if past_kv is None else past_kv[1])
    output = _run(branch, x, past_kv, mask)
    assert (output - expected).abs().max() <= 1e-6
    # and the gradients of u, v and W_{k,R}
    weights = torch.randn_like(output)
    parameters = list(branch.positions.parameters())
    ours = torch.autograd.grad((output * weights).sum(), parameters)
    theirs = torch.autograd.grad((expected * weights).sum(), parameters)
    assert max((a - b).abs().max() for a, b in zip(ours, theirs)) <= 1e-6
    branch.config._attn_implementation = "eager"  # the written-out path adds the same bias
    assert (_run(branch, x, past_kv, mask) - expected).abs().max() <= 1e-6


def _rotated_by_pairs(x, positions, theta=10000.0):
    """RoPE written pair by pair: (x_k, x_{k+d/2}) turned by the angle p * theta^(-2k/d)."""
    out = x.clone()
    half = x.shape[-1] // 2
    for n, p in enumerate(positions.tolist()):
        for k in range(half):
            angle = p * theta ** (-2 * k / x.shape[-1])
            a, b = x[..., n, k], x[..., n, k + half]
            out[..., n, k] = a * math.cos(angle) - b * math.sin(angle)
            out[..., n, k + half] = a * math.sin(angle) + b * math.cos(angle)
    return out


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rotary_equals_a_pairwise_rotation_and_llamas(theta):
    rotary = _branch("rotary", rope_theta=theta).positions
    x = torch.randn(2, HEADS, 6, HEAD, dtype=torch.float64)
    positions = torch.arange(7, 13)
    assert (rotary.rotate(x, positions) - _rotated_by_pairs(x, positions, theta)).abs().max() <= 1e-12
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    config = llama.LlamaConfig(hidden_size=WIDTH, num_attention_heads=HEADS, rope_parameters={
        "rope_type": "default", "rope_theta": theta})
    cos, sin = llama.LlamaRotaryEmbedding(config)(x.float(), positions[None])
    ours, _ = llama.apply_rotary_pos_emb(x.float(), x.float(), cos, sin)
    assert (rotary.rotate(x.float(), positions) - ours).abs().max() <= 1e-5


def test_rotary_attention_equals_softmax_of_rotated_queries_and_keys_under_a_cache():
    branch, past = _branch("rotary"), 3
    x = torch.randn(2, 4, WIDTH, dtype=torch.float64)
    past_k, past_v = (torch.randn(2, HEADS, past, HEAD, dtype=torch.float64) for _ in range(2))  # cached: rotated
    q = _rotated_by_pairs(_split(branch.query(x)), torch.arange(past, past + 4))
    k = torch.cat([past_k, _rotated_by_pairs(_split(branch.key(x)), torch.arange(past, past + 4))], dim=2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD)
    causal = sdpa_mask(None, causal=True, length=4, past=past)
    expected = _reference_attention(branch, x, scores.masked_fill(~causal, -math.inf), past_v)
    assert (_run(branch, x, (past_k, past_v), causal) - expected).abs().max() <= 1e-10


def _identical_tokens_scores(scheme, n, past):
    """Scores of n queries, all the same vector, on keys that are all the same vector, with ``past`` keys before."""
    branch = _branch(scheme)
    q = torch.randn(1, HEADS, 1, HEAD, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).expand(
        1, HEADS, n, HEAD)
    k = torch.randn(1, HEADS, 1, HEAD, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).expand(
        1, HEADS, past + n, HEAD)
    positions = torch.arange(past, past + n)
    if scheme == "rotary":
        return branch.positions.rotate(q, positions) @ branch.positions.rotate(k, torch.arange(past + n)).transpose(-1, -2)
    content, bias = branch.positions.queries(q, positions, past + n, past)
    return content @ k.transpose(-1, -2) + bias


@pytest.mark.parametrize("scheme", ["rotary", "transformer_xl"])
def test_scores_depend_on_i_minus_j_only(scheme):
    scores = _identical_tokens_scores(scheme, 6, 0)[0]  # (heads, 6, 6)
    assert (scores[:, 1:, 1:] - scores[:, :-1, :-1]).abs().max() <= 1e-10  # constant along each diagonal
    assert (scores[:, :, 0] - scores[:, :, 1]).abs().max() > 1e-3  # but it does vary with the distance
    shifted = _identical_tokens_scores(scheme, 6, 5)[0]  # the same queries after 5 cached positions
    assert (shifted[:, :, 5:] - scores).abs().max() <= 1e-10


def test_rotary_scores_do_not_change_when_the_absolute_start_shifts():
    rotary = _branch("rotary").positions
    q, k = (torch.randn(2, HEADS, 7, HEAD, dtype=torch.float64) for _ in range(2))
    at = lambda start: rotary.rotate(q, torch.arange(start, start + 7)) @ rotary.rotate(  # noqa: E731
        k, torch.arange(start, start + 7)).transpose(-1, -2)
    assert (at(0) - at(40)).abs().max() <= 1e-10
    assert (at(0) - q @ k.transpose(-1, -2)).abs().max() > 1e-3


@pytest.mark.parametrize("scheme", ["rotary", "transformer_xl", "deberta"])
def test_per_token_exit_queries_see_their_own_positions(scheme):
    """The active (not yet exited) tokens query alone, packed to the left: each keeps its position."""
    branch = _branch(scheme)
    x = torch.randn(2, 6, WIDTH, dtype=torch.float64)
    running = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 0]], dtype=torch.bool)
    causal = sdpa_mask(None, causal=True, length=6)
    assert (_run(branch, x, mask=causal, active=ActiveTokens(running)) - _run(branch, x, mask=causal)[running]
            ).abs().max() <= 1e-12


def _decoder(scheme, **fields):
    torch.manual_seed(0)
    config = bertode.BertODEConfig(**{**TINY, **fields}, is_decoder=True, initializer_range=0.3, position_scheme=scheme)
    return BertODEForCausalLM(config).eval()


@pytest.mark.parametrize("scheme", ["rotary", "transformer_xl", "deberta"])
@pytest.mark.parametrize("fields", [dict(mode="discrete"), dict(mode="ode", solver="rk4", steps=2),
                                    dict(mode="deq", deq_tol=1e-7, deq_max_iter=100)],
                         ids=["discrete", "rk4-2-steps", "deq"])
def test_the_cached_decoder_equals_one_forward(scheme, fields):
    from test_kv_cache import _fed_in_pieces

    model = _decoder(scheme, **fields)  # a DEQ: the bound is its solve's tolerance, as in test_kv_cache
    assert model.bert.embeddings.position_embeddings is None  # no absolute positions
    ids = torch.randint(5, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        pieces, _ = _fed_in_pieces(model, ids, [4, 1, 2, 1, 1])
        assert (pieces - whole).abs().max() <= 1e-5
        # positions matter: the same tokens in another order have other logits at the last position
        flipped = model(torch.cat([ids[:, :4].flip(1), ids[:, 4:]], dim=1), use_cache=False).logits
        assert (flipped[:, -1] - whole[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("scheme", ["rotary", "transformer_xl"])
def test_from_bert_refuses_to_drop_the_sources_absolute_positions(scheme):
    source = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=32))
    with pytest.raises(ValueError) as error:
        bertode.from_bert(source, position_scheme=scheme)
    assert str(error.value) == (f"from_bert(position_scheme={scheme!r}) is invalid: the source has 'absolute' position "
                                "embeddings, which the converted model would lose; allowed: 'absolute' (the source's)")


def test_unknown_schemes_and_a_stray_rope_theta_are_one_line():
    with pytest.raises(ValueError, match=r"^BertODEConfig.position_scheme='alibi' is invalid; allowed: 'absolute', "
                                         r"'after_padding', 'rotary', 'transformer_xl', 'deberta'$"):
        bertode.BertODEConfig(position_scheme="alibi")
    config = bertode.BertODEConfig(rope_theta=500.0)
    with pytest.raises(ValueError, match=r"^BertODEConfig.rope_theta=500.0 is invalid; allowed: 10000.0 with "
                                         r"position_scheme='absolute' \(it is the base of position_scheme='rotary'\)$"):
        config.validate_ode()


@pytest.mark.usefixtures("restore_logging")  # an in-process Hydra run moves the root logger
def test_train_refuses_an_unknown_scheme_in_one_line_and_writes_nothing(tmp_path, cache_dir, capsys):
    before = file_tree(tmp_path, cache_dir)
    error = refused_line(capsys, "train", f"hydra.run.dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}",
                         "+model.position_scheme=alibi")
    assert "model.position_scheme='alibi' is invalid; allowed: 'absolute', 'after_padding', 'rotary', " \
           "'transformer_xl'" in error, error
    assert file_tree(tmp_path, cache_dir) == before


@pytest.mark.usefixtures("restore_logging")
def test_finetune_refuses_a_relative_scheme_on_a_bert_checkpoint_in_one_line_and_writes_nothing(tmp_path, capsys):
    from bertode.training.corpus import SPECIAL_TOKENS
    from bertode.training.wordpiece import train_tokenizer

    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=80)).save_pretrained(bert)
    train_tokenizer(["good bad fine"], 40, SPECIAL_TOKENS).save_pretrained(bert)
    before = file_tree(tmp_path)
    error = refused_line(capsys, "finetune", f"hydra.run.dir={tmp_path / 'run'}", f"checkpoint={bert}",
                         "+model.position_scheme=transformer_xl")
    assert error == "error: model.position_scheme='transformer_xl' is invalid with the checkpoint's " \
                    "position_scheme='absolute' (its weights were trained with those positions); allowed: 'absolute'"
    assert file_tree(tmp_path) == before
