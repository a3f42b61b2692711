"""Stand-in for transformers' tests/utils package (not in the PyPI sdist)."""
