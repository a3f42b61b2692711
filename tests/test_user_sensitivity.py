"""A researcher's own sensitivity method, in one file, through the public API only:
truncated backpropagation through the solver (only the last k steps keep a graph).
With k covering every step it is autograd; with fewer it truncates; it refuses adaptive
solvers; and it trains for a few steps from Python."""

import json

import pytest
import torch

import bertode


@bertode.register_sensitivity("truncated")
class TruncatedBackprop(bertode.ODESensitivity):
    """Backpropagate through the last ``k`` fixed steps of each solve; the earlier steps
    run without a graph (their input gets no gradient through this solve)."""

    traceable = True

    def __init__(self, k: int = 1):
        self.k = k

    def validate(self, config):
        if config.adaptive:
            raise ValueError(f"BertODEConfig.sensitivity='truncated' is invalid with BertODEConfig.solver="
                             f"{config.solver!r}; allowed: a fixed-step solver")

    def __call__(self, problem):
        grid = problem.grid()
        steps = len(grid) - 1
        z = problem.z0
        for index in range(steps):
            with torch.set_grad_enabled(torch.is_grad_enabled() and index >= steps - self.k):
                z = problem.step(z, grid[index], grid[index + 1] - grid[index])
        return z


TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _run(weights=None, **ode):
    model = bertode.BertODEModel(bertode.BertODEConfig(**TINY, solver="rk4", steps=3, **ode)).double()
    if weights is not None:
        model.load_state_dict(weights)
    ids = torch.randint(5, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    out = model(ids).last_hidden_state
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, model


def test_covering_every_step_it_is_autograd():
    torch.manual_seed(0)
    out_a, grads_a, reference = _run()
    out_t, grads_t, model = _run(reference.state_dict(), sensitivity="truncated", sensitivity_kwargs={"k": 3})
    assert isinstance(model.encoder.layer[0].attention.solve.sensitivity, TruncatedBackprop)
    assert (out_a - out_t).abs().max() <= 1e-12
    assert set(grads_a) == set(grads_t)
    for name in grads_a:
        assert (grads_a[name] - grads_t[name]).abs().max() <= 1e-12, name


def test_fewer_steps_truncate_the_gradient():
    torch.manual_seed(0)
    out_a, grads_a, reference = _run()
    out_t, grads_t, _ = _run(reference.state_dict(), sensitivity="truncated", sensitivity_kwargs={"k": 1})
    assert (out_a - out_t).abs().max() <= 1e-12  # same solution, another gradient
    # nothing reaches the embeddings through a site whose first two steps have no graph
    assert not any(name.startswith("embeddings.") for name in grads_t)
    assert any(name.startswith("embeddings.") for name in grads_a)
    last_layer = "encoder.layer.1.feed_forward.branch.dense.weight"
    assert (grads_a[last_layer] - grads_t[last_layer]).abs().max() > 1e-6


def test_adaptive_solvers_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"sensitivity='truncated' is invalid with BertODEConfig.solver='dopri5'"):
        bertode.BertODEConfig(**TINY, solver="dopri5", sensitivity="truncated").validate_ode()
    with pytest.raises(ValueError, match=r"sensitivity='truncated' is invalid with BertODEConfig.mode='deq'"):
        bertode.BertODEConfig(**TINY, mode="deq", sensitivity="truncated").validate_ode()


def test_trained_for_a_few_steps_from_python(tmp_path):
    from bertode.train import compose, train

    cfg = compose(["sensitivity=truncated", "sensitivity.kwargs.k=1", "solver=rk4", "solver.steps=2",
                   f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=16", "data.vocab_size=300",
                   "data.max_eval_sequences=4", "trainer.batch_size=4", "trainer.max_steps=3", "trainer.warmup_steps=1",
                   "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2"])
    result = train(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
    saved = json.loads((tmp_path / "final" / "config.json").read_text())
    assert saved["sensitivity"] == "truncated" and saved["sensitivity_kwargs"] == {"k": 1}
    assert result["step"] == 3


# The axis's former names (bertode 0.2) work for one release, each with a FutureWarning naming its replacement.
DEPRECATED = {"register_gradient": "register_sensitivity", "available_gradients": "available_sensitivities",
              "get_gradient": "get_sensitivity", "ODEGradient": "ODESensitivity", "DEQGradient": "DEQSensitivity"}


@pytest.mark.parametrize("old, new", DEPRECATED.items())
def test_the_former_names_warn_and_are_the_new_ones(old, new):
    with pytest.warns(FutureWarning, match=rf"^bertode\.{old} is deprecated; use bertode\.{new}$"):
        assert getattr(bertode, old) is getattr(bertode, new)
    assert old not in bertode.__all__ and new in bertode.__all__


def test_the_former_names_still_work():
    with pytest.warns(FutureWarning, match="register_gradient is deprecated"):
        register = bertode.register_gradient
    assert register("truncated")(TruncatedBackprop) is TruncatedBackprop  # the same registration again: accepted
    with pytest.warns(FutureWarning, match="ODEGradient is deprecated"):
        assert issubclass(TruncatedBackprop, bertode.ODEGradient)
    with pytest.warns(FutureWarning, match="available_gradients is deprecated"):
        assert bertode.available_gradients("ode") == bertode.available_sensitivities("ode")
    assert "truncated" in bertode.available_sensitivities("ode")
    with pytest.warns(FutureWarning, match="get_gradient is deprecated"):
        assert bertode.get_gradient("truncated") is TruncatedBackprop
    with pytest.warns(FutureWarning, match="DEQGradient is deprecated"):
        assert bertode.DEQGradient is bertode.DEQSensitivity
    with pytest.raises(AttributeError, match="has no attribute 'GradientMethod'"):
        bertode.GradientMethod


def test_the_axis_keeps_its_config_field_and_names_its_methods_in_errors():
    assert set(bertode.available()) == {"solver", "sensitivity", "block", "vector_field", "regularizer", "deq_solver",
                                        "objective", "exit", "depth"}
    assert {"autograd", "adjoint", "ift", "truncated"} <= set(bertode.available()["sensitivity"])
    with pytest.raises(ValueError, match=r"BertODEConfig.sensitivity='nope' is invalid; allowed: .*'truncated'.* "
                                         r"\(registered sensitivity methods\)$"):
        bertode.BertODEConfig(**TINY, sensitivity="nope")
    with pytest.raises(TypeError, match=r"register_sensitivity\('bad'\) needs a bertode.ODESensitivity or "
                                        r"bertode.DEQSensitivity subclass"):
        bertode.register_sensitivity("bad")(object)
