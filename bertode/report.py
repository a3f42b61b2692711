"""`python -m bertode.report DIR [DIR ...] [--out OUT]`: a markdown table and plots of
bertode.train, bertode.evaluate and bertode.finetune runs, and the saturation fit of depth
curves (`bertode.training.report`)."""

import sys

from .training.report import depth_curves, extrapolation_ratio, find_runs, fit_saturation, main, table

__all__ = ["depth_curves", "extrapolation_ratio", "find_runs", "fit_saturation", "main", "table"]

if __name__ == "__main__":
    sys.exit(main())
