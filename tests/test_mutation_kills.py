"""Tests that kill the mutants `scripts/mutation.py` found alive (issue 29; docs/testing.md, "Mutation testing").

Each test names the module whose survivors it kills and checks a number or a message
against an oracle: a closed form written here, float64, or the stated one-line error.
Equivalent mutants (no test can tell them apart) are listed in docs/testing.md instead.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from bertode.solve import exits
from bertode.solve.exits import EXIT_CRITERIA, KLDivergence, LatentDifference, NoExit, make_exit_criterion


# --- bertode/solve/exits.py --------------------------------------------------------------------------------


def test_exit_criterion_defaults_and_repr():
    assert make_exit_criterion("latent_diff").threshold == 0.03
    assert LatentDifference().threshold == 0.03
    assert make_exit_criterion(None) is None and make_exit_criterion("none") is None  # `none` stops no token
    assert repr(LatentDifference(0.25)) == "LatentDifference(threshold=0.25)"


@pytest.mark.parametrize("bad", [True, "0.1", math.nan, math.inf, -0.1])
def test_exit_threshold_refusal_is_the_one_line_error(bad):
    with pytest.raises(ValueError) as error:
        LatentDifference(bad)
    assert str(error.value) == f"exit.threshold={bad!r} is invalid; allowed: a number >= 0"


def test_exit_threshold_accepts_zero_and_ints():
    assert LatentDifference(0).threshold == 0.0 and LatentDifference(2).threshold == 2.0


def test_unknown_exit_name_lists_the_registered_ones():
    with pytest.raises(ValueError) as error:
        make_exit_criterion("nope")
    assert str(error.value) == "exit='nope' is invalid; allowed: kl, latent_diff, none"


def test_kl_without_readout_is_the_stated_error():
    expected = ("exit='kl' needs the head's distribution: use it through a language-model head "
                "(BertODEForMaskedLM, BertODEForCausalLM) or dial a readout")
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        KLDivergence().summary(torch.zeros(1, 2, 3))


def test_latent_difference_is_the_relative_change_per_token():
    """|z_t - z_{t-1}| / (|z_t| + 1e-9) per token, against float64; tiny norms show the 1e-9."""
    generator = torch.Generator().manual_seed(0)
    previous = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    current = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    current[1, 2] = torch.tensor([1e-6, 0.0, 0.0, 0.0])
    previous[1, 2] = 0.0  # score 1e-6 / (1e-6 + 1e-9)
    expected = (current - previous).norm(dim=-1) / (current.norm(dim=-1) + 1e-9)
    score = LatentDifference().score(previous, current)
    assert score.shape == (2, 3)
    torch.testing.assert_close(score.double(), expected, rtol=1e-6, atol=0)
    assert abs(score[1, 2].item() - 1 / (1 + 1e-3)) < 1e-6


def test_a_score_equal_to_the_threshold_does_not_exit():
    """`exits` is score < threshold: an unchanged token (score 0) never exits at threshold 0."""
    state = torch.ones(1, 2, 4)
    assert not LatentDifference(0.0).exits(state, state).any()
    assert LatentDifference(1e-3).exits(state, state).all()


def test_no_exit_scores_are_infinite_per_token_on_the_state_device():
    current = torch.zeros(2, 3, 5, device="meta")  # meta: a device other than the default shows `device=`
    score = NoExit().score(current, current)
    assert score.shape == (2, 3) and score.device.type == "meta"
    assert torch.equal(NoExit().score(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5)), torch.full((2, 3), math.inf))


def test_a_registered_exit_criterion_is_built_with_its_kwargs(monkeypatch):
    monkeypatch.setattr(EXIT_CRITERIA, "_entries", dict(EXIT_CRITERIA._entries))
    monkeypatch.setattr(EXIT_CRITERIA, "default", EXIT_CRITERIA.default)

    class Scaled(LatentDifference):
        def __init__(self, threshold=0.03, scale=1.0):
            super().__init__(threshold)
            self.scale = scale

    assert exits.register_exit_criterion("scaled_for_test")(Scaled) is Scaled
    assert EXIT_CRITERIA["scaled_for_test"] is Scaled and EXIT_CRITERIA.default == "none"
    built = make_exit_criterion("scaled_for_test", 0.5, scale=2.0)
    assert type(built) is Scaled and built.threshold == 0.5 and built.scale == 2.0
    assert Scaled.registry_name == "scaled_for_test"

    class Default(LatentDifference):
        pass

    exits.register_exit_criterion("default_for_test", default=True)(Default)
    assert EXIT_CRITERIA.default == "default_for_test"


# --- bertode/solve/dial.py ---------------------------------------------------------------------------------


@pytest.mark.parametrize("field, bad", [("depth", 0), ("depth", 1.5), ("depth", True), ("backprop", 0),
                                        ("backprop", 2.0), ("backprop", False)])
def test_dial_refusal_names_the_field_and_value(field, bad):
    from bertode.solve.dial import dialed
    with pytest.raises(ValueError) as error, dialed(**{field: bad}):
        pass
    assert str(error.value) == f"dialed({field}={bad!r}) is invalid; allowed: None or an integer >= 1"


def test_dial_accepts_none_and_positive_integers():
    from bertode.solve.dial import current_dial, dialed
    with dialed(depth=1, backprop=None):
        assert current_dial().depth == 1
        with dialed(backprop=3):
            assert (current_dial().depth, current_dial().backprop) == (1, 3)
        assert current_dial().backprop is None


# --- bertode/layers/losses.py ------------------------------------------------------------------------------


def _dense_cross_entropy(hidden, weight, bias, labels):
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("kernel", ["chunked", "one_chunk"])
def test_linear_cross_entropy_without_bias_and_a_frozen_decoder(kernel):
    """bias=None and a weight that takes no gradient: the loss and hidden's gradient equal float64's."""
    from bertode.layers.losses import linear_cross_entropy
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 6, generator=generator, requires_grad=True)
    weight = torch.randn(11, 6, generator=generator)
    labels = torch.tensor([3, -100, 0, 10, -100, 5, 1])
    loss, _, ran = linear_cross_entropy(hidden, weight, None, labels, reduction="sum", chunk=3, kernel=kernel)
    loss.backward()
    reference = hidden.detach().double().requires_grad_()
    expected = _dense_cross_entropy(reference, weight, None, labels)
    expected.backward()
    assert ran == kernel and weight.grad is None
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), reference.grad, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_chunked_with_a_frozen_bias():
    from bertode.layers.losses import linear_cross_entropy
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 4, generator=generator, requires_grad=True)
    weight = torch.randn(6, 4, generator=generator, requires_grad=True)
    bias = torch.randn(6, generator=generator)
    labels = torch.tensor([0, 5, -100, 2, 2])
    loss, _, _ = linear_cross_entropy(hidden, weight, bias, labels, reduction="sum", chunk=2, kernel="chunked")
    loss.backward()
    weight64 = weight.detach().double().requires_grad_()
    _dense_cross_entropy(hidden.detach(), weight64, bias, labels).backward()
    torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_one_word_vocabulary_with_ignored_rows():
    """Vocabulary 1: every target is word 0 and the loss is 0; ignored rows must read no other word."""
    from bertode.layers.losses import linear_cross_entropy
    hidden = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(1, 3, requires_grad=True)
    loss, _, _ = linear_cross_entropy(hidden, weight, None, torch.tensor([0, -100, 0, -100]), reduction="sum",
                                      chunk=2, kernel="chunked")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_chunked_cross_entropy_computes_each_row_once_per_pass_in_chunks(monkeypatch):
    """The contract of the chunked kernel: forward and backward each compute the logits of every row
    once, ``chunk`` rows at a time (never the whole (n, vocab) at once)."""
    from bertode.layers.losses import linear_cross_entropy
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, *rest: calls.append(x.shape[0]) or linear(x, *rest))
    hidden = torch.randn(10, 4, requires_grad=True)
    loss, _, _ = linear_cross_entropy(hidden, torch.randn(7, 4), None, torch.arange(10) % 7, chunk=4, kernel="chunked")
    assert calls == [4, 4, 2]
    loss.backward()
    assert calls == [4, 4, 2] * 2


@pytest.mark.parametrize("bad", [0, 2.5, True, "4"])
def test_linear_cross_entropy_chunk_refusal(bad):
    from bertode.layers.losses import linear_cross_entropy
    with pytest.raises(ValueError) as error:
        linear_cross_entropy(torch.zeros(2, 3), torch.zeros(4, 3), None, torch.zeros(2, dtype=torch.long), chunk=bad)
    assert str(error.value) == f"linear_cross_entropy chunk={bad!r} is invalid; allowed: None or an int >= 1"


def test_kernel_choice_one_chunk_up_to_chunk_rows_then_chunked(monkeypatch):
    """``one_chunk`` for rows <= chunk_rows(vocab), else ``chunked`` in chunks of chunk_rows(vocab) rows."""
    from bertode.layers import losses
    monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 5 * 3)  # chunk_rows(vocab 5) = 3
    weight = torch.randn(5, 2)
    for rows, kernel in ((3, "one_chunk"), (4, "chunked")):
        _, _, ran = losses.linear_cross_entropy(torch.randn(rows, 2), weight, None, torch.zeros(rows, dtype=torch.long))
        assert ran == kernel, rows
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, *rest: calls.append(x.shape[0]) or linear(x, *rest))
    losses.linear_cross_entropy(torch.randn(7, 2), weight, None, torch.zeros(7, dtype=torch.long))
    assert calls == [3, 3, 1]


def test_liger_runs_where_installed_on_cuda(monkeypatch):
    from bertode.layers import losses
    monkeypatch.setattr(losses.importlib.util, "find_spec", lambda name: object() if name == "liger_kernel" else None)
    assert losses.liger_available(torch.device("cuda")) and not losses.liger_available(torch.device("cpu"))
    monkeypatch.setattr(losses.importlib.util, "find_spec", lambda name: None)
    assert not losses.liger_available(torch.device("cuda"))


@pytest.mark.parametrize("returns", ["tensor", "tuple", "output"])
def test_liger_path_calls_the_fused_loss_as_documented(monkeypatch, returns):
    """A stand-in for liger-kernel's LigerFusedLinearCrossEntropyLoss (its call signature: weight, hidden,
    labels, bias; its return types across versions): the loss and the logits come back as the dense ones."""
    import sys
    import types

    from bertode.layers.losses import linear_cross_entropy

    calls = []

    class FusedLoss:
        def __init__(self, ignore_index=-100, reduction="mean"):
            calls.append(ignore_index)
            assert reduction == "sum"
            self.ignore_index = ignore_index

        def __call__(self, weight, hidden, labels, bias):
            loss = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=self.ignore_index,
                                                     reduction="sum").double()
            return {"tensor": loss, "tuple": (loss, None), "output": types.SimpleNamespace(loss=loss)}[returns]

    module = types.ModuleType("liger_kernel.transformers")
    module.LigerFusedLinearCrossEntropyLoss = FusedLoss
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module)
    generator = torch.Generator().manual_seed(2)
    hidden, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((5, 3), (4, 3), (4,)))
    labels = torch.tensor([1, -100, 3, 0, 2])
    loss, logits, ran = linear_cross_entropy(hidden, weight, bias, labels, reduction="sum", kernel="liger")
    assert ran == "liger" and calls == [-100] and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), _dense_cross_entropy(hidden, weight, bias, labels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, hidden @ weight.T + bias)


# --- bertode/solve/fixed_point.py --------------------------------------------------------------------------


def test_damped_step_closed_form():
    from bertode.solve.fixed_point import damped
    z, fz = torch.tensor([math.nan, 1.0]), torch.tensor([2.0, 3.0])
    assert torch.equal(damped(z, fz, 1.0), fz)  # tau = 1 is f(z) itself, whatever z holds
    assert torch.equal(damped(torch.tensor([1.0]), torch.tensor([3.0]), 2.0), torch.tensor([5.0]))  # -z + 2 f(z)
    assert torch.equal(damped(torch.tensor([1.0]), torch.tensor([3.0]), 0.5), torch.tensor([2.0]))


def test_register_fixed_point_solver(monkeypatch):
    from bertode.solve.fixed_point import FIXED_POINT_SOLVERS, get_fixed_point_solver, register_fixed_point_solver
    monkeypatch.setattr(FIXED_POINT_SOLVERS, "_entries", dict(FIXED_POINT_SOLVERS._entries))
    monkeypatch.setattr(FIXED_POINT_SOLVERS, "default", FIXED_POINT_SOLVERS.default)

    def mine(f, z0, **kwargs):
        return z0, None

    assert register_fixed_point_solver("mine_for_test")(mine) is mine
    assert get_fixed_point_solver("mine_for_test") is mine and FIXED_POINT_SOLVERS.default == "anderson"
    register_fixed_point_solver("default_for_test", default=True)(mine)
    assert FIXED_POINT_SOLVERS.default == "default_for_test"
    with pytest.raises(TypeError) as error:
        register_fixed_point_solver("bad_for_test")(3)
    assert str(error.value) == "register_fixed_point_solver('bad_for_test') needs a function, got 3"
    assert "bad_for_test" not in FIXED_POINT_SOLVERS


def _count_transfers(monkeypatch):
    from bertode.solve.fixed_point import FixedPointTracker
    transfers = []
    pending_rows = FixedPointTracker._pending_rows
    monkeypatch.setattr(FixedPointTracker, "_pending_rows",
                        lambda self, *extra: transfers.append(self.iterations) or pending_rows(self, *extra))
    return transfers


@pytest.mark.parametrize("max_iter, check_every, expected", [(4, 2, [2, 4]), (5, 2, [2, 4, 5]), (3, 1, [1, 2, 3])])
def test_a_solve_of_n_evaluations_makes_ceil_n_over_check_every_transfers(monkeypatch, max_iter, check_every, expected):
    from bertode.solve.fixed_point import fixed_point
    transfers = _count_transfers(monkeypatch)
    z, info = fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=torch.float64), max_iter=max_iter, tol=0.0,
                          check_every=check_every)
    assert transfers == expected and info.iterations == max_iter  # info() makes the last transfer


def test_the_tracker_reports_each_iterate_and_its_info_is_the_closed_form():
    """f(z) = z/2 + b from z0 = 0: iterate n is (2 - 2^(1-n)) b; reported after each evaluation, float64 kept."""
    from bertode.solve.fixed_point import fixed_point, reporting
    b = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=torch.float64)
    seen = []
    with reporting(lambda n, best: seen.append((n, best.clone()))):
        z, info = fixed_point(lambda z: 0.5 * z + b, torch.zeros_like(b), max_iter=4, tol=0.0)
    assert [n for n, _ in seen] == [1, 2, 3, 4]
    for n, best in seen:  # the best after evaluation n is iterate n - 1 (residuals fall at every step)
        torch.testing.assert_close(best, (2 - 2.0 ** (2 - n)) * b, rtol=0, atol=1e-15)
    torch.testing.assert_close(z, seen[-1][1], rtol=0, atol=0)
    difference = (0.5 * z + b - z).norm(dim=1)
    relative = difference / ((0.5 * z + b).norm(dim=1) + 1e-9)
    assert info.abs_residual.dtype == torch.float64
    torch.testing.assert_close(info.abs_residual, difference)
    torch.testing.assert_close(info.rel_residual, relative)
    assert info.worst_abs_residual == pytest.approx(difference.max().item())
    assert info.worst_rel_residual == pytest.approx(relative.max().item())
    assert info.converged_fraction == 0.0 and not info.converged.any()


def test_the_tracker_stops_strictly_below_tol_in_its_stop_mode():
    from bertode.solve.fixed_point import FixedPointTracker
    z = torch.zeros(1, 4, dtype=torch.float64)
    fz = torch.tensor([[0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)  # |f(z) - z| = 0.5, relative ~ 1
    at_tol = FixedPointTracker(z, 0.5, "abs", "deq")
    assert at_tol.observe(z, fz) is False and not at_tol.info().converged.any()
    below = FixedPointTracker(z, 0.6, "abs", "deq")
    assert below.observe(z, fz) is True and below.info().converged.all()  # abs: 0.5 < 0.6 though rel ~ 1
    last = FixedPointTracker(z, 0.0, "abs", "deq", max_iter=1)
    assert last.observe(z, fz) is False  # not converged, last evaluation
    tie = FixedPointTracker(z, 0.0, "abs", "deq")
    tie.observe(z, fz)
    tie.observe(z + 1, fz + 1)  # the same residual: the first iterate stays the best
    assert torch.equal(tie.best, z)


@pytest.mark.parametrize("check_every", [1, 3])
@pytest.mark.parametrize("nan_at, best", [(1, "nan"), (2, "1.000e+00"), (3, "3.333e-01")])
def test_a_non_finite_evaluation_is_named_with_the_best_residual_so_far(check_every, nan_at, best):
    """f(z) = z/2 + b from 0: relative residuals 1 then 1/3; f turns NaN at evaluation ``nan_at``."""
    from bertode.solve.fixed_point import DEQSolveError, fixed_point
    calls = []

    def f(z):
        calls.append(1)
        return 0.5 * z + 1 if len(calls) < nan_at else torch.full_like(z, math.nan)

    with pytest.raises(DEQSolveError) as error:
        fixed_point(f, torch.zeros(2, 3, dtype=torch.float64), max_iter=6, tol=0.0, check_every=check_every)
    expected = f"deq: non-finite value in f(z) at iteration {nan_at} (best relative residual so far {best})"
    assert str(error.value) == expected


# --- bertode/solve/substeps.py -----------------------------------------------------------------------------


def test_substeps_moves_the_whole_tableau_to_the_state_dtype():
    from torchdyn.numerics.solvers.ode import SOLVER_DICT

    from bertode.solve._torchdyn import DiffEqSolver
    from bertode.solve.solvers import FIXED_STEPPING
    from bertode.solve.substeps import SubSteps
    state, t_span = torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0.0, 1.0])
    wrapped = SubSteps(SOLVER_DICT["rk4"](torch.float32), 2)
    assert wrapped.sync_device_dtype(state, t_span)[1] is t_span  # t_span stays where it is
    c, a, bsol, berr = wrapped.base.tableau
    assert {c.dtype, bsol.dtype, berr.dtype, *(row.dtype for row in a)} == {torch.float64}

    class NoErrorWeights(DiffEqSolver):  # a fixed-step tableau without error weights
        def __init__(self):
            super().__init__(order=1, stepping_class=FIXED_STEPPING)
            self.tableau = (torch.zeros(1), [torch.zeros(1)], torch.ones(1), None)

    wrapped = SubSteps(NoErrorWeights(), 2)
    wrapped.sync_device_dtype(state, t_span)
    assert wrapped.base.tableau[2].dtype == torch.float64 and wrapped.base.tableau[3] is None


def test_substeps_hand_args_to_every_base_step_and_note_inner_states():
    """n = 4 Euler-like steps of dx/dt = 1 from t0 = 0 to 1: the observer notes t = 1/4, 1/2, 3/4."""
    from bertode.solve import observe
    from bertode.solve._torchdyn import DiffEqSolver
    from bertode.solve.solvers import FIXED_STEPPING
    from bertode.solve.substeps import SubSteps
    seen_args = []

    class Recording(DiffEqSolver):
        def __init__(self):
            super().__init__(order=1, stepping_class=FIXED_STEPPING)

        def step(self, f, x, t, dt, k1=None, args=None):
            seen_args.append(args)
            return None, x + dt * f(t, x), None

    observer = observe.Observer(trajectory=True)
    x0 = torch.zeros(1, 2, dtype=torch.float64)
    with observe.observing(observer):
        observer.begin("solve", 0.0, x0)
        x1 = SubSteps(Recording(), 4).step(lambda t, x: torch.ones_like(x), x0, torch.tensor(0.0), torch.tensor(1.0),
                                           args="sentinel")[1]
        observer.end(1.0, x1)
    assert seen_args == ["sentinel"] * 4
    (solve,) = observer.trajectory()
    assert solve["times"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    torch.testing.assert_close(solve["states"][:, 0, 0], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))


def test_substeps_takes_the_base_solvers_order_and_dtype():
    from torchdyn.numerics.solvers.ode import SOLVER_DICT

    from bertode.solve._torchdyn import DiffEqSolver
    from bertode.solve.solvers import FIXED_STEPPING
    from bertode.solve.substeps import SubSteps
    wrapped = SubSteps(SOLVER_DICT["rk4"](torch.float64), 3)
    assert (wrapped.order, wrapped.stepping_class, wrapped.dtype, wrapped.n) == (4, FIXED_STEPPING, torch.float64, 3)
    assert SubSteps(DiffEqSolver(order=2), 1).dtype == torch.float32  # a base without a dtype
    with pytest.raises(ValueError) as error:
        SubSteps(SOLVER_DICT["dopri5"](torch.float32), 2)
    assert str(error.value) == "SubSteps needs a fixed-step solver, got DormandPrince45 (adaptive)"


# --- bertode/training/objective.py -------------------------------------------------------------------------


def test_objective_probability_name_and_targets():
    from bertode.training.objective import Objective, make_objective
    assert make_objective("mlm", None).probability == 0.15 and Objective(None).probability == 0.15
    assert make_objective("mlm", None, 0.3).probability == 0.3 and make_objective(None, None).name == "mlm"
    labels = torch.tensor([[5, 6, -100, 7], [-100, -100, 8, -100]])
    assert make_objective("mlm", None).targets(labels) == 4  # every label that is not -100
    assert make_objective("clm", None).targets(labels) == 3  # position 0 is never a next-token target
    with pytest.raises(NotImplementedError, match=r"^Objective\.make_batch$"):
        Objective(None).make_batch(labels, torch.Generator())


@pytest.mark.parametrize("saved, expected", [
    ({"objective": "clm"}, "clm"), ({"objective": "mlm", "is_decoder": True}, "mlm"), ({"is_decoder": True}, "clm"),
    ({"objective": None}, "mlm"), ({}, "mlm")])
def test_objective_of_a_saved_config(saved, expected):
    from bertode.training.objective import objective_of
    assert objective_of(saved) == expected


def test_register_objective(monkeypatch):
    from bertode.training.objective import OBJECTIVES, Objective, get_objective, register_objective
    monkeypatch.setattr(OBJECTIVES, "_entries", dict(OBJECTIVES._entries))
    monkeypatch.setattr(OBJECTIVES, "default", OBJECTIVES.default)

    class Span(Objective):
        pass

    assert register_objective("span_for_test")(Span) is Span
    assert get_objective("span_for_test") is Span and Span.registry_name == "span_for_test"
    assert get_objective(None).registry_name == "mlm"

    class Other(Objective):
        pass

    register_objective("other_for_test", default=True)(Other)
    assert get_objective(None) is Other


# --- bertode/layers/loop.py --------------------------------------------------------------------------------


@pytest.mark.parametrize("graph_from", [None, 1, 2])
def test_iterate_truncated_backprop_closed_form(graph_from):
    """z_{k+1} = w z_k from z0 = 1, depth 3: z3 = w^3. With a graph from iteration g (default 0) the
    gradient is d(w^(3-g) z_g)/dw = (3-g) w^2 and z0 receives dz3/dz_g = w^(3-g) (the skipped
    iterations count as the identity)."""
    from bertode.layers.loop import iterate
    w = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    z0 = torch.ones(1, 2, 3, dtype=torch.float64, requires_grad=True)
    kwargs = {} if graph_from is None else {"graph_from": graph_from}
    result = iterate(lambda z, active: z * w, z0, 3, **kwargs)
    result.state.sum().backward()
    g = graph_from or 0
    assert result.iterations == 3
    torch.testing.assert_close(result.state, torch.full_like(z0, 1.5**3))
    assert w.grad.item() == pytest.approx((3 - g) * 1.5**2 * 6)
    torch.testing.assert_close(z0.grad, torch.full_like(z0, 1.5 ** (3 - g)))


def test_iterate_zero_depth_and_the_global_stop():
    from bertode.layers.loop import iterate
    z0 = torch.ones(1, 1, 1)
    result = iterate(lambda z, active: z / 2, z0, 0)
    assert result.iterations == 0 and result.state is z0
    seen = []
    result = iterate(lambda z, active: z / 2, z0, 10, on_iterate=lambda n, z: seen.append((n, z.item())),
                     stop=lambda previous, current: (previous - current).abs().max() < 0.1)
    # differences 1/2, 1/4, 1/8, 1/16: the stop fires after iteration 4, which is reported and returned
    assert result.iterations == 4 and result.state.item() == 1 / 16
    assert seen == [(1, 0.5), (2, 0.25), (3, 0.125), (4, 0.0625)]


def test_iterate_ends_when_every_real_token_has_exited():
    """Real tokens stop changing at once (score 0), the padding token doubles (score 1/2): with ``valid``
    the loop ends after one iteration; every token's exit depth is 1."""
    from bertode.layers.loop import iterate
    z0 = torch.ones(1, 3, 2)
    factor = torch.tensor([1.0, 1.0, 2.0])[None, :, None]
    valid = torch.tensor([[True, True, False]])
    with torch.no_grad():
        result = iterate(lambda z, active: z * factor, z0, 5, criterion=LatentDifference(0.1), valid=valid)
    assert result.iterations == 1 and result.exit_depths.tolist() == [[1, 1, 1]]
    assert result.exit_summary(valid) == {"exit_depth_mean": 1.0, "exit_depth_max": 1}


def test_exit_summary_over_the_real_tokens():
    from bertode.layers.loop import LoopResult
    result = LoopResult(torch.zeros(2, 2, 1), 5, torch.tensor([[1, 3], [2, 5]]))
    assert result.exit_summary(torch.tensor([[True, False], [True, True]])) == {
        "exit_depth_mean": pytest.approx(8 / 3), "exit_depth_max": 5}
    assert result.exit_summary(torch.zeros(2, 2, dtype=torch.bool)) == {"exit_depth_mean": 0.0, "exit_depth_max": 0}
    assert result.exit_summary(None) == {"exit_depth_mean": 11 / 4, "exit_depth_max": 5}


def test_active_tokens_pack_positions_in_ascending_order_and_scatter_in_the_state_dtype():
    from bertode.layers.loop import ActiveTokens
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 200, generator=generator) < 0.7
    active = ActiveTokens(mask)
    for row in range(3):
        expected = mask[row].nonzero().squeeze(1)
        assert torch.equal(active.positions[row][active.packed[row]], expected)
        assert int(active.packed[row].sum()) == len(expected)
    x = torch.zeros(3, 200, 2, dtype=torch.float64)
    out = active.scatter(x, torch.ones(int(mask.sum()), 2, dtype=torch.float32))
    assert out.dtype == torch.float64 and torch.equal(out[..., 0], mask.double())


def test_refuse_training_exit_is_the_one_line_error():
    from bertode.layers.loop import refuse_training_exit
    module = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError) as error:
        refuse_training_exit(LatentDifference(0.1), module)
    assert str(error.value) == (
        "exit='latent_diff' is invalid while training (train mode with gradients): per-token exit is an inference "
        "dial (exited tokens would leave dropout and the gradient); allowed: model.eval() or torch.no_grad(), or no "
        "exit while training")
    refuse_training_exit(LatentDifference(0.1), module.eval())


# --- bertode/layers/dropout.py -----------------------------------------------------------------------------


def test_keep_threshold_and_signed_closed_forms():
    from bertode.layers.dropout import _keep_threshold, _signed
    assert _keep_threshold(0.0) == 2**31 - 1  # the int32 maximum (keeps all but one word in 2**32)
    assert _keep_threshold(0.5) == 0 and _keep_threshold(1.0) == -(2**31)
    assert _keep_threshold(0.1) == int(0.9 * 2**32) - 2**31
    assert _signed(1 << 63) == -(1 << 63) and _signed((1 << 63) - 1) == (1 << 63) - 1 and _signed(-1) == -1


def test_dropout_at_p_zero_is_the_identity_and_draws_nothing():
    """p = 0 returns the input itself and leaves the block's draw counter alone: the next draw's mask
    is the block's first."""
    from bertode.layers.dropout import dropout, split_invariant
    x = torch.ones(2, 8)
    assert dropout(x, 0.0, True) is x and dropout(x, 0.5, False) is x
    with split_invariant(3, torch.arange(2), 2):
        first = dropout(x, 0.5, True)
    with split_invariant(3, torch.arange(2), 2):
        assert dropout(x, 0.0, True) is x
        assert torch.equal(dropout(x, 0.5, True), first)


def test_split_invariant_dropout_refuses_a_tensor_of_other_rows():
    from bertode.layers.dropout import keep_mask, split_invariant
    with split_invariant(0, torch.arange(2), 4), pytest.raises(ValueError) as error:
        keep_mask(torch.ones(3, 5), 0.1)
    assert str(error.value) == "split-invariant dropout: a tensor of 3 rows in a block for 2 rows of this process"


# --- bertode/solve/solvers.py (registration runs at import: these tests call it themselves) -------------------


def test_solver_specs_of_torchdyn_classes_and_tableaus():
    from bertode.solve._torchdyn import DormandPrince45, Euler, RungeKutta4
    from bertode.solve.solvers import HEUN, ExplicitRK, solver_spec
    spec = solver_spec("dp", DormandPrince45, torchdiffeq="dopri5", torchode="Dopri5")
    assert (spec.name, spec.build, spec.adaptive, spec.order, spec.torchdiffeq, spec.source, spec.torchode) == (
        "dp", DormandPrince45, True, 5, "dopri5", DormandPrince45, "Dopri5")
    spec = solver_spec("e", Euler)
    assert (spec.adaptive, spec.order, spec.torchdiffeq, spec.torchode) == (False, 1, None, None)
    assert solver_spec("r", RungeKutta4).order == 4
    spec = solver_spec("h", HEUN, torchdiffeq="heun2", torchode="Heun")
    built = spec.build(torch.float64)
    assert (spec.adaptive, spec.order, spec.torchdiffeq, spec.source, spec.torchode) == (
        False, 2, "heun2", HEUN, "Heun")
    assert type(built) is ExplicitRK and built.dtype == torch.float64 and built.order == 2
    assert spec.same_as(solver_spec("h", HEUN, torchdiffeq="heun2", torchode="Heun"))
    assert not spec.same_as(solver_spec("h", HEUN, torchdiffeq="heun2")) and not spec.same_as(HEUN)
    assert solver_spec("e", Euler).same_as(solver_spec("e", Euler))
    assert not solver_spec("e", Euler).same_as(solver_spec("e", RungeKutta4))


def test_solver_spec_refusals():
    from bertode.solve._torchdyn import DiffEqSolver
    from bertode.solve.solvers import solver_spec

    class Odd(DiffEqSolver):
        def __init__(self, dtype):
            super().__init__(order=1, stepping_class="sometimes")

        def step(self, f, x, t, dt, k1=None, args=None):
            return None, x, None

    with pytest.raises(TypeError) as error:
        solver_spec("odd", Odd)
    assert str(error.value) == ("register_solver('odd'): test_solver_spec_refusals.<locals>.Odd.stepping_class="
                                "'sometimes' is invalid; allowed: 'fixed', 'adaptive'")
    with pytest.raises(TypeError) as error:
        solver_spec("three", 3)
    assert str(error.value) == ("register_solver('three') needs a torchdyn solver class (DiffEqSolver or "
                                "SolverTemplate subclass taking dtype) or a bertode.ButcherTableau, got 3")


def test_register_solver_as_call_and_decorator(monkeypatch):
    from bertode.solve._torchdyn import Midpoint
    from bertode.solve.solvers import HEUN, SOLVERS, get_solver, register_solver
    monkeypatch.setattr(SOLVERS, "_entries", dict(SOLVERS._entries))
    monkeypatch.setattr(SOLVERS, "default", SOLVERS.default)
    assert register_solver("heun_for_test", HEUN, torchdiffeq="heun2", torchode="Heun") is HEUN
    spec = get_solver("heun_for_test")
    assert (spec.name, spec.source, spec.torchdiffeq, spec.torchode) == ("heun_for_test", HEUN, "heun2", "Heun")
    assert SOLVERS.default == "euler"
    assert register_solver("mid_for_test", torchdiffeq="midpoint", default=True)(Midpoint) is Midpoint
    assert get_solver("mid_for_test").torchdiffeq == "midpoint" and SOLVERS.default == "mid_for_test"


@pytest.mark.parametrize("fields, message", [
    (dict(c=[0.0], a=[[], [1.0]], b=[1.0]), "ButcherTableau: c, a and b need one entry per stage; got 1, 2, 1"),
    (dict(c=[], a=[], b=[]), "ButcherTableau: c, a and b need one entry per stage; got 0, 0, 0"),
    (dict(c=[0.0, 1.0], a=[[], [1.0, 0.0]], b=[0.5, 0.5]),
     "ButcherTableau.a row 1 has 2 entries; allowed: 1 (explicit methods)"),
    (dict(c=[0.0, 1.0], a=[[], [1.0]], b=[0.5, 0.6]),
     "ButcherTableau.b sums to 1.1; allowed: weights summing to 1 (consistency)")])
def test_butcher_tableau_refusals(fields, message):
    from bertode.solve.solvers import ButcherTableau
    with pytest.raises(ValueError) as error:
        ButcherTableau(order=1, **fields)
    assert str(error.value) == message


def test_explicit_rk_step_is_heuns_closed_form():
    """Heun on dx/dt = t + x: k1 = t + x, k2 = t + h + x + h k1, x' = x + h (k1 + k2) / 2; a given k1 is used."""
    from bertode.solve.solvers import HEUN, ExplicitRK
    solver = ExplicitRK(HEUN, torch.float64)
    c, a, b, berr = solver.tableau
    assert c.dtype == b.dtype == a[1].dtype == torch.float64 and berr is None and solver.order == 2
    x, t, h = torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64), 0.1
    k1 = t + x
    expected = x + h * (k1 + (t + h + x + h * k1)) / 2
    torch.testing.assert_close(solver.step(lambda t, x: t + x, x, t, h)[1], expected, rtol=0, atol=1e-15)
    given = torch.zeros_like(x)  # a k1 handed in is used as the first stage
    expected = x + h * (given + (t + h + x)) / 2
    torch.testing.assert_close(solver.step(lambda t, x: t + x, x, t, h, k1=given)[1], expected, rtol=0, atol=1e-15)


def test_solver_spec_edge_cases():
    """A solver class without ``order`` reports 0; one without ``stepping_class`` and an instance are refused
    in one line; specs without a source compare equal."""
    from bertode.solve._torchdyn import Euler
    from bertode.solve.solvers import ODESolverSpec, solver_spec

    class NoOrder(torch.nn.Module):
        stepping_class = "fixed"

        def __init__(self, dtype):
            super().__init__()

        def step(self, f, x, t, dt, k1=None, args=None):
            return None, x, None

    class NoStepping(torch.nn.Module):  # no stepping_class at all
        def __init__(self, dtype):
            super().__init__()

        def step(self, f, x, t, dt, k1=None, args=None):
            return None, x, None

    assert solver_spec("no_order", NoOrder).order == 0
    with pytest.raises(TypeError, match=r"\.NoStepping\.stepping_class=None is invalid; allowed: 'fixed', 'adaptive'$"):
        solver_spec("no_stepping", NoStepping)
    instance = Euler()
    with pytest.raises(TypeError) as error:
        solver_spec("instance", instance)
    assert str(error.value).endswith(f"or a bertode.ButcherTableau, got {instance!r}")
    assert ODESolverSpec("x", Euler, False, 1).same_as(ODESolverSpec("x", Euler, False, 1))


def test_valid_tableaus_build_and_euler_steps():
    """One stage (Euler: x' = x + h f) and two (Heun) are valid tableaus; Euler's weight 1 is applied."""
    from bertode.solve.solvers import ButcherTableau, ExplicitRK
    euler = ButcherTableau(c=[0.0], a=[[]], b=[1.0], order=1)
    ButcherTableau(c=[0.0, 1.0], a=[[], [1.0]], b=[0.5, 0.5], order=2)
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    step = ExplicitRK(euler, torch.float64).step(lambda t, x: 3 * x, x, torch.tensor(0.0), 0.25)[1]
    torch.testing.assert_close(step, x * 1.75, rtol=0, atol=0)


# --- bertode/layers/vector_fields.py -----------------------------------------------------------------------


def test_time_residual_embedding_is_the_fourier_features_closed_form():
    """With W = I (hidden = time_features = 8): phi(t) = [sin(w_k t), cos(w_k t)], w_k geometric from 1 to
    max_frequency (4 of them); per sequence for t of shape (batch, 1, 1); forward is G(z + W phi(t)).
    (atol 1e-5: float32 angles up to 19 rad.)"""
    from transformers import BertConfig

    from bertode.layers.vector_fields import TimeResidualField
    field = TimeResidualField(BertConfig(hidden_size=8, num_attention_heads=2), time_features=8, max_frequency=27.0)
    assert field.time_features == 8 and field.max_frequency == 27.0 and torch.count_nonzero(field.time_proj.weight) == 0
    with torch.no_grad():
        field.time_proj.weight.copy_(torch.eye(8))
    w = torch.tensor([1.0, 3.0, 9.0, 27.0], dtype=torch.float64)
    t = 0.3
    expected = torch.cat([torch.sin(w * t), torch.cos(w * t)]).float()
    torch.testing.assert_close(field.time_embedding(torch.tensor(t)), expected, rtol=1e-5, atol=1e-5)
    batched = field.time_embedding(torch.tensor([0.3, 0.7]).view(2, 1, 1))
    assert batched.shape == (2, 1, 8)
    torch.testing.assert_close(batched[0, 0], expected, rtol=1e-5, atol=1e-5)
    later = torch.cat([torch.sin(w * 0.7), torch.cos(w * 0.7)]).float()
    torch.testing.assert_close(batched[1, 0], later, rtol=1e-5, atol=1e-5)
    z = torch.randn(2, 3, 8)
    out = field.forward(torch.tensor(t), z, lambda x: 2 * x, None)
    torch.testing.assert_close(out, 2 * (z + expected), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError) as error:
        TimeResidualField(BertConfig(hidden_size=8, num_attention_heads=2), time_features=3)
    assert str(error.value) == ("BertODEConfig.vector_field_kwargs['time_features']=3 is invalid; allowed: an even "
                                "integer >= 2")


# --- bertode/training/segments.py ------------------------------------------------------------------------------


def _noisy_batch(rows, generator):
    """A make_batch whose output shows the generator it was given (None: torch's global one)."""
    return rows + torch.randint(0, 1000, rows.shape, generator=generator), rows.clone()


def test_segment_order_masks_with_batch_orders_generator_and_noise_seed():
    """A memory run masks micro-batch m (and seeds its dropout) as `BatchOrder` does: the same generator and noise
    seed for the same (seed, m), reproducibly."""
    from types import SimpleNamespace

    from bertode.training.distributed import BatchOrder
    from bertode.training.segments import SegmentOrder

    rows = torch.arange(40).reshape(10, 4)
    order = SegmentOrder(rows, micro_batch=2, seed=3)
    for m in range(4):
        peer = SimpleNamespace(seed=3, micro_batch_rows=lambda _, rows=order.micro_batch_rows(m): rows)
        expected = BatchOrder.batch(peer, m, _noisy_batch)
        for got in (order.local_batch(m, _noisy_batch), order.local_batch(m, _noisy_batch)):
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert order.noise_seed(m) == BatchOrder(rows, 2, seed=3).noise_seed(m) == BatchOrder.noise_seed_of(3, m)


def test_slices_need_a_row_each_and_the_refusal_names_the_split():
    from bertode.training.segments import SegmentOrder, ordered_eval_batches, slice_length
    from bertode.training.sources import DataError

    assert slice_length(4, 4, "train") == 1 and slice_length(9, 4, "train") == 2  # as many rows as slices: one each
    with pytest.raises(DataError) as error:
        SegmentOrder(torch.zeros(3, 4, dtype=torch.long), micro_batch=4, seed=0)
    assert str(error.value) == ("model.mem_len needs the train rows read as 4 contiguous slices, but there are 3 rows; "
                                "allowed: more text, or a smaller batch")
    with pytest.raises(DataError) as error:
        ordered_eval_batches(torch.zeros(0, 4, dtype=torch.long), None, seed=0, batch_size=4)
    assert str(error.value) == ("model.mem_len needs the eval rows read as 1 contiguous slices, but there are 0 rows; "
                                "allowed: more text, or a smaller batch")


def test_ordered_eval_batches_of_one_slice_are_fixed_eval_batches_of_the_first_max_rows():
    """batch_size 1: one slice, the rows in order, masked as `lm.fixed_eval_batches` masks them (same seed)."""
    from bertode.training.lm import fixed_eval_batches
    from bertode.training.objective import MaskedLanguageModel
    from bertode.training.segments import ordered_eval_batches

    class Vocabulary:
        all_special_ids, mask_token_id = [0, 1, 2, 3, 4], 4

        def __len__(self):
            return 50

    objective = MaskedLanguageModel(Vocabulary(), probability=0.5)
    rows = torch.randint(5, 50, (6, 10), generator=torch.Generator().manual_seed(0))
    for max_rows in (None, 4):
        ordered = ordered_eval_batches(rows, objective, seed=7, batch_size=1, max_rows=max_rows)
        fixed = fixed_eval_batches(rows, objective, seed=7, batch_size=1, max_rows=max_rows)
        assert len(ordered) == len(fixed) == (max_rows or 6)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ordered, fixed))


class _Captured(Exception):
    pass


class _Capture:
    """A dist whose gather keeps the value a rank sends (and stops there)."""

    def gather(self, value):
        self.value = value
        raise _Captured


class _Ranks:
    """dist.gather as torch.distributed gives it: every rank's value (computed by the real code), in rank order."""

    def __init__(self, carries):
        self.carries = carries

    def gather(self, value):
        parts = []
        for carry in self.carries:
            capture = _Capture()
            with pytest.raises(_Captured):
                carry.state(capture)
            parts.append(capture.value)
        assert value in parts
        return parts


def test_a_memory_carry_starts_empty_keeps_each_forwards_memory_and_saves_what_each_rank_sends():
    from types import SimpleNamespace

    from bertode.training.segments import MemoryCarry, SegmentOrder

    order = SegmentOrder(torch.arange(12)[:, None], micro_batch=4, seed=0)  # 3 rows per slice
    carry = MemoryCarry(torch.arange(4))
    assert carry.mems is None and carry.before(order, 0) == {"mems": None}
    memory = [torch.randn(4, 2, 3, requires_grad=True), torch.randn(4, 2, 3, requires_grad=True)]
    carry.after(SimpleNamespace(mems=memory))
    assert all(torch.equal(a, b) and not a.requires_grad for a, b in zip(carry.mems, memory))
    assert carry.before(order, 1)["mems"] is carry.mems and carry.before(order, 2)["mems"] is carry.mems
    assert carry.before(order, 3) == {"mems": None} and carry.mems is None  # the slices wrap: the memory starts over
    carry.after(SimpleNamespace(mems=memory))
    carry.after(SimpleNamespace(logits=None))  # an output without a memory (a skipped batch): none is kept
    assert carry.mems is None
    carries = [MemoryCarry(torch.tensor([2, 0])), MemoryCarry(torch.tensor([3, 1]))]  # any rows, any order
    assert carries[0].state(_Ranks(carries)) is None  # no memory yet: nothing saved
    for each in carries:
        each.after(SimpleNamespace(mems=[m[each.own_rows] for m in memory]))
    state = carries[1].state(_Ranks(carries))
    assert all(torch.equal(saved, whole) for saved, whole in zip(state["mems"], memory))
    carries[0].load(None, "cpu")
    assert carries[0].mems is None


@pytest.mark.parametrize("value", [None, 0, 1, 480])
def test_eval_mem_len_accepts_null_and_integers_from_zero(value):
    from bertode.training.segments import check_eval_memory

    check_eval_memory(value, 24)


@pytest.mark.parametrize("value, mem_len", [(True, 24), (1.5, 24), ("8", 24), (-1, 24), (8, 0)])
def test_eval_mem_len_refusal_is_the_one_line_error(value, mem_len):
    from bertode.training.segments import check_eval_memory

    with pytest.raises(ValueError) as error:
        check_eval_memory(value, mem_len)
    assert str(error.value) == (f"trainer.eval_mem_len={value!r} is invalid with model.mem_len={mem_len}; allowed: "
                                "null, or an integer >= 0 for a model trained with a segment memory "
                                "(model.mem_len > 0)")


def test_memory_length_sets_and_restores_the_configs_mem_len():
    from types import SimpleNamespace

    from bertode.training.segments import memory_length

    model = SimpleNamespace(config=SimpleNamespace(mem_len=24))
    with memory_length(model, 64):
        assert model.config.mem_len == 64
    with memory_length(model, None):
        assert model.config.mem_len == 24
    with pytest.raises(RuntimeError), memory_length(model, 0):
        assert model.config.mem_len == 0
        raise RuntimeError
    assert model.config.mem_len == 24


# --- bertode/training/lm.py ------------------------------------------------------------------------------------


def test_precision_fp32_runs_in_float32_bf16_autocasts_and_others_are_the_one_line_error():
    from bertode.training.lm import autocast

    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with autocast(torch.device("cpu"), "fp32"):
        assert (a @ b).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    for bad in ("BF16", "fp16"):
        with pytest.raises(ValueError) as error:
            autocast(torch.device("cpu"), bad)
        assert str(error.value) == f"trainer.precision={bad!r} is invalid; allowed: 'fp32', 'bf16'"


def test_masked_ce_sum_is_the_float64_sum_over_the_labelled_positions_and_counts_the_right_ones():
    from bertode.training.lm import masked_ce_sum

    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = logits.argmax(-1)  # every labelled position right ...
    labels[0, 1] = (labels[0, 1] + 1) % 5  # ... but this one
    labels[1, 0] = labels[1, 2] = -100
    kept = labels != -100
    expected = -logits.log_softmax(-1)[kept].gather(-1, labels[kept][:, None]).sum()
    loss, correct = masked_ce_sum(logits.to(torch.bfloat16), labels)
    assert loss.dtype == torch.float32 and int(correct) == 3  # 4 labelled, 3 right
    reference = -logits.to(torch.bfloat16).double().log_softmax(-1)[kept].gather(-1, labels[kept][:, None]).sum()
    assert abs(loss.item() - reference.item()) <= 1e-5 and abs(loss.item() - expected.item()) <= 0.1


def test_fixed_eval_batches_cut_the_first_max_rows_into_consecutive_batches():
    from bertode.training.lm import fixed_eval_batches
    from bertode.training.objective import make_objective

    rows = torch.arange(7 * 4).reshape(7, 4)
    clm = make_objective("clm", tokenizer=None)
    for max_rows, sizes in ((None, [3, 3, 1]), (5, [3, 2])):
        batches = fixed_eval_batches(rows, clm, seed=0, batch_size=3, max_rows=max_rows)
        assert [len(inputs) for inputs, _ in batches] == sizes
        assert torch.equal(torch.cat([inputs for inputs, _ in batches]), rows[:sum(sizes)])


def test_scored_lines_up_dense_logits_and_gives_sparse_rows_their_targets_in_order():
    from bertode.training.lm import scored
    from bertode.training.objective import make_objective

    clm = make_objective("clm", tokenizer=None)
    labels = torch.tensor([[-100, 7, 8, -100], [-100, 9, -100, 6]])
    dense = torch.randn(2, 4, 10)
    logits, targets = scored(clm, dense, labels)
    assert torch.equal(logits, dense[:, :-1]) and torch.equal(targets, labels[:, 1:])
    sparse = torch.randn(4, 10)  # one row per target, (batch, seq) order: 7, 8, 9, 6
    logits, targets = scored(clm, sparse, labels)
    assert logits is sparse and targets.tolist() == [7, 8, 9, 6]


# --- bertode/training/words.py ---------------------------------------------------------------------------------

_WORD_LINES = ["The the THE cat", "Cat dog the", ""]
_SPECIALS = ["[PAD]", "<unk>", "[CLS]", "[SEP]", "[MASK]", "<eos>"]


def test_word_counts_and_vocabulary_keep_case_unless_lowercased():
    """By hand: case kept, the = 2, the rest 1 (first occurrence breaks ties); lower-cased, the 4, cat 2, dog 1."""
    from bertode.training.words import train_vocabulary, word_counts

    assert list(word_counts(_WORD_LINES).items()) == [("The", 1), ("the", 2), ("THE", 1), ("cat", 1), ("Cat", 1),
                                                      ("dog", 1)]
    assert train_vocabulary(_WORD_LINES, None) == _SPECIALS + ["the", "The", "THE", "cat", "Cat", "dog"]
    assert train_vocabulary(_WORD_LINES, None, lowercase=True) == _SPECIALS + ["the", "cat", "dog"]
    assert train_vocabulary(_WORD_LINES, None, min_count=2, lowercase=True) == _SPECIALS + ["the", "cat"]


def test_the_word_tokenizer_reads_words_unknowns_pairs_and_special_tokens_as_documented():
    from bertode.training.words import train_tokenizer

    tokenizer = train_tokenizer(_WORD_LINES, None)  # min_count 1, case kept
    vocab = tokenizer.get_vocab()
    assert len(vocab) == 12 and vocab["dog"] == 11 and vocab["The"] == 7
    assert tokenizer("The zebra dog")["input_ids"] == [7, 1, 11, 5]  # an unknown word is <unk>; the line ends <eos>
    assert tokenizer("dog", "the")["input_ids"] == [11, 5, 6, 5]  # a pair: each text ends with <eos>
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.mask_token_id, tokenizer.eos_token_id) == (0, 1, 2, 3, 4, 5)
    lower = train_tokenizer(_WORD_LINES, None, min_count=2, lowercase=True)
    assert lower("THE Cat dog")["input_ids"] == [6, 7, 1, 5]  # the, cat; dog (seen once) is <unk>


def test_line_end_id_is_eos_of_a_word_level_tokenizer_only():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from bertode.training.words import line_end_id, perplexity_unit, train_tokenizer

    assert line_end_id(train_tokenizer(_WORD_LINES, None)) == 5
    assert line_end_id(object()) is None  # no backend tokenizer (a slow one)
    vocab = {token: index for index, token in enumerate(["[UNK]", "<eos>", "a", "##b"])}
    wordpiece = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")))
    assert line_end_id(wordpiece) is None and perplexity_unit(wordpiece) == "token"  # <eos> in it, but not words


def test_read_by_sets_the_vocabulary_a_tokenizer_reads_on_a_copy():
    from omegaconf import OmegaConf
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from bertode.training.words import read_by, train_tokenizer

    word = train_tokenizer(_WORD_LINES, None)
    wordpiece = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]")))
    unset, pieces, words = (OmegaConf.create(c) for c in ({"x": 1}, {"vocabulary": "wordpiece"},
                                                          {"vocabulary": "word"}))
    assert read_by(unset, wordpiece) is unset and read_by(pieces, wordpiece) is pieces and read_by(words, word) is words
    for cfg, tokenizer, kind in ((unset, word, "word"), (pieces, word, "word"), (words, wordpiece, "wordpiece")):
        read = read_by(cfg, tokenizer)
        assert read is not cfg and read.vocabulary == kind and cfg.get("vocabulary") != kind  # the original kept
    assert read_by(unset, word).x == 1
    plain = {"vocabulary": "wordpiece"}
    assert read_by(plain, word) is plain  # not a config (a dict): as it is


# --- bertode/training/wordpiece.py -----------------------------------------------------------------------------


def test_wordpiece_alphabet_is_the_most_frequent_characters_ties_by_character():
    """a 3, d 3, b 2, c 1: limit_alphabet 3 keeps a, b, d; "c" leaves its word (an empty word: no symbols)."""
    from bertode.training.wordpiece import train_vocabulary

    vocab = train_vocabulary(["aaa bb c d dd"], 7, ["[UNK]"], limit_alphabet=3)
    assert vocab == ["[UNK]", "##a", "##b", "##d", "a", "b", "d"]
    cjk = " ".join(chr(0x4E00 + i) for i in range(1001))  # 1001 characters seen once: the default keeps the first 1000
    vocab = train_vocabulary([cjk], 10, ["[UNK]"])
    assert len(vocab) == 1001 and chr(0x4E00 + 999) in vocab and chr(0x4E00 + 1000) not in vocab


def test_wordpiece_merges_a_pair_whose_count_fell_to_one_at_min_frequency_one():
    """By hand: (a, ##b) 2 first; then (ab, ##c) and (ab, ##d), once each, in the pairs' text order."""
    from bertode.training.wordpiece import train_vocabulary

    assert train_vocabulary(["abc abd"], 100, ["[UNK]"], min_frequency=1) == ["[UNK]", "##b", "##c", "##d", "a", "ab",
                                                                             "abc", "abd"]


def _wordpiece_by_recounting(words: list[str], vocab_size: int, special: list[str], min_frequency: int) -> list[str]:
    """The module docstring's algorithm without its heap: recount every pair after each merge, take the most
    frequent (ties: the pair's text), stop below ``min_frequency`` or at ``vocab_size``."""
    from collections import Counter

    counts = Counter(words)
    seqs = {w: [w[0]] + ["##" + c for c in w[1:]] for w in counts}
    vocab = list(special) + sorted({s for seq in seqs.values() for s in seq})
    while len(vocab) < vocab_size:
        pairs = Counter()
        for word, seq in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += counts[word]
        if not pairs:
            break
        pair = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[pair] < min_frequency:
            break
        token = pair[0] + pair[1][2:]
        if token not in vocab:
            vocab.append(token)
        for word, seq in seqs.items():
            merged, i = [], 0
            while i < len(seq):
                if tuple(seq[i:i + 2]) == pair:
                    merged, i = merged + [token], i + 2
                else:
                    merged, i = merged + [seq[i]], i + 1
            seqs[word] = merged
    return vocab


def test_wordpiece_equals_recounting_every_pair_after_each_merge_on_random_corpora():
    """The heap's stale entries (a merged pair pushed at an older count) are skipped, at min_frequency 1 too:
    300 random corpora of 2-4 letters against the recounting reference."""
    import random

    from bertode.training.wordpiece import train_vocabulary

    draw = random.Random(0)
    for trial in range(300):
        letters = "abcd"[:draw.randint(2, 4)]
        words = ["".join(draw.choice(letters) for _ in range(draw.randint(1, 7))) for _ in range(draw.randint(1, 8))]
        minimum = 1 + trial % 2
        expected = _wordpiece_by_recounting(words, 60, ["[PAD]"], minimum)
        assert train_vocabulary([" ".join(words)], 60, ["[PAD]"], min_frequency=minimum) == expected, (words, minimum)


def test_wordpiece_lowercases_by_default_cleans_text_spaces_cjk_and_keeps_case_when_asked(tmp_path):
    from transformers import AutoTokenizer

    from bertode.training.wordpiece import train_tokenizer, train_vocabulary

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert train_vocabulary(["AB ab"], 6, ["[UNK]"]) == ["[UNK]", "##b", "a", "ab"]  # lower-cased: "ab" twice
    assert train_vocabulary(["AB ab"], 6, ["[UNK]"], lowercase=False) == ["[UNK]", "##B", "##b", "A", "a"]
    # a control character is dropped (clean_text), a CJK character is a word of its own (handle_chinese_chars)
    assert train_vocabulary(["a\x00b 中c"], 20, ["[UNK]"], lowercase=False) == ["[UNK]", "##b", "a", "c", "中"]
    cased = train_tokenizer(["AB ab AB"], 30, specials, lowercase=False)
    assert cased.tokenize("AB ab") == ["AB", "a", "##b"]  # AB twice (merged), ab once (not)
    assert cased.tokenize("a\x00b中") == ["a", "##b", "[UNK]"]  # 中 (no character of its corpus) a word of its own
    cased.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).tokenize("AB ab") == ["AB", "a", "##b"]  # saved as cased
    lower = train_tokenizer(["ab ab"], 30, specials)
    encoding = lower("AB zz")
    assert encoding.tokens() == ["[CLS]", "ab", "[UNK]", "[SEP]"]  # BERT's frame; an unknown word is [UNK]
    assert (lower.pad_token_id, lower.unk_token_id, lower.cls_token_id, lower.sep_token_id,
            lower.mask_token_id) == (0, 1, 2, 3, 4)


# --- bertode/layers/segment_memory.py ------------------------------------------------------------------------


def test_segment_memory_refuses_each_misfit_layer_by_index_in_the_one_line_error():
    from bertode.layers.segment_memory import SegmentMemory

    def message(past, batch=2, width=8):
        with pytest.raises(ValueError) as error:
            SegmentMemory(past, mem_len=6).check(batch, width)
        return str(error.value)

    tail = ("tensors, one per layer, as the model's output `mems` returned them for the previous segment of the "
            "same rows")
    fit = torch.zeros(2, 5, 8)
    SegmentMemory((fit, fit), mem_len=6).check(2, 8)  # fits: no error
    # the length is layer 0's: layer 1 of another length is the misfit, whatever its width
    allowed = f"is invalid; allowed: (batch=2, 5, 8) {tail}"
    assert message((fit, torch.zeros(2, 4, 8))) == f"mems[1] of shape (2, 4, 8) {allowed}"
    assert message((fit, torch.zeros(2, 5, 3))) == f"mems[1] of shape (2, 5, 3) {allowed}"
    assert message((fit,), batch=3).startswith("mems[0] of shape (2, 5, 8) is invalid; allowed: (batch=3, 5, 8)")
    assert message((torch.zeros(2, 5, 8, 1),)).startswith("mems[0] of shape (2, 5, 8, 1) is invalid")


def test_segment_memory_reads_nothing_before_a_layer_enters_and_keeps_the_states_dtype():
    from bertode.layers.segment_memory import SegmentMemory

    past = (torch.zeros(1, 3, 4),)
    memory = SegmentMemory(past, mem_len=4)
    assert memory.length == 3 and memory.states() is None  # no layer entered yet
    memory.enter(0, torch.ones(1, 2, 4), injection=torch.full((1, 2, 12), 2.0, dtype=torch.float64))
    assert memory.states() is past[0]
    assert memory.new[0].dtype == torch.float32 and torch.equal(memory.new[0][..., 4:], torch.full((1, 2, 12), 2.0))
    memory.enter(0, torch.full((1, 2, 4), 5.0))  # a later evaluation of the same layer: the first state is kept
    assert torch.equal(memory.new[0][..., :4], torch.ones(1, 2, 4))


def test_segment_memory_missing_a_layer_is_the_one_line_runtime_error():
    from bertode.layers.segment_memory import SegmentMemory

    memory = SegmentMemory(None, mem_len=4)
    memory.enter(1, torch.zeros(1, 2, 4))
    with pytest.raises(RuntimeError) as error:
        memory.updated()
    assert str(error.value) == "segment memory recorded layers [1]; expected 0 .. 0"


def test_segment_memory_updated_is_the_last_mem_len_positions_in_the_new_states_dtype():
    from bertode.layers.segment_memory import SegmentMemory

    past = (torch.arange(3.0, dtype=torch.float64).view(1, 3, 1),)
    memory = SegmentMemory(past, mem_len=4)
    memory.enter(0, torch.tensor([[[3.0], [4.0]]]))
    (kept,) = memory.updated()
    assert kept.dtype == torch.float32 and kept.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]


# --- bertode/layers/disentangled.py --------------------------------------------------------------------------


def test_deberta_spans_and_table_follow_its_defaults_for_configs_without_the_fields():
    from types import SimpleNamespace

    from bertode.layers.disentangled import RelativeEmbeddings, resolved_max_relative, table_span

    bare = SimpleNamespace(max_position_embeddings=40)  # DeBERTa's defaults: max_relative_positions=position_buckets=-1
    assert resolved_max_relative(bare) == 40 and table_span(bare) == 40
    one = SimpleNamespace(max_position_embeddings=40, max_relative_positions=1)  # < 1 means the embeddings' length
    assert resolved_max_relative(one) == 1 and table_span(one) == 1
    assert resolved_max_relative(SimpleNamespace(max_position_embeddings=40, max_relative_positions=0)) == 40
    assert table_span(SimpleNamespace(max_position_embeddings=40, max_relative_positions=5, position_buckets=2)) == 2
    assert table_span(SimpleNamespace(max_position_embeddings=40, max_relative_positions=5, position_buckets=0)) == 5
    torch.manual_seed(0)
    table = RelativeEmbeddings(SimpleNamespace(max_position_embeddings=64, hidden_size=32, initializer_range=0.02))
    assert table.norm is None and torch.equal(table(), table.weight) and tuple(table.weight.shape) == (128, 32)
    assert 0.018 <= table.weight.std().item() <= 0.022  # N(0, initializer_range^2) over 4096 draws: within 10 %


def test_disentangled_positions_share_the_encoders_table_parameters_and_none_before():
    from types import SimpleNamespace

    from bertode import BertODEConfig
    from bertode.layers.disentangled import DisentangledPositions, share_relative_embeddings

    config = BertODEConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, position_scheme="deberta", max_relative_positions=4)
    encoder = torch.nn.Module()
    encoder.positions = DisentangledPositions(config)
    assert list(encoder.positions.shared_parameters()) == []
    with pytest.raises(RuntimeError) as error:
        encoder.positions.queries(torch.zeros(1, 4, 2, 8), torch.arange(2), 2, content_keys=torch.zeros(1, 4, 2, 8))
    assert str(error.value) == ("DisentangledPositions has no relative embeddings: build the encoder with "
                                "bertode.layers.deq.build_encoder (it shares the encoder's table)")
    share_relative_embeddings(encoder, config)
    shared = list(encoder.positions.shared_parameters())
    assert len(shared) == 1 and shared[0] is encoder.rel_embeddings.weight
    assert tuple(encoder.rel_embeddings.weight.shape) == (8, 32)
    other = torch.nn.Module()
    assert share_relative_embeddings(other, SimpleNamespace()) is other and not hasattr(other, "rel_embeddings")


def test_segment_memory_a_looped_core_with_fewer_applications_reads_and_remembers_the_last_ones():
    from bertode.layers.segment_memory import SegmentMemory

    column = lambda *values: torch.tensor(values, dtype=torch.float32).view(1, -1, 1)  # noqa: E731
    past = (column(1.0, 2.0), column(3.0, 4.0))  # two applications last segment
    memory = SegmentMemory(past, mem_len=3)
    memory.enter(2, column(9.0))  # a third application reads the last one's memory
    assert memory.states() is past[1]
    one = SegmentMemory((column(1.0, 2.0),), mem_len=3)  # one application last segment, two now
    one.enter(0, column(5.0))
    one.enter(1, column(6.0))
    assert [m.flatten().tolist() for m in one.updated()] == [[1.0, 2.0, 5.0], [1.0, 2.0, 6.0]]
    two = SegmentMemory(past, mem_len=3)  # two last segment, one now: the second remembers the one's states
    two.enter(0, column(5.0))
    assert [m.flatten().tolist() for m in two.updated()] == [[1.0, 2.0, 5.0], [3.0, 4.0, 5.0]]


def test_open_memory_refuses_in_one_line_and_reads_configs_without_the_fields():
    from types import SimpleNamespace

    from bertode.layers.segment_memory import open_memory

    past = (torch.zeros(2, 3, 8),)
    with pytest.raises(ValueError) as error:  # a config without mem_len has none
        open_memory(SimpleNamespace(), past, 2, 8)
    assert str(error.value) == ("mems is invalid with BertODEConfig.mem_len=0; allowed: None (set mem_len > 0 for a "
                                "segment memory)")
    assert open_memory(SimpleNamespace(), None, 2, 8) is None
    with pytest.raises(ValueError) as error:  # refused here too, not only by the config's validation
        open_memory(SimpleNamespace(mem_len=8, is_decoder=False), None, 2, 8)
    assert str(error.value) == ("BertODEConfig.mem_len=8 is invalid with is_decoder=False (a bidirectional model's "
                                "tokens would attend to the memory and to later tokens); allowed: 0")
    memory = open_memory(SimpleNamespace(mem_len=4, is_decoder=True, position_scheme="rotary"), past, 2, 8)  # no mode
    assert memory.length == 3 and memory.mem_len == 4


def test_spanning_extends_a_mask_of_any_rank_over_the_memory_and_keeps_others_as_given():
    from bertode.layers.segment_memory import SegmentMemory, spanning

    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]])[:, None, None]  # (batch, 1, 1, new)
    memory = SegmentMemory((torch.zeros(2, 3, 8),), mem_len=4)
    extended = spanning(mask, memory, 5)
    assert torch.equal(extended, torch.cat([torch.ones(2, 1, 1, 3, dtype=mask.dtype), mask], -1))
    assert spanning(mask, None, 5) is mask and spanning(mask, SegmentMemory(None, 4), 5) is mask
    assert spanning(mask, memory, 2) is mask  # over memory and new positions already


def test_disentangled_defaults_are_both_terms_no_buckets_own_projections_even_for_configs_without_the_fields():
    from types import SimpleNamespace

    from bertode import BertODEConfig
    from bertode.layers.disentangled import DisentangledPositions, RelativeEmbeddings

    sizes = dict(hidden_size=32, num_attention_heads=4, max_position_embeddings=40, max_relative_positions=3)
    explicit = BertODEConfig(vocab_size=50, num_hidden_layers=1, intermediate_size=64, position_scheme="deberta",
                             pos_att_type=["c2p", "p2c"], **sizes)
    torch.manual_seed(0)
    reference = DisentangledPositions(explicit)
    reference.__dict__["table"] = RelativeEmbeddings(explicit)
    generator = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 4, 7, 8, generator=generator) for _ in range(2))
    expected = reference.queries(q, torch.arange(7), 7, content_keys=k)
    for config in (BertODEConfig(vocab_size=50, num_hidden_layers=1, intermediate_size=64, position_scheme="deberta",
                                 **sizes),
                   SimpleNamespace(pos_att_type=None, **sizes),  # None: both terms; no buckets, own projections
                   SimpleNamespace(pos_att_type=None, position_buckets=0, **sizes)):  # 0 buckets: none, as DeBERTa's
        positions = DisentangledPositions(config)
        assert (positions.c2p, positions.p2c, positions.scale_factor, positions.buckets <= 0) == (True, True, 3, True)
        positions.load_state_dict(reference.state_dict())
        positions.__dict__["table"] = reference.table
        for ours, theirs in zip(positions.queries(q, torch.arange(7), 7, content_keys=k), expected):
            assert torch.equal(ours, theirs)
    only_p2c = DisentangledPositions(SimpleNamespace(pos_att_type=["p2c"], **sizes))
    assert only_p2c.pos_key_proj is None and isinstance(only_p2c.pos_query_proj, torch.nn.Linear)
    wide = DisentangledPositions(explicit).double()  # float64 projections over the float32 table: cast to q's dtype
    wide.load_state_dict(reference.state_dict())
    wide.__dict__["table"] = reference.table
    for ours, theirs in zip(wide.queries(q.double(), torch.arange(7), 7, content_keys=k.double()), expected):
        assert ours.dtype == torch.float64 and (ours - theirs).abs().max() <= 1e-5
    content_only = DisentangledPositions(SimpleNamespace(pos_att_type=[], **sizes))  # s = 1, a zero bias in q's dtype
    content_only.__dict__["table"] = reference.table
    scaled, bias = content_only.queries(q.double(), torch.arange(7), 7, content_keys=k.double())
    assert torch.equal(scaled, q.double()) and bias.dtype == torch.float64 and not bias.any()


def test_the_models_init_rule_redraws_the_relative_table():
    from bertode import BertODEConfig, BertODEModel

    config = BertODEConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, position_scheme="deberta", max_relative_positions=64)
    model = BertODEModel(config)
    table = model.encoder.rel_embeddings
    with torch.no_grad():
        table.weight.zero_()
    model._init_weights(table)  # as from_pretrained does for a table missing from a checkpoint
    assert 0.018 <= table.weight.std().item() <= 0.022  # N(0, 0.02^2) over 128 x 32 draws


def test_segment_memory_refusal_reads_configs_without_the_fields_as_bidirectional_and_absolute():
    from types import SimpleNamespace

    from bertode.layers.segment_memory import refusal

    assert refusal(SimpleNamespace()) == ("is_decoder=False (a bidirectional model's tokens would attend to the "
                                          "memory and to later tokens)")
    assert refusal(SimpleNamespace(is_decoder=True)) == (
        "position_scheme='absolute' (absolute positions restart at 0 in every segment; the memory needs relative "
        "positions)")
    assert refusal(SimpleNamespace(is_decoder=True, position_scheme="rotary")) is None
    assert refusal(SimpleNamespace(is_decoder=True, position_scheme="deberta", position_biased_input=True)) == (
        "position_scheme='deberta' with position_biased_input=True (absolute positions restart at 0 in every "
        "segment; the memory needs relative positions)")
    assert refusal(SimpleNamespace(is_decoder=True, position_scheme="deberta", position_biased_input=False)) is None
    assert refusal(SimpleNamespace(is_decoder=True, position_scheme="rotary", add_cross_attention=True)) == (
        "add_cross_attention=True (a decoder of an encoder-decoder model)")
    assert refusal(SimpleNamespace(is_decoder=True, position_scheme="rotary", prelude_layers=0, coda_layers=2)) == (
        "prelude_layers=0, coda_layers=2 (a memory per layer of a prelude-core-coda stack is not built yet)")
