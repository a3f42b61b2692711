"""Pre-LN layers (``norm_position="pre"``, issue 15 item 1): x -> x + G(LN(x)) is one Euler
step of dz/dt = G(LN(z)). The discrete mode and Euler-1 (both backends, `residual` and
`add_norm` fields) equal a pre-LN transformer written out here from the weights; an ODE
solve's adjoint differentiates the LayerNorm inside the branch; save/load and the CLI take
it; a DEQ (whose pre-LN map has no fixed point in general) and a bad value are refused."""

import math

import pytest
import torch
import torch.nn.functional as F

import bertode
from conftest import TINY, projection_loss, tiny_ode_config


def pre_ln_reference(model, input_ids, attention_mask):
    """Embeddings, then per layer h += Attn(LN_a(h)); h += FFN(LN_f(h)), then LN_final: by hand."""
    hidden, heads = TINY["hidden_size"], TINY["num_attention_heads"]
    eps = model.config.layer_norm_eps
    h = model.embeddings(input_ids=input_ids)
    keep = attention_mask[:, None, None, :].bool()
    for layer in model.encoder.layer:
        a, f = layer.attention, layer.feed_forward
        x = F.layer_norm(h, (hidden,), a.norm.weight, a.norm.bias, eps)
        split = lambda t: t.view(*t.shape[:2], heads, hidden // heads).transpose(1, 2)  # noqa: E731
        q, k, v = (split(F.linear(x, m.weight, m.bias)) for m in (a.branch.query, a.branch.key, a.branch.value))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hidden // heads)).masked_fill(~keep, float("-inf"))
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(h.shape)
        h = h + F.linear(context, a.branch.dense.weight, a.branch.dense.bias)
        x = F.layer_norm(h, (hidden,), f.norm.weight, f.norm.bias, eps)
        inner = F.gelu(F.linear(x, f.branch.intermediate.weight, f.branch.intermediate.bias))
        h = h + F.linear(inner, f.branch.dense.weight, f.branch.dense.bias)
    return F.layer_norm(h, (hidden,), model.final_norm.weight, model.final_norm.bias, eps)


@pytest.mark.parametrize("overrides", [dict(mode="discrete"), dict(solver="euler", steps=1),
                                       dict(solver="euler", steps=1, ode_backend="torchdiffeq"),
                                       dict(solver="euler", steps=1, vector_field="add_norm")])
def test_discrete_and_euler_1_equal_a_hand_written_pre_ln_transformer(batch, overrides):
    torch.manual_seed(0)
    model = bertode.BertODEModel(tiny_ode_config(norm_position="pre", **overrides)).eval()
    with torch.no_grad():  # BERT's init leaves LayerNorm at the identity; move it so it matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    expected = pre_ln_reference(model, batch["input_ids"], batch["attention_mask"])
    assert (out.last_hidden_state - expected).abs().max() <= 1e-5
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state) and len(out.hidden_states) == 3
    post = bertode.BertODEModel(tiny_ode_config(**overrides)).eval()
    post.load_state_dict({k: v for k, v in model.state_dict().items() if "final_norm" not in k})
    assert (post(batch["input_ids"]).last_hidden_state - out.last_hidden_state).abs().max() > 1e-2  # not BERT's


def test_euler_1_has_the_discrete_gradients_and_the_adjoint_differentiates_the_branch_norm(batch):
    grads = {}
    for name, overrides in {"discrete": dict(mode="discrete"), "euler": dict(solver="euler", steps=1),
                            "rk4": dict(solver="rk4", steps=2),
                            "rk4_adjoint": dict(solver="rk4", steps=2, sensitivity="adjoint", adjoint_atol=1e-9,
                                                adjoint_rtol=1e-9)}.items():
        torch.manual_seed(0)
        model = bertode.BertODEModel(tiny_ode_config(norm_position="pre", **overrides)).double()
        projection_loss(model(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state).backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for n, g in grads["discrete"].items():
        assert (grads["euler"][n] - g).abs().max() <= 1e-10, n
    assert grads["rk4"].keys() == grads["rk4_adjoint"].keys()
    for n, g in grads["rk4"].items():
        assert (grads["rk4_adjoint"][n] - g).abs().max() <= 1e-6 * (1 + g.abs().max()), n
    norm = "encoder.layer.0.attention.norm.weight"
    assert grads["rk4_adjoint"][norm].abs().max() > 0 and "final_norm.weight" in grads["rk4_adjoint"]


def test_masked_lm_saves_and_loads_pre_ln_and_a_pre_ln_deq_is_refused(tmp_path, batch):
    torch.manual_seed(0)
    model = bertode.BertODEForMaskedLM(tiny_ode_config(norm_position="pre", solver="rk4", steps=2))
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.bert.final_norm.weight.grad.abs().max() > 0
    model.eval()
    model.save_pretrained(tmp_path)
    again = bertode.BertODEForMaskedLM.from_pretrained(tmp_path).eval()
    assert again.config.norm_position == "pre"
    assert torch.equal(again(**batch).logits, model(**batch).logits)
    with pytest.raises(ValueError, match="norm_position='pre' is invalid with mode='deq'"):
        tiny_ode_config(norm_position="pre", mode="deq", num_hidden_layers=1).validate_ode()


def test_norm_position_is_checked_and_trains_from_the_cli(tmp_path):
    with pytest.raises(ValueError, match=r"^BertODEConfig.norm_position='middle' is invalid; allowed: 'post', 'pre'$"):
        tiny_ode_config(norm_position="middle")
    from test_train import run_train, small

    result, records = run_train(tmp_path / "run", small(tmp_path / "cache", "model.norm_position=pre"))
    assert [r["step"] for r in records] == [1, 2, 3] and math.isfinite(result["eval"]["loss"])
    assert bertode.BertODEForMaskedLM.from_pretrained(tmp_path / "run" / "final").config.norm_position == "pre"
