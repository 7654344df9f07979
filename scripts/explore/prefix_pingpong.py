"""Hydragen's prefix pass alone: the kernel of 64 query rows a block (two blocks an SM) against the
kernel of two warpgroups taking turns on the tensor cores (128 rows a block, one block an SM, KV
tiles of 128 rows; since the commit after 2626971 the warp-specialised kernel, a producer
warpgroup copying the tiles by TMA: shared_prefix.cu, attend_rows_specialized; the logs before it
are of the kernel whose warpgroups copied their own tiles), at the planned chunk, its half and its
double. Prints each one's time (us) and rate on the useful rows (TFLOP/s), and the largest
difference of the two-warpgroup kernel's states from the other's (out relative to the largest
|out|, lse absolute; the outputs are poisoned with NaN first, so a state not written shows as
nan). Edge shapes first (rows past a block, a partial last KV tile, head_dim 64, bfloat16, a
negative scale), checked only.

An exploration, not a benchmark: lines of text, no result file.
Run: PYTHONPATH=. python3 scripts/explore/prefix_pingpong.py
     (with `profile`: only the 32/8 x 128, 32768 row at chunk 8192, both kernels launched a few
     times, nothing timed: for Nsight Compute; with `head_dim64`: four shapes at head_dim 64 in
     both dtypes, timed, then their whole planned calls against blocks of 64 rows)
"""
import importlib
import sys

import cupy as cp
import numpy as np
from _inputs import PREFIX_PASS_EDGES, prefix_pass_inputs, states_difference

from gpukernels.bench import SHARED_PREFIX_GRID, Timer

sp = importlib.import_module("gpukernels.shared_prefix")
timer = Timer(30)
HQ = 32
KERNELS = {"64-row": (sp._prefix_kernel, sp.QUERY_ROWS, sp.THREADS),
           "two warpgroups": (sp._specialized_kernel, sp.PINGPONG_ROWS, sp.SPECIALIZED_THREADS)}


def states(name, dtype, q, kp, vp, batch, hq, hkv, d, prefix_len, chunk, scale):
    """The pass's part_out, part_lse (poisoned first) and a function that launches it again."""
    make, rows_per_block, threads = KERNELS[name]
    kernel = make(dtype, d)
    n = -(-prefix_len // chunk)
    part_out = cp.full((n, batch, hq, d), np.nan, dtype=cp.float32)
    part_lse = cp.full((n, batch, hq), np.nan, dtype=cp.float32)
    grid = (n, -(-(batch * (hq // hkv)) // rows_per_block), hkv)
    tail = (part_out.data.ptr, part_lse.data.ptr, batch, prefix_len, hq, hkv, chunk, scale * 1.4426950408889634)
    if name == "64-row":
        args = (q.data.ptr, kp.data.ptr, vp.data.ptr) + tail
    else:   # the prefix through tensor maps
        args = tuple(sp.prefix_tensor_map(x.data.ptr, dtype, prefix_len, hkv, d) for x in (kp, vp)) + (q.data.ptr,) + tail

    def launch():
        kernel(grid, (threads,), args, stream_ptr=cp.cuda.get_current_stream().ptr, device_id=0)
    launch()
    return part_out, part_lse, launch


def run_case(label, batch, hq, hkv, d, prefix_len, chunk, dtype="float16", scale=None, time_it=False):
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    q, kp, vp = prefix_pass_inputs(batch, hq, hkv, d, prefix_len, dtype)
    flops = 4 * batch * hq * prefix_len * d
    ref = states("64-row", dtype, q, kp, vp, batch, hq, hkv, d, prefix_len, chunk, scale)
    got = states("two warpgroups", dtype, q, kp, vp, batch, hq, hkv, d, prefix_len, chunk, scale)
    err = states_difference(ref[:2], got[:2])
    text = f"{label} chunk {chunk}: difference {err[0]:.1e} / {err[1]:.1e}"
    if time_it:
        for name, result in (("64-row", ref), ("two warpgroups", got)):
            t = timer(result[2])
            text += f"; {name} {t * 1e3:.1f} ({flops / t / 1e9:.0f})"
    print(text, flush=True)


if sys.argv[1:] == ["profile"]:
    q, kp, vp = prefix_pass_inputs(128, HQ, 8, 128, 32768, "float16")
    for name in KERNELS:
        launch = states(name, "float16", q, kp, vp, 128, HQ, 8, 128, 32768, 8192, 1 / np.sqrt(128))[2]
        for _ in range(3):
            launch()
    cp.cuda.Device().synchronize()
    sys.exit(0)

if sys.argv[1:] == ["head_dim64"]:   # rows off the grid: head_dim 64, both dtypes, timed
    for hq, hkv, batch, prefix_len, chunk in ((32, 8, 256, 4096, 2048), (32, 8, 64, 16384, 2048),
                                              (8, 1, 128, 16384, 2048), (32, 8, 20, 8192, 1024)):
        for dtype in ("float16", "bfloat16"):
            run_case(f"d64 {dtype} {hq}/{hkv} x {batch}, {prefix_len}", batch, hq, hkv, 64, prefix_len, chunk,
                     dtype=dtype, time_it=True)
    # The whole planned call (suffixes of 128 tokens): the plan as made (blocks of two warpgroups,
    # their one-wave chunk) against blocks of 64 rows at theirs.
    import dataclasses

    from _inputs import shared_prefix_inputs
    from costmodel.shared_prefix import prefix_pass_chunk
    for hq, hkv, batch, prefix_len, _ in ((32, 8, 256, 4096, 0), (32, 8, 64, 16384, 0), (8, 1, 128, 16384, 0),
                                          (32, 8, 20, 8192, 0)):
        q, kp, vp, ks, vs, out, lse = shared_prefix_inputs(hkv, batch, prefix_len, 128, num_qo_heads=hq, head_dim=64)
        plan = sp.plan_shared_prefix(batch, hq, hkv, 64, prefix_len, 128, num_sms=132, gpu="h200")
        chunk64 = prefix_pass_chunk(prefix_len, batch * hq // hkv, hkv, 132, 2, 64)
        text = []
        for label, p in (("planned", plan),
                         ("64-row", dataclasses.replace(plan, prefix_block_rows=64, prefix_chunk_size=chunk64))):
            runner = sp.SharedPrefix(p)
            t = timer(lambda: runner.run(q, kp, vp, ks, vs, out=out, lse=lse))  # noqa: B023
            text.append(f"{label} ({p.prefix_block_rows} rows, chunk {p.prefix_chunk_size}) {t * 1e3:.1f}")
        print(f"d64 call {hq}/{hkv} x {batch}, {prefix_len} + 128: " + "; ".join(text), flush=True)
    sys.exit(0)

for label, *shape, options in PREFIX_PASS_EDGES:
    run_case(label, *shape, **options)

for hkv, B, P, S in SHARED_PREFIX_GRID:
    rows = B * (HQ // hkv)
    if rows <= sp.QUERY_ROWS:
        continue
    chunk0 = sp.plan_shared_prefix(B, HQ, hkv, 128, P, S, num_sms=132).prefix_chunk_size
    for chunk in sorted({chunk0 // 2, chunk0, chunk0 * 2}):
        if 128 <= chunk <= P:
            run_case(f"{HQ}/{hkv} x {B}, {P}", B, HQ, hkv, 128, P, chunk, time_it=True)
