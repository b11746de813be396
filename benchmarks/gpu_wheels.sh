#!/usr/bin/env bash
# Prepare wheels of dvtrain's run-time dependencies for an offline GPU machine (default: the H200 image
# described in benchmarks/gpu_target_packages.txt, Python 3.12) into OUTDIR (default .gpu_wheels/, ignored
# by git). Run it where pip can download, from an environment where dvtrain is installed (make setup).
# Then: benchmarks/gpu_check.sh OUT --wheels .gpu_wheels   (on the GPU machine; see docs/gpu.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" benchmarks/gpu_wheels.py "$@"
