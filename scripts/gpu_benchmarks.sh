#!/usr/bin/env bash
# Issue 17's GPU measurements in one command, each part under its own timeout, so that a
# hang in one still returns the others (about 8 minutes on one H200; the first run, 2026-11-30, is in results/gpu_h200/):
#   OUT=/some/dir bash scripts/gpu_benchmarks.sh
# Writes at most 5 files into $OUT: gpu_results.json (every benchmark row, the training run's
# summary, versions), gpu_run.log (all output), test_gpu.log, profile.txt, train_metrics.jsonl.
# The GPU machine sees only the checkout: bring the wheels its image lacks under .whl/
# (scripts/gpu_wheels.sh) and the WikiText-2 files under .gpu/data/ (valid.txt, test.txt).
# SIZE=tiny DEVICE=cpu DTYPE=fp32 TRAIN_TIME=20 is the dry run on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}; SIZE=${SIZE:-base}; DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-bf16}
BATCH=${BATCH:-64}; TRAIN_TIME=${TRAIN_TIME:-120}; DATA=${DATA:-$PWD/.gpu/data}
mkdir -p "$OUT"; PARTS=$(mktemp -d)
if [ -d .whl ] && ! python3 -c "import torchdyn.core, hydra" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
export BERTODE_WIKITEXT=$DATA/valid.txt BERTODE_CACHE=$PARTS/cache
exec > >(tee "$OUT/gpu_run.log") 2>&1
part() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s) $(date +%T)"; local t0=$SECONDS
  timeout -k 10 "$limit" "$@"; echo "=== $name: exit $? after $((SECONDS - t0)) s"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; } 2>&1
python3 -c "import torch, transformers, torchdyn, torchdiffeq, bertode; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'torchdiffeq', torchdiffeq.__version__, 'bertode', bertode.__version__, 'gpu', torch.cuda.is_available())"
common=(--size "$SIZE" --device "$DEVICE" --dtype "$DTYPE")
# GPU tests and the memory benchmark run side by side: peak memory is per process, and
# neither is a timing.
if [ "$DEVICE" = cuda ]; then
  part test_gpu 200 python3 -m pytest -q -rs tests/test_gpu.py -p no:cacheprovider > "$OUT/test_gpu.log" 2>&1 &
  tests=$!
fi
part bench_memory 170 python3 scripts/bench_memory.py "${common[@]}" --steps 2 --ode-steps 1,4,16,32 \
  --solvers euler,rk4 --sensitivities adjoint --out "$PARTS/memory.json"
[ -n "${tests:-}" ] && wait "$tests"  # a bare wait would also wait for the log's tee
part bench_speed 120 python3 scripts/bench_speed.py "${common[@]}" --batch "$BATCH" --steps 10 \
  --rows discrete,euler_1,discrete_sparse,euler_1_sparse,block_rk2,rk4_1,deq_anderson_ift,deq_anderson_ift_sparse \
  --out "$PARTS/speed.json"
# dopri5 at the bench's weight scale 4 takes ~48 NFE per site at BERT-base (autograd ran out
# of memory at batch 64 on an H200): its time per NFE against rk4 at scale 1, batch 16.
part bench_speed_adaptive 120 python3 scripts/bench_speed.py "${common[@]}" --batch 16 --weight-scale 1 --steps 5 \
  --rows rk4_1,dopri5_1e-3,dopri5_1e-3_adjoint --out "$PARTS/speed_adaptive.json"
part bench_speed_compiled 200 python3 scripts/bench_speed.py "${common[@]}" --batch "$BATCH" --steps 10 \
  --compile --rows euler_1 --out "$PARTS/speed_compiled.json"
# Split-invariant dropout (attention and hidden 0.1): a rank's step at simulated world sizes 1, 8, 64
# with the local batch fixed, per-row streams against the earlier global draw (issue 27).
part bench_dropout 120 python3 scripts/bench_dropout.py "${common[@]}" --batch 16 --steps 5 --worlds 1,8,64 \
  --out "$PARTS/dropout.json"
# Adaptive solves per sequence (issue 27): every backend's NFE, error against float64, time, and the
# stiff-batch experiment (the easy sequences' NFE alone and beside one stiff sequence).
part bench_solvers 120 python3 scripts/bench_solvers.py "${common[@]}" --batch 16 --steps 3 --out "$PARTS/solvers.json"
# Key/value caches (issue 26): one decoding step at 32 and 256 tokens of context, with and without the cache.
part bench_kv_cache 90 python3 scripts/bench_kv_cache.py "${common[@]}" --steps 5 --contexts 32,256 \
  --out "$PARTS/kv_cache.json"
part profile 90 python3 scripts/profile_steps.py "${common[@]}" --batch "$BATCH" --rows hf_bert,discrete,euler_1 \
  --out "$OUT/profile.txt" --json "$PARTS/profile.json"
if [ "$DEVICE" = cuda ]; then trainer=(trainer=gpu size=base); else trainer=(trainer=cpu size=tiny trainer.batch_size=8); fi
part train $((TRAIN_TIME + 150)) python3 -m bertode.train "${trainer[@]}" data=text "data.files=[$DATA/valid.txt]" \
  "data.eval_files=[$DATA/test.txt]" data.seq_len=128 data.vocab_size=8192 trainer.compile=true \
  trainer.max_time="$TRAIN_TIME" trainer.warmup_steps=100 trainer.log_every=20 trainer.eval_every=100000 trainer.checkpoint_every=100000 \
  hydra.run.dir="$PARTS/train"
cp "$PARTS/train/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
python3 - "$PARTS" "$OUT/gpu_results.json" <<'PY'
import json, sys
from pathlib import Path
parts, out = Path(sys.argv[1]), Path(sys.argv[2])
result = {}
for name in ("memory", "speed", "speed_adaptive", "speed_compiled", "dropout", "solvers", "profile"):
    f = parts / f"{name}.json"
    result[name] = json.loads(f.read_text()) if f.is_file() else None
metrics = parts / "train" / "metrics.jsonl"
records = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.is_file() else []
result["train"] = dict(records=len(records), first=records[0] if records else None, last=records[-1] if records else None)
out.write_text(json.dumps(result, indent=1) + "\n")
print("wrote", out, {k: v is not None for k, v in result.items()})
PY
