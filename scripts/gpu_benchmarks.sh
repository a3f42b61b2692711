#!/usr/bin/env bash
# Issue 6's GPU measurements in one command (about 10 minutes on one H100):
#   bash scripts/gpu_benchmarks.sh            # writes $OUT (default results/) and logs
# On a machine without network, first run scripts/gpu_wheels.sh where PyPI is reachable
# and bring .whl/ along; its wheels are installed into /tmp/site. SIZE, DEVICE and DTYPE
# override base / cuda / bf16 (SIZE=tiny DEVICE=cpu DTYPE=fp32 is a quick dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results}; SIZE=${SIZE:-base}; DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-bf16}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import torchdyn.core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
tag="${DEVICE}_${SIZE}_${DTYPE}"
python3 -c "import torch, transformers, bertode; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
if [ "$DEVICE" = cuda ]; then  # a failing GPU test is reported; the benchmarks still run
  python3 -m pytest -q -rs tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu_${tag}.log" || true
fi
common=(--size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" --steps "${STEPS:-10}")
python3 scripts/bench_speed.py "${common[@]}" --out "$OUT/bench_speed_${tag}.json" 2>&1 | tee "$OUT/bench_speed_${tag}.log"
python3 scripts/bench_speed.py "${common[@]}" --compile --rows "${COMPILE_ROWS:-discrete,euler_1,block_rk2,rk4_1,rk4_4,dopri5_1e-3}" \
  --out "$OUT/bench_speed_${tag}_compiled.json" 2>&1 | tee "$OUT/bench_speed_${tag}_compiled.log"
python3 scripts/bench_memory.py "${common[@]}" --steps 3 --ode-steps "${ODE_STEPS:-1,4,16,32}" --out "$OUT/bench_memory_${tag}.json" 2>&1 | tee "$OUT/bench_memory_${tag}.log"
