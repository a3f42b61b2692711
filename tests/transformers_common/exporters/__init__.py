"""Stand-in for transformers' tests/exporters package (not in the PyPI sdist)."""
