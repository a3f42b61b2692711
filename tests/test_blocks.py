"""ODE-Transformer blocks against a hand-written version of the paper's equations,
with HF's `BertLayer` as the layer map: F(y) = BertLayer(y) - y."""

import pytest
import torch
from transformers import BertModel

import bertode
from conftest import projection_loss, tiny_bert_config


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
