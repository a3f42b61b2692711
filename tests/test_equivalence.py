"""The master identity: one Euler step on [0, 1] is BERT (outputs and every gradient)."""

import pytest
import torch
from transformers import BertForMaskedLM, BertModel

import bertode
from conftest import projection_loss, tiny_bert_config, tiny_ode_config

TOLERANCE = 1e-5


def _gradients(model, prefix_map=lambda name: name):
    return {prefix_map(n): p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode, vector_field", [("ode", "residual"), ("ode", "add_norm"), ("ode", "time_residual"),
                                                ("discrete", None)])
def test_bert_model_outputs_and_gradients(batch, vector_field, mode):
    torch.manual_seed(0)
    hf = BertModel(tiny_bert_config())
    ode = dict(solver="euler", steps=1, t_end=1.0, vector_field=vector_field) if mode == "ode" else {}
    ours = bertode.from_bert(hf, mode=mode, **ode)
    hf_out = hf(**batch)
    our_out = ours(**batch)
    assert (hf_out.last_hidden_state - our_out.last_hidden_state).abs().max() <= TOLERANCE
    assert (hf_out.pooler_output - our_out.pooler_output).abs().max() <= TOLERANCE

    projection_loss(hf_out.last_hidden_state).backward()
    projection_loss(our_out.last_hidden_state).backward()
    hf_grads = {bertode.convert.rename_bert_key(n): p.grad for n, p in hf.named_parameters() if p.grad is not None}
    our_grads = _gradients(ours)
    assert set(hf_grads) <= set(our_grads)
    worst = max((hf_grads[n] - our_grads[n]).abs().max().item() for n in hf_grads)
    assert worst <= TOLERANCE, worst


@pytest.mark.parametrize("vector_field", ["residual", "add_norm"])
def test_bert_for_masked_lm_loss_and_gradients(batch, vector_field):
    torch.manual_seed(0)
    hf = BertForMaskedLM(tiny_bert_config())
    ours = bertode.from_bert(hf, solver="euler", steps=1, vector_field=vector_field)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    hf_out = hf(**batch, labels=labels)
    our_out = ours(**batch, labels=labels)
    assert (hf_out.logits - our_out.logits).abs().max() <= TOLERANCE
    assert abs(hf_out.loss.item() - our_out.loss.item()) <= TOLERANCE
    hf_out.loss.backward()
    our_out.loss.backward()
    ours_by_name = dict(ours.named_parameters())
    for name, parameter in hf.named_parameters():
        if parameter.grad is None:
            continue
        mine = ours_by_name[bertode.convert.rename_bert_key(name)].grad
        assert (parameter.grad - mine).abs().max() <= TOLERANCE, name


def test_more_euler_steps_change_the_output(batch):
    """Guards the identity test against a solver that ignores `steps`."""
    torch.manual_seed(0)
    hf = BertModel(tiny_bert_config())
    one = bertode.from_bert(hf, solver="euler", steps=1)(**batch).last_hidden_state
    four = bertode.from_bert(hf, solver="euler", steps=4)(**batch).last_hidden_state
    assert (one - four).abs().max() > 1e-4


def test_add_norm_euler_steps_are_the_damped_iteration(batch):
    """N Euler steps of add_norm = z <- (1 - h) z + h LN(z + G(z)), h = 1/N."""
    torch.manual_seed(0)
    model = bertode.BertODEModel(tiny_ode_config(vector_field="add_norm", steps=3, num_hidden_layers=1)).eval()
    site = model.encoder.layer[0].attention
    x = torch.randn(2, 10, 32)
    from bertode.layers.encoder import Pass

    got, _ = site(x, None, Pass(0))
    z, h = x, 1.0 / 3
    for _ in range(3):
        z = (1 - h) * z + h * site.norm(z + site.branch(z))
    assert (got - z).abs().max() <= 1e-5
