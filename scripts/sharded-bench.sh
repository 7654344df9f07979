#!/usr/bin/env bash
# Decode over the GPUs of one host against one GPU: gpukernels/bench_sharded.py under torchrun, one
# process a GPU. Writes <out>/<gpu>x<N>/distributed.json (rank 0 only) and prints the table; exits
# with the workers' status (0: the run finished and the large cache matched the exact answer).
#
#   bash scripts/sharded-bench.sh                    # every GPU PyTorch sees (at least 2), into results/
#   bash scripts/sharded-bench.sh --out "$OUT"       # arguments go to gpukernels.bench_sharded
#   NPROC=2 bash scripts/sharded-bench.sh --quick    # a few rows, nothing written
#
# NPROC: processes (GPUs), default all; TIMEOUT_S: wall-clock limit, default 600 (a rank waiting
# in a collective for a rank that died would otherwise hang). NVLink multicast stays off.
set -uo pipefail
. "$(dirname "$0")/torchrun-gpus.sh"
torchrun_gpus sharded-bench 600 -m gpukernels.bench_sharded "$@"
