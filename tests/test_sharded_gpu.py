"""The sharded decode step across two GPUs: real kernels, NCCL through torch.distributed (and CuPy's
communicator), against refattn.decode over the whole cache.

The work runs in tests/sharded_gpu_worker.py, one process a GPU under torchrun; this test starts
it with a timeout (a rank left waiting in a collective would otherwise hang the run) and fails
on its exit status, showing its output. Skipped with a reason unless PyTorch and CuPy see at
least two GPUs; nothing touches a GPU at import beyond counting them.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sharded_gpu_worker.py"
NUM_GPUS = 2
TIMEOUT_S = 900   # the first run compiles a few kernel instantiations on every rank


def _skip_reason() -> str | None:
    try:
        import torch
        import torch.distributed as dist
    except Exception:  # noqa: BLE001 - no PyTorch
        return "needs PyTorch with torch.distributed (NCCL) and CuPy on a machine with 2+ GPUs"
    try:
        import cupy  # noqa: F401
    except Exception:  # noqa: BLE001
        return "needs CuPy (the kernels) and PyTorch on a machine with 2+ GPUs"
    if not (dist.is_available() and dist.is_nccl_available()):
        return "needs torch.distributed with NCCL"
    try:
        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        count = 0
    if count < NUM_GPUS:
        return f"needs {NUM_GPUS} CUDA GPUs, PyTorch sees {count} (run on a 2-GPU machine)"
    return None


_REASON = _skip_reason()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]


def _environment() -> dict:
    env = dict(os.environ)
    env.update(
        NCCL_NVLS_ENABLE="0",                   # NVLink multicast stays off on these machines
        TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
        NVSHMEM_DISABLE_NVLS="1",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def test_sharded_decode_on_two_gpus_matches_the_whole_cache():
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(NUM_GPUS), str(WORKER)]
    # Its own process group, so that a timeout kills torchrun and every rank it started.
    proc = subprocess.Popen(command, cwd=ROOT, env=_environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the workers did not finish within {TIMEOUT_S} s (a hang?):\n{output[-8000:]}")
    assert proc.returncode == 0, f"workers exited with {proc.returncode}:\n{output[-12000:]}"
    for rank in range(NUM_GPUS):
        assert f"[rank {rank}] sharded worker: all checks passed" in output, output[-12000:]
