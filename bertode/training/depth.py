"""The depth a command dials (`bertode.dialed`): drawn per optimizer step in training, fixed at
evaluation and generation, and the exit criterion of those two.

``depth=<name>`` chooses a registered `DepthDistribution` (``register_depth_distribution``
adds one); ``depth.<parameter>`` sets its constructor's arguments (null: the constructor's
default) and ``depth.backprop=k`` differentiates the last k steps or iterations only
(null: all). Built in:

* ``fixed`` (default): ``depth.steps`` every step; null: the model's own depth (no dial).
* ``uniform``: an integer drawn uniformly from [``depth.low``, ``depth.high``].
* ``poisson_lognormal``: Huginn's r = Poisson(exp(mu + sigma * eps)) + 1, eps ~ N(0, 1),
  mu = log(``depth.mean``) - ``depth.sigma``^2 / 2: the rate has mean ``depth.mean``,
  so E[r] = ``depth.mean`` + 1, with a heavy right tail.

A draw depends on (seed, step) only: each draws from its own ``torch.Generator`` seeded
from both (`generator`), never from the global RNG, so every rank of a torchrun run and a
resumed run draw the same depth, and the model's random streams are those of an undialled
run. In `bertode.train` the step logged as ``step: s`` is dialled ``draw(seed, s)``.

``exit=<name>`` (evaluate, generate) builds `bertode.make_exit_criterion(name,
exit.threshold)`; ``exit=none`` (default) dials none.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..registry import Registry
from ..solve.dial import dialed
from ..solve.sensitivities import SENSITIVITIES, available_sensitivities, default_sensitivity
from ..solve.exits import EXIT_CRITERIA, make_exit_criterion
from ..solve.solvers import SOLVERS

_STREAM = 0x6465707468  # "depth": this module's own stream of (seed, step)


def generator(seed: int, step: int) -> torch.Generator:
    """A fresh generator that depends on (``seed``, ``step``) only."""
    state = np.random.SeedSequence([int(seed), int(step), _STREAM]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class DepthDistribution:
    """The depth of each optimizer step. Subclasses implement ``sample(generator) -> int``
    (an integer >= 1, drawn from ``generator`` only), or override ``draw(seed, step)``
    (which must depend on its arguments only; None: the model's own depth). Constructor
    arguments are ``depth.<name>`` on the command line; ``registry_name`` is set at registration."""

    registry_name: str = ""

    def draw(self, seed: int, step: int) -> int | None:
        return self.sample(generator(seed, step))

    def sample(self, generator: torch.Generator) -> int:
        raise NotImplementedError(f"{type(self).__name__} implements neither sample(generator) nor draw(seed, step)")

    def __repr__(self) -> str:
        settings = getattr(self, "settings", {})
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in settings.items())})"


DEPTH_DISTRIBUTIONS = Registry("depth distribution", "depth", base=DepthDistribution,
                               decorator="register_depth_distribution")


def register_depth_distribution(name: str, *, default: bool = False):
    """Class decorator: make a `DepthDistribution` subclass selectable as ``depth=name``."""
    return lambda cls: DEPTH_DISTRIBUTIONS.register(name, cls, default=default)


def available_depth_distributions() -> tuple[str, ...]:
    return DEPTH_DISTRIBUTIONS.names()


def parameters(name: str) -> dict:
    """The constructor arguments of ``depth=name`` and their defaults (`inspect.Parameter.empty`: required)."""
    signature = inspect.signature(DEPTH_DISTRIBUTIONS[name].__init__)
    return {p.name: p.default for p in list(signature.parameters.values())[1:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _shown(value) -> str:
    """A value as typed on the command line (null for None)."""
    return "null" if value is None else repr(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@register_depth_distribution("fixed", default=True)
class Fixed(DepthDistribution):
    """``steps`` every step (None: the model's own depth, no dial)."""

    def __init__(self, steps: int | None = None):
        if steps is not None and not (_integer(steps) and steps >= 1):
            raise ValueError(f"depth.steps={steps!r} is invalid; allowed: null (the model's own depth) or an integer >= 1")
        self.steps = steps

    def draw(self, seed: int, step: int) -> int | None:
        return self.steps


@register_depth_distribution("uniform")
class Uniform(DepthDistribution):
    """An integer uniform on [low, high] (both included)."""

    def __init__(self, low: int, high: int):
        for key, value in (("low", low), ("high", high)):
            if not (_integer(value) and value >= 1):
                raise ValueError(f"depth.{key}={_shown(value)} is invalid; allowed: an integer >= 1 "
                                 "(depth=uniform depth.low=A depth.high=B, 1 <= A <= B)")
        if low > high:
            raise ValueError(f"depth.low={low!r} is invalid with depth.high={high!r}; allowed: an integer in [1, {high}] "
                             "(depth.low <= depth.high)")
        self.low, self.high = low, high

    def sample(self, generator: torch.Generator) -> int:
        return int(torch.randint(self.low, self.high + 1, (), generator=generator))


@register_depth_distribution("poisson_lognormal")
class PoissonLogNormal(DepthDistribution):
    """Huginn's depth: r = Poisson(exp(mu + sigma * eps)) + 1, eps ~ N(0, 1), mu = log(mean) -
    sigma^2 / 2, so that the Poisson rate has mean ``mean`` (E[r] = mean + 1)."""

    def __init__(self, mean: float, sigma: float = 0.5):
        if not (_number(mean) and mean > 0):
            raise ValueError(f"depth.mean={_shown(mean)} is invalid; allowed: a number > 0")
        if not (_number(sigma) and sigma >= 0):
            raise ValueError(f"depth.sigma={_shown(sigma)} is invalid; allowed: a number >= 0")
        self.mean, self.sigma = float(mean), float(sigma)

    def sample(self, generator: torch.Generator) -> int:
        mu = math.log(self.mean) - self.sigma ** 2 / 2
        rate = torch.exp(mu + self.sigma * torch.randn((), generator=generator, dtype=torch.float64))
        return int(torch.poisson(rate, generator=generator)) + 1


def make_depth_distribution(name: str, **given) -> DepthDistribution:
    """The built distribution ``name`` with the arguments ``given`` (None: the default; a
    required argument left None reaches the constructor, which refuses it in one line).
    Its ``settings`` are every argument as used (defaults filled in)."""
    if name not in DEPTH_DISTRIBUTIONS:
        allowed = ", ".join(repr(n) for n in available_depth_distributions())
        raise ValueError(f"depth={name!r} is invalid; allowed: {allowed} (registered depth distributions)")
    known = parameters(name)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"depth.{unknown[0]}={given[unknown[0]]!r} is invalid for depth={name}; allowed: "
                         f"{', '.join(f'depth.{k}' for k in known) or 'no parameters'}, depth.backprop")
    arguments = {k: v for k, v in given.items() if v is not None or known[k] is inspect.Parameter.empty}
    arguments.update({k: None for k, default in known.items() if default is inspect.Parameter.empty and k not in arguments})
    distribution = DEPTH_DISTRIBUTIONS[name](**arguments)
    # as used: the constructor's own value where it keeps one (8 and 8.0 are one mean), else the argument
    distribution.settings = {k: getattr(distribution, k, arguments.get(k, default)) for k, default in known.items()}
    return distribution


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    if node is None:
        return {}
    return dict(OmegaConf.to_container(node) if OmegaConf.is_config(node) else node)


@dataclass
class DepthSetting:
    """``depth=`` of a command: the distribution and ``backprop`` (k: differentiate the last k)."""

    distribution: DepthDistribution
    backprop: int | None
    name: str
    describe: dict  # what a checkpoint keeps: the name, every argument as used, backprop

    @property
    def fixed(self) -> bool:
        return isinstance(self.distribution, Fixed)

    def draw(self, seed: int, step: int) -> int | None:
        """The depth of the step logged as ``step``: an integer >= 1, or None (the model's own)."""
        n = self.distribution.draw(seed, step)
        if n is not None and not (_integer(n) and n >= 1):
            raise ValueError(f"depth={self.name!r} drew {n!r} at step {step}; allowed: an integer >= 1 or None "
                             f"(fix {type(self.distribution).__name__}.draw)")
        return n

    def dial(self, depth: int | None):
        """``bertode.dialed(depth=depth, backprop=k)`` for one forward and backward; no dial
        at all where both are None (the model's own depth, every step differentiated)."""
        if depth is None and self.backprop is None:
            return contextlib.nullcontext()
        return dialed(depth=depth, backprop=self.backprop)


def depth_setting(node) -> DepthSetting:
    """The ``depth`` group of a composed config (None: ``fixed``, the model's own depth),
    checked; one line naming ``depth.<key>`` otherwise."""
    values = _plain(node)
    name = values.pop("name", None) or DEPTH_DISTRIBUTIONS.default
    backprop = values.pop("backprop", None)
    if backprop is not None and not (_integer(backprop) and backprop >= 1):
        raise ValueError(f"depth.backprop={backprop!r} is invalid; allowed: null (every step differentiated) or an "
                         "integer >= 1 (differentiate the last k)")
    distribution = make_depth_distribution(name, **values)
    return DepthSetting(distribution, backprop, name, {"name": name, **distribution.settings, "backprop": backprop})


def exit_criterion(node):
    """The ``exit`` group of a composed config: the built criterion, or None where it stops no
    token (``exit=none``, the default)."""
    values = _plain(node)
    name = values.pop("name", None) or EXIT_CRITERIA.default
    threshold = values.pop("threshold", None)
    if name not in EXIT_CRITERIA:
        allowed = ", ".join(repr(n) for n in EXIT_CRITERIA.names())
        raise ValueError(f"exit={name!r} is invalid; allowed: {allowed}")
    if threshold is not None and not (_number(threshold) and threshold >= 0):
        raise ValueError(f"exit.threshold={threshold!r} is invalid; allowed: a number >= 0")
    kwargs = {k: v for k, v in values.items() if v is not None}
    return make_exit_criterion(name, **({"threshold": threshold} if threshold is not None else {}), **kwargs)


def iterated(fields: dict) -> bool:
    """Whether a model (its config fields) iterates its depth: a DEQ, or a weight-tied looped core."""
    return fields.get("mode", "ode") == "deq" or bool(fields.get("weight_tying"))


def _model(fields: dict) -> str:
    return f"the model's mode={fields.get('mode', 'ode')!r} with weight_tying={bool(fields.get('weight_tying'))}"


def check_backprop(backprop: int, fields: dict) -> None:
    """``depth.backprop`` needs a gradient that takes it: a looped core's (any mode but DEQ), a DEQ's
    ``unrolled``/``phantom`` or a fixed-step ODE's ``autograd`` on torchdyn (adjoints, the IFT and
    torchdiffeq's steps would ignore or change it); one line otherwise."""
    mode, tied = fields.get("mode", "ode"), bool(fields.get("weight_tying"))
    if mode == "discrete" or (mode == "ode" and tied):
        return
    sensitivity = fields.get("sensitivity") or default_sensitivity(mode)
    if sensitivity in SENSITIVITIES and not getattr(SENSITIVITIES[sensitivity], "takes_backprop", False):
        takes = ", ".join(repr(n) for n in available_sensitivities(mode) if getattr(SENSITIVITIES[n], "takes_backprop", False))
        raise ValueError(f"depth.backprop={backprop!r} is invalid with sensitivity={sensitivity!r}: it does not "
                         f"backpropagate through the steps; allowed: null, or sensitivity={takes}")
    if mode == "ode" and fields.get("ode_backend", "torchdyn") != "torchdyn":
        raise ValueError(f"depth.backprop={backprop!r} is invalid with solver.ode_backend="
                         f"{fields.get('ode_backend')!r}: the truncated solve steps with torchdyn's solvers; "
                         "allowed: null, or solver.ode_backend=torchdyn")


def check_for_model(setting: DepthSetting, fields: dict, criterion=None) -> None:
    """A dialled depth needs a depth to dial (not a discrete untied model, nor an untied ODE
    whose adaptive solver chooses its steps), an exit criterion an iterated one (a DEQ or a
    weight-tied core); one line otherwise."""
    if criterion is not None and not iterated(fields):
        raise ValueError(f"exit={criterion.registry_name!r} is invalid for {_model(fields)}: exit applies to DEQ "
                         "(mode='deq') and weight-tied (looped, weight_tying=true) models, whose depth is iterated; "
                         "allowed: exit=none")
    mode, tied = fields.get("mode", "ode"), bool(fields.get("weight_tying"))
    solver = fields.get("solver")
    adaptive = mode == "ode" and not tied and solver in SOLVERS and SOLVERS[solver].adaptive
    if setting.backprop is not None:
        check_backprop(setting.backprop, fields)
    if (mode != "discrete" or tied) and not adaptive:
        return
    if not setting.fixed:
        typed = f"depth={setting.name!r}"
    elif setting.distribution.draw(0, 0) is not None:
        typed = f"depth.steps={setting.distribution.draw(0, 0)!r}"
    elif setting.backprop is not None:
        typed = f"depth.backprop={setting.backprop!r}"
    else:
        return
    if adaptive:
        raise ValueError(f"{typed} is invalid with solver={solver!r}: an adaptive solver chooses its own steps "
                         "(solver.atol, solver.rtol), so an untied ODE has no depth to dial; allowed: a fixed-step "
                         "solver (solver=euler, rk4, ...), or depth=fixed with depth.steps=null and depth.backprop=null")
    raise ValueError(f"{typed} is invalid for {_model(fields)}: nothing is iterated (its depth is its layers); "
                     "allowed: depth=fixed with depth.steps=null and depth.backprop=null, or an ODE, DEQ or "
                     "weight-tied model")


def inference_dial(cfg, fields: dict, command: str):
    """evaluate's and generate's dial: ``depth=fixed depth.steps=N`` and ``exit=``, checked against
    the model (``fields``: the checkpoint's config with the command line's changes); returns
    (depth, criterion) to dial around every forward."""
    setting = depth_setting(cfg.get("depth"))
    if not setting.fixed:
        raise ValueError(f"depth={setting.name!r} is invalid for bertode.{command}: a distribution is drawn per "
                         "training step; allowed: depth=fixed with depth.steps=N (the depth of every forward)")
    if setting.backprop is not None:
        raise ValueError(f"depth.backprop={setting.backprop!r} is invalid for bertode.{command}: nothing is "
                         "differentiated; allowed: null")
    criterion = exit_criterion(cfg.get("exit"))
    check_for_model(setting, fields, criterion)
    return setting.distribution.draw(0, 0), criterion


def inference_dialed(depth: int | None, criterion):
    """The dial around evaluate's and generate's forwards (none where there is nothing to dial)."""
    changes = {k: v for k, v in (("depth", depth), ("exit", criterion)) if v is not None}
    return dialed(**changes) if changes else contextlib.nullcontext()
