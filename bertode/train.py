"""`python -m bertode.train`: language-model training, masked (``objective=mlm``) or causal (``clm``) (the loop is
`bertode.training.loop`; this module keeps the command and the Python entry points).

    cfg = bertode.train.compose(["solver=rk4", "trainer.max_steps=10"])
    bertode.train.train(cfg, run_dir)
"""

from functools import partial

from .training.cli import compose as _compose
from .training.loop import main, train

compose = partial(_compose, "train")
compose.__doc__ = "The composed config of ``python -m bertode.train <overrides>`` (plugins imported)."

__all__ = ["compose", "main", "train"]

if __name__ == "__main__":
    main()
