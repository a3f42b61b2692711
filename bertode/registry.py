"""`Registry`: one name -> one choice, for every axis a user can extend.

Every axis of bertode (vector fields, ODE solvers, sensitivity methods, ODE-Transformer
blocks, fixed-point solvers) keeps one `Registry` beside its code and exposes its
``register`` method as a public decorator (``bertode.register_solver`` and so on).
Config validation, the Hydra config groups, ``bertode.available()`` and the README
tables all read the registries, so a name is written once: where it is registered.

The module imports nothing from bertode, so numerics and model code can both use it.
"""

from __future__ import annotations

from typing import Any, Callable

_ALL: dict[str, "Registry"] = {}


class Registry:
    """Names of one axis mapped to their entries (classes or spec objects).

    ``axis`` is the human name used in errors (``"ODE solver"``), ``field`` the config
    field that chooses from it (``"solver"``); ``check`` (optional) validates an entry at
    registration and may return a replacement (e.g. a spec built from a class), or
    ``base`` requires subclasses of it (``decorator`` names the public decorator in the
    error); ``default`` names the entry a config gets when it does not choose.
    """

    def __init__(self, axis: str, field: str, check: Callable[[str, Any], Any] | None = None,
                 base: type | tuple | None = None, decorator: str = ""):
        self.axis, self.field = axis, field
        self._check = check if check is not None else (self._subclass_check(base, decorator) if base else None)
        self._entries: dict[str, Any] = {}
        self.default: str | None = None
        _ALL[field] = self

    @staticmethod
    def _subclass_check(base, decorator: str):
        """Entries are subclasses of ``base``; each learns its name (``registry_name``; a
        class registered twice keeps its first)."""
        bases = base if isinstance(base, tuple) else (base,)

        def check(name, cls):
            if not (isinstance(cls, type) and issubclass(cls, bases)):
                wanted = " or ".join(f"bertode.{b.__name__}" for b in bases)
                raise TypeError(f"{decorator}({name!r}) needs a {wanted} subclass, got {cls!r}")
            if not cls.__dict__.get("registry_name"):
                cls.registry_name = name
            return cls

        return check

    def register(self, name: str, entry: Any = None, *, default: bool = False):
        """``@registry.register("name")`` on a class, or ``registry.register("name", entry)``."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"register: {self.axis} name {name!r} is invalid; allowed: a Python identifier")

        def decorate(obj):
            stored = self._check(name, obj) if self._check is not None else obj
            if name in self._entries and self._entries[name] is not stored and not _same(self._entries[name], stored):
                raise ValueError(f"{self.axis} {name!r} is already registered to {_describe(self._entries[name])}")
            self._entries[name] = stored
            if default:
                self.default = name
            return obj

        return decorate if entry is None else decorate(entry)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __getitem__(self, name: str):
        if name not in self._entries:
            raise KeyError(f"{self.axis} {name!r} is not registered; registered: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def items(self):
        return sorted(self._entries.items())

    def invalid(self, field: str, value: Any, owner: str = "BertODEConfig") -> ValueError:
        """The one-line error for a name that is not registered."""
        allowed = ", ".join(repr(n) for n in self.names())
        return ValueError(f"{owner}.{field}={value!r} is invalid; allowed: {allowed} (registered {self.axis}s)")


def _same(a, b) -> bool:
    """Re-registering the same thing (a module imported twice, a notebook cell re-run) is fine."""
    key = getattr(a, "same_as", None)
    if callable(key):
        return key(b)
    return getattr(a, "__qualname__", None) is not None and (a.__module__, a.__qualname__) == (
        getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def _describe(entry) -> str:
    return getattr(entry, "__qualname__", None) or repr(entry)


def registries() -> dict[str, Registry]:
    """Every registry, by the config field that chooses from it."""
    return dict(_ALL)
