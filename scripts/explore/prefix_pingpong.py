"""Hydragen's prefix pass alone: the kernel of 64 query rows a block (two blocks an SM) against the
kernel of two warpgroups taking turns on the tensor cores (128 rows a block, one block an SM,
shared_prefix.cu: attend_rows_pingpong), at the planned chunk, its half and its double, with 4, 5
and 6 stages (and 5 without the turns). Prints each one's time (us) and rate on the useful rows (TFLOP/s), and the largest
difference of its states from the 64-row kernel's (the outputs are poisoned with NaN first, so a
state not written shows). Edge shapes first (rows past a tile, a partial last KV tile, head_dim 64,
bfloat16, a negative scale), checked only.

An exploration, not a benchmark: lines of text, no result file.
Run: PYTHONPATH=. python3 scripts/explore/prefix_pingpong.py
     (with `profile`: only the 32/8 x 128, 32768 row at chunk 8192, both kernels launched a few
     times, nothing timed: for Nsight Compute)
"""
import importlib
import sys

import cupy as cp
import numpy as np

from gpukernels import _runtime as rt
from gpukernels.bench import SHARED_PREFIX_GRID, Timer

sp = importlib.import_module("gpukernels.shared_prefix")
timer = Timer(30)
HQ = 32


def pingpong_kernel(dtype: str, head_dim: int, stages: int, turns: bool) -> rt.Kernel:
    expr = (f"decode_attention::shared_prefix_pingpong_kernel<{rt.C_TYPES[dtype]}, {head_dim}, {stages}, "
            f"{'true' if turns else 'false'}>")
    return rt.Kernel("shared_prefix", expr, sp.PREFIX_SIGNATURE, shared_mem=stages * 2 * 64 * head_dim * 2 + 1024)


def states(kernel, rows_per_block, threads, q, kp, vp, batch, hq, hkv, d, prefix_len, chunk, scale):
    n = -(-prefix_len // chunk)
    part_out = cp.full((n, batch, hq, d), np.nan, dtype=cp.float32)
    part_lse = cp.full((n, batch, hq), np.nan, dtype=cp.float32)
    grid = (n, -(-(batch * (hq // hkv)) // rows_per_block), hkv)
    args = (q.data.ptr, kp.data.ptr, vp.data.ptr, part_out.data.ptr, part_lse.data.ptr, batch, prefix_len, hq, hkv,
            chunk, scale * 1.4426950408889634)

    def launch():
        kernel(grid, (threads,), args, stream_ptr=cp.cuda.get_current_stream().ptr, device_id=0)
    launch()
    return part_out, part_lse, launch


def compare(a, b):
    """Largest |difference| of out over the largest |out|, and of lse; NaN where either is NaN."""
    (oa, la), (ob, lb) = a, b
    if bool(cp.isnan(oa).any()) or bool(cp.isnan(ob).any()) or bool(cp.isnan(la).any()) or bool(cp.isnan(lb).any()):
        return float("nan"), float("nan")
    out_err = float(cp.abs(oa - ob).max() / cp.abs(oa).max())
    return out_err, float(cp.abs(la - lb).max())


def inputs(batch, hq, hkv, d, prefix_len, dtype):
    ct = cp.float16 if dtype == "float16" else None
    mk = (lambda s: cp.random.standard_normal(s, dtype=cp.float32).astype(ct)) if ct else None
    if dtype == "bfloat16":   # bfloat16 bits: the top half of float32
        def mk(s):
            x = cp.random.standard_normal(s, dtype=cp.float32)
            return (x.view(cp.uint32) >> 16).astype(cp.uint16)
    return mk((batch, hq, d)), mk((prefix_len, hkv, d)), mk((prefix_len, hkv, d))


def run_case(label, batch, hq, hkv, d, prefix_len, chunk, dtype="float16", scale=None, time_it=False,
             variants=((4, True), (5, True), (6, True), (5, False))):
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    q, kp, vp = inputs(batch, hq, hkv, d, prefix_len, dtype)
    old = sp._prefix_kernel(dtype, d)
    ref = states(old, sp.QUERY_ROWS, sp.THREADS, q, kp, vp, batch, hq, hkv, d, prefix_len, chunk, scale)
    flops = 4 * batch * hq * prefix_len * d
    parts = []
    if time_it:
        t = timer(ref[2])
        parts.append(f"64-row {t * 1e3:.1f} ({flops / t / 1e9:.0f})")
    for stages, turns in variants:
        k = pingpong_kernel(dtype, d, stages, turns)
        got = states(k, 128, 256, q, kp, vp, batch, hq, hkv, d, prefix_len, chunk, scale)
        err = compare(ref[:2], got[:2])
        text = f"pp{stages}{'' if turns else ' no turns'} err {err[0]:.1e}/{err[1]:.1e}"
        if time_it:
            t = timer(got[2])
            text += f" {t * 1e3:.1f} ({flops / t / 1e9:.0f})"
        parts.append(text)
    print(f"{label} chunk {chunk}: " + "; ".join(parts), flush=True)


if sys.argv[1:] == ["profile"]:
    q, kp, vp = inputs(128, HQ, 8, 128, 32768, "float16")
    for kernel, rows, threads in ((sp._prefix_kernel("float16", 128), sp.QUERY_ROWS, sp.THREADS),
                                  (pingpong_kernel("float16", 128, 5, True), 128, 256)):
        launch = states(kernel, rows, threads, q, kp, vp, 128, HQ, 8, 128, 32768, 8192, 1 / np.sqrt(128))[2]
        for _ in range(3):
            launch()
    cp.cuda.Device().synchronize()
    sys.exit(0)

# Edge shapes, checked only.
run_case("edge 32/8 x 20, 1000", 20, 32, 8, 128, 1000, 512)
run_case("edge 32/8 x 20, 1000, one chunk", 20, 32, 8, 128, 1000, 1024)
run_case("edge 8/2 x 3, 4100, d64", 3, 8, 2, 64, 4100, 1024)
run_case("edge 32/8 x 40, 777, bf16", 40, 32, 8, 128, 777, 256, dtype="bfloat16")
run_case("edge 32/4 x 33, 3000, negative scale", 33, 32, 4, 128, 3000, 1024, scale=-0.09)
run_case("edge 32/32 x 256, 64", 256, 32, 32, 128, 64, 64)

for hkv, B, P, S in SHARED_PREFIX_GRID:
    rows = B * (HQ // hkv)
    if rows < 128:
        continue
    chunk0 = sp.plan_shared_prefix(B, HQ, hkv, 128, P, S, num_sms=132).prefix_chunk_size
    for chunk in sorted({chunk0 // 2, chunk0, chunk0 * 2}):
        if 64 <= chunk <= P:
            run_case(f"{HQ}/{hkv} x {B}, {P}", B, HQ, hkv, 128, P, chunk, time_it=True)
