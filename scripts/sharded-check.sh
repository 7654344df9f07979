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
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
NPROC=${NPROC:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
if [ "${NPROC:-0}" -lt 2 ]; then
  echo "sharded-check: needs at least 2 GPUs, found ${NPROC:-0}" >&2
  exit 2
fi
exec timeout --kill-after=30 "${TIMEOUT_S:-900}" \
  python3 -m torch.distributed.run --standalone --nproc-per-node "$NPROC" tests/sharded_gpu_worker.py
