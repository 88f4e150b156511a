#!/usr/bin/env bash
# One command for a machine with a GPU or TPU (and, at tiny sizes, any CPU):
#
#   bash benchmarks/accelerator.sh [OUT_DIR]          # default: runs/accelerator
#
# installs what it needs (skipped with JAXREG_NO_INSTALL=1, which uses the python on PATH;
# JAXREG_WHEELS=DIR installs offline from a folder of wheels), then runs the train-step,
# inference, warp, operator, memory and register benchmarks within about 8 minutes and
# writes OUT_DIR/accelerator.json and OUT_DIR/accelerator.md.
# JAXREG_BENCH_SIZE=tiny|full picks the sizes (default: full on GPU/TPU, tiny on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/accelerator}
PY=${PYTHON:-python3}
if [ -z "${JAXREG_NO_INSTALL:-}" ]; then
  [ -x .venv-accel/bin/python ] || "$PY" -m venv .venv-accel
  PY=.venv-accel/bin/python
  PIP=("$PY" -m pip install -q)
  [ -n "${JAXREG_WHEELS:-}" ] && PIP+=(--no-index --find-links "$JAXREG_WHEELS")
  "${PIP[@]}" -e '.[bench]'
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" 'jax[cuda13]' || "${PIP[@]}" 'jax[cuda12]'
  elif [ -e /dev/accel0 ] || [ -n "${TPU_NAME:-}" ]; then
    "${PIP[@]}" 'jax[tpu]'
  fi
fi
exec "$PY" benchmarks/accelerator.py --out "$OUT"
