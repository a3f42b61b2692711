"""The training application: `python -m bertode.train` / `python -m bertode.evaluate`,
the Hydra groups built from the registries, data, checkpoints, logging. The model and
the numerics never import from here."""
