"""Microbenchmark of the Triton kernels: `python benchmarks/kernels.py [--json PATH] [--quick]`.

Thin wrapper around `dvtrain.bench.run_kernel_bench` (also `dvtrain bench kernels [--json PATH]`).
"""

from __future__ import annotations

import argparse

from dvtrain.bench import run_kernel_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None, help="write the results as JSON to this path")
    parser.add_argument("--quick", action="store_true", help="few small shapes and repeats (CPU smoke run)")
    args = parser.parse_args()
    run_kernel_bench(json_path=args.json, quick=args.quick)
