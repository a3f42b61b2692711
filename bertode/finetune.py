"""`python -m bertode.finetune`: fine-tuning on labelled data with `transformers.Trainer`
(the command lives in `bertode.training.finetune`).

    cfg = bertode.finetune.compose(["task.source=files", "task.train_file=a.csv", ...])
    bertode.finetune.run(cfg, run_dir)
"""

from functools import partial

from .training.cli import compose as _compose
from .training.finetune import main, run

compose = partial(_compose, "finetune")
compose.__doc__ = "The composed config of ``python -m bertode.finetune <overrides>`` (plugins imported)."

__all__ = ["compose", "main", "run"]

if __name__ == "__main__":
    main()
