#!/usr/bin/env bash
# The sharded decode step across the GPUs of one host: tests/sharded_gpu_worker.py under torchrun,
# one process a GPU, checked against the float64 reference over the whole cache. Exits with the
# workers' status (0: every check passed).
#
#   bash scripts/sharded-check.sh          # every GPU PyTorch sees (at least 2)
#   NPROC=4 bash scripts/sharded-check.sh  # 4 of them
#
# NPROC: processes (GPUs), default all; TIMEOUT_S: wall-clock limit, default 900 (a rank waiting
# in a collective for a rank that died would otherwise hang). NVLink multicast stays off.
set -uo pipefail
. "$(dirname "$0")/torchrun-gpus.sh"
torchrun_gpus sharded-check 900 tests/sharded_gpu_worker.py
