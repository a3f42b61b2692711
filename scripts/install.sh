#!/usr/bin/env bash
# Install bertode and what it needs into the active Python environment; safe to rerun.
#  * torch: kept if present (bring your CUDA build on a GPU machine); otherwise the
#    CPU build torch==2.13.0.
#  * torchdyn 1.0.6 without its declared dependencies (they would pull torchvision and a
#    CUDA torch); setup.cfg declares what its imports need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
"$PY" -c "import torchdyn" 2>/dev/null || pip_install --no-deps "torchdyn==1.0.6"
pip_install -e ".[test]"
