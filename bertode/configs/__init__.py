"""Hydra configs of `python -m bertode.train` and `python -m bertode.evaluate` (package data)."""
