"""What the command-line entry points (`train`, `evaluate`) share: Hydra wiring with the
configs shipped inside the package (so a wheel install works) and the registry-backed
groups (`groups.py`), user plugins, a check of group choices before Hydra runs, and
one-line errors with exit status 2 for bad input.

``plugins=[my_module,other]`` (or ``BERTODE_PLUGINS=my_module,other``) imports those
modules before the config is composed, so what they register (a solver, a gradient
method, a block, a vector field, a fixed-point solver, a depth distribution, an exit
criterion) is a choice on the command line.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def import_plugins(modules) -> None:
    """Import each named module (its registrations take effect); one line if one is missing."""
    for name in modules or []:
        name = str(name).strip()
        if not name:
            continue
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ValueError(f"plugins={name!r} is invalid: {error}; allowed: importable module names "
                             "(on PYTHONPATH)") from None


def plugins_from_argv(argv: list[str]) -> list[str]:
    names = [n for n in os.environ.get("BERTODE_PLUGINS", "").split(",") if n.strip()]
    for argument in argv:
        if argument.startswith(("plugins=", "+plugins=")):
            value = argument.split("=", 1)[1].strip()
            names += [n.strip(" '\"") for n in value.strip("[]").split(",") if n.strip(" '\"")]
    return names


def group_options(group: str) -> list[str]:
    from .groups import group_choices

    choices = group_choices(group)
    if choices is not None:
        return choices
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def config_groups() -> list[str]:
    from .groups import DIAL_GROUPS, REGISTRY_GROUPS

    files = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and not p.name.startswith("_")}
    return sorted(files | set(REGISTRY_GROUPS) | {"deq"} | set(DIAL_GROUPS))


def command_groups(config_name: str) -> list[str]:
    """The config groups ``python -m bertode.<config_name>`` takes: its defaults list's."""
    from omegaconf import OmegaConf

    groups = []
    for entry in OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml")).get("defaults", []):
        if isinstance(entry, dict):
            key = next(iter(entry)).removeprefix("optional ").strip()
            if not key.startswith(("override ", "hydra")):
                groups.append(key)
    return groups


def print_help(config_name: str, command_doc: str) -> None:
    """``--help``: what the command is, the groups it takes (with their choices) and its own keys."""
    from omegaconf import OmegaConf

    from .groups import store_groups

    store_groups()
    print(command_doc.strip().split("\n\n")[0].strip())
    print(f"\nusage: python -m bertode.{config_name} [group=choice] [key=value ...]  (Hydra overrides; -m sweeps)")
    groups = command_groups(config_name)
    print("\nconfig groups (group=choice; <group>.<key>=value sets one of its keys, null: as before):")
    for group in groups:
        print(f"  {group}: {', '.join(group_options(group))}")
    own = OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml")
    for key in ("defaults", "hydra"):
        own.pop(key, None)
    print("\nkeys (key=value):")
    print("  " + OmegaConf.to_yaml(own).strip().replace("\n", "\n  "))
    print("\nSee the README's config reference; --cfg job prints the composed config.")


def check_group_choices(argv: list[str], config_name: str | None = None) -> None:
    """``solver=heun3`` fails here in one line, not in Hydra's multi-line composition error.
    A plain key of the command's own config (``model=DIR`` for finetune) is not a group.
    An old spelling (``solver.name=rk4``, finetune's ``solve.steps=2``) is refused naming
    today's (``solver=rk4``, ``solver.steps=2``: every command spells a setting alike)."""
    from omegaconf import OmegaConf

    from .run_config import renamed

    old = renamed([a for a in argv if not a.startswith("-")])
    if old:
        _fail(old)
    plain = set()
    if config_name is not None:
        # a section that shares a group's name (evaluate's model.mem_len) is no group there: model=deq stays refused
        raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml"))
        plain = {k for k, v in raw.items() if k != "defaults" and not isinstance(v, dict)}
    groups = [g for g in config_groups() if g not in plain]
    own = command_groups(config_name) if config_name is not None else groups
    for argument in argv:
        if argument.startswith(("-", "+", "~")) or "=" not in argument:
            continue
        key, value = argument.split("=", 1)
        if "." in key or "/" in key or key not in groups:
            continue
        if key not in own:
            _fail(f"{argument} is invalid for bertode.{config_name}: it takes no {key} group; allowed groups: "
                  f"{', '.join(own)} (python -m bertode.{config_name} --help)")
        for choice in value.split(","):
            if choice.startswith(("range(", "choice(", "glob(")) or choice == "null":
                continue
            options = group_options(key)
            if choice not in options:
                _fail(f"{key}={choice!r} is invalid; allowed: {', '.join(repr(o) for o in options)}")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def usage_errors():
    """Turn a bad-input ValueError (config, data) into one line on stderr and exit 2."""
    try:
        yield
    except ValueError as error:
        _fail(str(error).splitlines()[0] if str(error) else type(error).__name__)


def hydra_entry(config_name: str, task, precheck=None, distributed: bool = False, prerun=None, lock: bool = True):
    """``main()`` for ``python -m bertode.<config_name>``: import plugins, store the
    registry groups, check group choices and overrides, run ``precheck(cfg)`` (the checks
    that need no data) on the composed config, and only then hand over to Hydra, which
    creates the run directory and runs ``task(cfg, run_dir)``. A ``distributed`` command
    runs on torchrun's other ranks without Hydra (``task(cfg, None)``: rank 0 says where
    to write); the others refuse torchrun in one line.

    Before Hydra writes anything into the run directory (`lock.RunDirectoryCallback`), a
    ``lock`` command takes the directory's lock (`lock.py`: one run per directory; the
    commands whose directory is shared, ``prepare``'s cache and ``generate``'s ``.``, take
    none) and ``prerun(cfg, run_dir)`` runs the checks that need the directory (a resumed
    run's settings). A run refused later (exit status 2) leaves the directory as it found
    it; the lock is released, its file removed, however the run ends."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path="pkg://bertode.configs", config_name=config_name)
    def _run(cfg):
        return task(cfg, Path(HydraConfig.get().runtime.output_dir))

    def main():
        from .groups import store_groups

        if any(a in ("--help", "-h") for a in sys.argv[1:]):
            print_help(config_name, sys.modules[task.__module__].__doc__ or "")
            return None
        with usage_errors():
            import_plugins(plugins_from_argv(sys.argv[1:]))
        store_groups()
        check_group_choices(sys.argv[1:], config_name)
        if not distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _fail(f"torchrun is invalid for bertode.{config_name}: it runs in one process; allowed: "
                  f"python -m bertode.{config_name}")
        worker = int(os.environ.get("RANK", "0")) != 0
        if worker and any(a in ("-m", "--multirun") for a in sys.argv[1:]):
            _fail("-m (a sweep) is invalid under torchrun: each process would run the sweep on its own; "
                  "allowed: one run per torchrun, or a sweep whose launcher starts torchrun")
        cfg = check_overrides(config_name, sys.argv[1:])
        _PRECHECKED.clear()
        if cfg is not None and precheck is not None:
            with usage_errors():
                _PRECHECKED[_config_key(cfg)] = precheck(cfg)
        if worker and cfg is not None:
            # torchrun's other ranks: no Hydra run directory of their own; `task` writes
            # under the directory rank 0 broadcasts.
            return task(cfg, None)
        if cfg is None:  # Hydra's own flags (a sweep: each job's task takes its lock)
            return _run()
        from .lock import guarded_run

        return guarded_run(_run, cfg, prerun, lock)

    return main


_PRECHECKED: dict = {}  # the composed config `hydra_entry` checked (as yaml) -> what its precheck returned


def _config_key(cfg) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg)


def prechecked(cfg, check):
    """``check(cfg)``'s result: the one `hydra_entry` computed before Hydra started when
    ``cfg`` is Hydra's copy of the config it checked (each command checks, and reads its
    checkpoint and task files, once per run), else computed now (a sweep's job, a call from Python)."""
    key = _config_key(cfg)
    if key in _PRECHECKED:
        return _PRECHECKED.pop(key)
    return check(cfg)


def check_overrides(config_name: str, argv: list[str]):
    """Compose the config once before Hydra does, so that an override Hydra cannot apply
    (a key that is not there, a value of the wrong type) fails in one line, exit 2,
    before Hydra writes anything. Sweeps and Hydra's own flags are left to Hydra."""
    if any(argument.startswith("-") for argument in argv):  # Hydra's own flags (-m, -cn, --cfg, ...)
        return None
    overrides = [a for a in argv if "=" in a and not a.lstrip("+~").startswith("hydra")]
    try:
        return compose(config_name, overrides)
    except Exception as error:  # Hydra's and OmegaConf's errors have no common base
        _fail(_override_error(config_name, overrides, error))


def _override_error(config_name: str, overrides: list[str], error: Exception) -> str:
    from omegaconf import DictConfig, OmegaConf

    text = str(error)
    key = text.split("'", 2)[1] if text.startswith("Could not override '") else None
    culprit = next((o for o in overrides if key and o.lstrip("+~").split("=", 1)[0] == key), None)
    if culprit is None:
        return text.splitlines()[0] if text else type(error).__name__
    try:
        others = compose(config_name, [o for o in overrides if o is not culprit])
    except Exception:  # another override is bad too: name the first
        return f"{culprit} is invalid: {text.splitlines()[0]}"
    hint = _nearest_key(others, key)
    if "." not in key:
        return f"{culprit} is invalid: no such key{hint} (give +{culprit} to add one)"
    parent = key.rsplit(".", 1)[0]
    node = OmegaConf.select(others, parent)
    if isinstance(node, DictConfig) and len(node):
        return (f"{culprit} is invalid: no such option{hint}; allowed: "
                f"{', '.join(f'{parent}.{k}' for k in node.keys())}")
    if isinstance(node, DictConfig):
        return f"{culprit} is invalid: {parent} has no keys yet (give +{culprit} to add one)"
    if node is None and parent:
        return f"{culprit} is invalid: {parent} is null here (give +{culprit} to set it)"
    return f"{culprit} is invalid: {' '.join(line.strip() for line in text.splitlines()[1:3])}"


def _nearest_key(cfg, key: str) -> str:
    """`` (did you mean solver.t_end?)`` for the closest existing key: the same name
    elsewhere in the config, else the closest spelling among the parent's keys."""
    import difflib

    from omegaconf import DictConfig

    paths: list[str] = []

    def walk(node, prefix):
        for name in node.keys():
            path = f"{prefix}{name}"
            paths.append(path)
            child = node._get_node(name)
            if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
                walk(child, f"{path}.")

    walk(cfg, "")
    leaf = key.rsplit(".", 1)[-1]
    same_name = [p for p in paths if p.rsplit(".", 1)[-1] == leaf and p != key]
    if same_name:
        return f" (did you mean {same_name[0]}?)"
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [p[len(parent):] for p in paths if p.startswith(parent) and "." not in p[len(parent):]]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.75)
    return f" (did you mean {parent}{close[0]}?)" if close else ""


def compose(config_name: str, overrides: list[str] | tuple = ()):
    """The composed config of ``python -m bertode.<config_name> <overrides>``, for Python
    use (plugins named in the overrides are imported, the groups stored first)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from .groups import store_groups

    import_plugins(plugins_from_argv(list(overrides)))
    store_groups()
    with initialize_config_module("bertode.configs", version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))
