#!/usr/bin/env bash
# GPU acceptance check of dvtrain (docs/gpu.md): one command, under 9 minutes on one H200.
#
#   benchmarks/gpu_check.sh OUTDIR                        # on a GPU machine where dvtrain is installed
#   benchmarks/gpu_check.sh OUTDIR --wheels .gpu_wheels   # on a bare, offline GPU machine: installs the
#                                                         # wheels made by benchmarks/gpu_wheels.sh first
#   benchmarks/gpu_check.sh OUTDIR --dry-run              # on a CPU: tiny shapes, CUDA-only steps skipped
#
# Writes OUTDIR/gpu_check.json, OUTDIR/gpu_check.md and OUTDIR/gpu_check.log; exit status 1 if a check failed.
# Python: $PYTHON, else the repository's .venv, else python3 (on the lent H200: the image's python3, torch 2.11).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
exec "$PY" benchmarks/gpu_check.py "$@"
