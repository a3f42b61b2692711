"""The README stays true and short: its group table covers every config group and option,
its choices tables are the registries' (`python -m bertode.choices`), every
`BertODEConfig` field is documented, its vector-field example runs as written, and it
stays a user's guide (design notes live in docs/)."""

import re
import subprocess
import sys
from pathlib import Path

import torch

import bertode
from bertode.training.cli import config_groups, group_options
from bertode.training.groups import REGISTRY_GROUPS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _table_rows(header: str) -> dict:
    start = README.index(header)
    rows = {}
    for line in README[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for group in re.findall(r"`(\w+)`", cells[0]):
            rows[group] = " ".join(cells[1:])
    return rows


def test_cli_group_table_lists_every_group_and_option():
    rows = _table_rows("| group | options | sets |")
    assert sorted(rows) == config_groups()
    for group in config_groups():
        if group in REGISTRY_GROUPS:
            assert "registered" in rows[group], group  # options: the choices tables below
            continue
        named = set(re.findall(r"`([\w.]+)`", rows[group]))
        missing = set(group_options(group)) - named
        assert not missing, (group, missing)


def test_choices_tables_are_the_registries():
    """Run in a fresh process: the tables of a user who registered nothing."""
    tables = subprocess.run([sys.executable, "-m", "bertode.choices"], capture_output=True, text=True, check=True).stdout
    block = README[README.index("<!-- choices:begin -->") + len("<!-- choices:begin -->"):README.index("<!-- choices:end -->")]
    assert block.strip() == tables.strip()
    assert all(f"`{name}`" in block for name in ("euler", "dopri5", "adjoint", "ift", "rk2_gated", "anderson", "add_norm"))


def test_every_bertode_config_field_is_documented():
    own = set(bertode.BertODEConfig.__dataclass_fields__) - set(bertode.BertODEConfig.__mro__[1].__dataclass_fields__)
    documented = set(re.findall(r"`(\w+)`", README))
    assert own and not own - documented, own - documented


def test_the_readme_is_a_users_guide():
    assert len(README.splitlines()) <= 230  # a user's guide for three commands; design notes are in docs/
    for doc in ("docs/architecture.md", "docs/extending.md", "docs/solve.md", "docs/testing.md", "docs/results.md"):
        assert (ROOT / doc).is_file() and doc in README + (ROOT / "docs" / "architecture.md").read_text()


def test_vector_field_example_runs_as_written():
    block = README[README.index("### Adding a vector field"):]
    code = block[block.index("```python") + len("```python"):block.index("```", block.index("```python") + 3)]
    code = code.replace('"scaled_residual"', '"readme_scaled_residual"')  # the registry test owns the README name
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    model = namespace["model"]
    field = model.encoder.layer[0].attention.field
    assert type(field).__name__ == "ScaledResidual" and field.scale.item() == 0.5
    out = model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert out.last_hidden_state.shape == (1, 4, model.config.hidden_size)
