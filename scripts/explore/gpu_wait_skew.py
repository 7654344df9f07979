"""How long a GPU wait of a fixed number of SM clock cycles lasts on each GPU, against one on the
GPU's global nanosecond timer (what gpukernels.bench.gpu_wait spins on).

An exploration, not a benchmark: lines of text, no result file. On each GPU in turn, after a 256 MB
write (as the benchmarks flush L2 before each repetition), CUDA events time a spin of 2.1 million
clock cycles (1 ms at 2.1 GHz: the wait the benchmarks used before) and a 1 ms wait on the global
timer; the median, least and most over repetitions, in us, with the SM clock nvidia-smi reports.
Run: PYTHONPATH=. python3 scripts/explore/gpu_wait_skew.py
"""
import subprocess

import cupy as cp
import numpy as np

from gpukernels.bench import FLUSH_BYTES, gpu_wait

CYCLES = 2_100_000
REPS = 30
_CLOCK_WAIT = cp.RawKernel(r"""
extern "C" __global__ void clock_wait(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}
""", "clock_wait")


def timed(launch, flush) -> list[float]:
    out = []
    for _ in range(REPS):
        flush.fill(1)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        launch()
        end.record()
        end.synchronize()
        out.append(cp.cuda.get_elapsed_time(start, end) * 1e3)
    return out


def summary(xs) -> str:
    return f"median {np.median(xs):.1f}, least {min(xs):.1f}, most {max(xs):.1f}"


for device in range(cp.cuda.runtime.getDeviceCount()):
    with cp.cuda.Device(device):
        flush = cp.empty(FLUSH_BYTES, dtype=cp.uint8)
        cycles = timed(lambda: _CLOCK_WAIT((1,), (1,), (cp.int64(CYCLES),)), flush)
        wall = timed(lambda: gpu_wait(1.0), flush)
        try:
            clock = subprocess.run(["nvidia-smi", "-i", str(device), "--query-gpu=clocks.sm,clocks.max.sm",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            clock = "unknown"
        print(f"GPU {device} (SM clock now, max: {clock}): {CYCLES:,} cycles {summary(cycles)} us; "
              f"1 ms on the global timer {summary(wall)} us", flush=True)
        del flush
