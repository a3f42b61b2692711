"""What the command-line entry points (`train`, `evaluate`) share: Hydra wiring with the
configs shipped inside the package (so a wheel install works), a check of config-group
choices before Hydra runs, and one-line errors with exit status 2 for bad input."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def check_group_choices(argv: list[str]) -> None:
    """``solver=heun`` fails here in one line, not in Hydra's multi-line composition error."""
    for argument in argv:
        if argument.startswith(("-", "+", "~")) or "=" not in argument:
            continue
        key, value = argument.split("=", 1)
        if "." in key or "/" in key or not (CONFIG_DIR / key).is_dir():
            continue
        for choice in value.split(","):
            if choice.startswith(("range(", "choice(", "glob(")) or choice == "null":
                continue
            if not (CONFIG_DIR / key / f"{choice}.yaml").is_file():
                options = ", ".join(repr(o) for o in group_options(key))
                _fail(f"{key}={choice!r} is invalid; allowed: {options}")


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


def hydra_entry(config_name: str, task):
    """``main()`` for ``python -m bertode.<config_name>``: check group choices, then run
    ``task(cfg, run_dir)`` under Hydra with the packaged configs."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path="configs", config_name=config_name)
    def _run(cfg):
        return task(cfg, Path(HydraConfig.get().runtime.output_dir))

    def main():
        check_group_choices(sys.argv[1:])
        return _run()

    return main
