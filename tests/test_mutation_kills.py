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
