"""The sensitivity registry: ``sensitivity=<name>`` resolves here, for both families.

A sensitivity method is one object that decides how a solve is differentiated (the
gradient path of its solution). It belongs to one family, and a method of the other
family is refused by the config:

* `ODESensitivity` (``family = "ode"``): called with an `ODEProblem` (`ode.py`), returns
  z(t1). Built in: ``autograd``, ``adjoint``, ``interpolated_adjoint`` (`ode_sensitivities.py`).
* `DEQSensitivity` (``family = "deq"``): called with a `FixedPointProblem` (`deq_sensitivities.py`),
  returns z* with its gradient path. Built in: ``ift``, ``phantom``, ``unrolled``.

Register your own with ``@bertode.register_sensitivity("name")`` on a subclass. A method is
built from the model config by ``from_config(config)``: constructor arguments named in
``config_fields`` (argument -> `BertODEConfig` field) are read from the config, the rest
come from ``config.sensitivity_kwargs`` (``sensitivity.kwargs.<name>`` on the command
line). ``validate(config)`` may refuse pairings (raise ValueError naming the fields).
"""

from __future__ import annotations

import abc

from ..registry import Registry

class SensitivityMethod(abc.ABC):
    """Base of both families; ``registry_name`` is set by `register_sensitivity`."""

    family: str = ""
    registry_name: str = ""
    config_fields: dict[str, str] = {}
    takes_backprop: bool = False  # whether the depth dial's backprop=k changes this method's gradient

    @classmethod
    def from_config(cls, config) -> "SensitivityMethod":
        own = {argument: getattr(config, field) for argument, field in cls.config_fields.items()}
        return cls(**own, **(getattr(config, "sensitivity_kwargs", None) or {}))

    def validate(self, config) -> None:
        """Raise ValueError (naming the fields) for a config this method cannot serve."""

    @abc.abstractmethod
    def __call__(self, problem):
        """The solution of ``problem``, with the gradient path this method defines."""

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


class ODESensitivity(SensitivityMethod):
    """How an ODE solve is differentiated.

    ``reevaluates_field``: the backward pass evaluates the vector field again (adjoints):
    such methods need attention-probability dropout off and cannot sit under a block.
    ``traceable``: a fixed-step solve traces into one ``torch.compile`` graph.
    ``backends``: the ``ode_backend`` values the method supports.
    """

    family = "ode"
    reevaluates_field: bool = False
    traceable: bool = False
    backends: tuple[str, ...] = ("torchdyn",)


class DEQSensitivity(SensitivityMethod):
    """How a fixed-point solve is differentiated (see `deq_sensitivities.FixedPointProblem`).

    ``solves_fixed_point``: the output is a solved z* (the Jacobian penalty and the
    spectral radius are taken there); False for methods that return an unrolled iterate."""

    family = "deq"
    solves_fixed_point: bool = True


SENSITIVITIES = Registry("sensitivity method", "sensitivity", base=(ODESensitivity, DEQSensitivity),
                         decorator="register_sensitivity")
_DEFAULTS: dict[str, str] = {}


def register_sensitivity(name: str, *, default: bool = False):
    """Class decorator: make an `ODESensitivity`/`DEQSensitivity` subclass selectable as
    ``sensitivity=name``; ``default=True`` makes it its family's default."""

    def decorate(cls):
        SENSITIVITIES.register(name, cls)
        if default:
            _DEFAULTS[cls.family] = name
        return cls

    return decorate


def available_sensitivities(family: str | None = None) -> tuple[str, ...]:
    return tuple(n for n, cls in SENSITIVITIES.items() if family is None or cls.family == family)


def default_sensitivity(family: str) -> str:
    return _DEFAULTS[family]


def get_sensitivity(name: str) -> type[SensitivityMethod]:
    return SENSITIVITIES[name]


def build_sensitivity(config) -> SensitivityMethod:
    """The sensitivity method ``config.sensitivity`` names, built from the config."""
    return get_sensitivity(config.sensitivity).from_config(config)
