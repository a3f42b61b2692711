"""`Observer`: what one forward records for inspection, when asked (``output_attentions``,
``output_trajectory``), and nothing otherwise.

* Attention probabilities, per layer: ``keep="first"`` keeps the first evaluation of a
  layer's attention in this forward (an ODE solve's first evaluation is at its start,
  the site's input: at Euler-1 exactly BERT's attention), ``"last"`` the last one (a
  DEQ's: at the fixed point), ``"all"`` every evaluation, stacked. They are not detached:
  where the evaluation ran with grad on (training, an autograd solve), a loss of them
  reaches the parameters, as HF's eager attentions (a DEQ's forward solve, an adjoint's
  forward run without grad, so theirs are constants).
* Trajectories: for every solve, a dict of ``name``, ``times`` and ``states`` (the start,
  the state after every accepted step, the end) and ``outputs`` (each state as the site
  would hand it on, e.g. after its LayerNorm: the last is the site's output). torchdyn's fixed-step (`SubSteps`) and adaptive solvers note
  their steps here; solves that go elsewhere (torchdiffeq, the interpolated adjoint's
  grid) record their two ends. A DEQ's trajectory is its forward solve's iterates, the
  "time" being the iteration.

The active observer is a plain module global (read, not written, by the numerics), so
compiled graphs guard on it instead of breaking when nothing is observed.
"""

from __future__ import annotations

import contextlib

import torch


class Observer:
    def __init__(self, attentions: bool = False, trajectory: bool = False, keep: str = "first"):
        if keep not in ("first", "last", "all"):
            raise ValueError(f"Observer keep={keep!r} is invalid; allowed: 'first', 'last', 'all'")
        self.wants_attentions, self.wants_trajectory, self.keep = attentions, trajectory, keep
        self.layer: int | None = None  # the layer whose attention runs now
        self._attentions: dict[int, list[torch.Tensor]] = {}
        self._cross: dict[int, list[torch.Tensor]] = {}  # a decoder's cross-attention, kept by the same rule
        self.solves: list[dict] = []
        self._open: dict | None = None

    def replay(self) -> "Observer":
        """A throw-away observer that makes the same choices as this one does now (which
        attentions it would record), so that a checkpointed layer's recomputation takes
        the same (eager or fused) attention path; it records nothing that is kept."""
        twin = Observer(attentions=self.wants_attentions, keep=self.keep)
        twin._attentions = {layer: [] for layer in self._attentions}
        twin._cross = {layer: [] for layer in self._cross}
        return twin

    # --- attention ------------------------------------------------------------------------
    def needs_attention(self, cross: bool = False) -> bool:
        """Whether the attention evaluated now is kept (an eager, probability-returning path);
        ``cross``: a decoder's cross-attention."""
        kept = self._cross if cross else self._attentions
        return self.wants_attentions and not (self.keep == "first" and self.layer in kept)

    def attention(self, probs: torch.Tensor, cross: bool = False) -> None:
        kept = (self._cross if cross else self._attentions).setdefault(self.layer, [])
        if self.keep == "last":
            kept.clear()
        kept.append(probs)  # with its graph where grad is on: differentiable, as HF's eager attentions

    def attentions(self, cross: bool = False) -> tuple | None:
        """Per layer, the kept self-attention (``cross``: cross-attention) probabilities; None if not asked
        (or, for ``cross``, if no layer cross-attends)."""
        recorded = self._cross if cross else self._attentions
        if not self.wants_attentions or (cross and not recorded):
            return None
        layers = [recorded[i] for i in sorted(recorded)]
        return tuple(torch.stack(kept) if self.keep == "all" else kept[0] for kept in layers)

    # --- trajectories -----------------------------------------------------------------------
    def begin(self, name: str, t0: float, z0: torch.Tensor) -> None:
        if self.wants_trajectory:
            self._open = {"name": name, "times": [float(t0)], "states": [z0.detach()], "shape": z0.shape}

    def note(self, t, x: torch.Tensor) -> None:
        """The state at time ``t`` (a step's start or end; repeated times, rejected steps, are dropped)."""
        solve = self._open
        if solve is None:
            return
        t = float(t.detach()) if isinstance(t, torch.Tensor) else float(t)
        if t > solve["times"][-1]:
            shape = solve["shape"]
            x = x.detach().reshape(*shape[:-1], -1)[..., :shape[-1]]  # an augmented state: its first channels
            solve["times"].append(t)
            solve["states"].append(x)

    def end(self, t1: float, z1: torch.Tensor, finish=None, output: torch.Tensor | None = None) -> None:
        """Close the solve: ``states`` are the solver's states z(t); ``outputs`` what the site
        would hand on if stopped there (``finish`` of each state, e.g. the LayerNorm; the
        last is the site's own ``output``)."""
        if self._open is None:
            return
        self.note(t1, z1)
        solve, self._open = self._open, None
        solve["states"][-1] = z1.detach().reshape(solve["shape"])  # the solve's own result
        states = torch.stack(solve["states"])
        with torch.no_grad():
            outputs = torch.stack([finish(state) for state in states]) if finish is not None else states.clone()
        if output is not None:
            outputs[-1] = output.detach()
        self.solves.append({"name": solve["name"], "times": torch.tensor(solve["times"]), "states": states,
                            "outputs": outputs})

    def trajectory(self) -> tuple | None:
        return tuple(self.solves) if self.wants_trajectory else None


class _State:
    observer: Observer | None = None


_ACTIVE = _State()


def active() -> Observer | None:
    return _ACTIVE.observer


@contextlib.contextmanager
def observing(observer: Observer | None):
    previous = _ACTIVE.observer
    _ACTIVE.observer = observer
    try:
        yield observer
    finally:
        _ACTIVE.observer = previous
