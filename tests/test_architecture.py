"""The package's shape: every registered name is written once (where it is registered),
the numerics do not import the model, the layers import only the numerics and the registry, the top level holds
only the commands and the public face, imports (also those inside functions, but for documented lazy ones) have no
cycle, no module outgrows one idea (about 300 lines), and the model and its heads never branch on the mode."""

import ast
import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import bertode

PACKAGE = Path(bertode.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))
# `python -m bertode.demo` is a tour written as user code: it uses names like a user does.
DEFINING_SOURCES = [p for p in SOURCES if p.name != "demo.py"]
# Hydra recipes (experiment/*.yaml) name choices the way a user does; they are configs that
# use the registries, not places that define names.
CONFIG_FILES = sorted(p for p in (PACKAGE / "configs").rglob("*.yaml") if p.parent.name != "experiment")


def _string_constants(path: Path):
    """(line, value) of every string literal that is not a docstring or part of an f-string."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))
        if isinstance(node, ast.JoinedStr):
            skip.update(id(value) for value in node.values)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip]


def _places(name: str) -> set:
    places = set()
    for path in DEFINING_SOURCES:
        places |= {(path.relative_to(PACKAGE), line) for line, value in _string_constants(path) if value == name}
    for path in CONFIG_FILES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            text = line.split("#", 1)[0]
            if any(token.strip(" '\"[],") == name for token in text.replace(":", " ").split()):
                places.add((path.relative_to(PACKAGE), number))
    return places


def _package_names() -> dict:
    """The package's own registrations (a fresh process: none of the tests' own)."""
    code = "import json, bertode; print(json.dumps(bertode.available()))"
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_every_registered_name_is_written_once_per_registry():
    available = _package_names()
    axes = Counter(name for names in available.values() for name in names)
    assert {"solver", "sensitivity", "block", "deq_solver", "vector_field"} <= set(available)
    too_many = {}
    for name, registries in axes.items():
        places = _places(name)
        if len(places) != registries:
            too_many[name] = sorted(map(str, places))
    assert not too_many, too_many


def test_the_name_check_can_fail():
    """The oracle finds a name written twice: 'ode' is a mode, written in several places."""
    assert len(_places("ode")) > 1


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """bertode modules imported by ``path`` (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "bertode":
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists() else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "bertode"}
    return found - {module}


def test_numerics_do_not_import_the_model_or_the_app():
    for path in sorted((PACKAGE / "solve").glob("*.py")):
        outside = {m for m in _imports(path, top_level_only=False)
                   if not m.startswith("bertode.solve") and m != "bertode.registry"}
        assert not outside, (path.name, outside)


def test_layers_import_only_the_numerics_and_the_registry():
    """bertode/layers/ sits under the public face: it never imports configuration, modeling, heads or the app."""
    for path in sorted((PACKAGE / "layers").glob("*.py")):
        outside = {m for m in _imports(path, top_level_only=False)
                   if not m.startswith(("bertode.layers", "bertode.solve")) and m != "bertode.registry"}
        assert not outside, (path.name, outside)


# The top level is the public face: the commands (python -m bertode.X) and the modules a user imports. The
# layers live in layers/, the numerics in solve/, the CLI app in training/ (its Hydra files in configs/); a new
# module goes into one of those.
COMMANDS = {"train", "evaluate", "finetune", "generate", "prepare", "report", "choices", "demo"}
PUBLIC_FACE = {"__init__", "configuration", "modeling", "heads", "causal_lm", "convert", "families", "compile",
               "callbacks", "analysis", "registry", "validation"}
SUBPACKAGES = {"layers", "solve", "training", "configs"}


def _strays(names: set[str]) -> set[str]:
    """Top-level module and package names that are neither a command, the public face nor a known subpackage."""
    return names - COMMANDS - PUBLIC_FACE - SUBPACKAGES


def test_the_top_level_is_the_commands_and_the_public_face():
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert not _strays(modules | packages), sorted(_strays(modules | packages))
    assert SUBPACKAGES <= packages, sorted(SUBPACKAGES - packages)


def test_the_top_level_check_can_fail():
    """A layer module put back at the top level (or any new one) is found."""
    planted = {path.stem for path in PACKAGE.glob("*.py")} | {"deq", "vector_fields"}
    assert _strays(planted) == {"deq", "vector_fields"}


# Documented lazy imports back (importer -> imported), each inside one function: from_pretrained converts another
# family's directory with `convert.load_foreign`, and convert.py builds on modeling.py's classes.
LAZY_IMPORTS_BACK = {("bertode.modeling", "bertode.convert")}


def test_imports_are_acyclic():
    graph = {_module_name(path): _imports(path, top_level_only=False) for path in SOURCES}
    for importer, imported in LAZY_IMPORTS_BACK:  # the allowance stays exact: an import inside a function only
        top_level = _imports(PACKAGE / (importer.split(".", 1)[1].replace(".", "/") + ".py"), top_level_only=True)
        assert imported in graph[importer] and imported not in top_level, (importer, imported)
        graph[importer] = graph[importer] - {imported}
    state: dict = defaultdict(int)  # 0 new, 1 on the stack, 2 done

    def visit(module, stack):
        state[module] = 1
        for target in graph.get(module, ()):
            assert state[target] != 1, " -> ".join(stack + [target])
            if state[target] == 0:
                visit(target, stack + [target])
        state[module] = 2

    for module in graph:
        if state[module] == 0:
            visit(module, [module])


def test_no_module_outgrows_one_idea():
    """About 300 lines is a guideline (a module past it should be read for a second idea),
    not a wall that bends the code; 400 is the wall."""
    sizes = {str(path.relative_to(PACKAGE)): len(path.read_text(encoding="utf-8").splitlines()) for path in SOURCES}
    assert max(sizes.values()) <= 400, {k: v for k, v in sizes.items() if v > 400}


# The model and its heads leave every mode-dependent choice to the encoder (`deq.build_encoder`, `encoder.Encoder`).
MODE_FREE = ("modeling.py", "heads.py", "causal_lm.py")
MODE_BRANCH = re.compile(r"mode ==|mode in|\.mode\b")


def _mode_branches(source: str) -> list[str]:
    return [line.strip() for line in source.splitlines() if MODE_BRANCH.search(line)]


def test_the_model_and_its_heads_do_not_branch_on_the_mode():
    found = {name: _mode_branches((PACKAGE / name).read_text(encoding="utf-8")) for name in MODE_FREE}
    assert not any(found.values()), found


def test_the_mode_check_can_fail():
    planted = (PACKAGE / "modeling.py").read_text(encoding="utf-8") + '\nif self.config.mode == "deq":\n    pass\n'
    assert 'if self.config.mode == "deq":' in _mode_branches(planted)
