"""The depth dial: how much iterated depth the next forward passes spend, set from outside the model.

Continuous and implicit depth make compute a dial. `dialed(...)` turns it for the forwards
inside its ``with`` block (nested blocks restore the outer dial on exit; the state is a plain module
attribute, as `observe`'s, so that ``torch.compile`` traces a dialled forward into one graph):

* ``depth``: the steps or iterations of the depth the model iterates (None: the config's).
  What the number counts is the encoder's business: a DEQ's iterations (``deq_max_iter``),
  a looped core's applications (``weight_tying``: ``num_hidden_layers`` minus prelude and
  coda), an untied ODE's fixed steps per solve (``steps``).
* ``backprop``: differentiate through the last k of them only; the earlier ones run
  without a graph (Huginn's truncated backpropagation; None: all). A DEQ's ``phantom``
  takes k phantom steps, ``unrolled`` keeps the graph of the last k iterations.
* ``exit``: a built `ExitCriterion` (`exits.py`): each token stops iterating once its
  score falls below the threshold, and keeps its state (looped cores and DEQs).
* ``on_iterate``: called as ``on_iterate(n, hidden)`` with the encoder's output as it would
  be had the forward stopped after n iterations (a DEQ's best iterate so far), for the
  quality-versus-depth curve of one solve.
* ``readout``: ``hidden -> logits``, set by the language-model heads for their forward
  (the ``kl`` exit criterion reads the head's distributions).

    with bertode.dialed(depth=16, exit=bertode.make_exit_criterion("latent_diff", 0.03)):
        out = model(**batch)

The training loop draws ``depth`` per optimizer step (``depth=`` group) and dials it; the
evaluation and generation commands dial a fixed depth and an exit criterion.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable


@dataclass(frozen=True)
class Dial:
    depth: int | None = None
    backprop: int | None = None
    exit: object | None = None  # an ExitCriterion
    on_iterate: Callable | None = None
    readout: Callable | None = None

    def steps(self, configured: int) -> int:
        """The depth to run: the dialled one, or ``configured``."""
        return configured if self.depth is None else self.depth

    def graph_from(self, depth: int) -> int:
        """The first iteration (0-based) of ``depth`` that keeps a graph (``backprop``)."""
        return 0 if self.backprop is None else max(depth - self.backprop, 0)


NEUTRAL = Dial()


class _State:
    dial: Dial = NEUTRAL


_CURRENT = _State()


def current_dial() -> Dial:
    """The dial in force (`NEUTRAL`: every field None, the config decides)."""
    return _CURRENT.dial


def _check(depth, backprop) -> None:
    for name, value in (("depth", depth), ("backprop", backprop)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"dialed({name}={value!r}) is invalid; allowed: None or an integer >= 1")


@contextlib.contextmanager
def dialed(**changes):
    """Turn the dial for the forwards inside the block: the named fields replace the current
    dial's (``depth``, ``backprop``, ``exit``, ``on_iterate``, ``readout``); others are kept."""
    unknown = set(changes) - set(Dial.__dataclass_fields__)
    if unknown:
        raise TypeError(f"dialed() got unknown field(s) {sorted(unknown)}; allowed: {', '.join(Dial.__dataclass_fields__)}")
    _check(changes.get("depth"), changes.get("backprop"))
    previous = _CURRENT.dial
    _CURRENT.dial = replace(previous, **changes)
    try:
        yield _CURRENT.dial
    finally:
        _CURRENT.dial = previous
