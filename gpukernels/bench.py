"""Benchmark the grids of docs/benchmarks.md (decode, coverage, shared prefix, span, tree) against the
peers, in one process, on one GPU.

Protocol: CUDA events around each call, warm-up first, median of `--reps` repetitions, L2 flushed
between repetitions by writing a 256 MB buffer; inputs are fresh random normals. The run measures
its own ceilings (device-to-device copy, a streaming read, fp16 matmul) and reports for every
row `floor = max(unique bytes / bandwidth, flops / matmul rate)` and `frac = floor / time`. Every
row also carries `stream_ms`: the time, under the same protocol, of a kernel that does nothing but
read the row's K and V once; no attention kernel can beat it, whatever the ceilings say.
Peers: PyTorch SDPA (cuDNN and flash backends), FlashInfer's paged decode when installed, and a
naive CuPy matmul attention. Every row of this project's kernels is measured both as the planned
run (`SplitKV(plan).run` with `out` and `lse`) and as the one-shot call a user makes first
(`gpukernels.split_kv(q, k, v)`), with the host time of each call. The coverage suite runs shapes
off the decode grid (dtypes, head dims, group sizes, odd lengths) against SDPA's cuDNN and flash
backends. The shared-prefix suite runs Hydragen (`gpukernels.shared_prefix`) against the prefix
copied into every sequence (naive) and FlashInfer's cascade and paged decode; the span suite runs
`gpukernels.span` against dense attention (split-KV, cuDNN), FlexAttention with a block mask and
FlashInfer's block-sparse wrapper. The shared_prefix_papers suite runs the shared-prefix rows in
the settings of the bifurcated-attention and Hydragen papers; the tree suite runs `gpukernels.tree`
on a 3-level tree against the paths copied into contiguous caches and FlashInfer's cascade (3 and
2 levels) and paged decode. Results go to `results/<gpu>/<suite>.json`.

    decode-attention bench [--suite decode|coverage|shared_prefix|shared_prefix_papers|span|tree]
                           [--reps 30] [--out results] [--quick]
    decode-attention bench --report results/h100/decode.json      (a result file as Markdown)
    python -m gpukernels.bench ...
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# (batch, num_kv_heads, kv_len); fp16, num_qo_heads 32, head_dim 128 (docs/benchmarks.md).
DECODE_GRID = [
    (1, 8, 4096),
    (1, 8, 32768),
    (1, 8, 131072),
    (1, 32, 32768),
    (8, 8, 32768),
    (64, 8, 16384),
    (16, 32, 8192),
]
NUM_QO_HEADS = 32
HEAD_DIM = 128
PAGE_SIZE = 16
SWEEP_SPLITS = (1, 2, 4, 8, 16, 32, 64)
FLUSH_BYTES = 256 << 20

# A pure streaming read (16-byte loads, four in flight per thread, a grid of 4 blocks per SM) of one
# or two buffers in one launch: the read-bandwidth ceiling, and the fastest any kernel can read a
# row's K and V. The xor keeps the loads alive; the store never happens for random data.
_STREAM_READ = r"""
extern "C" __global__ void stream_read(const uint4* __restrict__ a, long long na,
                                       const uint4* __restrict__ b, long long nb, unsigned* sink) {
  const long long n = na + nb;
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  unsigned acc = 0;
  long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + 3 * step < n; i += 4 * step) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const long long j = i + u * step;
      v[u] = j < na ? a[j] : b[j - na];
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += step) {
    const uint4 v = i < na ? a[i] : b[i - na];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}
"""


class StreamRead:
    """Reads whole buffers (sizes multiple of 16 bytes) with the pure streaming kernel, in one launch."""

    def __init__(self):
        import cupy as cp

        self.cp = cp
        self.kernel = cp.RawKernel(_STREAM_READ, "stream_read")
        self.sink = cp.zeros(1, dtype=cp.uint32)
        sms = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["multiProcessorCount"]
        self.grid = (4 * sms,)

    def __call__(self, a, b=None):
        cp = self.cp
        nb = 0 if b is None else b.nbytes // 16
        self.kernel(self.grid, (512,), (a, cp.int64(a.nbytes // 16), a if b is None else b, cp.int64(nb),
                                        self.sink))


# The streaming read of listed rows in place (a span row's attended tokens where the spans put them):
# warp w reads listed rows w, w + warps, ...; lane l the 16-byte pieces l, l + 32, ... of the row's K
# and V (PIECES pieces each, all KV heads): 2 * PIECES / 32 loads in flight a lane, four blocks of 8
# warps an SM (the bytes in flight of stream_read), the next row's number loaded a row ahead.
_READ_ROWS = r"""
extern "C" __global__ void read_rows(const uint4* __restrict__ a, const uint4* __restrict__ b,
                                     const int* __restrict__ rows, int n, unsigned* sink) {
  constexpr int PER_LANE = PIECES / 32;
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * blockDim.x / 32;
  int w = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  unsigned acc = 0;
  int next = w < n ? __ldg(rows + w) : 0;
  for (; w < n; w += warps) {
    const long long r = next;
    if (w + warps < n) next = __ldg(rows + w + warps);
    uint4 v[2 * PER_LANE];
#pragma unroll
    for (int u = 0; u < PER_LANE; ++u) {
      v[u] = a[r * PIECES + lane + 32 * u];
      v[PER_LANE + u] = b[r * PIECES + lane + 32 * u];
    }
#pragma unroll
    for (int u = 0; u < 2 * PER_LANE; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}
"""


class ReadRows:
    """Reads listed rows of two buffers in place (`rows`: int32 row numbers; each row `row_bytes`
    long, a multiple of 512), with the streaming read's bytes in flight."""

    def __init__(self, row_bytes: int):
        import cupy as cp

        if row_bytes % 512:
            raise ValueError(f"row_bytes must be a multiple of 512, got {row_bytes}")
        self.cp = cp
        self.kernel = cp.RawKernel(_READ_ROWS, "read_rows", options=(f"-DPIECES={row_bytes // 16}",))
        self.sink = cp.zeros(1, dtype=cp.uint32)
        sms = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["multiProcessorCount"]
        self.grid = (4 * sms,)

    def __call__(self, a, b, rows):
        self.kernel(self.grid, (256,), (a, b, rows, self.cp.int32(rows.size), self.sink))


@functools.lru_cache(maxsize=None)
def stream_read() -> StreamRead:
    """The one StreamRead of this process (its kernel compiled once)."""
    return StreamRead()


# One thread spinning: keeps the stream busy while the host prepares a call whose host work is
# longer than the flush, so that the events time the kernels alone. It spins on the GPU's global
# nanosecond timer, not on SM clock cycles: a count of cycles lasts longer on a GPU running at a
# lower clock (2.1 million cycles: 1.06 ms at 1.98 GHz, 1.15 ms at 1.83 GHz), so two GPUs leaving
# a barrier together left such a wait apart, and the first collective of the timed step waited out
# the difference (scripts/explore/gpu_wait_skew.py).
_GPU_WAIT = r"""
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
extern "C" __global__ void gpu_wait(long long ns) {
  const unsigned long long start = global_ns();
  while (global_ns() - start < static_cast<unsigned long long>(ns)) {
  }
}
"""


@functools.lru_cache(maxsize=None)
def _gpu_wait_kernel():
    import cupy as cp

    return cp.RawKernel(_GPU_WAIT, "gpu_wait")


def gpu_wait(ms: float) -> None:
    """Keep the current stream busy for `ms` milliseconds of wall time (one block of one thread),
    whatever the GPU's clock."""
    import cupy as cp

    _gpu_wait_kernel()((1,), (1,), (cp.int64(int(ms * 1e6)),))


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Timer:
    """Median of CUDA-event timings with the L2 flushed before each repetition."""

    def __init__(self, reps: int):
        import cupy as cp

        self.cp = cp
        self.reps = reps
        self.flush = cp.empty(FLUSH_BYTES, dtype=cp.uint8)

    def __call__(self, fn, *, warmup: int = 3, lead_ms: float = 0.0) -> float:
        """Median time of `fn` in ms. `lead_ms` > 0 puts a GPU wait of that length between the
        flush and the start event, so host work of `fn` shorter than the wait is not timed."""
        cp = self.cp
        for _ in range(warmup):
            fn()
        cp.cuda.Device().synchronize()
        times = []
        for _ in range(self.reps):
            self.flush.fill(1)
            if lead_ms > 0:
                gpu_wait(lead_ms)
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end))
        return float(np.median(times))


def host_us(fn, calls: int = 20, rounds: int = 5) -> float:
    """Host time of one call (launch overhead: argument checks, allocation, the launch itself):
    the median over `rounds` rounds of `calls` back-to-back calls, after a few calls not counted
    (one round alone was seen to read twice the steady cost on the first row of a suite)."""
    import cupy as cp

    for _ in range(3):
        fn()
    per_call = []
    for _ in range(rounds):
        cp.cuda.Device().synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    cp.cuda.Device().synchronize()
    return float(np.median(per_call))


def host_us_interleaved(fns: dict, calls: int = 20, rounds: int = 5) -> dict:
    """`host_us` of several calls of one row, their rounds interleaved (round r of every call, then
    round r + 1): a stretch of host noise (another process, a collection) then falls on all of them
    alike instead of on whichever call was being timed. Returns {label: us}."""
    import cupy as cp

    for fn in fns.values():
        for _ in range(3):
            fn()
    per_call = {label: [] for label in fns}
    for _ in range(rounds):
        for label, fn in fns.items():
            cp.cuda.Device().synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            per_call[label].append((time.perf_counter() - start) / calls * 1e6)
    cp.cuda.Device().synchronize()
    return {label: float(np.median(v)) for label, v in per_call.items()}


def measure_ceilings(timer: Timer) -> dict:
    """Copy bandwidth (read + write), streaming-read bandwidth, and the fp16 matmul rate, measured now."""
    cp = timer.cp
    n = 2 << 30
    src = cp.ones(n // 2, dtype=cp.float16)
    dst = cp.empty_like(src)
    t_copy = timer(lambda: dst.__setitem__(Ellipsis, src))
    copy_bps = 2 * src.nbytes / (t_copy / 1e3)
    stream = stream_read()
    t_read = timer(lambda: stream(src))
    read_bps = src.nbytes / (t_read / 1e3)
    del src, dst
    m = 8192
    a = cp.random.standard_normal((m, m), dtype=cp.float32).astype(cp.float16)
    b = cp.random.standard_normal((m, m), dtype=cp.float32).astype(cp.float16)
    t_mm = timer(lambda: a @ b)
    mm_fps = 2 * m**3 / (t_mm / 1e3)
    return {"copy_bytes_per_s": copy_bps, "read_bytes_per_s": read_bps, "matmul_flops_per_s": mm_fps}


def source_digest() -> str:
    """SHA-256 (first 16 hex digits) of the package sources the results depend on: every .py, .cu
    and .cuh file of decode_attention, refattn, costmodel and gpukernels, by relative path and
    content, so a result file can be matched to a checkout even when no git metadata travelled."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in ("decode_attention", "refattn", "costmodel", "gpukernels"):
        for path in sorted((root / pkg).rglob("*")):
            if path.suffix in (".py", ".cu", ".cuh") and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _meta(ceilings: dict, command: str) -> dict:
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=here).stdout.strip()
        if commit and dirty:
            commit += "+changes"  # the tree differs from that commit
    except OSError:
        commit = ""
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        driver = str(cp.cuda.runtime.driverGetVersion())
    return {
        "gpu": name,
        "driver": driver,
        "cuda": str(cp.cuda.runtime.runtimeGetVersion()),
        "cupy": cp.__version__,
        "python": platform.python_version(),
        "num_sms": int(props["multiProcessorCount"]),
        "l2_bytes": int(props["l2CacheSize"]),
        "commit": commit,
        "source_digest": source_digest(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        **ceilings,
    }


def gpu_slug(name: str) -> str:
    low = name.lower()
    for key in ("h200", "h100", "a100", "l40", "b200"):
        if key in low:
            return key
    return "".join(ch if ch.isalnum() else "-" for ch in low).strip("-")


def decode_floor_s(batch, num_kv_heads, kv_len, elem_bytes, ceilings) -> tuple[float, int, int]:
    kv_bytes = 2 * batch * num_kv_heads * kv_len * HEAD_DIM * elem_bytes
    qo_bytes = 2 * batch * NUM_QO_HEADS * HEAD_DIM * elem_bytes
    flops = 4 * batch * NUM_QO_HEADS * kv_len * HEAD_DIM
    bw = max(ceilings["copy_bytes_per_s"], ceilings["read_bytes_per_s"])
    return max((kv_bytes + qo_bytes) / bw, flops / ceilings["matmul_flops_per_s"]), kv_bytes + qo_bytes, flops


def _sdpa_peers(q, k, v, labels=("peer:cudnn", "peer:flash")) -> dict:
    """PyTorch SDPA's cuDNN and flash backends (those of `labels`) on the same inputs (those that
    accept the shape)."""
    peers = {}
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        _progress("  torch not installed: no SDPA peers")
        return peers
    qt = torch.as_tensor(q, device="cuda").unsqueeze(2)                 # [B, Hq, 1, D]
    kt = torch.as_tensor(k, device="cuda").transpose(1, 2)              # [B, Hkv, L, D] view
    vt = torch.as_tensor(v, device="cuda").transpose(1, 2)
    gqa = k.shape[2] != q.shape[1]
    backends = {"peer:cudnn": SDPBackend.CUDNN_ATTENTION, "peer:flash": SDPBackend.FLASH_ATTENTION}
    for label, backend in ((label, backends[label]) for label in labels):
        def run(backend=backend):
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa)
        try:
            run()
            torch.cuda.synchronize()
            peers[label] = run
        except Exception as exc:  # noqa: BLE001 - a backend that refuses this shape
            _progress(f"  {label} unavailable: {str(exc).splitlines()[0][:80]}")
    return peers


def _peers(q, k, v, batch, num_kv_heads, kv_len):
    """Callables of every peer available here, on the same inputs."""
    import cupy as cp

    peers = _sdpa_peers(q, k, v)
    peers.update(_flashinfer_peer(q, k, v, batch, num_kv_heads, kv_len))

    group = NUM_QO_HEADS // num_kv_heads
    scale = 1.0 / math.sqrt(HEAD_DIM)

    def naive():
        # The plain approach: scores by matmul over the whole cache, softmax, matmul with V.
        qg = q.reshape(batch, num_kv_heads, group, HEAD_DIM)
        kk = k.transpose(0, 2, 3, 1)                                         # [B, Hkv, D, L]
        s = cp.matmul(qg, kk).astype(cp.float32) * scale                     # [B, Hkv, g, L]
        s -= s.max(axis=-1, keepdims=True)
        p = cp.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        return cp.matmul(p.astype(q.dtype), v.transpose(0, 2, 1, 3))         # [B, Hkv, g, D]

    peers["peer:naive"] = naive
    return peers


def _flashinfer_peer(q, k, v, batch, num_kv_heads, kv_len):
    try:
        import flashinfer
        import torch
    except ImportError:
        return {}
    try:
        pages_per_seq = -(-kv_len // PAGE_SIZE)
        kt = torch.as_tensor(k, device="cuda")
        vt = torch.as_tensor(v, device="cuda")
        pad = pages_per_seq * PAGE_SIZE - kv_len
        if pad:
            kt = torch.nn.functional.pad(kt, (0, 0, 0, 0, 0, pad))
            vt = torch.nn.functional.pad(vt, (0, 0, 0, 0, 0, pad))
        # FlashInfer's NHD paged layout: [num_pages, 2, page_size, Hkv, D].
        kv_cache = torch.stack([kt.reshape(-1, PAGE_SIZE, num_kv_heads, HEAD_DIM),
                                vt.reshape(-1, PAGE_SIZE, num_kv_heads, HEAD_DIM)], dim=1)
        indptr = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * pages_per_seq
        indices = torch.arange(batch * pages_per_seq, dtype=torch.int32, device="cuda")
        last = torch.full((batch,), kv_len - (pages_per_seq - 1) * PAGE_SIZE, dtype=torch.int32, device="cuda")
        workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
        wrapper.plan(indptr, indices, last, NUM_QO_HEADS, num_kv_heads, HEAD_DIM, PAGE_SIZE,
                     q_data_type=torch.float16, kv_data_type=torch.float16)
        qt = torch.as_tensor(q, device="cuda")
        run = lambda: wrapper.run(qt, kv_cache)  # noqa: E731
        run()
        torch.cuda.synchronize()
        return {"peer:flashinfer": run}
    except Exception as exc:  # noqa: BLE001 - report and go on without it
        _progress(f"  peer:flashinfer unavailable: {str(exc).splitlines()[0][:100]}")
        return {}


def _plans_to_time(batch, num_kv_heads, kv_len, sms, gpu, sweep_splits, *, page_size=0) -> dict:
    """The plan's own choice ("auto") and one plan per swept split count ("forced:<n>")."""
    import gpukernels

    make = functools.partial(gpukernels.plan_split_kv, batch, NUM_QO_HEADS, num_kv_heads, HEAD_DIM, kv_len,
                             dtype="float16", num_sms=sms, page_size=page_size)
    return {"auto": make(gpu=gpu), **{f"forced:{s}": make(num_splits=s) for s in sweep_splits}}


def _plan_rows(plans: dict, impl: str, run, base: dict, timer, gpu) -> list[dict]:
    """Time `run(runner)` for each plan: one row each, with the model's prediction for that plan."""
    import gpukernels
    from costmodel.rows import predict_row

    rows = []
    for key, plan in plans.items():
        runner = gpukernels.SplitKV(plan)
        call = functools.partial(run, runner)
        row = {**base, "impl": impl, "num_splits": plan.num_splits, "chunk_size": plan.chunk_size,
               "time_ms": timer(call), "host_us": host_us(call),
               "plan": "forced" if key.startswith("forced") else "auto"}
        row["predicted_ms"] = predict_row(row, gpu).time_s * 1e3
        rows.append(row)
    return rows


def _peer_rows_with_host(timer: Timer, base: dict, one_shot_row: dict, one_shot, peers: dict) -> list[dict]:
    """A row for each peer of `peers` (label -> call) that runs, timed; then the host time of the
    one-shot call and of those peers, measured together in interleaved rounds
    (`host_us_interleaved`), written into `one_shot_row` and the peer rows."""
    rows, timed = [], {one_shot_row["impl"]: one_shot}
    for label, fn in peers.items():
        try:
            rows.append({**base, "impl": label, "time_ms": timer(fn)})
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run this shape: reported, left out
            _progress(f"  {label} failed: {str(exc).splitlines()[0][:80]}")
            continue
        timed[label] = fn
    host = host_us_interleaved(timed)
    for row in (one_shot_row, *rows):
        row["host_us"] = host[row["impl"]]
    return rows


def run_decode_suite(timer: Timer, ceilings: dict, gpu, *, quick: bool, sweep: bool = True) -> list[dict]:
    import cupy as cp

    import gpukernels
    from gpukernels.split_kv import num_sms

    rows = []
    stream = stream_read()
    grid = DECODE_GRID[:2] if quick else DECODE_GRID
    for i, (batch, num_kv_heads, kv_len) in enumerate(grid, 1):
        _progress(f"decode {i}/{len(grid)}: batch {batch}, {num_kv_heads} KV heads, kv_len {kv_len}")
        q = cp.random.standard_normal((batch, NUM_QO_HEADS, HEAD_DIM), dtype=cp.float32).astype(cp.float16)
        k = cp.random.standard_normal((batch, kv_len, num_kv_heads, HEAD_DIM), dtype=cp.float32).astype(cp.float16)
        v = cp.random.standard_normal((batch, kv_len, num_kv_heads, HEAD_DIM), dtype=cp.float32).astype(cp.float16)
        floor_s, unique_bytes, flops = decode_floor_s(batch, num_kv_heads, kv_len, 2, ceilings)
        base = {"suite": "decode", "dtype": "float16", "batch": batch, "num_qo_heads": NUM_QO_HEADS,
                "num_kv_heads": num_kv_heads, "head_dim": HEAD_DIM, "kv_len": kv_len,
                "unique_bytes": unique_bytes, "flops": flops, "floor_ms": floor_s * 1e3}
        sms = num_sms(cp.cuda.Device().id)
        # The fastest anything can read these K and V bytes, in this run, under the same flush.
        base["stream_ms"] = timer(lambda: stream(k, v))
        # Each kernel with its plan's own split count ("auto") and with the counts swept ("forced"):
        # what the plan's choice is measured against.
        sweep_splits = [s for s in SWEEP_SPLITS if sweep and (s == 1 or kv_len // s >= 256)]
        plans = functools.partial(_plans_to_time, batch, num_kv_heads, kv_len, sms, gpu, sweep_splits)
        out = cp.empty((batch, NUM_QO_HEADS, HEAD_DIM), dtype=cp.float16)
        lse = cp.empty((batch, NUM_QO_HEADS), dtype=cp.float32)
        run = lambda runner: runner.run(q, k, v, out=out, lse=lse)  # noqa: E731
        rows += _plan_rows(plans(), "split_kv", run, base, timer, gpu)
        unsplit = gpukernels.plan_split_kv(batch, NUM_QO_HEADS, num_kv_heads, HEAD_DIM, kv_len,
                                           dtype="float16", num_splits=1, num_sms=sms)
        rows += _plan_rows({"auto": unsplit}, "decode", run, base, timer, gpu)
        # The call as a user first makes it: no plan, no out (the plan cache warms up in warm-up).
        one_shot = lambda: gpukernels.split_kv(q, k, v)  # noqa: E731
        one_shot_row = {**base, "impl": "split_kv:oneshot", "time_ms": timer(one_shot)}
        rows.append(one_shot_row)
        # Paged: the same cache cut into pages of PAGE_SIZE, page table in order.
        pages_per_seq = -(-kv_len // PAGE_SIZE)
        pad = pages_per_seq * PAGE_SIZE - kv_len
        kp = cp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(-1, PAGE_SIZE, num_kv_heads, HEAD_DIM)
        vp = cp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(-1, PAGE_SIZE, num_kv_heads, HEAD_DIM)
        indptr = cp.arange(batch + 1, dtype=cp.int32) * pages_per_seq
        indices = cp.arange(batch * pages_per_seq, dtype=cp.int32)
        last = cp.full((batch,), kv_len - (pages_per_seq - 1) * PAGE_SIZE, dtype=cp.int32)
        run_paged = lambda runner: runner.run_paged(q, kp, vp, indptr, indices, last, out=out, lse=lse)  # noqa: E731
        rows += _plan_rows(plans(page_size=PAGE_SIZE), "paged_decode", run_paged,
                           {**base, "page_size": PAGE_SIZE}, timer, gpu)
        del kp, vp
        rows += _peer_rows_with_host(timer, base, one_shot_row, one_shot,
                                     _peers(q, k, v, batch, num_kv_heads, kv_len))
        for row in rows:
            if "frac" not in row:
                row["frac"] = row["floor_ms"] / row["time_ms"]
        del q, k, v
        cp.get_default_memory_pool().free_all_blocks()
    return rows


# (dtype, batch, num_qo_heads, num_kv_heads, head_dim, kv_len): shapes off the decode grid, chosen
# to cover float16 and bfloat16, head_dim 64/128/256, 1 to 32 KV heads (MQA included), groups of
# 1, 4, 5, 7 and 8 query heads per KV head, odd lengths up to 500k tokens and batch 1 to 128.
COVERAGE_GRID = [
    ("float16", 1, 8, 1, 256, 262147),
    ("bfloat16", 1, 16, 2, 256, 333333),
    ("float16", 2, 16, 16, 256, 32768),
    ("bfloat16", 16, 64, 8, 256, 16385),
    ("bfloat16", 4, 32, 4, 64, 65536),
    ("float16", 16, 20, 4, 64, 8191),
    ("float16", 1, 32, 32, 64, 131071),
    ("bfloat16", 64, 16, 16, 64, 1000),
    ("bfloat16", 128, 28, 4, 128, 2049),
    ("float16", 32, 32, 32, 128, 4099),
    ("bfloat16", 8, 32, 8, 128, 100003),
    ("float16", 1, 40, 8, 128, 500000),
    ("float16", 3, 56, 8, 128, 77777),
    ("float16", 128, 8, 1, 128, 16384),
]


def run_coverage_suite(timer: Timer, ceilings: dict, gpu, *, quick: bool) -> list[dict]:
    """Shapes off the decode grid: the planned run and the one-shot call against SDPA's backends."""
    import cupy as cp
    import torch

    import gpukernels
    from costmodel.rows import predict_row
    from gpukernels.split_kv import num_sms

    rows = []
    stream = stream_read()
    grid = COVERAGE_GRID[:3] if quick else COVERAGE_GRID
    bw = max(ceilings["copy_bytes_per_s"], ceilings["read_bytes_per_s"])
    for i, (dtype, batch, hq, hkv, d, kv_len) in enumerate(grid, 1):
        _progress(f"coverage {i}/{len(grid)}: {dtype}, batch {batch}, {hq}/{hkv} heads, head_dim {d}, "
                  f"kv_len {kv_len}")
        # As PyTorch tensors (CuPy has no bfloat16); the streaming read sees them as int16.
        tdtype = getattr(torch, dtype)

        def randn(*shape):
            return torch.randn(shape, device="cuda", dtype=tdtype)

        q, k, v = randn(batch, hq, d), randn(batch, kv_len, hkv, d), randn(batch, kv_len, hkv, d)
        k16, v16 = (cp.asarray(x.view(torch.int16)) for x in (k, v))
        unique_bytes = (2 * batch * kv_len * hkv * d + 2 * batch * hq * d) * 2
        flops = 4 * batch * hq * kv_len * d
        floor_s = max(unique_bytes / bw, flops / ceilings["matmul_flops_per_s"])
        base = {"suite": "coverage", "dtype": dtype, "batch": batch, "num_qo_heads": hq,
                "num_kv_heads": hkv, "head_dim": d, "kv_len": kv_len, "unique_bytes": unique_bytes,
                "flops": flops, "floor_ms": floor_s * 1e3, "stream_ms": timer(lambda: stream(k16, v16))}
        plan = gpukernels.plan_split_kv(batch, hq, hkv, d, kv_len, dtype=dtype,
                                        num_sms=num_sms(cp.cuda.Device().id), gpu=gpu)
        runner = gpukernels.SplitKV(plan)
        out, lse = torch.empty_like(q), torch.empty((batch, hq), device="cuda", dtype=torch.float32)
        planned = lambda: runner.run(q, k, v, out=out, lse=lse)  # noqa: E731
        row = {**base, "impl": "split_kv", "plan": "auto", "num_splits": plan.num_splits,
               "chunk_size": plan.chunk_size, "time_ms": timer(planned), "host_us": host_us(planned)}
        row["predicted_ms"] = predict_row(row, gpu).time_s * 1e3
        rows.append(row)
        one_shot = lambda: gpukernels.split_kv(q, k, v)  # noqa: E731
        one_shot_row = {**base, "impl": "split_kv:oneshot", "num_splits": plan.num_splits,
                        "time_ms": timer(one_shot)}
        rows.append(one_shot_row)
        rows += _peer_rows_with_host(timer, base, one_shot_row, one_shot, _sdpa_peers(q, k, v))
        for r in rows:
            r.setdefault("frac", r["floor_ms"] / r["time_ms"])
        _progress("  " + ", ".join(f"{r['impl']} {r['time_ms'] * 1e3:.1f} us" for r in rows
                                   if r["kv_len"] == kv_len and r["batch"] == batch))
        del q, k, v, k16, v16, out, lse, runner
        cp.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------
# Helpers shared by the shared-prefix, span and tree suites


def _randn16(shape) -> "object":
    """Fresh float16 normals (drawn as float32, cast), made in slices so a large cache needs no
    float32 copy of its whole size."""
    import cupy as cp

    out = cp.empty(shape, dtype=cp.float16)
    flat = out.reshape(-1)
    step = 1 << 28
    for start in range(0, flat.size, step):
        n = min(step, flat.size - start)
        flat[start:start + n] = cp.random.standard_normal(n, dtype=cp.float32).astype(cp.float16)
    return out


def _floor_and_ceiling(base: dict, ceilings: dict) -> dict:
    """floor_ms from unique_bytes and flops; ceiling_ms = max(stream_ms, flops / matmul rate)."""
    bw = max(ceilings["copy_bytes_per_s"], ceilings["read_bytes_per_s"])
    compute_s = base["flops"] / ceilings["matmul_flops_per_s"]
    base["floor_ms"] = max(base["unique_bytes"] / bw, compute_s) * 1e3
    if "stream_ms" in base:
        base["ceiling_ms"] = max(base["stream_ms"], compute_s * 1e3)
    return base


def _measure(timer, label: str, fn, failed: list) -> "dict | None":
    """{"time_ms", "host_us"} of fn, or None (reported, and `label` added to `failed`) if it raises."""
    try:
        return {"time_ms": timer(fn), "host_us": host_us(fn)}
    except Exception as exc:  # noqa: BLE001 - report and go on with the other rows
        _progress(f"  {label} failed: {_error_line(exc)}")
        failed.append(label)
        return None


def _peer_rows(timer, base: dict, peers: dict) -> list[dict]:
    """One row per peer that runs: `peers` maps a label to a callable, or to (callable, extra row
    keys). A peer that fails is reported and left out."""
    rows = []
    for label, entry in peers.items():
        fn, extra = entry if isinstance(entry, tuple) else (entry, {})
        m = _measure(timer, label, fn, [])
        if m:
            rows.append({**base, "impl": label, **extra, **m})
    return rows


def _predicted(row: dict, gpu) -> dict:
    """The row with the cost model's `predicted_ms` where `costmodel.rows.predict_row` reads it."""
    from costmodel.rows import UnsupportedRow, predict_row

    try:
        row["predicted_ms"] = predict_row(row, gpu).time_s * 1e3
    except (UnsupportedRow, ValueError) as exc:
        _progress(f"  {row['impl']}: no prediction ({str(exc).splitlines()[0][:80]})")
    return row


def _error_line(exc: Exception) -> str:
    text = str(exc).splitlines()[0][:100] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------------------------
# Shared prefix

# (num_kv_heads, batch, prefix_len, suffix_len); fp16, num_qo_heads 32, head_dim 128, pages of
# PAGE_SIZE for the peers (docs/benchmarks.md, "Shared prefix").
SHARED_PREFIX_GRID = [
    (32, 16, 8192, 256),
    (32, 32, 8192, 256),
    (32, 64, 16384, 256),
    (32, 256, 4096, 128),
    (8, 16, 8192, 256),
    (8, 64, 16384, 256),
    (8, 256, 4096, 128),
    (8, 128, 32768, 256),
]


def shared_prefix_sizes(num_kv_heads: int, batch: int, prefix_len: int, suffix_len: int,
                        elem_bytes: int = 2) -> tuple[int, int, int]:
    """(unique bytes, KV bytes, FLOPs) of one shared-prefix row: the prefix's K and V once, every
    suffix's, q and out; FLOPs over every sequence's prefix and suffix."""
    kv_bytes = 2 * (prefix_len + batch * suffix_len) * num_kv_heads * HEAD_DIM * elem_bytes
    qo_bytes = 2 * batch * NUM_QO_HEADS * HEAD_DIM * elem_bytes
    flops = 4 * batch * NUM_QO_HEADS * (prefix_len + suffix_len) * HEAD_DIM
    return kv_bytes + qo_bytes, kv_bytes, flops


def shared_prefix_base(num_kv_heads: int, batch: int, prefix_len: int, suffix_len: int, *,
                       suite: str = "shared_prefix", **extra) -> dict:
    """The workload keys of a shared-prefix row (without the measured ones); `extra` keys (a
    published setting's name) follow `suite`."""
    unique_bytes, _, flops = shared_prefix_sizes(num_kv_heads, batch, prefix_len, suffix_len)
    return {"suite": suite, **extra, "dtype": "float16", "batch": batch, "num_qo_heads": NUM_QO_HEADS,
            "num_kv_heads": num_kv_heads, "head_dim": HEAD_DIM, "prefix_len": prefix_len,
            "suffix_len": suffix_len, "unique_bytes": unique_bytes, "flops": flops}


# The naive baseline copies the prefix into every sequence's cache; a copy larger than this is not
# made (the row is skipped, with the reason on the workload's other rows): the published baselines
# run out of memory there first.
NAIVE_COPY_LIMIT_BYTES = 60e9


def naive_copy_bytes(num_kv_heads: int, batch: int, prefix_len: int, suffix_len: int,
                     elem_bytes: int = 2) -> int:
    """Bytes of the naive baseline's caches: every sequence's prefix and suffix, K and V."""
    return 2 * batch * (prefix_len + suffix_len) * num_kv_heads * HEAD_DIM * elem_bytes


def naive_skip_reason(num_kv_heads: int, batch: int, prefix_len: int, suffix_len: int) -> "str | None":
    """Why the naive row of a workload is not run (its copy is over NAIVE_COPY_LIMIT_BYTES), or None."""
    need = naive_copy_bytes(num_kv_heads, batch, prefix_len, suffix_len)
    if need <= NAIVE_COPY_LIMIT_BYTES:
        return None
    return (f"the prefix copied into every sequence needs {need / 1e9:.1f} GB for K and V, over the "
            f"{NAIVE_COPY_LIMIT_BYTES / 1e9:.0f} GB limit")


def _shared_prefix_peers(q, k_pool, v_pool, batch, num_kv_heads, prefix_len, suffix_len) -> dict:
    """FlashInfer's two ways to run a shared prefix, on the same pool of pages (the prefix's pages
    first, then each sequence's suffix pages in order), as callables.

    - peer:flashinfer_cascade: MultiLevelCascadeAttentionWrapper with 2 levels: level 0 is one
      request of `batch` queries over the prefix's pages, level 1 one request per sequence over
      its suffix pages; FlashInfer merges the two states.
    - peer:flashinfer_decode_prefix_pages: BatchDecodeWithPagedKVCacheWrapper (tensor cores),
      each sequence's page table listing the prefix's pages and then its own: the pages are
      shared, the reads are not.
    """
    try:
        import flashinfer
        import torch
    except ImportError:
        _progress("  flashinfer not installed: no FlashInfer peers")
        return {}
    if prefix_len % PAGE_SIZE or suffix_len % PAGE_SIZE:
        _progress(f"  FlashInfer peers need prefix_len and suffix_len in whole pages of {PAGE_SIZE}")
        return {}
    peers = {}
    dev = "cuda"
    i32 = {"dtype": torch.int32, "device": dev}
    prefix_pages, suffix_pages = prefix_len // PAGE_SIZE, suffix_len // PAGE_SIZE
    # The pool as FlashInfer's NHD pages, without a copy: (k_cache, v_cache), each
    # [num_pages, page_size, num_kv_heads, head_dim].
    paged_kv = (torch.as_tensor(k_pool, device=dev).view(-1, PAGE_SIZE, num_kv_heads, HEAD_DIM),
                torch.as_tensor(v_pool, device=dev).view(-1, PAGE_SIZE, num_kv_heads, HEAD_DIM))
    qt = torch.as_tensor(q, device=dev)
    prefix_ids = torch.arange(prefix_pages, **i32)
    suffix_ids = prefix_pages + torch.arange(batch * suffix_pages, **i32)   # sequence b's: row b
    try:
        workspace = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
        cascade = flashinfer.MultiLevelCascadeAttentionWrapper(2, workspace, "NHD")
        cascade.plan(
            qo_indptr_arr=[torch.tensor([0, batch], **i32), torch.arange(batch + 1, **i32)],
            paged_kv_indptr_arr=[torch.tensor([0, prefix_pages], **i32),
                                 torch.arange(batch + 1, **i32) * suffix_pages],
            paged_kv_indices_arr=[prefix_ids, suffix_ids],
            paged_kv_last_page_len=[torch.tensor([PAGE_SIZE], **i32),
                                    torch.full((batch,), PAGE_SIZE, **i32)],
            num_qo_heads=NUM_QO_HEADS, num_kv_heads=num_kv_heads, head_dim=HEAD_DIM, page_size=PAGE_SIZE,
            q_data_type=torch.float16, kv_data_type=torch.float16)
        run_cascade = lambda: cascade.run(qt, paged_kv)  # noqa: E731
        run_cascade()
        torch.cuda.synchronize()
        peers["peer:flashinfer_cascade"] = run_cascade
    except Exception as exc:  # noqa: BLE001 - report and go on without it
        _progress(f"  peer:flashinfer_cascade unavailable: {_error_line(exc)}")
    try:
        workspace2 = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
        decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace2, "NHD", use_tensor_cores=True)
        indices = torch.cat([prefix_ids.expand(batch, prefix_pages), suffix_ids.view(batch, suffix_pages)],
                            dim=1).reshape(-1)
        indptr = torch.arange(batch + 1, **i32) * (prefix_pages + suffix_pages)
        last = torch.full((batch,), PAGE_SIZE, **i32)
        decode.plan(indptr, indices, last, NUM_QO_HEADS, num_kv_heads, HEAD_DIM, PAGE_SIZE,
                    q_data_type=torch.float16, kv_data_type=torch.float16)
        run_decode = lambda: decode.run(qt, paged_kv)  # noqa: E731
        run_decode()
        torch.cuda.synchronize()
        peers["peer:flashinfer_decode_prefix_pages"] = run_decode
    except Exception as exc:  # noqa: BLE001
        _progress(f"  peer:flashinfer_decode_prefix_pages unavailable: {_error_line(exc)}")
    return peers


def _shared_prefix_workload_rows(timer: Timer, ceilings: dict, gpu, base: dict, failed: list) -> list[dict]:
    """Every row of one shared-prefix workload (`base`: `shared_prefix_base(...)`, which names the
    suite): Hydragen planned (`SharedPrefix(plan).run`, out/lse given) and its one-shot call, bifurcated, the prefix copied into every
    sequence then split-KV (naive; left out, with `naive_skipped` on the other rows, where the copy
    would pass NAIVE_COPY_LIMIT_BYTES), FlashInfer's cascade and paged decode with the prefix's
    pages in every page table."""
    import cupy as cp

    import gpukernels
    from gpukernels.shared_prefix import SharedPrefix, plan_shared_prefix, shared_prefix
    from gpukernels.split_kv import num_sms

    hkv, batch = base["num_kv_heads"], base["batch"]
    prefix_len, suffix_len = base["prefix_len"], base["suffix_len"]
    base = dict(base)
    rows = []
    stream = stream_read()
    q = _randn16((batch, NUM_QO_HEADS, HEAD_DIM))
    # One pool of tokens, laid out as a paged cache holds them: the prefix, then each
    # sequence's suffix. Our kernels get views of it, FlashInfer the same memory as pages.
    k_pool = _randn16((prefix_len + batch * suffix_len, hkv, HEAD_DIM))
    v_pool = _randn16((prefix_len + batch * suffix_len, hkv, HEAD_DIM))
    k_prefix, v_prefix = k_pool[:prefix_len], v_pool[:prefix_len]
    k_suffix = k_pool[prefix_len:].reshape(batch, suffix_len, hkv, HEAD_DIM)
    v_suffix = v_pool[prefix_len:].reshape(batch, suffix_len, hkv, HEAD_DIM)
    skip_naive = naive_skip_reason(hkv, batch, prefix_len, suffix_len)
    if skip_naive:
        base["naive_skipped"] = skip_naive
        _progress(f"  shared_prefix:naive skipped: {skip_naive}")
    # Reading the unique K and V once (the prefix once, every suffix): one launch over the pool.
    base["stream_ms"] = timer(lambda: stream(k_pool, v_pool))
    _floor_and_ceiling(base, ceilings)
    out = cp.empty((batch, NUM_QO_HEADS, HEAD_DIM), dtype=cp.float16)
    lse = cp.empty((batch, NUM_QO_HEADS), dtype=cp.float32)

    plan = plan_shared_prefix(batch, NUM_QO_HEADS, hkv, HEAD_DIM, prefix_len, suffix_len, dtype="float16",
                              num_sms=num_sms(cp.cuda.Device().id), gpu=gpu)
    runner = SharedPrefix(plan)
    planned = lambda: runner.run(q, k_prefix, v_prefix, k_suffix, v_suffix, out=out, lse=lse)  # noqa: E731
    m = _measure(timer, "shared_prefix:hydragen", planned, failed)
    if m:
        rows.append(_predicted({**base, "impl": "shared_prefix:hydragen", "prefix_chunk_size": plan.prefix_chunk_size,
                                "merge_launch": plan.merge_launch, **m}, gpu))
    one_shot = lambda: shared_prefix(q, k_prefix, v_prefix, k_suffix, v_suffix)  # noqa: E731
    m = _measure(timer, "shared_prefix:hydragen:oneshot", one_shot, failed)
    if m:
        rows.append({**base, "impl": "shared_prefix:hydragen:oneshot", **m})
    # Bifurcated attention: the paper's one softmax over both logits, by its own kernels.
    bifurcated = lambda: shared_prefix(q, k_prefix, v_prefix, k_suffix, v_suffix,  # noqa: E731
                                       method="bifurcated", out=out, lse=lse)
    m = _measure(timer, "shared_prefix:bifurcated", bifurcated, failed)
    if m:
        rows.append(_predicted({**base, "impl": "shared_prefix:bifurcated", **m}, gpu))

    if not skip_naive:
        # Naive: the prefix copied into every sequence's cache (not timed), then split-KV.
        total = prefix_len + suffix_len
        k_full = cp.empty((batch, total, hkv, HEAD_DIM), dtype=cp.float16)
        v_full = cp.empty_like(k_full)
        k_full[:, :prefix_len] = k_prefix[None]
        k_full[:, prefix_len:] = k_suffix
        v_full[:, :prefix_len] = v_prefix[None]
        v_full[:, prefix_len:] = v_suffix
        naive = lambda: gpukernels.split_kv(q, k_full, v_full, out=out, lse=lse)  # noqa: E731
        m = _measure(timer, "shared_prefix:naive", naive, failed)
        if m:
            rows.append(_predicted({**base, "impl": "shared_prefix:naive", **m}, gpu))
        del k_full, v_full, naive
        cp.get_default_memory_pool().free_all_blocks()

    rows += _peer_rows(timer, base, _shared_prefix_peers(q, k_pool, v_pool, batch, hkv, prefix_len, suffix_len))
    for r in rows:
        r.setdefault("frac", r["floor_ms"] / r["time_ms"])
    _progress("  " + ", ".join(f"{r['impl']} {r['time_ms'] * 1e3:.1f} us" for r in rows))
    del q, k_pool, v_pool, k_prefix, v_prefix, k_suffix, v_suffix, out, lse
    _free_torch_and_cupy()
    return rows


def run_shared_prefix_suite(timer: Timer, ceilings: dict, gpu, *, quick: bool,
                            failed: "list | None" = None) -> list[dict]:
    """One prefix shared by every sequence: Hydragen (planned call with out/lse, and the one-shot
    call), the prefix copied into every sequence then split-KV (naive), and FlashInfer's cascade
    and paged decode with the prefix's pages in every page table."""
    failed = [] if failed is None else failed
    rows = []
    grid = SHARED_PREFIX_GRID[:2] if quick else SHARED_PREFIX_GRID
    for i, (hkv, batch, prefix_len, suffix_len) in enumerate(grid, 1):
        _progress(f"shared_prefix {i}/{len(grid)}: {hkv} KV heads, batch {batch}, prefix {prefix_len}, "
                  f"suffix {suffix_len}")
        rows += _shared_prefix_workload_rows(timer, ceilings, gpu,
                                             shared_prefix_base(hkv, batch, prefix_len, suffix_len), failed)
    return rows


# --------------------------------------------------------------------------------------------
# Shared prefix, the published settings

# (setting, num_kv_heads, batch, prefix_len, suffix_len); fp16, 32 query heads, head_dim 128
# (docs/benchmarks.md, "Shared prefix", "The published settings"):
# - bifurcated_7b: bifurcated attention's 7B multi-head model (32 heads, 32 KV heads), an 8k
#   context shared by 16 and 32 samples, 256 decoded tokens each;
# - hydragen_sweep: Hydragen's sweep of the shared prefix from 1k to 16k tokens at batch 256 and
#   1024, 128 own tokens per sequence, with the grouped heads of the GQA rows (32 query, 8 KV).
SHARED_PREFIX_PAPERS_GRID = (
    [("bifurcated_7b", 32, samples, 8192, 256) for samples in (16, 32)]
    + [("hydragen_sweep", 8, batch, prefix_len, 128)
       for batch in (256, 1024) for prefix_len in (1024, 2048, 4096, 8192, 16384)]
)


def shared_prefix_papers_grid(quick: bool = False) -> list[tuple]:
    """The published settings' rows; with `quick`, the first row of each setting."""
    if not quick:
        return list(SHARED_PREFIX_PAPERS_GRID)
    seen: dict = {}
    for row in SHARED_PREFIX_PAPERS_GRID:
        seen.setdefault(row[0], row)
    return list(seen.values())


def run_shared_prefix_papers_suite(timer: Timer, ceilings: dict, gpu, *, quick: bool,
                                   failed: "list | None" = None) -> list[dict]:
    """The shared-prefix rows of the published settings (SHARED_PREFIX_PAPERS_GRID), each row
    marked with its `setting`; the same rows as the shared_prefix suite, the naive one left out
    where its copy would pass NAIVE_COPY_LIMIT_BYTES."""
    failed = [] if failed is None else failed
    rows = []
    grid = shared_prefix_papers_grid(quick)
    for i, (setting, hkv, batch, prefix_len, suffix_len) in enumerate(grid, 1):
        _progress(f"shared_prefix_papers {i}/{len(grid)}: {setting}, {hkv} KV heads, batch {batch}, "
                  f"prefix {prefix_len}, suffix {suffix_len}")
        base = shared_prefix_base(hkv, batch, prefix_len, suffix_len, suite="shared_prefix_papers",
                                  setting=setting)
        rows += _shared_prefix_workload_rows(timer, ceilings, gpu, base, failed)
    return rows


def _free_torch_and_cupy() -> None:
    import cupy as cp

    cp.get_default_memory_pool().free_all_blocks()
    try:
        import torch

        torch.cuda.empty_cache()
    except ImportError:
        pass


# --------------------------------------------------------------------------------------------
# Tree

# docs/benchmarks.md, "Tree": 64 sequences, MHA with 32 heads of 128, fp16; a 4096-token root shared
# by all, 8 groups of 8 sequences sharing 2048 more tokens each, 256 own tokens per sequence. Levels
# are (num_segments, seg_len) from the root down, as `costmodel.tree.TreeShape` reads them.
TREE_BATCH = 64
TREE_KV_HEADS = 32
TREE_LEVELS = ((1, 4096), (8, 2048), (64, 256))


def tree_layout(levels, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The segments of a tree given by levels, back to back in one pool, level by level (the root
    first), and each sequence's path (root to leaf): int32 seg_indptr [num_segs + 1], path_indptr
    [batch + 1], path_segs [nnz], as `refattn.tree_from_paths` lays them out. Segment j of level i
    is shared by sequences j * (batch / n_i) ... (j + 1) * (batch / n_i) - 1."""
    seg_lens, first_seg = [], []
    for n, length in levels:
        if n < 1 or batch % n:
            raise ValueError(f"a level of {n} segments does not split a batch of {batch} evenly")
        first_seg.append(len(seg_lens))
        seg_lens += [length] * n
    seg_indptr = np.concatenate([[0], np.cumsum(seg_lens)])
    paths = [[first + b // (batch // n) for first, (n, _) in zip(first_seg, levels)] for b in range(batch)]
    path_indptr = np.arange(batch + 1) * len(levels)
    return (seg_indptr.astype(np.int32), path_indptr.astype(np.int32),
            np.asarray(paths, dtype=np.int32).reshape(-1))


def tree_cascade_requests(levels, batch: int, num_levels: int) -> list[list[tuple[int, list[int]]]]:
    """A cascade of `num_levels` levels over the tree's segments (numbered as `tree_layout` does):
    the first num_levels - 1 tree levels as they are (one request per segment, for the queries of
    its sharers), the remaining ones folded into one request per sequence over the rest of its
    path. Each level is a list of (number of queries, segment ids); the queries of a level's
    requests follow each other in sequence order. num_levels = 1 is paged decode over whole paths."""
    if not 1 <= num_levels <= len(levels):
        raise ValueError(f"num_levels must be 1 to {len(levels)}, got {num_levels}")
    _, path_indptr, path_segs = tree_layout(levels, batch)
    paths = path_segs.reshape(batch, len(levels)).tolist()
    cascade = []
    first = 0
    for n, _ in levels[:num_levels - 1]:
        cascade.append([(batch // n, [first + j]) for j in range(n)])
        first += n
    cascade.append([(1, path[num_levels - 1:]) for path in paths])
    return cascade


def paged_level_tables(requests, seg_indptr, page_size: int = PAGE_SIZE) -> tuple[np.ndarray, ...]:
    """FlashInfer's tables of one level of requests (number of queries, segment ids) over the pool
    cut into pages of `page_size` tokens (segments on page boundaries): int32 qo_indptr, kv_indptr,
    kv_indices (the pages of the request's segments, in order) and kv_last_page_len (full pages)."""
    seg_indptr = np.asarray(seg_indptr, dtype=np.int64)
    if np.any(seg_indptr % page_size):
        raise ValueError(f"segments must start and end on pages of {page_size} tokens")
    qo, kv, indices = [0], [0], []
    for num_queries, segs in requests:
        pages = [np.arange(seg_indptr[s] // page_size, seg_indptr[s + 1] // page_size) for s in segs]
        pages = np.concatenate(pages) if pages else np.zeros(0, dtype=np.int64)
        if not pages.size:
            raise ValueError(f"a request over segments {list(segs)} holds no page")
        qo.append(qo[-1] + num_queries)
        kv.append(kv[-1] + pages.size)
        indices.append(pages)
    i32 = functools.partial(np.asarray, dtype=np.int32)
    return (i32(qo), i32(kv), i32(np.concatenate(indices)), np.full(len(requests), page_size, dtype=np.int32))


def tree_base(levels=TREE_LEVELS, *, batch: int = TREE_BATCH, num_kv_heads: int = TREE_KV_HEADS) -> dict:
    """The workload keys of a tree row: `levels` (what `costmodel.rows.predict_row` reads), the
    tokens each sequence attends to (`context_len`), unique bytes (every segment's K and V once,
    q and out) and FLOPs (every sequence over its whole path)."""
    total_tokens = sum(n * length for n, length in levels)
    context_len = sum(length for _, length in levels)
    unique_bytes = 2 * total_tokens * num_kv_heads * HEAD_DIM * 2 + 2 * batch * NUM_QO_HEADS * HEAD_DIM * 2
    return {"suite": "tree", "dtype": "float16", "batch": batch, "num_qo_heads": NUM_QO_HEADS,
            "num_kv_heads": num_kv_heads, "head_dim": HEAD_DIM, "levels": [list(level) for level in levels],
            "context_len": context_len, "unique_bytes": unique_bytes,
            "flops": 4 * batch * NUM_QO_HEADS * context_len * HEAD_DIM}


_TREE_PEER_LEVELS = {"peer:flashinfer_cascade3": 3, "peer:flashinfer_cascade2": 2, "peer:flashinfer_decode": 1}


def _tree_peers(q, k_pool, v_pool, levels, batch: int, num_kv_heads: int) -> dict:
    """FlashInfer on the same pool as pages of PAGE_SIZE, no copies, as callables:
    - peer:flashinfer_cascade3: MultiLevelCascadeAttentionWrapper with one level per tree level
      (the root's pages for all queries, each group's for its sequences, each sequence's own);
    - peer:flashinfer_cascade2: two levels, the root's pages for all queries, then each sequence's
      group and own pages;
    - peer:flashinfer_decode: BatchDecodeWithPagedKVCacheWrapper (tensor cores), each sequence's
      page table listing its root, group and own pages (the pages shared, not the reads)."""
    try:
        import flashinfer
        import torch
    except ImportError:
        _progress("  flashinfer not installed: no FlashInfer peers")
        return {}
    seg_indptr, _, _ = tree_layout(levels, batch)
    dev = "cuda"
    paged_kv = (torch.as_tensor(k_pool, device=dev).view(-1, PAGE_SIZE, num_kv_heads, HEAD_DIM),
                torch.as_tensor(v_pool, device=dev).view(-1, PAGE_SIZE, num_kv_heads, HEAD_DIM))
    qt = torch.as_tensor(q, device=dev)
    peers = {}
    for label, num_levels in _TREE_PEER_LEVELS.items():
        if num_levels > len(levels):
            continue
        try:
            tables = [[torch.as_tensor(a, device=dev) for a in paged_level_tables(level, seg_indptr)]
                      for level in tree_cascade_requests(levels, batch, num_levels)]
            workspace = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
            if num_levels == 1:
                _, indptr, indices, last = tables[0]
                wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
                wrapper.plan(indptr, indices, last, NUM_QO_HEADS, num_kv_heads, HEAD_DIM, PAGE_SIZE,
                             q_data_type=torch.float16, kv_data_type=torch.float16)
            else:
                wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(num_levels, workspace, "NHD")
                wrapper.plan(
                    qo_indptr_arr=[t[0] for t in tables], paged_kv_indptr_arr=[t[1] for t in tables],
                    paged_kv_indices_arr=[t[2] for t in tables], paged_kv_last_page_len=[t[3] for t in tables],
                    num_qo_heads=NUM_QO_HEADS, num_kv_heads=num_kv_heads, head_dim=HEAD_DIM,
                    page_size=PAGE_SIZE, q_data_type=torch.float16, kv_data_type=torch.float16)
            run = lambda wrapper=wrapper: wrapper.run(qt, paged_kv)  # noqa: E731
            run()
            torch.cuda.synchronize()
            peers[label] = (run, {"page_size": PAGE_SIZE})
        except Exception as exc:  # noqa: BLE001 - report and go on without it
            _progress(f"  {label} unavailable: {_error_line(exc)}")
    return peers


def _kernel_ms(timer, label: str, fn, host: float) -> dict:
    """{"kernel_ms"}: `fn` timed again with a GPU wait of twice its host time (at least 0.2 ms)
    before the start event, so that the host work of each call (checks, the work list) is not in
    the time: what the kernels take when the host is ahead, as across the layers of a model or
    under a CUDA graph. Empty if it fails."""
    try:
        return {"kernel_ms": timer(fn, lead_ms=max(0.2, 2 * host * 1e-3))}
    except Exception as exc:  # noqa: BLE001
        _progress(f"  {label}: no kernel_ms: {_error_line(exc)}")
        return {}


def run_tree_suite(timer: Timer, ceilings: dict, gpu, *, quick: bool = False,
                   failed: "list | None" = None) -> list[dict]:
    """The tree of docs/benchmarks.md on one pool of segments (the root, the groups', each
    sequence's own, back to back): `tree`, the planned run (`Tree(plan_tree(...)).run`, out/lse
    given; also timed with its host work hidden, `kernel_ms`; its form and chunk in the row) and
    the one-shot call; `tree:paged`, the planned run over the pool as pages of PAGE_SIZE (each
    segment's pages in order, as the peers read it); `tree:naive`, every sequence's path copied into a
    contiguous cache (not timed) then split-KV; FlashInfer's cascade with three levels and with
    two, and its paged decode over whole paths, on the same pool as pages. `stream_ms`: the pool
    read once. `quick` changes nothing (one workload)."""
    import cupy as cp

    import gpukernels

    failed = [] if failed is None else failed
    levels, batch, hkv = TREE_LEVELS, TREE_BATCH, TREE_KV_HEADS
    base = tree_base(levels, batch=batch, num_kv_heads=hkv)
    _progress(f"tree: batch {batch}, {hkv} KV heads, levels {tree_label(base)}")
    seg_indptr, path_indptr, path_segs = tree_layout(levels, batch)
    total = int(seg_indptr[-1])
    rows = []
    stream = stream_read()
    q = _randn16((batch, NUM_QO_HEADS, HEAD_DIM))
    k_pool = _randn16((total, hkv, HEAD_DIM))
    v_pool = _randn16((total, hkv, HEAD_DIM))
    base["stream_ms"] = timer(lambda: stream(k_pool, v_pool))
    _floor_and_ceiling(base, ceilings)
    out = cp.empty((batch, NUM_QO_HEADS, HEAD_DIM), dtype=cp.float16)
    lse = cp.empty((batch, NUM_QO_HEADS), dtype=cp.float32)

    try:
        from gpukernels.split_kv import device_gpu
        from gpukernels.tree import Tree, plan_tree, tree

        plan = plan_tree(seg_indptr, path_indptr, path_segs, num_qo_heads=NUM_QO_HEADS, num_kv_heads=hkv,
                         head_dim=HEAD_DIM, gpu=device_gpu(cp.cuda.Device().id))
        runner = Tree(plan)
    except Exception as exc:  # noqa: BLE001 - the peers still run
        _progress(f"  tree unavailable: {_error_line(exc)}")
        failed.append("tree")
        tree = None
    if tree is not None:
        ours = lambda: runner.run(q, k_pool, v_pool, out=out, lse=lse)  # noqa: E731
        m = _measure(timer, "tree", ours, failed)
        if m:
            row = {**base, "impl": "tree", **m, **_kernel_ms(timer, "tree", ours, m["host_us"]),
                   "chunk_size": plan.chunk_size, "form": plan.form}
            rows.append(_predicted(row, gpu))
        # The index arrays stay on the host, where the call reads them (its plan is kept for the next call).
        one_shot = lambda: tree(q, k_pool, v_pool, seg_indptr, path_indptr, path_segs)  # noqa: E731
        m = _measure(timer, "tree:oneshot", one_shot, failed)
        if m:
            rows.append({**base, "impl": "tree:oneshot", **m})
        # The same pool as the peers read it, pages of PAGE_SIZE, each segment's pages in order.
        try:
            pages = np.diff(seg_indptr) // PAGE_SIZE
            tables = dict(seg_kv_indptr=np.concatenate([[0], np.cumsum(pages)]),
                          seg_kv_indices=np.arange(int(pages.sum())), seg_kv_last_page_len=np.full(len(pages), PAGE_SIZE))
            paged_plan = plan_tree(None, path_indptr, path_segs, num_qo_heads=NUM_QO_HEADS, num_kv_heads=hkv,
                                   head_dim=HEAD_DIM, gpu=device_gpu(cp.cuda.Device().id), page_size=PAGE_SIZE,
                                   **tables)
            paged_runner = Tree(paged_plan)
            k_pages, v_pages = (x.reshape(-1, PAGE_SIZE, hkv, HEAD_DIM) for x in (k_pool, v_pool))
            m = _measure(timer, "tree:paged", lambda: paged_runner.run(q, k_pages, v_pages, out=out, lse=lse), failed)
            if m:
                rows.append(_predicted({**base, "impl": "tree:paged", **m, "chunk_size": paged_plan.chunk_size,
                                        "form": paged_plan.form, "page_size": PAGE_SIZE}, gpu))
        except Exception as exc:  # noqa: BLE001 - the other rows stand
            _progress(f"  tree:paged unavailable: {_error_line(exc)}")
            failed.append("tree:paged")

    # Naive: every sequence's path copied into its own contiguous cache (not timed), then split-KV.
    context = base["context_len"]
    k_full = cp.empty((batch, context, hkv, HEAD_DIM), dtype=cp.float16)
    v_full = cp.empty_like(k_full)
    for b in range(batch):
        at = 0
        for seg in path_segs[path_indptr[b]:path_indptr[b + 1]]:
            begin, end = int(seg_indptr[seg]), int(seg_indptr[seg + 1])
            k_full[b, at:at + end - begin] = k_pool[begin:end]
            v_full[b, at:at + end - begin] = v_pool[begin:end]
            at += end - begin
    naive = lambda: gpukernels.split_kv(q, k_full, v_full, out=out, lse=lse)  # noqa: E731
    m = _measure(timer, "tree:naive", naive, failed)
    if m:
        # Not predicted: `predict_row` reads every "tree..." row as the tree kernel.
        rows.append({**base, "impl": "tree:naive", **m})
    del k_full, v_full, naive
    cp.get_default_memory_pool().free_all_blocks()

    rows += _peer_rows(timer, base, _tree_peers(q, k_pool, v_pool, levels, batch, hkv))
    for r in rows:
        r.setdefault("frac", r["floor_ms"] / r["time_ms"])
    _progress("  " + ", ".join(f"{r['impl']} {r['time_ms'] * 1e3:.1f} us" for r in rows)
              + "".join(f"; {r['impl']} kernels {r['kernel_ms'] * 1e3:.1f} us" for r in rows if "kernel_ms" in r))
    del q, k_pool, v_pool, out, lse
    _free_torch_and_cupy()
    return rows


def tree_label(r: dict) -> str:
    """A tree row's levels as the tables name them: "4096 + 8x2048 + 64x256"."""
    return " + ".join(str(length) if n == 1 else f"{n}x{length}" for n, length in r["levels"])


# --------------------------------------------------------------------------------------------
# Span

SPAN_BATCH = 8
SPAN_KV_HEADS = 8
SPAN_KV_LEN = 32768
SPAN_ALIGN = 16        # interval starts and lengths on 16-token boundaries (a Quest page)
SPAN_SEED = 0
FLEX_BLOCK = 128       # FlexAttention's block mask: blocks of 128 tokens
BSR_BLOCK = 16         # FlashInfer's block-sparse mask: blocks of 16 tokens (one row each)

# fp16, batch 8, 8 KV heads, 32 query heads, head_dim 128, kv_len 32768 (docs/benchmarks.md, "Span"),
# plus two patterns like the self-selected attention span paper's tasks (`refattn.span_pattern`).
SPAN_GRID = [
    {"pattern": "intervals", "density": 0.125, "num_spans": 8},
    {"pattern": "intervals", "density": 0.25, "num_spans": 16},
    {"pattern": "intervals", "density": 0.5, "num_spans": 64},
    {"pattern": "intervals", "density": 0.75, "num_spans": 96},
    {"pattern": "sinks_window", "num_sinks": 4, "window": 4096},
    {"pattern": "arithmetic", "density": 0.1},
    {"pattern": "summarization", "density": 0.1},
]


def interval_spans(batch: int, kv_len: int, density: float, num_spans: int, *, align: int = SPAN_ALIGN,
                   seed: int = SPAN_SEED) -> tuple[np.ndarray, np.ndarray]:
    """`num_spans` equal intervals per sequence covering `density` of its kv_len tokens, at random
    places drawn from `seed` (each sequence its own), starts and lengths multiples of `align`,
    sorted and never touching. Returns int32 span_indptr [batch + 1], spans [batch * num_spans, 2]."""
    attended = round(density * kv_len)
    if attended % (num_spans * align) or kv_len % align:
        raise ValueError(f"{density} of {kv_len} tokens in {num_spans} spans is not in whole blocks of {align}")
    length = attended // num_spans
    free_units = (kv_len - attended) // align
    if free_units < num_spans - 1:
        raise ValueError(f"{num_spans} spans of {length} tokens do not fit apart in {kv_len} tokens")
    rng = np.random.default_rng(seed)
    spans = np.empty((batch, num_spans, 2), dtype=np.int64)
    for b in range(batch):
        # num_spans + 1 gaps (before, between, after); the ones between at least one block.
        gaps = rng.multinomial(free_units - (num_spans - 1), np.full(num_spans + 1, 1.0 / (num_spans + 1)))
        gaps[1:num_spans] += 1
        starts = np.cumsum(gaps[:num_spans] * align) + np.arange(num_spans) * length
        spans[b, :, 0], spans[b, :, 1] = starts, starts + length
    indptr = np.arange(batch + 1, dtype=np.int64) * num_spans
    return indptr.astype(np.int32), spans.reshape(-1, 2).astype(np.int32)


def span_case_spans(case: dict, *, batch: int = SPAN_BATCH, kv_len: int = SPAN_KV_LEN,
                    seed: int = SPAN_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The span list of one SPAN_GRID case, the same for the same seed."""
    import refattn

    pattern = case["pattern"]
    if pattern == "intervals":
        return interval_spans(batch, kv_len, case["density"], case["num_spans"], seed=seed)
    if pattern == "sinks_window":
        return refattn.spans_from_sinks_window(np.full(batch, kv_len), num_sinks=case["num_sinks"],
                                               window=case["window"])
    return refattn.span_pattern(pattern, batch=batch, kv_len=kv_len, density=case["density"], seed=seed)


def span_token_mask(span_indptr, spans, batch: int, kv_len: int) -> np.ndarray:
    """bool [batch, kv_len]: the tokens each sequence attends to."""
    mask = np.zeros((batch, kv_len), dtype=bool)
    indptr = np.asarray(span_indptr, dtype=np.int64)
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    for b in range(batch):
        for start, end in spans[indptr[b]:indptr[b + 1]]:
            mask[b, start:end] = True
    return mask


def covered_blocks(mask: np.ndarray, block: int) -> np.ndarray:
    """bool [batch, ceil(kv_len / block)]: the blocks of `block` tokens holding an attended token."""
    batch, kv_len = mask.shape
    nblocks = -(-kv_len // block)
    padded = np.zeros((batch, nblocks * block), dtype=bool)
    padded[:, :kv_len] = mask
    return padded.reshape(batch, nblocks, block).any(axis=2)


def covered_tokens(mask: np.ndarray, block: int) -> int:
    """Tokens inside the covered blocks of `block` tokens, over the batch: what a block mask reads."""
    kv_len = mask.shape[1]
    sizes = np.minimum(block, kv_len - np.arange(0, kv_len, block))      # the last block may be short
    return int((covered_blocks(mask, block) * sizes).sum())


def bsr_from_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A block-sparse matrix of one block row per sequence over the batch's caches laid end to end
    ([batch * kv_len] columns): int32 indptr [batch + 1] and the column block ids of sequence b,
    b * nblocks + j for each covered block j, in order."""
    batch, nblocks = blocks.shape
    counts = blocks.sum(axis=1)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    seq, j = np.nonzero(blocks)                      # row-major: sequence by sequence, j ascending
    return indptr, (seq * nblocks + j).astype(np.int32)


def span_case_keys(case: dict, span_indptr, spans, *, batch: int = SPAN_BATCH,
                   kv_len: int = SPAN_KV_LEN, seed: int = SPAN_SEED) -> dict:
    """The workload keys of a span row: what `costmodel.rows.predict_row` reads (`density` and
    `num_spans`, or `num_sinks` and `window`, or `span_lens`) and what the tables show. For the
    paper-like patterns (spans of unequal lengths, their count varying by sequence) `num_spans` is
    the mean count, and `span_lens` the span lengths of the sequence that reads the most windows of
    WINDOW_ROWS rows (the one the kernel's longest work runs over): equal spans of the same density
    take fewer windows, so the model given only those put the summarisation row at 36.4 us where it
    measured 41.5 (with its spans: 41.2)."""
    from costmodel.span import WINDOW_ROWS  # noqa: PLC0415

    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    attended = int((spans[:, 1] - spans[:, 0]).sum())
    keys = {"kv_len": kv_len, "pattern": case["pattern"], "density": attended / (batch * kv_len),
            "num_spans": int(case.get("num_spans", round(len(spans) / batch))), "spans_total": len(spans)}
    if case["pattern"] == "sinks_window":
        keys.update(num_sinks=case["num_sinks"], window=case["window"])
    if case["pattern"] == "intervals":
        keys["span_align"] = SPAN_ALIGN
    if case["pattern"] != "sinks_window":
        keys["seed"] = seed
    if case["pattern"] not in ("intervals", "sinks_window"):
        indptr = np.asarray(span_indptr, dtype=np.int64)
        lens = [spans[indptr[b]:indptr[b + 1], 1] - spans[indptr[b]:indptr[b + 1], 0] for b in range(batch)]
        windows = [int((-(-seq // WINDOW_ROWS)).sum()) for seq in lens]
        keys["span_lens"] = [int(n) for n in lens[int(np.argmax(windows))]]
    return keys


def span_base(case: dict, span_indptr, spans, *, batch: int = SPAN_BATCH, num_kv_heads: int = SPAN_KV_HEADS,
              kv_len: int = SPAN_KV_LEN) -> dict:
    """The workload keys of a span row with its unique bytes (attended K and V, q, out) and FLOPs."""
    keys = span_case_keys(case, span_indptr, spans, batch=batch, kv_len=kv_len)
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    attended = int((spans[:, 1] - spans[:, 0]).sum())               # tokens over the batch
    unique_bytes = 2 * attended * num_kv_heads * HEAD_DIM * 2 + 2 * batch * NUM_QO_HEADS * HEAD_DIM * 2
    return {"suite": "span", "dtype": "float16", "batch": batch, "num_qo_heads": NUM_QO_HEADS,
            "num_kv_heads": num_kv_heads, "head_dim": HEAD_DIM, **keys, "unique_bytes": unique_bytes,
            "flops": 4 * NUM_QO_HEADS * attended * HEAD_DIM}


_FLEX: dict = {}          # the compiled flex_attention, made once per process
_FLEX_MASK = None         # torch bool [batch, kv_len]: the token mask the block mask's mask_mod reads


def _flex_mask_mod(b, h, q_idx, kv_idx):
    """Sequence b attends to token kv_idx where the suite's token mask says so."""
    return _FLEX_MASK[b, kv_idx]


def _flex_peer(q, k, v, mask: np.ndarray) -> dict:
    """torch FlexAttention (flex decoding), torch.compile'd, with a block mask of FLEX_BLOCK tokens
    made from the token mask: blocks holding no attended token are skipped, partial blocks apply
    the mask. One query row per sequence; if the compiled kernel refuses a query of one row, the
    query is repeated to 16 rows (and the row records `q_rows`)."""
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        _progress("  torch FlexAttention not available: no peer:flex_block_mask")
        return {}
    batch, kv_len = mask.shape
    global _FLEX_MASK
    extra = {"block_size": FLEX_BLOCK, "covered_tokens": covered_tokens(mask, FLEX_BLOCK)}
    try:
        # One mask buffer for every case: the same mask_mod reading the same tensor, so the
        # compiled kernel is not compiled again for each case.
        if _FLEX_MASK is None or tuple(_FLEX_MASK.shape) != (batch, kv_len):
            _FLEX_MASK = torch.zeros((batch, kv_len), dtype=torch.bool, device="cuda")
        _FLEX_MASK.copy_(torch.as_tensor(mask, device="cuda"))
        if "compiled" not in _FLEX:
            _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
        flex = _FLEX["compiled"]
        q1 = torch.as_tensor(q, device="cuda").unsqueeze(2)                           # [B, Hq, 1, D]
        # FlexAttention's own layout [B, Hkv, L, D], built once from the same K and V (not timed).
        kt = torch.as_tensor(k, device="cuda").transpose(1, 2).contiguous()
        vt = torch.as_tensor(v, device="cuda").transpose(1, 2).contiguous()
    except Exception as exc:  # noqa: BLE001
        _progress(f"  peer:flex_block_mask unavailable: {_error_line(exc)}")
        return {}
    for q_rows in (1, 16):
        try:
            qt = q1 if q_rows == 1 else q1.expand(-1, -1, q_rows, -1).contiguous()
            block_mask = create_block_mask(_flex_mask_mod, B=batch, H=None, Q_LEN=q_rows, KV_LEN=kv_len,
                                           device="cuda", BLOCK_SIZE=FLEX_BLOCK)
            run = lambda qt=qt, bm=block_mask: flex(qt, kt, vt, block_mask=bm, enable_gqa=True)  # noqa: E731
            run()
            torch.cuda.synchronize()
            return {"peer:flex_block_mask": (run, {**extra, "q_rows": q_rows})}
        except Exception as exc:  # noqa: BLE001
            _progress(f"  peer:flex_block_mask with {q_rows} query row(s) unavailable: {_error_line(exc)}")
    return {}


def _flashinfer_block_sparse_peer(q, k, v, mask: np.ndarray) -> dict:
    """FlashInfer's BlockSparseAttentionWrapper: one block row (R = 1) per sequence over the batch's
    caches laid end to end, column blocks of BSR_BLOCK tokens covering every attended token (whole
    blocks: where a span does not start or end on a block boundary it reads the rest of the block)."""
    try:
        import flashinfer
        import torch
    except ImportError:
        _progress("  flashinfer not installed: no peer:flashinfer_block_sparse")
        return {}
    try:
        batch, kv_len = mask.shape
        num_kv_heads = k.shape[2]
        indptr, indices = bsr_from_blocks(covered_blocks(mask, BSR_BLOCK))
        workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        wrapper = flashinfer.BlockSparseAttentionWrapper(workspace)
        wrapper.plan(torch.as_tensor(indptr, device="cuda"), torch.as_tensor(indices, device="cuda"),
                     M=batch, N=batch * kv_len, R=1, C=BSR_BLOCK, num_qo_heads=NUM_QO_HEADS,
                     num_kv_heads=num_kv_heads, head_dim=HEAD_DIM, q_data_type=torch.float16,
                     kv_data_type=torch.float16)
        qt = torch.as_tensor(q, device="cuda")                                          # [M, Hq, D]
        kt = torch.as_tensor(k, device="cuda").reshape(batch * kv_len, num_kv_heads, HEAD_DIM)  # [N, Hkv, D]
        vt = torch.as_tensor(v, device="cuda").reshape(batch * kv_len, num_kv_heads, HEAD_DIM)
        run = lambda: wrapper.run(qt, kt, vt)  # noqa: E731
        run()
        torch.cuda.synchronize()
        return {"peer:flashinfer_block_sparse": (run, {"block_size": BSR_BLOCK,
                                                       "covered_tokens": covered_tokens(mask, BSR_BLOCK)})}
    except Exception as exc:  # noqa: BLE001 - report and go on without it
        _progress(f"  peer:flashinfer_block_sparse unavailable: {_error_line(exc)}")
        return {}


def run_span_suite(timer: Timer, ceilings: dict, gpu, *, quick: bool, failed: "list | None" = None) -> list[dict]:
    """Sparse spans over a 32k cache: `span` (`Span(plan_span(...)).run` with out/lse given: the
    page table and split plan made once), the one-shot call (`span:oneshot`, which keeps the tables
    of recent span lists), split-KV over every token (the dense reference), and the peers: SDPA cuDNN over every token, FlexAttention with a block mask,
    FlashInfer's block-sparse wrapper. `stream_ms`: reading the attended K and V once where they lie
    in the cache (`ReadRows`, each attended token's rows whole); `packed_stream_ms`: reading the same
    bytes gathered into one buffer beforehand (a layout no span kernel is given: on short scattered
    spans the faster of the two)."""
    import cupy as cp

    import gpukernels
    from gpukernels.span import Span, plan_span, span
    from gpukernels.split_kv import num_sms

    failed = [] if failed is None else failed
    rows = []
    stream = stream_read()
    grid = SPAN_GRID[:2] if quick else SPAN_GRID
    batch, hkv, kv_len = SPAN_BATCH, SPAN_KV_HEADS, SPAN_KV_LEN
    read_rows = ReadRows(hkv * HEAD_DIM * 2)
    sms = num_sms(cp.cuda.Device().id)
    dense_plan = gpukernels.plan_split_kv(batch, NUM_QO_HEADS, hkv, HEAD_DIM, kv_len, dtype="float16",
                                          num_sms=sms, gpu=gpu)
    for i, case in enumerate(grid, 1):
        span_indptr, spans = span_case_spans(case)
        base = span_base(case, span_indptr, spans)
        _progress(f"span {i}/{len(grid)}: {span_label(base)} (density {base['density']:.4f}, "
                  f"{base['spans_total']} spans)")
        first = len(rows)
        q = _randn16((batch, NUM_QO_HEADS, HEAD_DIM))
        k = _randn16((batch, kv_len, hkv, HEAD_DIM))
        v = _randn16((batch, kv_len, hkv, HEAD_DIM))
        mask = span_token_mask(span_indptr, spans, batch, kv_len)
        # The attended K and V read once in place, and gathered into one buffer each (not timed).
        tokens = cp.asarray(np.flatnonzero(mask.reshape(-1)), dtype=cp.int32)   # b * kv_len + t
        base["stream_ms"] = timer(lambda: read_rows(k, v, tokens))  # noqa: B023
        k_att = k.reshape(batch * kv_len, hkv, HEAD_DIM)[tokens]
        v_att = v.reshape(batch * kv_len, hkv, HEAD_DIM)[tokens]
        base["packed_stream_ms"] = timer(lambda: stream(k_att, v_att))
        del k_att, v_att, tokens
        _floor_and_ceiling(base, ceilings)
        out = cp.empty((batch, NUM_QO_HEADS, HEAD_DIM), dtype=cp.float16)
        lse = cp.empty((batch, NUM_QO_HEADS), dtype=cp.float32)

        # Planned: the table and split plan made once (as across the layers of a model).
        plan = plan_span(span_indptr, spans, batch=batch, kv_len=kv_len, num_qo_heads=NUM_QO_HEADS,
                         num_kv_heads=hkv, head_dim=HEAD_DIM, dtype="float16", num_sms=sms, gpu=gpu)
        runner = Span(plan)
        ours = lambda: runner.run(q, k, v, out=out, lse=lse)  # noqa: E731
        m = _measure(timer, "span", ours, failed)
        if m:
            rows.append(_predicted({**base, "impl": "span", "page_size": plan.table.page_size, "layout": plan.layout,
                                    "num_splits": plan.split.num_splits, **m}, gpu))
        one_shot = lambda: span(q, k, v, span_indptr, spans)  # noqa: E731
        m = _measure(timer, "span:oneshot", one_shot, failed)
        if m:
            rows.append({**base, "impl": "span:oneshot", "page_size": plan.table.page_size, "layout": plan.layout,
                         **m})
        # Dense: every token, by this project's split-KV with its plan, and by SDPA's cuDNN backend.
        runner = gpukernels.SplitKV(dense_plan)
        dense = lambda: runner.run(q, k, v, out=out, lse=lse)  # noqa: E731
        m = _measure(timer, "split_kv (dense)", dense, failed)
        if m:
            rows.append(_predicted({**base, "impl": "split_kv", "dense": True, "plan": "auto",
                                    "num_splits": dense_plan.num_splits, "chunk_size": dense_plan.chunk_size,
                                    **m}, gpu))
        peers = {label: (fn, {"dense": True}) for label, fn in _sdpa_peers(q, k, v, ("peer:cudnn",)).items()}
        peers.update(_flex_peer(q, k, v, mask))
        peers.update(_flashinfer_block_sparse_peer(q, k, v, mask))
        rows += _peer_rows(timer, base, peers)
        for r in rows[first:]:
            r.setdefault("frac", r["floor_ms"] / r["time_ms"])
        _progress("  " + ", ".join(f"{r['impl']} {r['time_ms'] * 1e3:.1f} us" for r in rows[first:]))
        del q, k, v, out, lse, runner, peers
        _free_torch_and_cupy()
    return rows


def span_label(r: dict) -> str:
    """A span row's case as the tables name it: "12.5% in 8", "4 sinks + 4096 window", "arithmetic 10%"."""
    pattern = r.get("pattern")
    if pattern == "sinks_window" or (pattern is None and r.get("num_sinks") is not None):
        return f"{r['num_sinks']} sinks + {r['window']} window"
    if pattern in (None, "intervals"):
        return f"{100 * r['density']:g}% in {r['num_spans']}"
    return f"{pattern} {100 * r['density']:.0f}%"


def _shape_key(r: dict) -> tuple:
    return (r.get("dtype", "float16"), r["batch"], r.get("num_qo_heads", NUM_QO_HEADS), r["num_kv_heads"],
            r.get("head_dim", HEAD_DIM), r["kv_len"])


def _by_shape(rows: list[dict]) -> dict:
    """Rows grouped by grid row (dtype, batch, heads, head_dim, kv_len), in order of first appearance."""
    keyed: dict = {}
    for r in rows:
        keyed.setdefault(_shape_key(r), []).append(r)
    return keyed


_PEER_NAMES = {"peer:cudnn": "cuDNN", "peer:flash": "flash", "peer:flashinfer": "FlashInfer paged",
               "peer:flashinfer_cascade": "FlashInfer cascade",
               "peer:flashinfer_decode_prefix_pages": "FlashInfer decode, prefix pages",
               "peer:flex_block_mask": "Flex block mask",
               "peer:flashinfer_block_sparse": "FlashInfer block-sparse",
               "peer:flashinfer_cascade3": "FlashInfer cascade, 3 levels",
               "peer:flashinfer_cascade2": "FlashInfer cascade, 2 levels",
               "peer:flashinfer_decode": "FlashInfer decode, path pages"}
# Rows keyed by a workload label, not by kv_len.
_WORKLOAD_SUITES = ("shared_prefix", "shared_prefix_papers", "span", "tree")
SUITES = ("decode", "coverage", "shared_prefix", "shared_prefix_papers", "span", "tree")


def _best_peer(group: list[dict]):
    peers = [r for r in group if r["impl"] in _PEER_NAMES]
    return min(peers, key=lambda r: r["time_ms"]) if peers else None


def format_table(rows: list[dict]) -> str:
    if rows and {r.get("suite") for r in rows} <= set(_WORKLOAD_SUITES):
        return _format_workload_table(rows)
    lines = [f"{'dtype':<8} {'batch':>5} {'Hq/Hkv':>6} {'D':>3} {'kv_len':>7} {'floor us':>9} {'read us':>8}  "
             f"{'impl':<18} {'time us':>9} {'frac':>5} {'vs best peer':>12} {'pred us':>8} {'host us':>8}"]
    for key, group in _by_shape(rows).items():
        best = _best_peer(group)
        for r in group:
            vs = f"{best['time_ms'] / r['time_ms']:.2f}x" if best else "-"
            impl = r["impl"] + (f" /{r['num_splits']}" if "num_splits" in r else "")
            impl += " *" if r.get("plan") == "auto" else ""
            pred = f"{r['predicted_ms'] * 1e3:8.1f}" if "predicted_ms" in r else f"{'-':>8}"
            read = f"{r['stream_ms'] * 1e3:8.1f}" if "stream_ms" in r else f"{'-':>8}"
            lines.append(f"{key[0]:<8} {key[1]:>5} {f'{key[2]}/{key[3]}':>6} {key[4]:>3} {key[5]:>7} "
                         f"{r['floor_ms'] * 1e3:>9.1f} {read}  {impl:<18} {r['time_ms'] * 1e3:>9.1f} "
                         f"{r['frac']:>5.2f} {vs:>12} {pred} {r.get('host_us', float('nan')):>8.1f}")
    return "\n".join(lines)


def _us(r) -> str:
    return f"{r['time_ms'] * 1e3:.1f}"


def _host(r) -> str:
    return f"{r['host_us']:.0f}" if r and "host_us" in r else "-"


def format_markdown(rows: list[dict]) -> str:
    """A result file as Markdown: the decode suite one line per grid row (split_kv with its plan and
    the one-shot call against the best peer, the paged kernel against FlashInfer's, the time of a
    kernel that only reads K and V once, host time per call); the coverage suite likewise."""
    suites = {r.get("suite", "decode") for r in rows}
    if suites == {"coverage"}:
        return _format_coverage(rows)
    if suites == {"shared_prefix"}:
        return _format_shared_prefix(rows)
    if suites == {"shared_prefix_papers"}:
        return _format_shared_prefix(rows, papers=True)
    if suites == {"span"}:
        return _format_span(rows)
    if suites == {"tree"}:
        return _format_tree(rows)
    lines = ["| batch | KV heads | kv_len | floor us | read-only us | split_kv us | frac | one-shot us "
             "| best peer us | vs peer | paged_decode us | FlashInfer paged us | host us: split_kv / "
             "one-shot / FlashInfer / cuDNN |", "|" + "---|" * 13]
    hosts: dict = {}
    for (_, batch, _, hkv, _, kv_len), group in _by_shape(rows).items():
        ours = next((r for r in group if r["impl"] == "split_kv" and r.get("plan") == "auto"), None)
        one = next((r for r in group if r["impl"] == "split_kv:oneshot"), None)
        paged = next((r for r in group if r["impl"] == "paged_decode" and r.get("plan", "auto") == "auto"), None)
        best = _best_peer(group)
        if ours is None or best is None:
            continue
        fi = next((r for r in group if r["impl"] == "peer:flashinfer"), None)
        cudnn = next((r for r in group if r["impl"] == "peer:cudnn"), None)
        for name, r in (("split_kv", ours), ("one-shot", one), ("FlashInfer", fi), ("cuDNN", cudnn)):
            if r is not None and "host_us" in r:
                hosts.setdefault(name, []).append(r["host_us"])
        lines.append(
            f"| {batch} | {hkv} | {kv_len} | {ours['floor_ms'] * 1e3:.1f} | "
            f"{ours['stream_ms'] * 1e3:.1f} | {_us(ours)} ({ours['num_splits']}) | {ours['frac']:.3f} | "
            + (_us(one) if one else "-") + " | "
            f"{_us(best)} ({_PEER_NAMES[best['impl']]}) | {100 * (ours['time_ms'] / best['time_ms'] - 1):+.1f}% | "
            + (f"{_us(paged)} ({paged['num_splits']})" if paged else "-") + " | "
            + (_us(fi) if fi else "-") + f" | {_host(ours)} / {_host(one)} / {_host(fi)} / {_host(cudnn)} |")
    if hosts:
        lines.append("")
        lines.append("Median host us per call: " + ", ".join(
            f"{name} {float(np.median(v)):.0f}" for name, v in hosts.items()))
    return "\n".join(lines)


def _format_coverage(rows: list[dict]) -> str:
    lines = ["| dtype | batch | q/KV heads | head_dim | kv_len | read-only us | split_kv us | one-shot us "
             "| best peer us | planned vs peer | one-shot vs peer | host us: one-shot / peer |",
             "|" + "---|" * 12]
    for (dtype, batch, hq, hkv, d, kv_len), group in _by_shape(rows).items():
        ours = next((r for r in group if r["impl"] == "split_kv"), None)
        one = next((r for r in group if r["impl"] == "split_kv:oneshot"), None)
        best = _best_peer(group)
        if ours is None or one is None or best is None:
            continue
        lines.append(
            f"| {dtype} | {batch} | {hq}/{hkv} | {d} | {kv_len} | {ours['stream_ms'] * 1e3:.1f} | "
            f"{_us(ours)} ({ours['num_splits']}) | {_us(one)} | {_us(best)} ({_PEER_NAMES[best['impl']]}) | "
            f"{best['time_ms'] / ours['time_ms']:.2f}x | {best['time_ms'] / one['time_ms']:.2f}x | "
            f"{_host(one)} / {_host(best)} |")
    return "\n".join(lines)


def workload_label(r: dict) -> str:
    """The grid row of a shared-prefix, span or tree row, as the tables name it."""
    if r.get("suite") == "tree" or "levels" in r:
        return tree_label(r)
    if r.get("suite") in ("shared_prefix", "shared_prefix_papers") or ("prefix_len" in r and "pattern" not in r):
        return f"{r['prefix_len']}+{r['suffix_len']}"
    if r.get("suite") == "span" or "pattern" in r:
        return span_label(r)
    return str(r["kv_len"])


def _workload_key(r: dict) -> tuple:
    return (r.get("dtype", "float16"), r["batch"], r.get("num_qo_heads", NUM_QO_HEADS), r["num_kv_heads"],
            r.get("head_dim", HEAD_DIM), workload_label(r))


def _by_workload(rows: list[dict]) -> dict:
    """Rows grouped by grid row (heads, batch, workload label), in order of first appearance."""
    keyed: dict = {}
    for r in rows:
        keyed.setdefault(_workload_key(r), []).append(r)
    return keyed


def _find(group: list[dict], impl: str, **keys):
    return next((r for r in group if r["impl"] == impl and all(r.get(k) == v for k, v in keys.items())), None)


def _best_of(group: list[dict], impls) -> "dict | None":
    found = [r for r in group if r["impl"] in impls]
    return min(found, key=lambda r: r["time_ms"]) if found else None


def _t(r) -> str:
    return _us(r) if r else "-"


def _x(slow, fast) -> str:
    """How many times faster `fast` is than `slow` (slow time / fast time), or "-"."""
    return f"{slow['time_ms'] / fast['time_ms']:.2f}x" if slow and fast else "-"


def _vs_ceiling(r) -> str:
    """time / ceiling of the row (ceiling_ms, else stream_ms): 1.00x is reading the operands once."""
    if not r:
        return "-"
    ceiling = r.get("ceiling_ms", r.get("stream_ms"))
    return f"{r['time_ms'] / ceiling:.2f}x" if ceiling else "-"


def _format_workload_table(rows: list[dict]) -> str:
    """The printed table of the shared-prefix and span suites: every row against the best peer."""
    lines = [f"{'Hq/Hkv':>6} {'batch':>5} {'workload':<22} {'floor us':>9} {'read us':>8}  {'impl':<36} "
             f"{'time us':>9} {'frac':>5} {'vs best peer':>12} {'pred us':>8} {'host us':>8}"]
    for key, group in _by_workload(rows).items():
        best = _best_peer(group)
        for r in group:
            vs = f"{best['time_ms'] / r['time_ms']:.2f}x" if best else "-"
            impl = r["impl"] + (" (dense)" if r.get("dense") and not r["impl"].startswith("peer:") else "")
            pred = f"{r['predicted_ms'] * 1e3:8.1f}" if "predicted_ms" in r else f"{'-':>8}"
            read = f"{r['stream_ms'] * 1e3:8.1f}" if "stream_ms" in r else f"{'-':>8}"
            lines.append(f"{f'{key[2]}/{key[3]}':>6} {key[1]:>5} {key[5]:<22} {r['floor_ms'] * 1e3:>9.1f} "
                         f"{read}  {impl:<36} {r['time_ms'] * 1e3:>9.1f} {r['frac']:>5.2f} {vs:>12} {pred} "
                         f"{r.get('host_us', float('nan')):>8.1f}")
    return "\n".join(lines)


def _naive_cell(naive, any_row) -> str:
    if naive:
        return _us(naive)
    return "skipped" if any_row.get("naive_skipped") else "-"


def _format_shared_prefix(rows: list[dict], *, papers: bool = False) -> str:
    """One line per grid row: Hydragen (with out/lse, and the one-shot call) against its ceiling,
    the naive copy-then-split-KV, FlashInfer's cascade and paged decode, host time per call. With
    `papers` (the published settings), the setting first and the speedups of Hydragen and
    bifurcated over naive ("skipped" where its copy was too large to make)."""
    head = ["KV heads", "batch", "prefix_len", "suffix_len", "read-only us", "ceiling us", "hydragen us",
            "vs ceiling", "frac", "one-shot us", "bifurcated us", "naive us", "FlashInfer cascade us",
            "FlashInfer decode, prefix pages us", "best peer", "vs cascade", "vs best peer"]
    if papers:
        head = ["setting"] + head + ["vs naive: hydragen / bifurcated"]
    head.append("host us: hydragen / one-shot / cascade / decode")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, group in _by_workload(rows).items():
        any_row = group[0]
        ours = _find(group, "shared_prefix:hydragen")
        one = _find(group, "shared_prefix:hydragen:oneshot")
        naive = _find(group, "shared_prefix:naive")
        bifurcated = _find(group, "shared_prefix:bifurcated")
        cascade = _find(group, "peer:flashinfer_cascade")
        decode = _find(group, "peer:flashinfer_decode_prefix_pages")
        best = _best_peer(group)
        ceiling = any_row.get("ceiling_ms", any_row.get("stream_ms"))
        line = (
            f"| {any_row['num_kv_heads']} | {any_row['batch']} | {any_row['prefix_len']} | {any_row['suffix_len']} "
            f"| {any_row['stream_ms'] * 1e3:.1f} | " + (f"{ceiling * 1e3:.1f}" if ceiling else "-")
            + f" | {_t(ours)} | {_vs_ceiling(ours)} | " + (f"{ours['frac']:.3f}" if ours else "-")
            + f" | {_t(one)} | {_t(bifurcated)} | {_naive_cell(naive, any_row)} | {_t(cascade)} | {_t(decode)} | "
            + (f"{_us(best)} ({_PEER_NAMES[best['impl']]})" if best else "-")
            + f" | {_x(cascade, ours)} | {_x(best, ours)} |")
        if papers:
            line = f"| {any_row.get('setting', '-')} " + line + f" {_x(naive, ours)} / {_x(naive, bifurcated)} |"
        lines.append(line + f" {_host(ours)} / {_host(one)} / {_host(cascade)} / {_host(decode)} |")
    return "\n".join(lines)


def _format_tree(rows: list[dict]) -> str:
    """One line per tree: `tree` (out/lse given) against its ceiling, FlashInfer's 3-level cascade
    (the target's peer) and the best peer; the same call with its host work hidden (kernels); the
    one-shot call, the planned run with the segments in pages, the naive copy-then-split-KV, every
    FlashInfer variant, the prediction, host time per call."""
    head = ["levels", "batch", "q/KV heads", "read-only us", "ceiling us", "tree us", "vs ceiling", "frac",
            "kernels us", "kernels vs ceiling", "one-shot us", "paged us", "naive us", "FlashInfer cascade 3 us",
            "FlashInfer cascade 2 us", "FlashInfer decode us", "best peer", "vs cascade 3", "vs best peer",
            "kernels vs cascade 3", "predicted us", "host us: tree / one-shot / cascade 3 / cascade 2 / decode"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (*_, label), group in _by_workload(rows).items():
        any_row = group[0]
        ours = _find(group, "tree")
        one = _find(group, "tree:oneshot")
        paged = _find(group, "tree:paged")
        naive = _find(group, "tree:naive")
        c3 = _find(group, "peer:flashinfer_cascade3")
        c2 = _find(group, "peer:flashinfer_cascade2")
        decode = _find(group, "peer:flashinfer_decode")
        best = _best_peer(group)
        ceiling = any_row.get("ceiling_ms", any_row.get("stream_ms"))
        kernels = {"time_ms": ours["kernel_ms"], "ceiling_ms": ceiling} if ours and "kernel_ms" in ours else None
        lines.append(
            f"| {label} | {any_row['batch']} | {any_row['num_qo_heads']}/{any_row['num_kv_heads']} "
            f"| {any_row['stream_ms'] * 1e3:.1f} | " + (f"{ceiling * 1e3:.1f}" if ceiling else "-")
            + f" | {_t(ours)} | {_vs_ceiling(ours)} | " + (f"{ours['frac']:.3f}" if ours else "-")
            + f" | {_t(kernels)} | {_vs_ceiling(kernels)} | {_t(one)} | {_t(paged)} | {_t(naive)} | {_t(c3)} | {_t(c2)} "
            f"| {_t(decode)} | " + (f"{_us(best)} ({_PEER_NAMES[best['impl']]})" if best else "-")
            + f" | {_x(c3, ours)} | {_x(best, ours)} | {_x(c3, kernels)} | "
            + (f"{ours['predicted_ms'] * 1e3:.1f}" if ours and "predicted_ms" in ours else "-")
            + f" | {_host(ours)} / {_host(one)} / {_host(c3)} / {_host(c2)} / {_host(decode)} |")
    return "\n".join(lines)


_SPARSE_PEERS = ("peer:flashinfer_block_sparse", "peer:flex_block_mask")


def _format_span(rows: list[dict]) -> str:
    """One line per span case: `span` (with out/lse), its one-shot call and the reused table against
    the read-only time of the attended bytes, the sparse peers, and dense attention over every
    token (this project's split-KV and SDPA cuDNN), host time per call."""
    lines = ["| spans | density | read-only us | span us | vs read-only | one-shot us "
             "| FlashInfer block-sparse us | Flex block mask us | dense split_kv us | dense cuDNN us "
             "| best peer | vs best peer | vs sparse peers (FlashInfer / Flex) | vs dense "
             "| host us: span / one-shot / FlashInfer / Flex / cuDNN |", "|" + "---|" * 15]
    for (*_, label), group in _by_workload(rows).items():
        any_row = group[0]
        ours = _find(group, "span")
        one = _find(group, "span:oneshot")
        fi = _find(group, "peer:flashinfer_block_sparse")
        flex = _find(group, "peer:flex_block_mask")
        dense = _find(group, "split_kv")
        cudnn = _find(group, "peer:cudnn")
        best = _best_peer(group)
        best_dense = _best_of(group, ("split_kv", "peer:cudnn"))
        read = f"{ours['time_ms'] / ours['stream_ms']:.2f}x" if ours and ours.get("stream_ms") else "-"
        lines.append(
            f"| {label} | {any_row['density']:.3f} | {any_row['stream_ms'] * 1e3:.1f} | {_t(ours)} | {read} "
            f"| {_t(one)} | {_t(fi)} | {_t(flex)} | {_t(dense)} | {_t(cudnn)} | "
            + (f"{_us(best)} ({_PEER_NAMES[best['impl']]})" if best else "-")
            + f" | {_x(best, ours)} | {_x(fi, ours)} / {_x(flex, ours)} | {_x(best_dense, ours)} "
            f"| {_host(ours)} / {_host(one)} / {_host(fi)} / {_host(flex)} / {_host(cudnn)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="decode-attention bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=SUITES, default="decode",
                        help="decode: the decode grid with the split sweep and every peer; coverage: "
                        "shapes off that grid (dtypes, head dims, groups, odd lengths) against SDPA; "
                        "shared_prefix: one prefix shared by a batch (Hydragen, naive, FlashInfer's cascade "
                        "and paged decode); shared_prefix_papers: the same rows in the settings of the "
                        "bifurcated-attention and Hydragen papers; span: sparse spans over a 32k cache (span, "
                        "dense split-KV and cuDNN, FlexAttention block mask, FlashInfer block-sparse); tree: "
                        "a 3-level tree of shared segments (tree, naive, FlashInfer's cascade with 3 and 2 "
                        "levels and paged decode) (default: %(default)s)")
    from decode_attention.cli import positive_int

    parser.add_argument("--reps", type=positive_int, default=30,
                        help="timed repetitions per measurement, the median is kept (default: %(default)s)")
    parser.add_argument("--out", default="results",
                        help="results folder; a <gpu>/ subfolder is made (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="the first rows of the grid only, nothing written (default: off)")
    parser.add_argument("--no-sweep", action="store_true",
                        help="decode suite: skip the rows with forced split counts (default: off)")
    parser.add_argument("--report", metavar="JSON", help="print a result file as a Markdown table and exit "
                        "(no GPU needed; default: off)")
    args = parser.parse_args(argv)
    if args.report:
        from costmodel.accuracy import read_result_file

        try:
            result = read_result_file(args.report)
            suites = {r.get("suite") for r in result.rows}
            if suites == {"end_to_end"}:   # decoder steps: their suite's own table
                from decode_attention.e2e.bench import format_rows

                print(format_rows(result.rows))
            elif suites == {"distributed"}:   # one GPU against several: with the crossovers and targets
                from gpukernels.bench_sharded import format_table as format_sharded

                whole = json.loads(Path(args.report).read_text())
                print(format_sharded(result.rows, whole.get("crossover", []), whole.get("targets", {})))
            else:
                print(format_markdown(result.rows))
        except FileNotFoundError:
            print(f"decode-attention bench: --report: no such file: {args.report}", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"decode-attention bench: --report: {exc}", file=sys.stderr)
            return 2
        except (KeyError, TypeError) as exc:
            lacks = f"a row lacks {exc}" if isinstance(exc, KeyError) else str(exc)
            print(f"decode-attention bench: --report: {args.report} is not a result file of the decode "
                  f"benchmark ({lacks})", file=sys.stderr)
            return 2
        return 0

    from gpukernels._runtime import gpu_available

    if not gpu_available():
        print("bench needs CuPy and a CUDA GPU; none found here", file=sys.stderr)
        return 2
    from costmodel.gpus import get_gpu

    command = "decode-attention bench " + " ".join(argv if argv is not None else sys.argv[1:])
    timer = Timer(args.reps)
    _progress("measuring ceilings (copy, read, fp16 matmul)")
    ceilings = measure_ceilings(timer)
    meta = _meta(ceilings, command.strip())
    gpu = get_gpu(meta["gpu"]).with_measured(copy_bytes_per_s=ceilings["copy_bytes_per_s"],
                                               matmul_flops_per_s=ceilings["matmul_flops_per_s"])
    _progress(f"{meta['gpu']}: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, read "
              f"{ceilings['read_bytes_per_s'] / 1e12:.2f} TB/s, fp16 matmul "
              f"{ceilings['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    failed: list[str] = []
    if args.suite == "coverage":
        rows = run_coverage_suite(timer, ceilings, gpu, quick=args.quick)
    elif args.suite == "decode":
        rows = run_decode_suite(timer, ceilings, gpu, quick=args.quick, sweep=not args.no_sweep)
    else:
        run = {"shared_prefix": run_shared_prefix_suite, "shared_prefix_papers": run_shared_prefix_papers_suite,
               "span": run_span_suite, "tree": run_tree_suite}[args.suite]
        rows = run(timer, ceilings, gpu, quick=args.quick, failed=failed)
    if not args.quick:
        out_dir = Path(args.out) / gpu_slug(meta["gpu"])
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{args.suite}.json"
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        _progress(f"wrote {path}")
    print(format_table(rows))
    if args.suite in _WORKLOAD_SUITES:
        print("read us: a kernel that only reads the unique K and V once (a shared prefix once, every "
              "segment of a tree once, only the attended tokens of a span); vs best peer: the best peer's "
              "time / this row's time")
    else:
        print("/n: split count; *: the plan's own choice; read us: a kernel that only reads K and V once")
    if failed:
        print(f"bench: {len(failed)} call(s) of this project's kernels failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
