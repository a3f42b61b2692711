"""`SolverStatsCallback`: solver statistics in `transformers.Trainer`'s logs.

    trainer = Trainer(model=model, args=args, train_dataset=..., callbacks=[bertode.SolverStatsCallback()])

At every optimizer step it reads the model's latest ``solver_stats()`` (NFE forward and
backward for ODE models; iterations, residuals, skipped batches for DEQ models) and, at
each log, adds their mean over the steps since the previous log to the logged values
(keys prefixed ``solver/``), in ``trainer.state.log_history`` and for the callbacks that
run after it (put it first in ``callbacks`` for reporting integrations to see them).
"""

from __future__ import annotations

from transformers import TrainerCallback

PREFIX = "solver/"


class SolverStatsCallback(TrainerCallback):
    def __init__(self):
        self._sums: dict[str, float] = {}
        self._steps = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        stats = getattr(_unwrap(model), "solver_stats", None)
        if stats is None:
            return
        for key, value in stats().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self._steps or "loss" not in logs:
            return
        means = {f"{PREFIX}{key}": total / self._steps for key, total in self._sums.items()}
        logs.update(means)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(means)
        self._sums, self._steps = {}, 0


def _unwrap(model):
    """Through DistributedDataParallel and torch.compile wrappers."""
    while model is not None and not hasattr(model, "solver_stats") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)
