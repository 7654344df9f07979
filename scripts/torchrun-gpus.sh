# Sourced by the scripts that run one process a GPU under torchrun (sharded-bench.sh,
# sharded-check.sh): `torchrun_gpus NAME DEFAULT_TIMEOUT_S TARGET...` runs TARGET (a script, or
# -m module, and its arguments) on NPROC processes (default: every GPU PyTorch sees, at least 2)
# within TIMEOUT_S seconds (default DEFAULT_TIMEOUT_S: a rank waiting in a collective for a rank
# that died would otherwise hang), with NVLink multicast off, and exits with its status.
torchrun_gpus() {
  local name=$1 default_timeout=$2
  shift 2
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
  NPROC=${NPROC:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
  if [ "${NPROC:-0}" -lt 2 ]; then
    echo "$name: needs at least 2 GPUs, found ${NPROC:-0}" >&2
    exit 2
  fi
  exec timeout --kill-after=30 "${TIMEOUT_S:-$default_timeout}" \
    python3 -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "$@"
}
