"""Where the time of a Hydragen call goes: its two launches timed alone (GPU time, the host kept
ahead by a GPU wait), the whole call with and without that wait, the prefix pass over several
chunk sizes, the suffix launch (which merges the prefix chunks' states) over several split
counts, the merge of the chunks alone, and the host's share (a profile of repeated calls). Then the bifurcated method's five
launches, each timed by CUDA events around it inside whole calls (the median over the calls).

An exploration, not a benchmark: lines of text (us), no result file.
Run: PYTHONPATH=. python3 scripts/explore/shared_prefix_parts.py
"""
import importlib
import os

import cupy as cp

import numpy as np

from _profile import print_host_profile
from gpukernels.bench import SHARED_PREFIX_GRID, Timer, _randn16, gpu_wait, host_us, stream_read

sp = importlib.import_module("gpukernels.shared_prefix")
sk = importlib.import_module("gpukernels.split_kv")
import gpukernels  # noqa: E402

timer = Timer(20)
stream = stream_read()
HQ, D = 32, 128
import sys  # noqa: E402

bif = importlib.import_module("gpukernels.bifurcated")


def bifurcated_parts(hydragen_plan, q, kp, vp, ks, vs, out, lse, calls: int = 20) -> None:
    """Each launch of a bifurcated call, timed by CUDA events around it (us, median over `calls`
    whole calls after a GPU wait), and the whole call."""
    p = hydragen_plan
    plan = sp.plan_shared_prefix(p.batch, p.num_qo_heads, p.num_kv_heads, p.head_dim, p.prefix_len, p.suffix_len,
                                 num_sms=132, method="bifurcated")
    runner = sp.SharedPrefix(plan)
    call = lambda: runner.run(q, kp, vp, ks, vs, out=out, lse=lse)  # noqa: E731
    whole = timer(call, lead_ms=0.5)
    original = bif._kernel
    times: dict = {}

    def timed(expression, signature, shared_mem=0):
        kernel = original(expression, signature, shared_mem)
        name = expression.split("::")[-1].split("<")[0].removeprefix("bifurcated_").removesuffix("_kernel")

        def launch(*args, **kwargs):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            kernel(*args, **kwargs)
            end.record()
            times.setdefault(name, []).append((start, end))
        return launch

    bif._kernel = timed
    try:
        for _ in range(calls):
            gpu_wait(0.5)
            call()
        cp.cuda.Device().synchronize()
    finally:
        bif._kernel = original
    parts = {name: float(np.median([cp.cuda.get_elapsed_time(a, b) for a, b in pairs])) * 1e3
             for name, pairs in times.items()}
    print(f"  bifurcated: call={whole * 1e3:.1f}, " + ", ".join(f"{k}={v:.1f}" for k, v in parts.items()), flush=True)


rows = SHARED_PREFIX_GRID if len(sys.argv) < 2 else [SHARED_PREFIX_GRID[int(i)] for i in sys.argv[1].split(",")]
for hkv, B, P, S in rows:
    q = _randn16((B, HQ, D))
    k_pool, v_pool = _randn16((P + B * S, hkv, D)), _randn16((P + B * S, hkv, D))
    kp, vp = k_pool[:P], v_pool[:P]
    ks, vs = (x[P:].reshape(B, S, hkv, D) for x in (k_pool, v_pool))
    out = cp.empty((B, HQ, D), cp.float16)
    lse = cp.empty((B, HQ), cp.float32)
    res = {"read_all": timer(lambda: stream(k_pool, v_pool)), "read_prefix": timer(lambda: stream(kp, vp))}
    plan = sp.plan_shared_prefix(B, HQ, hkv, D, P, S, num_sms=132)
    runner = sp.SharedPrefix(plan)
    call = lambda: runner.run(q, kp, vp, ks, vs, out=out, lse=lse)  # noqa: E731
    res["call"] = timer(call)
    res["call_lead"] = timer(call, lead_ms=0.5)
    sk.STATES_OVERLAP = False   # the suffix launch waiting for the prefix pass at its start
    try:
        res["call_lead waiting"] = timer(call, lead_ms=0.5)
    finally:
        sk.STATES_OVERLAP = True
    for chunk in (plan.prefix_chunk_size // 2, plan.prefix_chunk_size * 2):   # the whole call, other chunks
        if chunk >= sp.kv_tile(D):
            other = sp.SharedPrefix(sp.plan_shared_prefix(B, HQ, hkv, D, P, S, num_sms=132, prefix_chunk_size=chunk))
            res[f"call_lead c{chunk}"] = timer(lambda: other.run(q, kp, vp, ks, vs, out=out, lse=lse),  # noqa: B023
                                               lead_ms=0.5)
    res["host"] = host_us(call) / 1e3
    chunk0 = plan.prefix_chunk_size
    group = HQ // hkv
    for chunk in sorted({chunk0, chunk0 * 2, chunk0 * 4}) if os.environ.get("CALLS_ONLY", "0") != "1" else ():
        n = -(-P // chunk)
        po = cp.empty((n, B, HQ, D), cp.float32)
        pl = cp.empty((n, B, HQ), cp.float32)
        grid = (n, -(-(B * group) // sp.QUERY_ROWS), hkv)
        kern = sp._prefix_kernel("float16", D)
        args = (q.data.ptr, kp.data.ptr, vp.data.ptr, po.data.ptr, pl.data.ptr, B, P, HQ, hkv, chunk,
                0.088 * 1.4427)
        launch = lambda: kern(grid, (sp.THREADS,), args, stream_ptr=cp.cuda.get_current_stream().ptr,  # noqa: E731
                              device_id=0)
        res[f"prefix c{chunk}x{n}{'*' if chunk == chunk0 else ''}"] = timer(launch, lead_ms=0.3)
        if chunk == chunk0:
            # The suffix launch as the call runs it (merging the prefix chunks' states), then the
            # same with other split counts, and the separate merge it replaced.
            states = sp.StatePointers(po.data.ptr, pl.data.ptr, n)
            for splits in sorted({plan.suffix.num_splits, 1, 2, 4, 8}):
                suffix_plan = sp.plan_split_kv(B, HQ, hkv, D, S, num_splits=splits, num_sms=132)
                suffix = sp.SplitKV(suffix_plan)
                name = f"suffix s{splits}{'*' if splits == plan.suffix.num_splits else ''}"
                res[name] = timer(lambda: suffix.run(q, ks, vs, out=out, lse=lse, states=states),  # noqa: B023
                                  lead_ms=0.3)
            mk = sp._merge_kernel("float16")
            margs = (po.data.ptr, pl.data.ptr, out.data.ptr, lse.data.ptr, n, B * HQ, D)
            res["chunks merge"] = timer(lambda: mk((sp.merge_blocks(B * HQ, D),), (sp.MERGE_THREADS,),  # noqa: B023
                                                   margs, stream_ptr=cp.cuda.get_current_stream().ptr,  # noqa: B023
                                                   device_id=0), lead_ms=0.3)
        del po, pl
    print(f"{HQ}/{hkv} B={B} {P}+{S}: " + ", ".join(f"{a}={b * 1e3:.1f}" for a, b in res.items()), flush=True)
    if (hkv, B) == (8, 16) and os.environ.get("CALLS_ONLY", "0") != "1":
        print_host_profile(call, calls=200, top=14, lines=60)
    if os.environ.get("BIFURCATED", "1") == "1" and os.environ.get("CALLS_ONLY", "0") != "1":
        bifurcated_parts(plan, q, kp, vp, ks, vs, out, lse)
    del q, k_pool, v_pool, kp, vp, ks, vs
    cp.get_default_memory_pool().free_all_blocks()
