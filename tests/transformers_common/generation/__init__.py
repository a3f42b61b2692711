"""Stand-in for transformers' tests/generation package (not in the PyPI sdist)."""
