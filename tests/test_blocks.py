"""ODE-Transformer blocks against a hand-written version of the paper's equations,
with HF's `BertLayer` as the layer map: F(y) = BertLayer(y) - y."""

from types import SimpleNamespace

import pytest
import torch
from transformers import BertModel

import bertode
from bertode.layers.blocks import BLOCKS, available_blocks, build_block
from conftest import TINY, projection_loss, tiny_bert_config


def _reference_block(block, layer, gate, y, mask):
    F = lambda v: layer(v, attention_mask=mask) - v  # noqa: E731
    if block == "rk2":
        f1 = F(y)
        f2 = F(y + f1)
        return y + (f1 + f2) / 2
    if block == "rk2_gated":
        f1 = F(y)
        f2 = F(y + f1)
        g = torch.sigmoid(gate(torch.cat([f1, f2], dim=-1)))
        return y + g * f1 + (1 - g) * f2
    f1 = F(y)
    f2 = F(y + f1 / 2)
    f3 = F(y + f2 / 2)
    f4 = F(y + f3)
    return y + (f1 + 2 * f2 + 2 * f3 + f4) / 6


@pytest.mark.parametrize("block", ["rk2", "rk2_gated", "rk4"])
def test_block_matches_the_paper_equations(batch, block):
    torch.manual_seed(0)
    hf = BertModel(tiny_bert_config()).eval()
    with torch.no_grad():  # BERT's init makes each layer nearly the identity; make F(y) sizeable
        for p in hf.encoder.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    ours = bertode.from_bert(hf, block=block).eval()
    if block == "rk2_gated":
        with torch.no_grad():
            for layer in ours.encoder.layer:
                assert layer.block.gate.weight.abs().sum() == 0 and layer.block.gate.bias.abs().sum() == 0  # g = 1/2
                layer.block.gate.weight.normal_(0, 0.3)
                layer.block.gate.bias.fill_(0.4)
    mask = (1.0 - batch["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
    with torch.no_grad():
        y = hf.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        for index, hf_layer in enumerate(hf.encoder.layer):
            gate = ours.encoder.layer[index].block.gate if block == "rk2_gated" else None
            y = _reference_block(block, hf_layer, gate, y, mask)
        got = ours(**batch).last_hidden_state
    assert (got - y).abs().max() <= 1e-5
    assert (got - hf(**batch).last_hidden_state).abs().max() > 1e-2  # a block is not one layer


def test_gate_is_trained():
    torch.manual_seed(0)
    model = bertode.from_bert(BertModel(tiny_bert_config()), block="rk2_gated")
    projection_loss(model(torch.randint(0, 64, (2, 6))).last_hidden_state).backward()
    assert model.encoder.layer[0].block.gate.weight.grad.abs().sum() > 0


# The tests below call the blocks directly, with a layer map written here (issue 29's mutation run).

def _layer_map(y):
    """A nonlinear stand-in for a layer: y -> tanh(2y) + y^2/4 (no autocast op inside)."""
    return torch.tanh(2 * y) + y * y / 4


def _y():
    return torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))


def test_the_plain_blocks_apply_the_layer_once():
    config = bertode.BertODEConfig(**TINY)
    y = _y()
    for name in ("none", "strang"):
        assert torch.equal(BLOCKS[name](config)(_layer_map, y), _layer_map(y)), name


def test_every_built_in_block_refuses_extra_arguments_in_one_line():
    config = bertode.BertODEConfig(**TINY)
    for name in available_blocks():
        with pytest.raises(ValueError) as error:
            BLOCKS[name](config, scale=2.0)
        assert str(error.value) == (f"BertODEConfig.block_kwargs={{'scale': 2.0}} is invalid for block={name!r}; "
                                    "allowed: no extra arguments")


def test_block_kwargs_reach_a_block_built_from_the_config():
    @bertode.register_block("scaled_test_block")
    class Scaled(bertode.Block):
        def __init__(self, config, scale):
            super().__init__(config)
            self.scale = scale

        def forward(self, layer, y):
            return self.scale * layer(y)

    try:
        assert BLOCKS.default == "none"  # registering a block does not make it the default
        block = build_block(bertode.BertODEConfig(**TINY, block="scaled_test_block", block_kwargs={"scale": 3.0}))
        assert isinstance(block, Scaled) and block.scale == 3.0
    finally:
        BLOCKS._entries.pop("scaled_test_block", None)
        BLOCKS.default = "none"
    # a config object without the block_kwargs field builds a block without arguments
    assert isinstance(build_block(SimpleNamespace(block="rk2_gated", hidden_size=32)), bertode.Block)


def test_a_scheme_block_takes_one_step_of_a_named_solver_and_refuses_an_adaptive_one():
    config = bertode.BertODEConfig(**TINY)

    class Midpoint(bertode.SchemeBlock):
        solver = "midpoint"

    class Dopri(bertode.SchemeBlock):
        solver = "dopri5"

    y = _y()
    f1 = _layer_map(y) - y
    half = y + f1 / 2
    expected = y + (_layer_map(half) - half)  # y' = y + F(y + F(y)/2)
    assert (Midpoint(config)(_layer_map, y) - expected).abs().max() <= 1e-6
    with pytest.raises(ValueError) as error:
        Dopri(config)
    assert str(error.value) == "Dopri.solver is adaptive; allowed: a fixed-step solver (one step)"
    # a tableau or solver class is named after the block class (the name its solver errors show)
    assert BLOCKS["rk2"](config)._solve.spec.name == "RK2Block"
    assert BLOCKS["rk4"](config)._solve.spec.name == "RK4Block"


def test_the_gated_mix_is_computed_in_the_states_dtype_under_autocast():
    torch.manual_seed(0)
    block = BLOCKS["rk2_gated"](bertode.BertODEConfig(**TINY))
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.3)
        block.gate.bias.fill_(0.4)
    y = _y()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = block(_layer_map, y)
        f1 = _layer_map(y) - y
        f2 = _layer_map(y + f1) - (y + f1)
        g = torch.sigmoid(block.gate(torch.cat([f1, f2], dim=-1))).float()  # the bf16 gate, then float32
    assert got.dtype == torch.float32
    assert (got - (y + g * f1 + (1 - g) * f2)).abs().max() <= 1e-6
