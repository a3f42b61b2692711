"""The Macaron layer (Lu et al. 2019; issue 25 part 5): ``block="strang"`` lays each layer out as the
Strang-Marchuk splitting of its convection-diffusion ODE, a feed-forward half-step, the attention step,
a feed-forward half-step. The oracle is the Macaron layer written out in this file from the paper's
equations (post-LN, two feed-forward networks): at Euler with one step and in discrete mode the model
computes it; in ODE mode each sub-step is a solve over its part of the layer's time interval."""

import math

import pytest
import torch
import torch.nn.functional as F

import bertode
from conftest import TINY


def _linear(module, x):
    return F.linear(x, module.weight, module.bias)


def _norm(module, x):
    return F.layer_norm(x, x.shape[-1:], module.weight, module.bias, module.eps)


def _ffn(branch, x):
    return _linear(branch.dense, F.gelu(_linear(branch.intermediate, x)))


def _attention(branch, x, heads):
    batch, seq, width = x.shape
    size = width // heads

    def split(t):
        return t.view(batch, seq, heads, size).transpose(1, 2)

    q, k, v = (split(_linear(m, x)) for m in (branch.query, branch.key, branch.value))
    probs = (q @ k.transpose(-1, -2) / math.sqrt(size)).softmax(-1)
    return _linear(branch.dense, (probs @ v).transpose(1, 2).reshape(batch, seq, width))


def _macaron(model, hidden):
    """x1 = LN(x + 1/2 FFN1(x)); x2 = LN(x1 + Attn(x1)); y = LN(x2 + 1/2 FFN2(x2)), per layer."""
    for layer in model.bert.encoder.layer:
        first, attention, second = layer.feed_forward_first, layer.attention, layer.feed_forward
        hidden = _norm(first.norm, hidden + 0.5 * _ffn(first.branch, hidden))
        hidden = _norm(attention.norm, hidden + _attention(attention.branch, hidden, TINY["num_attention_heads"]))
        hidden = _norm(second.norm, hidden + 0.5 * _ffn(second.branch, hidden))
    return hidden


@pytest.mark.parametrize("fields", [dict(mode="discrete"), dict(mode="ode", solver="euler", steps=1)])
def test_block_strang_is_the_macaron_layer(fields):
    torch.manual_seed(0)
    config = bertode.BertODEConfig(**TINY, block="strang", initializer_range=0.2, **fields)
    model = bertode.BertODEForMaskedLM(config).eval()
    ids = torch.randint(5, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        expected = _macaron(model, out.hidden_states[0])
    assert (out.hidden_states[-1] - expected).abs().max() <= 1e-5
    # the second feed-forward network is its own: the layer is not BERT's with a feed-forward step split in two
    layer = model.bert.encoder.layer[0]
    assert layer.feed_forward_first.branch.intermediate.weight.data_ptr() != layer.feed_forward.branch.intermediate.weight.data_ptr()


def test_in_ode_mode_the_halves_solve_over_their_half_of_the_layers_interval():
    torch.manual_seed(0)
    config = bertode.BertODEConfig(**TINY, block="strang", solver="rk4", steps=2, vector_field="time_residual")
    model = bertode.BertODEForMaskedLM(config).eval()
    ids = torch.randint(5, TINY["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(ids, output_trajectory=True)
    spans = {solve["name"]: (solve["times"][0].item(), solve["times"][-1].item()) for solve in out.trajectory}
    assert spans["layer.1.feed_forward_first"] == (1.0, 1.5)
    assert spans["layer.1.attention"] == (1.0, 2.0)
    assert spans["layer.1.feed_forward"] == (1.5, 2.0)
    assert [r["nfe_forward"] for r in model.solver_stats()["layers"]][:3] == [8, 8, 8]  # rk4, 2 steps: each site a solve


def test_a_macaron_model_trains_and_caches():
    torch.manual_seed(0)
    config = bertode.BertODEConfig(**TINY, block="strang", solver="euler", steps=2, is_decoder=True)
    model = bertode.BertODEForCausalLM(config)
    ids = torch.randint(5, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(3))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.bert.encoder.layer[0].feed_forward_first.branch.dense.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        first = model(ids[:, :5], use_cache=True)
        rest = model(ids[:, 5:], cache=first.cache).logits
    assert (torch.cat([first.logits, rest], 1) - whole).abs().max() <= 1e-5
