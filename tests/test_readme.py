"""The README stays true: its config tables match the config tree and `BertODEConfig`,
and its vector-field example runs as written."""

import re
from pathlib import Path

import torch

import bertode
from bertode.training.cli import CONFIG_DIR, group_options

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _table_rows(header: str) -> dict:
    start = README.index(header)
    rows = {}
    for line in README[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = " ".join(cells[1:])
    return rows


def test_cli_group_table_lists_every_group_and_option():
    rows = _table_rows("| group | options | sets |")
    groups = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and not p.name.startswith("_"))
    assert sorted(rows) == groups
    for group in groups:
        named = set(re.findall(r"`([\w.]+)`", rows[group]))
        missing = set(group_options(group)) - named
        assert not missing, (group, missing)


def test_every_bertode_config_field_is_documented():
    own = set(bertode.BertODEConfig.__dataclass_fields__) - set(bertode.BertODEConfig.__mro__[1].__dataclass_fields__)
    documented = set(re.findall(r"`(\w+)`", README))
    assert own and not own - documented, own - documented


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
