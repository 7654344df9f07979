"""Benchmark the decode and coverage grids of docs/benchmarks.md against the peers, in one process,
on one GPU.

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
backends. Results go to `results/<gpu>/<suite>.json`.

    decode-attention bench [--suite decode|coverage] [--reps 30] [--out results] [--quick]
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


@functools.lru_cache(maxsize=None)
def stream_read() -> StreamRead:
    """The one StreamRead of this process (its kernel compiled once)."""
    return StreamRead()


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Timer:
    """Median of CUDA-event timings with the L2 flushed before each repetition."""

    def __init__(self, reps: int):
        import cupy as cp

        self.cp = cp
        self.reps = reps
        self.flush = cp.empty(FLUSH_BYTES, dtype=cp.uint8)

    def __call__(self, fn, *, warmup: int = 3) -> float:
        cp = self.cp
        for _ in range(warmup):
            fn()
        cp.cuda.Device().synchronize()
        times = []
        for _ in range(self.reps):
            self.flush.fill(1)
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end))
        return float(np.median(times))


def host_us(fn, calls: int = 20) -> float:
    """Host time of one call (launch overhead: argument checks, allocation, the launch itself)."""
    import cupy as cp

    cp.cuda.Device().synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    cp.cuda.Device().synchronize()
    return elapsed / calls * 1e6


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


def _sdpa_peers(q, k, v) -> dict:
    """PyTorch SDPA's cuDNN and flash backends on the same inputs (those that accept the shape)."""
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
    for label, backend in (("peer:cudnn", SDPBackend.CUDNN_ATTENTION),
                           ("peer:flash", SDPBackend.FLASH_ATTENTION)):
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
        rows.append({**base, "impl": "split_kv:oneshot", "time_ms": timer(one_shot),
                     "host_us": host_us(one_shot)})
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
        for label, fn in _peers(q, k, v, batch, num_kv_heads, kv_len).items():
            try:
                t = timer(fn)
                host = host_us(fn)
            except Exception as exc:  # noqa: BLE001
                _progress(f"  {label} failed: {str(exc).splitlines()[0][:80]}")
                continue
            rows.append({**base, "impl": label, "time_ms": t, "host_us": host})
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
        rows.append({**base, "impl": "split_kv:oneshot", "num_splits": plan.num_splits,
                     "time_ms": timer(one_shot), "host_us": host_us(one_shot)})
        for label, fn in _sdpa_peers(q, k, v).items():
            try:
                rows.append({**base, "impl": label, "time_ms": timer(fn), "host_us": host_us(fn)})
            except Exception as exc:  # noqa: BLE001
                _progress(f"  {label} failed: {str(exc).splitlines()[0][:80]}")
        for r in rows:
            r.setdefault("frac", r["floor_ms"] / r["time_ms"])
        _progress("  " + ", ".join(f"{r['impl']} {r['time_ms'] * 1e3:.1f} us" for r in rows
                                   if r["kv_len"] == kv_len and r["batch"] == batch))
        del q, k, v, k16, v16, out, lse, runner
        cp.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
    return rows


def _shape_key(r: dict) -> tuple:
    return (r.get("dtype", "float16"), r["batch"], r.get("num_qo_heads", NUM_QO_HEADS), r["num_kv_heads"],
            r.get("head_dim", HEAD_DIM), r["kv_len"])


def _by_shape(rows: list[dict]) -> dict:
    """Rows grouped by grid row (dtype, batch, heads, head_dim, kv_len), in order of first appearance."""
    keyed: dict = {}
    for r in rows:
        keyed.setdefault(_shape_key(r), []).append(r)
    return keyed


_PEER_NAMES = {"peer:cudnn": "cuDNN", "peer:flash": "flash", "peer:flashinfer": "FlashInfer paged"}


def _best_peer(group: list[dict]):
    peers = [r for r in group if r["impl"] in _PEER_NAMES]
    return min(peers, key=lambda r: r["time_ms"]) if peers else None


def format_table(rows: list[dict]) -> str:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="decode-attention bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["decode", "coverage"], default="decode",
                        help="decode: the decode grid with the split sweep and every peer; coverage: "
                        "shapes off that grid (dtypes, head dims, groups, odd lengths) against SDPA "
                        "(default: %(default)s)")
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
    if args.suite == "coverage":
        rows = run_coverage_suite(timer, ceilings, gpu, quick=args.quick)
    else:
        rows = run_decode_suite(timer, ceilings, gpu, quick=args.quick, sweep=not args.no_sweep)
    if not args.quick:
        out_dir = Path(args.out) / gpu_slug(meta["gpu"])
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{args.suite}.json"
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        _progress(f"wrote {path}")
    print(format_table(rows))
    print("/n: split count; *: the plan's own choice; read us: a kernel that only reads K and V once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
