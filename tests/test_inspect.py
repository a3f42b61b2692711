"""What researchers inspect: attention probabilities (equal to HF's eager attentions at
Euler-1), trajectories of every solve (monotone times; the last output is the layer's),
and per-layer activation checkpointing (the same gradients, dropout included, with fewer
saved bytes; refused in one line where it saves nothing)."""

import copy

import pytest
import torch
from transformers import BertModel

import bertode
from bertode.layers.dropout import split_invariant
from conftest import tiny_bert_config


def _batch(vocab=64):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _config(**fields):
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return bertode.BertODEConfig(**{**base, **fields})


def test_attentions_equal_hf_eager_attentions_at_euler1():
    torch.manual_seed(0)
    config = tiny_bert_config()
    config._attn_implementation = "eager"
    hf = BertModel(config).eval()
    ours = bertode.from_bert(hf, solver="euler", steps=1).eval()
    theirs = hf(**_batch(), output_attentions=True).attentions
    mine = ours(**_batch(), output_attentions=True).attentions
    assert len(mine) == len(theirs) == hf.config.num_hidden_layers
    for a, b in zip(mine, theirs):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-6
    assert ours(**_batch()).attentions is None  # off unless asked


def test_all_attentions_stack_every_evaluation_and_a_deq_gives_its_last():
    torch.manual_seed(0)
    model = bertode.BertODEModel(_config(solver="rk4", steps=2)).eval()
    first = model(**_batch(), output_attentions=True).attentions
    every = model(**_batch(), output_attentions="all").attentions
    assert every[0].shape[0] == 8  # rk4: 4 stages x 2 steps
    assert torch.equal(every[0][0], first[0]) and not torch.equal(every[0][-1], first[0])
    deq = bertode.BertODEModel(_config(mode="deq", deq_tol=1e-5, deq_max_iter=60)).eval()
    attentions = deq(**_batch(), output_attentions=True).attentions
    assert len(attentions) == 2 and attentions[0].shape == (2, 4, 9, 9)
    rows = attentions[0].sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)  # probabilities


@pytest.mark.parametrize("solver,steps", [("rk4", 3), ("dopri5", 1)])
def test_trajectories_have_monotone_times_and_end_at_the_layer_output(solver, steps):
    torch.manual_seed(0)
    model = bertode.BertODEModel(_config(solver=solver, steps=steps, atol=1e-6, rtol=1e-6)).eval()
    for p in model.encoder.parameters():
        p.data.mul_(4)  # dynamics that make an adaptive solver take several steps
    out = model(**_batch(), output_trajectory=True, output_hidden_states=True)
    solves = out.trajectory
    assert [s["name"] for s in solves] == ["layer.0.attention", "layer.0.feed_forward", "layer.1.attention",
                                           "layer.1.feed_forward"]
    for index, solve in enumerate(solves):
        times = solve["times"]
        assert (times[1:] > times[:-1]).all() and times[0] == index // 2 and times[-1] == index // 2 + 1
        assert solve["states"].shape == (len(times), 2, 9, 32) == solve["outputs"].shape
        if solver == "rk4":
            assert len(times) == steps + 1
    accepted = [row["accepted_steps"] for row in out.solver_stats["layers"]]
    if solver == "dopri5":
        assert [len(s["times"]) - 1 for s in solves] == accepted and max(accepted) > 1
    for layer in range(2):
        assert torch.equal(solves[2 * layer + 1]["outputs"][-1], out.hidden_states[layer + 1])
        assert torch.equal(solves[2 * layer]["states"][0], out.hidden_states[layer])  # a solve starts at its input


def test_a_deq_trajectory_is_its_iterates():
    torch.manual_seed(0)
    model = bertode.BertODEModel(_config(mode="deq", deq_tol=1e-6, deq_max_iter=80, deq_solver="fixed_point",
                                         deq_damping=0.7)).eval()
    out = model(**_batch(), output_trajectory=True)
    (solve,) = out.trajectory
    times = solve["times"]
    assert (times[1:] > times[:-1]).all() and len(times) == out.solver_stats["forward_iterations"] + 1
    gap = (solve["states"][-1] - out.last_hidden_state).norm() / out.last_hidden_state.norm()
    assert gap <= 1e-4  # z* and f(z*)
    steps = (solve["states"][1:] - solve["states"][:-1]).flatten(1).norm(dim=1)
    assert steps[-1] < steps[0] * 1e-2  # the iteration contracts


def _saved_bytes(model, batch):
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).last_hidden_state.pow(2).sum()
    return loss, total[0]


@pytest.mark.parametrize("split", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients_with_fewer_saved_bytes(split):
    torch.manual_seed(0)
    plain = bertode.BertODEModel(_config(solver="rk4", steps=4, num_hidden_layers=3, hidden_dropout_prob=0.1,
                                         attention_probs_dropout_prob=0.1)).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    grads, saved = [], []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        context = split_invariant(5, torch.arange(4)[1::2], 4) if split else torch.enable_grad()
        with context:
            loss, nbytes = _saved_bytes(model, _batch())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        saved.append(nbytes)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) <= 1e-6
    assert saved[1] < 0.25 * saved[0], saved  # measured 19 KB against 3.3 MB (0.006)


def test_gradient_checkpointing_is_refused_where_it_saves_nothing():
    for fields, expected in (({"mode": "deq"}, "mode='deq'"), ({"sensitivity": "adjoint"}, "sensitivity='adjoint'")):
        model = bertode.BertODEModel(_config(**fields))
        with pytest.raises(ValueError) as error:
            model.gradient_checkpointing_enable()
        assert f"gradient_checkpointing_enable() is invalid with {expected}" in str(error.value)
        assert "\n" not in str(error.value)


def test_gradient_checkpointing_with_attentions_requested():
    torch.manual_seed(0)
    plain = bertode.BertODEModel(_config(solver="rk4", steps=2)).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    grads = []
    for model in (plain, checkpointed):
        out = model(**_batch(), output_attentions=True)
        assert len(out.attentions) == 2
        out.last_hidden_state.pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) <= 1e-6


@pytest.mark.parametrize("checkpointing", [False, True])
def test_attentions_are_differentiable_in_train_mode_with_hf_eagers_gradients(checkpointing):
    torch.manual_seed(0)
    config = tiny_bert_config()
    config._attn_implementation = "eager"
    hf = BertModel(config).train()  # dropout is 0 in the tiny config
    ours = bertode.from_bert(hf, solver="euler", steps=1).train()
    if checkpointing:
        ours.gradient_checkpointing_enable()
    weights = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(1))  # (sum of probs: constant)
    grads = []
    for model, query in ((hf, "encoder.layer.0.attention.self.query.weight"),
                         (ours, bertode.convert.rename_bert_key("encoder.layer.0.attention.self.query.weight"))):
        attentions = model(**_batch(), output_attentions=True).attentions
        sum((a * weights).sum() for a in attentions).backward()
        grads.append(dict(model.named_parameters())[query].grad)
    assert grads[1] is not None and grads[0].abs().max() > 1e-4
    assert (grads[0] - grads[1]).abs().max() <= 1e-6


def test_checkpointing_is_transformers_per_layer_with_every_n_layers_and_kwargs_and_no_warning():
    """Every layer is a transformers GradientCheckpointingLayer: every_n_layers picks the same layers as in HF's
    BertModel, the kwargs reach torch's checkpoint, and gradient_checkpointing_enable() warns nothing."""
    import warnings

    from transformers.modeling_layers import GradientCheckpointingLayer

    torch.manual_seed(0)
    hf = BertModel(tiny_bert_config(num_hidden_layers=4)).train()
    plain = bertode.BertODEModel(_config(solver="euler", steps=1, num_hidden_layers=4, hidden_dropout_prob=0.1,
                                         attention_probs_dropout_prob=0.1)).train()
    checkpointed = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True},
                                                   every_n_layers=2)
    hf.activation_checkpointing_enable(every_n_layers=2)
    flags = [layer.gradient_checkpointing for layer in checkpointed.encoder.layer]
    assert all(isinstance(layer, GradientCheckpointingLayer) for layer in checkpointed.encoder.layer)
    assert flags == [layer.gradient_checkpointing for layer in hf.encoder.layer] == [True, False, True, False]
    calls = []
    for layer in checkpointed.encoder.layer:
        if layer.gradient_checkpointing:
            assert layer._checkpoint.keywords == {"use_reentrant": True}
            func = layer._checkpoint
            layer._checkpoint = lambda *args, func=func, **kwargs: calls.append(1) or func(*args, **kwargs)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks: the recomputation replays them
        model(**_batch()).last_hidden_state.pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert len(calls) == 2 and grads[0].keys() == grads[1].keys()
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpointed.gradient_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in checkpointed.encoder.layer)
