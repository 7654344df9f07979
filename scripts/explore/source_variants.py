"""The library's kernels against a variant of their sources, on the rows that miss a target, in
alternating rounds in one process.

An exploration, not a benchmark: lines of text (us), no result file. VARIANT names a directory
holding a full copy of gpukernels/cuda with one change; each row's planned run is timed with the
kernels compiled from the library's sources and from the variant's (the median of 30 calls after
the benchmark's L2 flush, each round), beside the read-only time of its bytes and PyTorch SDPA's
best backend. Rows: "coverage" (the head_dim-64 rows of many short items the persistent kernel
serves), "span" (the span grid's rows read by windows), "shared_prefix" (the shared-prefix grid's
Hydragen calls as planned, and their prefix pass alone; no SDPA there).
Run: VARIANT=/path/to/cuda PYTHONPATH=. python3 scripts/explore/source_variants.py coverage,span
"""
import importlib
import os
import pathlib
import sys

import cupy as cp
import numpy as np
import torch

import gpukernels
from _inputs import span_grid_inputs
from gpukernels.bench import (HEAD_DIM, NUM_QO_HEADS, SPAN_BATCH, SPAN_GRID, SPAN_KV_HEADS, SPAN_KV_LEN, Timer,
                              _sdpa_peers, span_case_spans, span_token_mask, stream_read)

rt = importlib.import_module("gpukernels._runtime")
sk = importlib.import_module("gpukernels.split_kv")
sp = importlib.import_module("gpukernels.shared_prefix")
span_mod = importlib.import_module("gpukernels.span")
LIBRARY = rt.CUDA_DIR
VARIANT = pathlib.Path(os.environ["VARIANT"]).resolve()
ROUNDS = 3
timer = Timer(30)
stream = stream_read()


def use(sources: pathlib.Path) -> None:
    """Compile (or load from CuPy's cache) every kernel from `sources` from now on."""
    rt.CUDA_DIR = sources
    for cached in (rt.module, sk._kernel_for, sk._persistent_kernel_for, sk._persistent_grid, sp._prefix_kernel,
                   sp._specialized_kernel, sp._merge_kernel):
        cached.cache_clear()


def alternate(run) -> "tuple[float, float, list, list]":
    """Median times (us) of `run` with the library's and the variant's kernels, alternating rounds."""
    times = {LIBRARY: [], VARIANT: []}
    for _ in range(ROUNDS):
        for sources in (LIBRARY, VARIANT):
            use(sources)
            times[sources].append(timer(run) * 1e3)
    use(LIBRARY)
    return (float(np.median(times[LIBRARY])), float(np.median(times[VARIANT])), times[LIBRARY], times[VARIANT])


def line(label: str, read: float, lib: float, var: float, tl: list, tv: list, extra: str = "") -> None:
    print(f"{label}: read {read:.1f}, library {lib:.1f} ({lib / read:.3f}x read), variant {var:.1f} "
          f"({var / read:.3f}x read; {lib / var:.3f}x the library){extra}; rounds "
          f"{', '.join(f'{t:.1f}' for t in tl)} / {', '.join(f'{t:.1f}' for t in tv)}", flush=True)


COVERAGE = [   # dtype, batch, num_qo_heads, num_kv_heads, head_dim, kv_len
    ("bfloat16", 64, 16, 16, 64, 1000),      # the coverage row level with cuDNN
    ("bfloat16", 512, 8, 1, 64, 2000),
    ("float16", 96, 40, 8, 64, 3000),
    ("float16", 16, 20, 4, 64, 8191),
]


def coverage() -> None:
    for dtype, batch, hq, hkv, d, n in COVERAGE:
        tdtype = getattr(torch, dtype)
        q = torch.randn((batch, hq, d), device="cuda", dtype=tdtype)
        k = torch.randn((batch, n, hkv, d), device="cuda", dtype=tdtype)
        v = torch.randn((batch, n, hkv, d), device="cuda", dtype=tdtype)
        plan = gpukernels.plan_split_kv(batch, hq, hkv, d, n, dtype=dtype, num_sms=sk.num_sms(0),
                                        gpu=sk.device_gpu(0))
        runner = gpukernels.SplitKV(plan)
        out, lse = torch.empty_like(q), torch.empty((batch, hq), device="cuda", dtype=torch.float32)
        lib, var, tl, tv = alternate(lambda: runner.run(q, k, v, out=out, lse=lse))  # noqa: B023
        k16, v16 = (cp.asarray(x.view(torch.int16)) for x in (k, v))
        read = timer(lambda: stream(k16, v16)) * 1e3  # noqa: B023
        peers = {name: timer(fn) * 1e3 for name, fn in _sdpa_peers(q, k, v).items()}
        best = min(peers.items(), key=lambda kv: kv[1]) if peers else ("none", float("nan"))
        line(f"{dtype} {batch}x{hq}/{hkv}x{d} L={n} (s{plan.num_splits}, persistent grid "
             f"{sk.persistent_grid(plan, 0)})", read, lib, var, tl, tv, f", best SDPA {best[1]:.1f} ({best[0]})")
        del q, k, v, k16, v16
        torch.cuda.empty_cache()
        cp.get_default_memory_pool().free_all_blocks()


def span() -> None:
    batch, hkv, kv_len = SPAN_BATCH, SPAN_KV_HEADS, SPAN_KV_LEN
    q, k, v, out, lse = span_grid_inputs()
    for case in SPAN_GRID:
        indptr, spans = span_case_spans(case)
        plan = span_mod.plan_span(indptr, spans, batch=batch, kv_len=kv_len, num_qo_heads=NUM_QO_HEADS,
                                  num_kv_heads=hkv, head_dim=HEAD_DIM, num_sms=sk.num_sms(0), gpu=sk.device_gpu(0))
        if plan.layout != "windows":
            continue
        mask = span_token_mask(indptr, spans, batch, kv_len)
        tokens = cp.asarray(np.flatnonzero(mask.reshape(-1)))
        k_att = k.reshape(batch * kv_len, hkv, HEAD_DIM)[tokens]
        v_att = v.reshape(batch * kv_len, hkv, HEAD_DIM)[tokens]
        read = timer(lambda: stream(k_att, v_att)) * 1e3  # noqa: B023
        for s in sorted({plan.split.num_splits, 2, 3, 4}):
            p = span_mod.plan_span(indptr, spans, batch=batch, kv_len=kv_len, num_qo_heads=NUM_QO_HEADS,
                                   num_kv_heads=hkv, head_dim=HEAD_DIM, num_sms=sk.num_sms(0), num_splits=s)
            runner = span_mod.Span(p)
            lib, var, tl, tv = alternate(lambda: runner.run(q, k, v, out=out, lse=lse))  # noqa: B023
            mark = "*" if s == plan.split.num_splits else ""
            line(f"span {case} s{s}{mark}", read, lib, var, tl, tv)


def shared_prefix() -> None:
    from _inputs import shared_prefix_inputs

    from gpukernels.bench import SHARED_PREFIX_GRID

    for hkv, batch, prefix_len, suffix_len in SHARED_PREFIX_GRID:
        q, kp, vp, ks, vs, out, lse = shared_prefix_inputs(hkv, batch, prefix_len, suffix_len,
                                                           num_qo_heads=NUM_QO_HEADS, head_dim=HEAD_DIM)
        plan = sp.plan_shared_prefix(batch, NUM_QO_HEADS, hkv, HEAD_DIM, prefix_len, suffix_len,
                                     num_sms=sk.num_sms(0), gpu=sk.device_gpu(0))
        runner = sp.SharedPrefix(plan)
        read = timer(lambda: (stream(kp, vp), stream(ks, vs))) * 1e3  # noqa: B023   (two launches)
        label = (f"{NUM_QO_HEADS}/{hkv} x {batch} x {prefix_len}+{suffix_len} (c{plan.prefix_chunk_size}, "
                 f"{plan.prefix_block_rows} rows{', merge launch' if plan.merge_launch else ''})")
        lib, var, tl, tv = alternate(lambda: runner.run(q, kp, vp, ks, vs, out=out, lse=lse))  # noqa: B023
        line(label, read, lib, var, tl, tv)
        # the prefix pass alone, the plan's kernel and grid
        runner.run(q, kp, vp, ks, vs, out=out, lse=lse)
        part_out, part_lse, _ = next(iter(runner._buffers.values()))
        wide = plan.prefix_block_rows == sp.PINGPONG_ROWS
        rows = -(-batch * (NUM_QO_HEADS // hkv) // plan.prefix_block_rows)
        tail = (part_out.data.ptr, part_lse.data.ptr, batch, prefix_len, NUM_QO_HEADS, hkv, plan.prefix_chunk_size,
                0.088)
        if wide:   # blocks of two warpgroups and a producer: the prefix through tensor maps
            maps = tuple(sp.prefix_tensor_map(x.data.ptr, "float16", prefix_len, hkv, HEAD_DIM) for x in (kp, vp))
            args = maps + (q.data.ptr,) + tail
        else:
            args = (q.data.ptr, kp.data.ptr, vp.data.ptr) + tail
        grid = (plan.num_chunks, rows, hkv)

        def prefix_pass():
            kernel = (sp._specialized_kernel if wide else sp._prefix_kernel)("float16", HEAD_DIM)  # noqa: B023
            kernel(grid, (sp.SPECIALIZED_THREADS if wide else sp.THREADS,), args,  # noqa: B023
                   stream_ptr=cp.cuda.get_current_stream().ptr, device_id=0)

        lib, var, tl, tv = alternate(prefix_pass)
        flops = 4 * batch * NUM_QO_HEADS * prefix_len * HEAD_DIM
        line(f"   its prefix pass", read, lib, var, tl, tv,
             f", {flops / lib / 1e6:.0f} / {flops / var / 1e6:.0f} TFLOP/s")


for name in sys.argv[1].split(","):
    {"coverage": coverage, "span": span, "shared_prefix": shared_prefix}[name]()
