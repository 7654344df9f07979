"""Hydragen's whole call on the shared-prefix grid: the plan's two launches (the suffixes' blocks
merge the prefix chunks' states) against three (`SharedPrefixPlan.merge_launch`: the suffixes'
launch merges nothing and starts on the SMs the prefix pass frees without waiting for it, then a
merge launch), the suffixes one block per item or by the persistent kernel (at head_dim 128 too,
with 2 or 3 stages; "plan" as the library runs it). Also the suffixes alone both ways. Each call's output is compared with the
plan's.

An exploration, not a benchmark: lines of text (us), no result file.
Run: PYTHONPATH=. python3 scripts/explore/prefix_merge_launch.py [short] [rows ...]   (indices into the grid)
"""
import dataclasses
import importlib
import sys

import cupy as cp

from _inputs import shared_prefix_inputs
from gpukernels.bench import SHARED_PREFIX_GRID, Timer

sp = importlib.import_module("gpukernels.shared_prefix")
sk = importlib.import_module("gpukernels.split_kv")
timer = Timer(30)
HQ, D = 32, 128


LIBRARY = (sk.PERSISTENT_HEAD_DIMS, dict(sk.PERSISTENT_STAGES), dict(sk.PERSISTENT_MAX_KV_LEN))


def persistent(stages):
    """The suffixes one block per item (None), by the persistent kernel of `stages` stages at any
    length, or as the library runs them ("library")."""
    dims, by_dim, max_len = LIBRARY
    sk.PERSISTENT_HEAD_DIMS = dims if stages == "library" else (64,) if stages is None else (64, D)
    sk.PERSISTENT_STAGES.update(by_dim)
    sk.PERSISTENT_MAX_KV_LEN.clear()
    sk.PERSISTENT_MAX_KV_LEN.update(max_len)
    if stages not in (None, "library"):
        sk.PERSISTENT_STAGES[D] = stages
        sk.PERSISTENT_MAX_KV_LEN.pop(D, None)
    sk._persistent_grid.cache_clear()
    sk._persistent_kernel_for.cache_clear()


args = [a for a in sys.argv[1:] if a != "short"]
rows = [int(a) for a in args] or range(len(SHARED_PREFIX_GRID))
# `short`: the suffixes one block per item only, and chunks down to a quarter of the plan's
STAGES = (None,) if "short" in sys.argv else (None, 2, 3)
CHUNK_DIVISORS = (4, 2, 1) if "short" in sys.argv else (2, 1, 0.5)
for i in rows:
    hkv, B, P, S = SHARED_PREFIX_GRID[i]
    q, kp, vp, ks, vs, out, lse = shared_prefix_inputs(hkv, B, P, S, num_qo_heads=HQ, head_dim=D)
    plan = sp.plan_shared_prefix(B, HQ, hkv, D, P, S, num_sms=132)
    persistent("library")
    runner = sp.SharedPrefix(plan)
    res = {"plan": timer(lambda: runner.run(q, kp, vp, ks, vs, out=out, lse=lse))}  # noqa: B023
    ref = out.astype(cp.float32).copy()
    suffix = sp.SplitKV(plan.suffix)
    errs = []
    for stages in STAGES:
        name = "item" if stages is None else f"pers{stages}"
        persistent(stages)
        res[f"suffixes/{name}"] = timer(lambda: suffix.run(q, ks, vs))  # noqa: B023
        for chunk in sorted({int(plan.prefix_chunk_size / c) for c in CHUNK_DIVISORS}):
            if chunk < 64 or chunk > P:
                continue
            r = sp.SharedPrefix(dataclasses.replace(plan, merge_launch=True, prefix_chunk_size=chunk))
            out.fill(cp.nan)
            res[f"3L/{name}/c{chunk}"] = timer(lambda: r.run(q, kp, vp, ks, vs, out=out, lse=lse))  # noqa: B023
            errs.append(float(cp.linalg.norm(out.astype(cp.float32) - ref) / cp.linalg.norm(ref)))
    persistent("library")
    print(f"{HQ}/{hkv} B={B} {P}+{S} (c{plan.prefix_chunk_size}, {plan.prefix_block_rows} rows, max rel err vs plan "
          f"{max(errs):.1e}): " + ", ".join(f"{k}={v * 1e3:.1f}" for k, v in res.items()), flush=True)
