"""`python -m bertode.report DIR [DIR ...] [--out OUT]`: a markdown table and plots of
bertode.train, bertode.evaluate and bertode.finetune runs (`bertode.training.report`)."""

import sys

from .training.report import find_runs, main, table

__all__ = ["find_runs", "main", "table"]

if __name__ == "__main__":
    sys.exit(main())
