#!/bin/bash
# Device run of the paired-seed study (configs/sweeps/cifar10_small_study.py) on one GPU, arms in parallel.
# Usage (repo root): bash .devdata/run_study.sh DEADLINE_S PARALLEL [SWEEP]
# Writes $OUT/env.txt, $OUT/log.txt (sweep output), $OUT/study.tar.gz (every arm's metrics/config/done/launch.log),
# $OUT/dmon.txt (GPU utilisation), and, if time is left, $OUT/assignment_gpu.json.
set -u
T0=$(date +%s)
DEADLINE=${1:-480}
PARALLEL=${2:-12}
SWEEP=${3:-configs/sweeps/cifar10_small_study.py}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=${STUDY_ROOT:-/tmp/study}
PY=${PY:-python3}
elapsed() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1

{ date -u; uname -a; nproc; free -g | head -2; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } \
  > "$OUT/env.txt" 2>&1

if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
IMPORTS="import jax, flax, optax, orbax.checkpoint, ott, grain, ml_collections; \
from immiscible_jax import main, train, evaluators; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'orbax', orbax.checkpoint.__version__, jax.devices())"
if ! "$PY" -c "$IMPORTS" >> "$OUT/env.txt" 2>&1; then
  echo "imports failed with the image's flax/optax/orbax/chex; trying the pinned ones" | tee -a "$OUT/env.txt"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/pinned/*.whl || exit 1
  "$PY" -c "$IMPORTS" >> "$OUT/env.txt" 2>&1 || { tail -40 "$OUT/env.txt"; exit 1; }
fi

# Same program for every arm of a configuration: no autotuning (its timings differ under load between processes),
# deterministic reductions, full float32 matmuls/convolutions (as on the CPU). Dropped if this XLA rejects a flag.
export XLA_FLAGS="--xla_gpu_autotune_level=0 --xla_gpu_deterministic_ops=true"
if ! "$PY" -c "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))" >> "$OUT/env.txt" 2>&1; then
  echo "XLA_FLAGS rejected; running without them" | tee -a "$OUT/env.txt"; unset XLA_FLAGS
fi
export JAX_DEFAULT_MATMUL_PRECISION=highest
export XLA_PYTHON_CLIENT_PREALLOCATE=false          # several processes share the GPU
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache      # arms of one configuration compile once
export IMMISCIBLE_JAX_CACHE=/tmp/ij_cache
echo "XLA_FLAGS=${XLA_FLAGS:-} JAX_DEFAULT_MATMUL_PRECISION=$JAX_DEFAULT_MATMUL_PRECISION parallel=$PARALLEL" \
  >> "$OUT/env.txt"
"$PY" -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda.*|flax|optax|orbax-checkpoint|chex|numpy|scipy|ott-jax|grain|tensorstore) " \
  >> "$OUT/env.txt"
DATA=$PWD/.devdata/cifar10-jpg.tar.gz

# Decode the archive and compute both sizes' reference statistics once, before the arms start together.
"$PY" - "$DATA" >> "$OUT/log.txt" 2>&1 <<'EOF'
import sys, time
from configs import cifar10_small
from immiscible_jax import evaluators
for size in (16, 8):
  t = time.time()
  c = cifar10_small.get_config()
  c.data.dataset, c.data.path, c.data.image_size = 'folder', sys.argv[1], size
  evaluators.TrainingEvaluator(c)
  print(f'reference statistics {size}x{size}: {time.time() - t:.1f} s', flush=True)
EOF
echo "prepared at $(elapsed) s" | tee -a "$OUT/log.txt"

(nvidia-smi dmon -s u -d 5 > "$OUT/dmon.txt" 2>&1 &)
set -m
"$PY" -m launch.sweep --sweep="$SWEEP" --runner=local --python="$PY" --parallel="$PARALLEL" --root="$ROOT" -- \
  --config.data.dataset=folder --config.data.path="$DATA" >> "$OUT/log.txt" 2>&1 &
SWEEP_PID=$!
while kill -0 $SWEEP_PID 2>/dev/null && [ "$(elapsed)" -lt "$DEADLINE" ]; do
  sleep 2
  # An arm that fails before any has finished: stop at once (the others would fail the same way) for a rerun.
  if ! ls "$ROOT"/*/done.json >/dev/null 2>&1 && grep -l Traceback "$ROOT"/*/launch.log >/dev/null 2>&1; then
    echo "an arm failed before any finished, at $(elapsed) s" | tee -a "$OUT/log.txt"
    grep -h -B2 -A30 Traceback "$ROOT"/*/launch.log | head -80 | tee -a "$OUT/log.txt"; break
  fi
done
if kill -0 $SWEEP_PID 2>/dev/null; then
  echo "deadline at $(elapsed) s: stopping the sweep" | tee -a "$OUT/log.txt"
  kill -KILL -- -$SWEEP_PID 2>/dev/null
  pkill -KILL -f immiscible_jax.main
fi
wait $SWEEP_PID 2>/dev/null
set +m
pkill -f "nvidia-smi dmon"
echo "sweep ended at $(elapsed) s; finished arms: $(ls "$ROOT"/*/done.json 2>/dev/null | wc -l)" | tee -a "$OUT/log.txt"
(cd "$ROOT" && tar czf "$OUT/study.tar.gz" sweep.json */metrics.jsonl */config.json */done.json */launch.log \
  2>/dev/null)

# Time left: the per-iteration loop cost on this GPU (assignment alone, B as in the study).
LEFT=$(( ${ASSIGN_UNTIL:-0} - $(elapsed) ))
ls "$ROOT"/*/done.json >/dev/null 2>&1 || LEFT=0
if [ "$LEFT" -gt 40 ]; then
  timeout -s KILL $LEFT "$PY" benchmarks/assignment.py --data="$DATA" --batch_sizes=32,128,512,1024 \
    --methods=none,auction,jv,knn --costs=l2,sqeuclidean --repeats=5 --num_batches=2 \
    --json "$OUT/assignment_gpu.json" >> "$OUT/assign_log.txt" 2>&1
fi
echo "done at $(elapsed) s" | tee -a "$OUT/log.txt"
