"""The per-token exit criteria: ``exit=<name>`` resolves here (`register_exit_criterion` adds one).

A criterion compares a token's state after an iteration with its state before and gives a
score per token; a token whose score is below ``threshold`` stops (its state is frozen and
it still supplies keys and values to the tokens that go on). A score reads only the token's
own state (or the head's distribution at its own position), so a causal model's exit
decisions never read future tokens.

* ``none`` (default): no token stops.
* ``latent_diff``: |z_t - z_{t-1}| / |z_t| per token (Huginn's relative latent change).
* ``kl``: KL(p_t || p_{t-1}) of the head's output distributions at the token's position
  (the masked-LM prediction at that position; a causal LM's next token). It needs the
  model's readout, which the language-model heads supply (`dial.Dial.readout`).

A criterion is built as ``criterion_class(threshold, **kwargs)``; subclasses implement
``summary(hidden, readout)`` (what is compared between iterations, per token) and
``score(previous, current)`` (batch, seq).
"""

from __future__ import annotations

import abc
import math

import torch

from ..registry import Registry


class ExitCriterion(abc.ABC):
    """Decides per token whether to stop iterating; ``registry_name`` is set at registration.
    ``stops_tokens = False`` marks a criterion that never stops one (``none``): no criterion runs."""

    registry_name: str = ""
    needs_readout: bool = False
    stops_tokens: bool = True

    def __init__(self, threshold: float = 0.03):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or threshold < 0:
            raise ValueError(f"exit.threshold={threshold!r} is invalid; allowed: a number >= 0")
        self.threshold = float(threshold)

    def summary(self, hidden: torch.Tensor, readout=None):
        """What this criterion compares between iterations (default: the states themselves)."""
        return hidden

    @abc.abstractmethod
    def score(self, previous, current) -> torch.Tensor:
        """(batch, seq) scores; a token exits when its score is below the threshold."""

    def exits(self, previous, current) -> torch.Tensor:
        """(batch, seq) bool: the tokens that stop after this iteration (never any at threshold 0)."""
        return self.score(previous, current) < self.threshold

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold})"


EXIT_CRITERIA = Registry("exit criterion", "exit", base=ExitCriterion, decorator="register_exit_criterion")


def register_exit_criterion(name: str, *, default: bool = False):
    """Class decorator: make an `ExitCriterion` subclass selectable as ``exit=name``."""
    return lambda cls: EXIT_CRITERIA.register(name, cls, default=default)


def available_exit_criteria() -> tuple[str, ...]:
    return EXIT_CRITERIA.names()


def make_exit_criterion(name: str | None, threshold: float = 0.03, **kwargs) -> ExitCriterion | None:
    """The built criterion ``name``, or None where it stops no token (None: the default, ``none``)."""
    name = EXIT_CRITERIA.default if name is None else name
    if name not in EXIT_CRITERIA:
        raise ValueError(f"exit={name!r} is invalid; allowed: {', '.join(available_exit_criteria())}")
    criterion = EXIT_CRITERIA[name](threshold, **kwargs)
    return criterion if criterion.stops_tokens else None


@register_exit_criterion("none", default=True)
class NoExit(ExitCriterion):
    """Every token runs the whole depth (the default)."""

    stops_tokens = False

    def score(self, previous, current):
        return torch.full(current.shape[:2], math.inf, device=current.device)


@register_exit_criterion("latent_diff")
class LatentDifference(ExitCriterion):
    def score(self, previous, current):
        return (current - previous).float().norm(dim=-1) / (current.float().norm(dim=-1) + 1e-9)


@register_exit_criterion("kl")
class KLDivergence(ExitCriterion):
    needs_readout = True

    def summary(self, hidden, readout=None):
        if readout is None:
            raise ValueError("exit='kl' needs the head's distribution: use it through a language-model head "
                             "(BertODEForMaskedLM, BertODEForCausalLM) or dial a readout")
        return torch.log_softmax(readout(hidden).float(), dim=-1)

    def score(self, previous, current):
        return (current.exp() * (current - previous)).sum(-1)
