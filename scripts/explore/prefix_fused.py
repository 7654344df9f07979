"""Hydragen with the suffixes attended inside the prefix pass (`plan_shared_prefix(..., fused=True)`)
against the planned launches, on the shared-prefix grid's rows: each call's time (the benchmark's
timer, the L2 flushed before each call) at the fused pass's prefix chunks from one block an SM to a
quarter of that, its largest error against the float64 reference on the row's first 16 sequences
first (a wrong kernel is not timed), and the model's time where it predicts the fused pass.

An exploration, not a benchmark: lines of text (us), no result file.
Run: PYTHONPATH=. python3 scripts/explore/prefix_fused.py [ROW,ROW...]   (indices into the grid)
"""
import importlib
import sys

import cupy as cp
import numpy as np

import refattn
from _inputs import shared_prefix_inputs
from gpukernels.bench import SHARED_PREFIX_GRID, Timer

sp = importlib.import_module("gpukernels.shared_prefix")   # the module (the package exports its function)

HQ, D = 32, 128
timer = Timer(30)


def error(out, q, kp, vp, ks, vs) -> float:
    """Largest relative error of the first 16 sequences' outputs against refattn (float64)."""
    n = min(16, q.shape[0])
    ref, _ = refattn.shared_prefix(*(cp.asnumpy(x).astype(np.float64) for x in (q[:n], kp, vp, ks[:n], vs[:n])))
    got = cp.asnumpy(out[:n]).astype(np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


rows = SHARED_PREFIX_GRID if len(sys.argv) < 2 else [SHARED_PREFIX_GRID[int(i)] for i in sys.argv[1].split(",")]
for hkv, B, P, S in rows:
    q, kp, vp, ks, vs, out, lse = shared_prefix_inputs(hkv, B, P, S)
    plan = sp.plan_shared_prefix(B, HQ, hkv, D, P, S, gpu="H200", fused=False)
    runner = sp.SharedPrefix(plan)
    call = lambda: runner.run(q, kp, vp, ks, vs, out=out, lse=lse)  # noqa: E731
    call()
    print(f"32/{hkv} x {B} x {P} + {S}: planned launches (chunk {plan.prefix_chunk_size}, "
          f"{'three' if plan.merge_launch else 'two'} launches) {timer(call) * 1e3:.1f}", flush=True)
    if sp.fused_ineligible(plan):
        print(f"  fused: {sp.fused_ineligible(plan)}", flush=True)
        continue
    one_wave = sp.plan_shared_prefix(B, HQ, hkv, D, P, S, gpu="H200", fused=True).prefix_chunk_size
    for chunk in sorted({one_wave, max(128, one_wave // 2), max(128, one_wave // 4), 2 * one_wave}):
        if chunk > 2 * P:
            continue
        fplan = sp.plan_shared_prefix(B, HQ, hkv, D, P, S, gpu="H200", fused=True, prefix_chunk_size=chunk)
        frunner = sp.SharedPrefix(fplan)
        out.fill(np.nan)
        fcall = lambda: frunner.run(q, kp, vp, ks, vs, out=out, lse=lse)  # noqa: E731
        fcall()
        err = error(out, q, kp, vp, ks, vs)
        t = timer(fcall) * 1e3 if err < 1e-2 else float("nan")
        print(f"  fused, chunk {chunk} ({fplan.num_chunks} chunks): {t:.1f} (max rel error {err:.2e})", flush=True)
        del frunner
    del runner, q, kp, vp, ks, vs, out, lse
    cp.get_default_memory_pool().free_all_blocks()
