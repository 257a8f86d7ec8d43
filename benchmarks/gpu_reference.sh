#!/usr/bin/env bash
# GPU reference-drafter job (docs/gpu_reference.md). Runs from the repository root with the package
# importable from the checkout (no install needed, no gguf or data packages needed for `run`):
#   benchmarks/gpu_reference.sh prepare build/gpu_ref            # here: target shards + prompts, in parts
#   benchmarks/gpu_reference.sh run build/gpu_ref "$OUT"         # GPU machine: ~10 min, shards + summary.json
#   benchmarks/gpu_reference.sh run build/gpu_ref out --smoke    # CPU, seconds: the same path, tiny settings
#   benchmarks/gpu_reference.sh assemble <out> <export dir>      # here: shards -> native export
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_reference.py "$@"
