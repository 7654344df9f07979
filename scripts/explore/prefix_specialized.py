"""Hydragen's prefix pass alone: blocks of 64 query rows (attend_rows) against the warp-specialised
pass (attend_rows_specialized: a producer warpgroup copying by TMA, two consumers with 240
registers each taking turns on the tensor cores and overlapping their softmax with their own P V).
(At the commit that added it, a third kernel beside them, two warpgroups taking turns that copied
their tiles themselves and took their softmax after both products, since removed:
logs/explore-prefix-specialized.log.) Edge shapes first, checked only: the specialised pass's
states against the 64-row kernel's (out relative to the largest |out|, lse absolute; outputs
poisoned with NaN first, so a state not written shows as nan). Then the grid's rows of more than
64 query rows a KV head, at the plan's chunk: time (us) and rate on the useful rows (TFLOP/s);
with PyTorch, its scaled_dot_product_attention (cuDNN and FlashAttention back ends) on the same
work (each chunk a batch entry, the head's query rows its sequence) for comparison.

An exploration, not a benchmark: lines of text, no result file.
Run: PYTHONPATH=. python3 scripts/explore/prefix_specialized.py
     (with `variants`: the pass at head_dim 128 on 3 stages and on 2, on five rows; with `check`: the
     edge shapes only)
"""
import importlib
import sys

import cupy as cp
import numpy as np
from _inputs import PREFIX_PASS_EDGES, prefix_pass_inputs, states_difference

from gpukernels import _runtime as rt
from gpukernels.bench import SHARED_PREFIX_GRID, Timer

sp = importlib.import_module("gpukernels.shared_prefix")
timer = Timer(30)
HQ = 32


def states(name, dtype, q, kp, vp, batch, hq, hkv, d, prefix_len, chunk, scale):
    """The pass's part_out, part_lse (poisoned first) and a function that launches it again."""
    n = -(-prefix_len // chunk)
    part_out = cp.full((n, batch, hq, d), np.nan, dtype=cp.float32)
    part_lse = cp.full((n, batch, hq), np.nan, dtype=cp.float32)
    tail = (batch, prefix_len, hq, hkv, chunk, scale * 1.4426950408889634)
    if name == "64-row":
        kernel, rows, threads = sp._prefix_kernel(dtype, d), sp.QUERY_ROWS, sp.THREADS
        args = (q.data.ptr, kp.data.ptr, vp.data.ptr, part_out.data.ptr, part_lse.data.ptr) + tail
    else:
        kernel, rows, threads = sp._specialized_kernel(dtype, d), sp.PINGPONG_ROWS, sp.SPECIALIZED_THREADS
        maps = tuple(sp.prefix_tensor_map(x.data.ptr, dtype, prefix_len, hkv, d) for x in (kp, vp))
        args = maps + (q.data.ptr, part_out.data.ptr, part_lse.data.ptr) + tail
    grid = (n, -(-(batch * (hq // hkv)) // rows), hkv)

    def launch():
        kernel(grid, (threads,), args, stream_ptr=cp.cuda.get_current_stream().ptr, device_id=0)
    launch()
    return part_out, part_lse, launch


def torch_rates(batch, hq, hkv, d, prefix_len, chunk, flops):
    """scaled_dot_product_attention's time on the pass's work, per back end (us), or why not."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as exc:
        return f"torch: {exc}"
    n = -(-prefix_len // chunk)
    rows = batch * (hq // hkv)
    qt = torch.randn(n, hkv, rows, d, device="cuda", dtype=torch.float16)
    kt = torch.randn(n, hkv, chunk, d, device="cuda", dtype=torch.float16)
    vt = torch.randn(n, hkv, chunk, d, device="cuda", dtype=torch.float16)
    text = []
    for label, backend in (("cuDNN", SDPBackend.CUDNN_ATTENTION), ("FlashAttention", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
                t = timer(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))  # noqa: B023
            text.append(f"{label} {t * 1e3:.1f} ({flops / t / 1e9:.0f})")
        except Exception as exc:  # noqa: BLE001 - a back end this build lacks
            text.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
    return "; ".join(text)


def run_case(label, batch, hq, hkv, d, prefix_len, chunk, dtype="float16", scale=None, time_it=False, peers=False):
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    q, kp, vp = prefix_pass_inputs(batch, hq, hkv, d, prefix_len, dtype)
    flops = 4 * batch * hq * prefix_len * d
    results = {name: states(name, dtype, q, kp, vp, batch, hq, hkv, d, prefix_len, chunk, scale)
               for name in ("64-row", "specialized")}
    text = f"{label} chunk {chunk}:"
    for name in ("specialized",):
        err = states_difference(results["64-row"][:2], results[name][:2])
        text += f" {name} difference {err[0]:.1e} / {err[1]:.1e};"
    if time_it:
        for name, result in results.items():
            t = timer(result[2])
            text += f" {name} {t * 1e3:.1f} ({flops / t / 1e9:.0f})"
    if peers:
        text += "; " + torch_rates(batch, hq, hkv, d, prefix_len, chunk, flops)
    print(text, flush=True)


print(f"GPU: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}", flush=True)
if sys.argv[1:] == ["variants"]:   # the pass at head_dim 128: the library's 3 stages against 2
    # (2 free 64 KB of shared memory). logs/explore-prefix-specialized-variants.log also has a third
    # variant from a build not kept: the query's A fragments in registers (the scores an RS product),
    # a template flag of the kernel then.
    def variant(stages):
        name = f"decode_attention::shared_prefix_specialized_kernel<__half, 128, {stages}>"
        smem = stages * 2 * sp.PINGPONG_KV_TILE * 128 * 2 + sp.PINGPONG_ROWS * 128 * 2 + 1024
        return rt.Kernel("shared_prefix", name, sp.SPECIALIZED_SIGNATURE, shared_mem=smem)
    for hkv, B, P in ((8, 128, 32768), (8, 256, 16384), (8, 64, 16384), (8, 256, 4096), (32, 256, 4096)):
        chunk = sp.plan_shared_prefix(B, HQ, hkv, 128, P, 128, num_sms=132, gpu="h200").prefix_chunk_size
        q, kp, vp = prefix_pass_inputs(B, HQ, hkv, 128, P, "float16")
        flops = 4 * B * HQ * P * 128
        n = -(-P // chunk)
        maps = tuple(sp.prefix_tensor_map(x.data.ptr, "float16", P, hkv, 128) for x in (kp, vp))
        text, first = [], None
        for stages in (3, 2):
            part_out = cp.full((n, B, HQ, 128), np.nan, dtype=cp.float32)
            part_lse = cp.full((n, B, HQ), np.nan, dtype=cp.float32)
            kernel = variant(stages)
            args = maps + (q.data.ptr, part_out.data.ptr, part_lse.data.ptr, B, P, HQ, hkv, chunk, -0.127)
            grid = (n, -(-(B * (HQ // hkv)) // sp.PINGPONG_ROWS), hkv)

            def launch():
                kernel(grid, (sp.SPECIALIZED_THREADS,), args, stream_ptr=cp.cuda.get_current_stream().ptr,  # noqa: B023
                       device_id=0)
            launch()
            label = f"{stages} stages"
            if first is None:
                first = (part_out, part_lse)
            else:
                label += " (difference {:.1e} / {:.1e})".format(*states_difference(first, (part_out, part_lse)))
            t = timer(launch)
            text.append(f"{label} {t * 1e3:.1f} ({flops / t / 1e9:.0f})")
        print(f"{HQ}/{hkv} x {B}, {P} chunk {chunk}: " + "; ".join(text), flush=True)
    sys.exit(0)
# and two chunks that are not multiples of the 128-row tile (a chunk's last tile holds the next's rows)
for label, *shape, options in PREFIX_PASS_EDGES + (("edge 32/8 x 20, 1000, chunk 200", 20, 32, 8, 128, 1000, 200, {}),
                                                   ("edge 32/8 x 64, 100, chunk 16", 64, 32, 8, 128, 100, 16, {})):
    run_case(label, *shape, **options)
if sys.argv[1:] == ["check"]:
    sys.exit(0)

for hkv, B, P, S in SHARED_PREFIX_GRID:
    if B * (HQ // hkv) <= sp.QUERY_ROWS:
        continue
    chunk = sp.plan_shared_prefix(B, HQ, hkv, 128, P, S, num_sms=132, gpu="h200").prefix_chunk_size
    run_case(f"{HQ}/{hkv} x {B}, {P}", B, HQ, hkv, 128, P, chunk, time_it=True, peers=True)
for B, P in ((256, 16384), (1024, 4096)):   # Hydragen's sweep, 32/8 heads
    chunk = sp.plan_shared_prefix(B, HQ, 8, 128, P, 128, num_sms=132, gpu="h200").prefix_chunk_size
    run_case(f"{HQ}/8 x {B}, {P}", B, HQ, 8, 128, P, chunk, time_it=True, peers=True)
run_case("d64 32/8 x 256, 4096", 256, 32, 8, 64, 4096, 2048, time_it=True)
