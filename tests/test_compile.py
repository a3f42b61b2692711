"""`compile_model`: whole graphs where the solve allows them, compiled fields elsewhere,
and the same numbers as eager.

The backend is ``aot_eager`` (Dynamo's tracing plus AOTAutograd's joint forward/backward
graph, run without code generation) wrapped to count the graphs a forward runs: graph
breaks and wrong traces show here; Inductor's code generation (85 s for a tiny model on
this CPU) is PyTorch's to test and is exercised by ``scripts/bench_speed.py --compile``.
"""

import copy
import pickle

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager

import bertode
from bertode.compile import compile_model, whole_graph
from bertode.layers.encoder import ResidualSite
from conftest import tiny_ode_config


class CountingBackend:
    """aot_eager, counting the compiled graphs called (one per graph break + 1)."""

    def __init__(self):
        self.calls = 0
        self.compiled = 0

    def __call__(self, gm, example_inputs):
        self.compiled += 1
        compiled = aot_eager(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return compiled(*args)

        return run


def _inputs(step):
    generator = torch.Generator().manual_seed(step)
    ids = torch.randint(5, 64, (2, 8), generator=generator)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids)


def _compiled_and_eager(config, scope, steps=3):
    """Per step: (graphs called in the compiled forward, |loss difference|, max |grad difference|,
    graphs compiled so far)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = bertode.BertODEForMaskedLM(config)
    eager = copy.deepcopy(model)
    backend = CountingBackend()
    runner = compile_model(model, scope, backend=backend)
    results = []
    for step in range(steps):
        backend.calls = 0
        torch.manual_seed(step)  # the same dropout masks in both
        compiled_loss = runner(**_inputs(step)).loss
        graphs = backend.calls
        compiled_loss.backward()
        torch.manual_seed(step)
        eager_loss = eager(**_inputs(step)).loss
        eager_loss.backward()
        grad_diff = max((p.grad - q.grad).abs().max().item()
                        for p, q in zip(model.parameters(), eager.parameters()) if p.grad is not None)
        results.append((graphs, abs(compiled_loss.item() - eager_loss.item()), grad_diff, backend.compiled))
        model.zero_grad()
        eager.zero_grad()
    return results, backend


WHOLE_GRAPH = [
    dict(mode="discrete"),
    dict(solver="euler", steps=1),
    dict(solver="rk4", steps=1, vector_field="time_residual"),
    dict(solver="midpoint", steps=2, vector_field="add_norm"),
    dict(block="rk2_gated"),
]


@pytest.mark.parametrize("overrides", WHOLE_GRAPH, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_fixed_step_models_compile_to_one_graph_per_forward(overrides):
    # One layer: the trace unrolls every stage of every step, and more layers add only time.
    config = tiny_ode_config(**{"hidden_dropout_prob": 0.1, "num_hidden_layers": 1, **overrides})
    assert whole_graph(config)
    results, _ = _compiled_and_eager(config, "auto")
    # After the first step (which builds the solvers and recompiles once), one graph per forward.
    assert [graphs for graphs, *_ in results[1:]] == [1, 1], results
    assert all(loss <= 1e-6 and grad <= 1e-6 for _, loss, grad, _ in results), results


FIELDS = [
    dict(solver="dopri5", num_hidden_layers=3),
    dict(solver="rk4", steps=2, sensitivity="adjoint", attention_probs_dropout_prob=0.0, num_hidden_layers=3),
    dict(mode="deq", jac_reg_weight=0.1, hidden_dropout_prob=0.1),
]


@pytest.mark.parametrize("overrides", FIELDS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_adaptive_adjoint_and_deq_models_compile_their_fields_without_recompiling(overrides):
    config = tiny_ode_config(**overrides)
    assert not whole_graph(config)
    results, backend = _compiled_and_eager(config, "auto")
    # Attention and feed-forward evaluations are compiled once each for all layers (the
    # DEQ's map once; the adjoint's backward evaluations once more, with t requiring a
    # gradient), and the later steps compile nothing new.
    compiled = [count for *_, count in results]
    assert compiled[0] <= 6 and compiled[-1] == compiled[0], compiled
    assert all(graphs >= 2 for graphs, *_ in results)  # many compiled evaluations per forward
    assert all(loss <= 1e-6 and grad <= 1e-6 for _, loss, grad, _ in results), results


def test_copies_of_a_field_compiled_model_are_plain_models_with_their_own_weights():
    torch.manual_seed(0)
    model = compile_model(bertode.BertODEForMaskedLM(tiny_ode_config(solver="dopri5")), "fields", backend="aot_eager")
    pickled = pickle.loads(pickle.dumps(model))
    twin = copy.deepcopy(model)
    sites = lambda m: [s for s in m.modules() if isinstance(s, ResidualSite)]  # noqa: E731
    assert all(site.compiled_evaluate is not None for site in sites(model))
    assert all(site.compiled_evaluate is None for site in sites(twin) + sites(pickled))
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    inputs = _inputs(0)
    reference = bertode.BertODEForMaskedLM(twin.config)
    reference.load_state_dict(twin.state_dict())
    assert (twin(**inputs).loss - reference(**inputs).loss).abs() <= 1e-6
    assert (twin(**inputs).loss - model(**inputs).loss).abs() > 1e-3


def test_compile_scope_errors_name_the_value_and_the_choices():
    model = bertode.BertODEForMaskedLM(tiny_ode_config(mode="discrete"))
    with pytest.raises(ValueError, match=r"compile scope='graph' is invalid; allowed: 'auto', 'model', 'fields'"):
        compile_model(model, "graph")
    with pytest.raises(ValueError, match=r"scope='fields' is invalid for a discrete model"):
        compile_model(model, "fields")
