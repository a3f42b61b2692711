"""Host synchronisations: `count_host_syncs` against calls whose sync count is known, a fixed-step
ODE training step that makes none, and the DEQ's batched stopping checks (``deq_check_every``):
at most 16 syncs for an Anderson + IFT training step of 30 + 30 iterations, and the same solve
(z*, history, where it converged) as checking every iteration."""

import pytest
import torch

import bertode
from bertode import DEQSolveError
from bertode.solve.host_syncs import count_host_syncs
from bertode.solve.fixed_point import FIXED_POINT_SOLVERS as SOLVERS

from conftest import TINY

BUILT_IN = ("fixed_point", "anderson", "broyden")
IDS = torch.randint(5, TINY["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(3))


def syncs_of(fn) -> "bertode.solve.host_syncs.HostSyncs":
    with count_host_syncs() as syncs:
        fn()
    return syncs


def test_the_counter_counts_known_syncs_once_each():
    x = torch.randn(6, requires_grad=True)
    w = torch.randn(6, 6)
    assert syncs_of(lambda: x.sum().item()).count == 1
    assert syncs_of(lambda: x.detach().tolist()).count == 1  # six elements, one transfer
    assert syncs_of(lambda: x.detach()[x.detach() > 0]).count == 1
    assert syncs_of(lambda: bool(x.sum() > 0)).count == 1
    assert syncs_of(lambda: torch.linalg.solve(w @ w.T + torch.eye(6), x.detach())).count == 1  # its error check
    assert syncs_of(lambda: torch.linalg.solve_ex(w @ w.T + torch.eye(6), x.detach())).count == 0
    assert syncs_of(lambda: (w @ x).sum().backward()).count == 0
    with count_host_syncs() as outer:
        with count_host_syncs() as inner:
            x.detach().tolist()
    assert outer.count == inner.count == 1 and inner.by_op == {"Tensor.tolist": 1}


def test_syncs_inside_backward_are_counted():
    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return 2 * a

        @staticmethod
        def backward(ctx, grad):
            grad.sum().item()
            return 2 * grad

    x = torch.randn(4, requires_grad=True)
    loss = ReadsInBackward.apply(x).sum()
    assert syncs_of(loss.backward).count == 1


def training_step_syncs(attention_mask=None, **config) -> tuple:
    torch.manual_seed(0)
    model = bertode.BertODEForMaskedLM(bertode.BertODEConfig(**{**TINY, **config})).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        model(input_ids=IDS, attention_mask=attention_mask, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return syncs_of(step), model


@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_a_fixed_step_ode_training_step_makes_no_host_sync(solver):
    syncs, _ = training_step_syncs(mode="ode", solver=solver, steps=2)
    assert syncs.count == 0, syncs.sites
    # With a padding mask, one: `sublayers.sdpa_mask` reads whether it is all ones (then SDPA runs
    # unmasked, on its fastest kernels; HF's mask does the same), once per forward, not per step.
    syncs, _ = training_step_syncs(torch.ones_like(IDS), mode="ode", solver=solver, steps=2)
    assert syncs.count == 1 and all("layers/sublayers.py" in site for site in syncs.sites), syncs.sites


DEQ_30 = dict(mode="deq", num_hidden_layers=1, deq_solver="anderson", sensitivity="ift", deq_max_iter=30,
              deq_backward_max_iter=30, deq_tol=1e-30, deq_backward_tol=1e-30)


def test_a_deq_anderson_ift_training_step_makes_at_most_16_host_syncs():
    syncs, model = training_step_syncs(**DEQ_30)
    stats = model.solver_stats()
    assert stats["forward_iterations"] == stats["backward_iterations"] == 30  # tol 1e-30: every iteration runs
    assert syncs.count <= 16, (syncs.by_op, syncs.sites)
    every, _ = training_step_syncs(**DEQ_30, deq_check_every=1)  # the counter sees the DEQ's checks
    assert every.count >= 60, every.by_op


def solve(name, check_every, tol=1e-4, stop_mode="rel", max_iter=40, hook=None):
    torch.manual_seed(0)
    model = bertode.BertODEModel(bertode.BertODEConfig(**{**TINY, "mode": "deq", "num_hidden_layers": 1})).eval()
    with torch.no_grad():
        embeddings = model.embeddings(input_ids=IDS)
        f = model.encoder.layer_map(embeddings, None, torch.float32)
        z0 = embeddings.new_zeros(IDS.shape[0], embeddings[0].numel())
        with bertode.solve.fixed_point.reporting(hook):
            return SOLVERS[name](f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, check_every=check_every)


@pytest.mark.parametrize("name", BUILT_IN)
def test_all_iterations_give_the_same_fixed_point_as_checking_every_iteration(name):
    (z1, info1), (z5, info5) = solve(name, 1, tol=1e-30, max_iter=30), solve(name, 5, tol=1e-30, max_iter=30)
    assert info1.iterations == info5.iterations == 30 and info5.converged_at is None
    assert (z5 - z1).abs().max().item() <= 1e-6
    assert info5.history == pytest.approx(info1.history, rel=1e-6)


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("stop_mode, tol", [("rel", 1e-4), ("abs", 1e-3)])
def test_an_early_stop_is_seen_within_check_every_iterations_and_returns_the_best_iterate(name, stop_mode, tol):
    z1, info1 = solve(name, 1, tol=tol, stop_mode=stop_mode)
    z7, info7 = solve(name, 7, tol=tol, stop_mode=stop_mode)
    assert info1.converged_at == info1.iterations < 40  # checking every iteration stops where it converges
    assert info7.converged_at == info1.converged_at  # ... and the batched check says where that was
    assert info1.iterations <= info7.iterations <= info1.iterations + 6  # up to check_every - 1 more
    assert info7.history[:info1.iterations] == pytest.approx(info1.history, rel=1e-6)
    residual = {"rel": lambda i: i.rel_residual, "abs": lambda i: i.abs_residual}[stop_mode]
    assert bool((residual(info7) <= residual(info1)).all())  # the best of more iterates: equal or better
    assert bool(info7.converged.all()) and info7.converged_fraction == 1.0
    if info7.iterations == info1.iterations:
        assert torch.equal(z7, z1)


def test_rel_and_abs_stop_at_their_own_iterations_under_batched_checks():
    """The same tolerance means different things in the two norms (|f(z)| is about 20 here): the
    relative test is met later, and each batched solve says where its own test was met."""
    rel, abs_ = solve("fixed_point", 5, tol=1e-3, stop_mode="rel")[1], solve("fixed_point", 5, tol=1e-3, stop_mode="abs")[1]
    assert rel.converged_at == solve("fixed_point", 1, tol=1e-3, stop_mode="rel")[1].iterations
    assert abs_.converged_at == solve("fixed_point", 1, tol=1e-3, stop_mode="abs")[1].iterations
    assert rel.converged_at != abs_.converged_at


def test_the_per_iterate_report_still_sees_every_iteration():
    seen = []
    _, info = solve("anderson", 5, hook=lambda n, best: seen.append(n))
    assert seen == list(range(1, info.iterations + 1))


@pytest.mark.parametrize("check_every", [1, 4])
def test_a_non_finite_map_raises_naming_the_iteration_where_it_appeared(check_every):
    calls = []

    def f(z):
        calls.append(1)
        return z * 0.5 + 1 if len(calls) < 3 else z * float("nan")

    with pytest.raises(DEQSolveError, match="non-finite value in f\\(z\\) at iteration 3 "):
        SOLVERS["anderson"](f, torch.zeros(2, 4), max_iter=30, tol=1e-30, check_every=check_every)
    assert len(calls) == (3 if check_every == 1 else 4)  # detected at the next check


def test_check_every_is_validated_and_saved(tmp_path):
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"deq_check_every={bad!r} is invalid; allowed: an integer >= 1"):
            bertode.BertODEConfig(**TINY, mode="deq", deq_check_every=bad)
    bertode.BertODEConfig(**TINY, mode="deq", deq_check_every=3).save_pretrained(tmp_path)
    assert bertode.BertODEConfig.from_pretrained(tmp_path).deq_check_every == 3
