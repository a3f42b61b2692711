"""`vector_field=time_weights`: depth-varying weights W(t) = W + U diag(A phi(t)) D on every
Linear of each branch. At initialisation (A = 0) a converted model is BERT exactly at
Euler-1; gradients reach the generator A; after a step the field depends on depth; copies
keep their own hooks; it trains from the command line."""

import copy

import torch
from transformers import BertModel

import bertode
from conftest import tiny_bert_config


def test_time_weights_starts_as_bert_and_its_generator_learns():
    torch.manual_seed(0)
    hf = BertModel(tiny_bert_config()).eval()
    model = bertode.from_bert(hf, vector_field="time_weights", solver="euler", steps=1).eval()
    batch = {"input_ids": torch.randint(5, 64, (2, 7))}
    assert torch.equal(model(**batch).last_hidden_state, hf(**batch).last_hidden_state)
    for solver, steps in (("rk4", 3), ("dopri5", 1)):  # and the residual field exactly, under any solve
        residual = bertode.from_bert(hf, vector_field="residual", solver=solver, steps=steps).eval()
        varying = bertode.from_bert(hf, vector_field="time_weights", solver=solver, steps=steps).eval()
        assert torch.equal(varying(**batch).last_hidden_state, residual(**batch).last_hidden_state)
    field = model.encoder.layer[0].attention.field
    assert len(field.down) == 4 and len(model.encoder.layer[0].feed_forward.field.down) == 2  # Q, K, V, O; W1, W2
    model.train()
    model(**batch).last_hidden_state.pow(2).sum().backward()
    assert field.generator.weight.grad.abs().max() > 0
    with torch.no_grad():
        field.generator.weight.normal_()
    z = torch.randn(1, 7, hf.config.hidden_size)
    branch = model.encoder.layer[0].attention.branch
    a = field(torch.tensor(0.0), z, lambda s: branch(s), None)
    b = field(torch.tensor(0.7), z, lambda s: branch(s), None)
    assert (a - b).abs().max() > 1e-4  # the weights depend on depth now
    twin = copy.deepcopy(model)
    hook = next(iter(twin.encoder.layer[0].attention.branch.query._forward_hooks.values()))
    assert hook.func.__self__ is twin.encoder.layer[0].attention.field


def test_time_weights_trains_from_the_command_line(tmp_path):
    from bertode.train import compose, train

    cfg = compose([f"data.cache_dir={tmp_path / 'cache'}", "vector_field=time_weights", "vector_field.kwargs.rank=2",
                   "solver=rk4", "trainer.max_steps=3", "trainer.batch_size=4", "data.seq_len=16", "data.vocab_size=300",
                   "data.max_eval_sequences=4", "model.hidden_size=32", "model.intermediate_size=64",
                   "model.num_attention_heads=2"])
    assert train(cfg, tmp_path / "run")["step"] == 3
    loaded = bertode.BertODEForMaskedLM.from_pretrained(tmp_path / "run" / "final")
    assert loaded.config.vector_field == "time_weights" and loaded.config.vector_field_kwargs["rank"] == 2
