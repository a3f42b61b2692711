#!/usr/bin/env bash
# Download, on a machine with PyPI, the pure-Python wheels that bertode's model code needs
# and a GPU image with torch and transformers lacks (torchdyn and what its imports load),
# into .whl/ (git-ignored). scripts/gpu_benchmarks.sh installs them from there, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
  torchdyn==1.0.6 torchcde==0.2.5 torchsde==0.2.6 trampoline==0.1.2 dill hydra-core==1.3.2 omegaconf==2.3.1 transformers==5.24.0
# antlr4 (hydra's parser) is only an sdist: build its pure-Python wheel here
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls .whl
