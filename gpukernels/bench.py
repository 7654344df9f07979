"""Benchmark the decode grid of BENCHMARKS.md against the peers, in one process, on one GPU.

Protocol: CUDA events around each call, warm-up first, median of `--reps` repetitions, L2 flushed
between repetitions by writing a 256 MB buffer; inputs are fresh random normals. The run measures
its own ceilings (device-to-device copy, a streaming read, fp16 matmul) and reports for every
row `floor = max(unique bytes / bandwidth, flops / matmul rate)` and `frac = floor / time`. Every
row also carries `stream_ms`: the time, under the same protocol, of a kernel that does nothing but
read the row's K and V once; no attention kernel can beat it, whatever the ceilings say.
Peers: PyTorch SDPA (cuDNN and flash backends), FlashInfer's paged decode when installed, and a
naive CuPy matmul attention. Results go to `results/<gpu>/decode.json`.

    decode-attention bench [--suite decode] [--reps 30] [--out results] [--quick]
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

# (batch, num_kv_heads, kv_len); fp16, num_qo_heads 32, head_dim 128 (BENCHMARKS.md).
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


def _peers(q, k, v, batch, num_kv_heads, kv_len):
    """Callables of every peer available here, on the same inputs."""
    import cupy as cp

    peers = {}
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qt = torch.as_tensor(q, device="cuda").unsqueeze(2)                 # [B, Hq, 1, D]
        kt = torch.as_tensor(k, device="cuda").transpose(1, 2)              # [B, Hkv, L, D] view
        vt = torch.as_tensor(v, device="cuda").transpose(1, 2)
        gqa = num_kv_heads != NUM_QO_HEADS
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
    except ImportError:
        _progress("  torch not installed: no SDPA peers")
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


def _by_shape(rows: list[dict]) -> dict:
    """Rows grouped by grid row (batch, num_kv_heads, kv_len), in order of first appearance."""
    keyed: dict = {}
    for r in rows:
        keyed.setdefault((r["batch"], r["num_kv_heads"], r["kv_len"]), []).append(r)
    return keyed


def format_table(rows: list[dict]) -> str:
    lines = [f"{'batch':>5} {'Hkv':>4} {'kv_len':>7} {'floor us':>9} {'read us':>8}  {'impl':<18} {'time us':>9} "
             f"{'frac':>5} {'vs best peer':>12} {'pred us':>8} {'host us':>8}"]
    for key, group in _by_shape(rows).items():
        peers = [r for r in group if r["impl"].startswith("peer:") and r["impl"] != "peer:naive"]
        best = min((r["time_ms"] for r in peers), default=None)
        for r in group:
            vs = f"{best / r['time_ms']:.2f}x" if best else "-"
            impl = r["impl"] + (f" /{r['num_splits']}" if "num_splits" in r else "")
            impl += " *" if r.get("plan") == "auto" else ""
            pred = f"{r['predicted_ms'] * 1e3:8.1f}" if "predicted_ms" in r else f"{'-':>8}"
            read = f"{r['stream_ms'] * 1e3:8.1f}" if "stream_ms" in r else f"{'-':>8}"
            lines.append(f"{key[0]:>5} {key[1]:>4} {key[2]:>7} {r['floor_ms'] * 1e3:>9.1f} {read}  "
                         f"{impl:<18} {r['time_ms'] * 1e3:>9.1f} {r['frac']:>5.2f} {vs:>12} {pred} "
                         f"{r.get('host_us', float('nan')):>8.1f}")
    return "\n".join(lines)


_PEER_NAMES = {"peer:cudnn": "cuDNN", "peer:flash": "flash", "peer:flashinfer": "FlashInfer paged"}


def format_markdown(rows: list[dict]) -> str:
    """One line per grid row of a result file: split_kv with its plan against the best peer, the
    paged kernel against FlashInfer's, and the time of a kernel that only reads K and V once."""
    lines = ["| batch | KV heads | kv_len | floor us | read-only us | split_kv us | frac | best peer us "
             "| vs peer | paged_decode us | FlashInfer paged us |", "|" + "---|" * 11]
    for (batch, hkv, kv_len), group in _by_shape(rows).items():
        ours = next((r for r in group if r["impl"] == "split_kv" and r.get("plan") == "auto"), None)
        paged = next((r for r in group if r["impl"] == "paged_decode" and r.get("plan", "auto") == "auto"), None)
        peers = [r for r in group if r["impl"] in _PEER_NAMES]
        if ours is None or not peers:
            continue
        best = min(peers, key=lambda r: r["time_ms"])
        fi = next((r for r in peers if r["impl"] == "peer:flashinfer"), None)
        us = lambda r: f"{r['time_ms'] * 1e3:.1f}"  # noqa: E731
        lines.append(
            f"| {batch} | {hkv} | {kv_len} | {ours['floor_ms'] * 1e3:.1f} | "
            f"{ours['stream_ms'] * 1e3:.1f} | {us(ours)} ({ours['num_splits']}) | {ours['frac']:.3f} | "
            f"{us(best)} ({_PEER_NAMES[best['impl']]}) | {100 * (ours['time_ms'] / best['time_ms'] - 1):+.1f}% | "
            + (f"{us(paged)} ({paged['num_splits']})" if paged else "-") + " | "
            + (us(fi) if fi else "-") + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="decode-attention bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["decode"], default="decode")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default="results", help="results folder (a <gpu>/ subfolder is made)")
    parser.add_argument("--quick", action="store_true", help="first two grid rows only, not for results")
    parser.add_argument("--no-sweep", action="store_true", help="skip the rows with forced split counts")
    parser.add_argument("--report", metavar="JSON", help="print a result file as a Markdown table and exit "
                        "(no GPU needed)")
    args = parser.parse_args(argv)
    if args.report:
        print(format_markdown(json.loads(Path(args.report).read_text())["rows"]))
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
