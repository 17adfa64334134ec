#!/bin/bash
# make device-check: benchmarks/device_check.py with the device machine's own Python (it has no network, so no
# venv is built there). When that Python lacks a package the trainer imports, the wheels carried in .whl/
# (`make device-wheels` on a machine with network, then carry .whl/) are installed into /tmp/device_site first.
# Usage (repository root): bash benchmarks/device_check.sh [device_check.py flags]   (PY=... picks the interpreter)
set -u
PY=${PY:-python3}
IMPORTS="import jax, flax, optax, orbax.checkpoint, ott, grain, ml_collections, absl, etils.epath, PIL, scipy"
if ! "$PY" -c "$IMPORTS" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/device_site .whl/*.whl
    export PYTHONPATH=/tmp/device_site${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PY" -c "$IMPORTS" || { echo "device-check: a package is missing (above); carry its wheel in .whl/"; exit 1; }
fi
exec "$PY" benchmarks/device_check.py "$@"
