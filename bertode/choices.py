"""`python -m bertode.choices`: every registered choice, as the README's tables.

Reads the registries (with whatever ``plugins`` registered: ``python -m bertode.choices
my_module``), so the tables cannot drift from the code; tests/test_readme.py checks that
the README holds exactly this output.
"""

from __future__ import annotations

import argparse
import importlib

from .layers.blocks import BLOCKS
from .layers.regularizers import REGULARIZERS
from .configuration import BertODEConfig
from .solve.fixed_point import FIXED_POINT_SOLVERS
from .solve.sensitivities import SENSITIVITIES, default_sensitivity
from .solve.solvers import SOLVERS
from .layers.vector_fields import VECTOR_FIELDS


def _names(registry, default=None) -> str:
    default = default or registry.default
    return ", ".join(f"`{n}`" + (" (default)" if n == default else "") for n in registry.names())


def markdown_tables() -> str:
    lines = ["| axis (CLI group) | `BertODEConfig` field | registered | add your own |", "|---|---|---|---|",
             f"| `solver` | `solver` | {_names(SOLVERS)} | `bertode.register_solver` |",
             f"| `sensitivity` (mode=ode) | `sensitivity` | "
             f"{', '.join(f'`{n}`' for n, c in SENSITIVITIES.items() if c.family == 'ode')} "
             f"(default `{default_sensitivity('ode')}`) | `bertode.register_sensitivity` |",
             f"| `sensitivity` (mode=deq) | `sensitivity` | "
             f"{', '.join(f'`{n}`' for n, c in SENSITIVITIES.items() if c.family == 'deq')} "
             f"(default `{default_sensitivity('deq')}`) | `bertode.register_sensitivity` |",
             f"| `vector_field` | `vector_field` | {_names(VECTOR_FIELDS)} | `bertode.register_vector_field` |",
             f"| `block` | `block` | {_names(BLOCKS)} | `bertode.register_block` |",
             f"| `regularizer` (mode=ode) | `regularizer` | {_names(REGULARIZERS)} | `bertode.register_regularizer` |",
             f"| `deq.solver`, `deq.backward_solver` | `deq_solver`, `deq_backward_solver` | {_names(FIXED_POINT_SOLVERS)} "
             "| `bertode.register_fixed_point_solver` |",
             "", "| solver | steps | order | torchdiffeq peer |", "|---|---|---|---|"]
    for name, spec in SOLVERS.items():
        kind = "adaptive (`atol`, `rtol`)" if spec.adaptive else "fixed (`steps`)"
        lines.append(f"| `{name}` | {kind} | {spec.order} | {f'`{spec.torchdiffeq}`' if spec.torchdiffeq else '—'} |")
    lines += ["", "| sensitivity | family | re-evaluates the field | backends |", "|---|---|---|---|"]
    for name, method in SENSITIVITIES.items():
        backends = ", ".join(getattr(method, "backends", ())) or "—"
        again = "yes" if getattr(method, "reevaluates_field", False) else "no"
        lines.append(f"| `{name}` | {method.family} | {again if method.family == 'ode' else '—'} | {backends} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bertode.choices",
        description="Print every registered choice (solvers, sensitivities, vector fields, blocks, regularizers, "
                    "fixed-point solvers) as the README's markdown tables.")
    parser.add_argument("plugins", nargs="*", metavar="MODULE",
                        help="modules to import first, so that their registrations are listed (as plugins=[...])")
    for module in parser.parse_args(argv).plugins:
        try:
            importlib.import_module(module)
        except ImportError as error:
            parser.exit(2, f"error: plugin {module!r} cannot be imported: {error}\n")
    BertODEConfig()  # the registries are complete once the model's modules are imported
    print(markdown_tables())


if __name__ == "__main__":
    main()
