"""Whether Hydragen's two passes can run at the same time: the prefix pass (tensor-core bound) and
the suffixes' split-KV (memory bound) on two streams, against the two one after the other, for
prefix chunks that leave the SMs more or less room (fewer prefix blocks: room for suffix blocks
beside them). The suffix launch here merges nothing (the call's merge of the states would be a
third launch after both); the whole call as it runs today is printed beside.

An exploration, not a benchmark: lines of text (us), no result file.
Run: PYTHONPATH=. python3 scripts/explore/prefix_suffix_streams.py [row indices, e.g. 2,3,6]
"""
import importlib
import sys

import cupy as cp

from _inputs import shared_prefix_inputs
from gpukernels.bench import SHARED_PREFIX_GRID, Timer
from gpukernels.split_kv import device_gpu

sp = importlib.import_module("gpukernels.shared_prefix")
timer = Timer(20)
HQ, D = 32, 128
gpu = device_gpu(cp.cuda.Device().id)
main = cp.cuda.get_current_stream()
side = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]

rows = SHARED_PREFIX_GRID if len(sys.argv) < 2 else [SHARED_PREFIX_GRID[int(i)] for i in sys.argv[1].split(",")]
for hkv, B, P, S in rows:
    q, kp, vp, ks, vs, out, lse = shared_prefix_inputs(hkv, B, P, S, num_qo_heads=HQ, head_dim=D)
    plan = sp.plan_shared_prefix(B, HQ, hkv, D, P, S, gpu=gpu)
    whole = sp.SharedPrefix(plan)
    res = {"call": timer(lambda: whole.run(q, kp, vp, ks, vs, out=out, lse=lse), lead_ms=0.5)}  # noqa: B023
    suffix = sp.SplitKV(plan.suffix)
    group = HQ // hkv
    for chunk in (plan.prefix_chunk_size, plan.prefix_chunk_size * 2, plan.prefix_chunk_size * 4):
        n = -(-P // chunk)
        po = cp.empty((n, B, HQ, D), cp.float32)
        pl = cp.empty((n, B, HQ), cp.float32)
        grid = (n, -(-(B * group) // sp.QUERY_ROWS), hkv)
        kern = sp._prefix_kernel("float16", D)
        args = (q.data.ptr, kp.data.ptr, vp.data.ptr, po.data.ptr, pl.data.ptr, B, P, HQ, hkv, chunk, 0.088 * 1.4427)

        def prefix(stream):
            kern(grid, (sp.THREADS,), args, stream_ptr=stream.ptr, device_id=0)  # noqa: B023

        def suffixes(stream):
            with stream:
                suffix.run(q, ks, vs, out=out, lse=lse)  # noqa: B023

        def one_after_other():
            prefix(main)
            suffixes(main)

        def side_by_side():
            start = cp.cuda.Event()
            start.record(main)
            for s in side:
                s.wait_event(start)
            prefix(side[0])
            suffixes(side[1])
            for s in side:
                done = cp.cuda.Event()
                done.record(s)
                main.wait_event(done)

        blocks = grid[0] * grid[1] * grid[2]
        res[f"c{chunk} ({blocks} blocks): prefix"] = timer(lambda: prefix(main), lead_ms=0.3)  # noqa: B023
        res[f"c{chunk} one after the other"] = timer(one_after_other, lead_ms=0.3)
        res[f"c{chunk} side by side"] = timer(side_by_side, lead_ms=0.3)
        del po, pl
    res["suffixes"] = timer(lambda: suffixes(main), lead_ms=0.3)
    print(f"{HQ}/{hkv} B={B} {P}+{S}: " + ", ".join(f"{a}={b * 1e3:.1f}" for a, b in res.items()), flush=True)
    del q, kp, vp, ks, vs
    cp.get_default_memory_pool().free_all_blocks()
