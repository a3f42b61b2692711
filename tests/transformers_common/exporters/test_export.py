"""Stand-in for transformers' tests/exporters/test_export.py, which the PyPI sdist lacks and
test_modeling_common.py imports: ``ExportTesterMixin`` (torch.export tests) with no tests.
torch.export is a feature transformers marks optional per model (``test_torch_exportable``)."""


class ExportTesterMixin:
    """No torch.export tests (see the module docstring)."""
