"""Hydragen's suffix launch alone on the shared-prefix grid: how near the read-only time of the
suffixes' K and V it runs, with and without the prefix chunks' states merged into it, at several
pipeline depths of the one-block-per-item kernel and of the persistent kernel (a grid of the
resident blocks running on from item to item).

An exploration, not a benchmark: lines of text (us, the median of 20 calls after the benchmark's
L2 flush), no result file.
Run: PYTHONPATH=. python3 scripts/explore/suffix_launch.py [row indices, e.g. 3,6]
"""
import functools
import importlib
import os
import sys

import cupy as cp

from gpukernels.bench import SHARED_PREFIX_GRID, Timer, _randn16, stream_read

sp = importlib.import_module("gpukernels.shared_prefix")
sk = importlib.import_module("gpukernels.split_kv")
rt = importlib.import_module("gpukernels._runtime")

timer = Timer(20)
stream = stream_read()
HQ, D = 32, 128
STAGES = [int(x) for x in os.environ.get("STAGES", "2,3,4").split(",") if x]
PERSISTENT_STAGES = [int(x) for x in os.environ.get("PERSISTENT_STAGES", "2,3,4").split(",") if x]
_depth = {"stages": None, "persistent": None}
_own_kernel_for, _own_persistent_for = sk._kernel_for, sk._persistent_kernel_for


@functools.lru_cache(None)
def _kernel_at(dtype, head_dim, g, paged, states, windows, stages):
    return rt.Kernel("split_kv", sk.name_expression(dtype, head_dim, g, paged, stages=stages, states=states,
                                                    windows=windows),
                     sk.KERNEL_SIGNATURE, shared_mem=sk.dynamic_smem_bytes(dtype, head_dim, paged, stages=stages))


@functools.lru_cache(None)
def _persistent_at(dtype, head_dim, g, stages):
    return rt.Kernel("split_kv", sk.persistent_name_expression(dtype, head_dim, g, stages), sk.KERNEL_SIGNATURE,
                     shared_mem=sk.dynamic_smem_bytes(dtype, head_dim, False, stages=stages))


def _kernel_for(dtype, head_dim, g, paged, states=False, windows=False):
    if _depth["stages"] is None:
        return _own_kernel_for(dtype, head_dim, g, paged, states, windows)
    return _kernel_at(dtype, head_dim, g, paged, states, windows, _depth["stages"])


def _persistent_kernel_for(dtype, head_dim, g, take=False):
    if _depth["persistent"] is None or take:
        return _own_persistent_for(dtype, head_dim, g, take)
    return _persistent_at(dtype, head_dim, g, _depth["persistent"])


sk._kernel_for = _kernel_for
sk._persistent_kernel_for = _persistent_kernel_for

rows = SHARED_PREFIX_GRID if len(sys.argv) < 2 else [SHARED_PREFIX_GRID[int(i)] for i in sys.argv[1].split(",")]
for hkv, B, P, S in rows:
    plan = sp.plan_shared_prefix(B, HQ, hkv, D, P, S, num_sms=132)
    n = -(-P // plan.prefix_chunk_size)
    q = _randn16((B, HQ, D))
    ks, vs = _randn16((B, S, hkv, D)), _randn16((B, S, hkv, D))
    out = cp.empty((B, HQ, D), cp.float16)
    lse = cp.empty((B, HQ), cp.float32)
    po = cp.random.standard_normal((n, B, HQ, D), dtype=cp.float32)
    pl = cp.random.standard_normal((n, B, HQ), dtype=cp.float32)
    states = sp.StatePointers(po.data.ptr, pl.data.ptr, n)
    res = {"read": timer(lambda: stream(ks, vs))}
    sk.PERSISTENT = False
    for splits in sorted({plan.suffix.num_splits, 1}):
        runner = sk.SplitKV(sp.plan_split_kv(B, HQ, hkv, D, S, num_splits=splits, num_sms=132))
        for st in STAGES:
            _depth["stages"] = st
            per_sm = _kernel_for("float16", D, runner.plan.heads_per_block, False).resident_blocks(0, 128)
            res[f"s{splits} st{st} ({per_sm}/SM)"] = timer(lambda: runner.run(q, ks, vs, out=out, lse=lse))  # noqa: B023
            res[f"s{splits} st{st} +{n} states"] = timer(
                lambda: runner.run(q, ks, vs, out=out, lse=lse, states=states))  # noqa: B023
        _depth["stages"] = None
    sk.PERSISTENT = True
    sk.PERSISTENT_HEAD_DIMS = (64, 128)
    runner = sk.SplitKV(sp.plan_split_kv(B, HQ, hkv, D, S, num_splits=1, num_sms=132))
    for st in PERSISTENT_STAGES:
        _depth["persistent"] = st
        sk._persistent_grid.cache_clear()
        grid = sk.persistent_grid(runner.plan, 0)
        if grid is not None:
            res[f"persistent st{st} {grid[1]} blocks"] = timer(lambda: runner.run(q, ks, vs, out=out, lse=lse))  # noqa: B023
    _depth["persistent"] = None
    sk.PERSISTENT_HEAD_DIMS = (64,)
    sk._persistent_grid.cache_clear()
    print(f"{HQ}/{hkv} B={B} suffix {S} (prefix {P}, plan: {plan.suffix.num_splits} split(s), {n} chunk states): "
          + ", ".join(f"{a}={b * 1e3:.1f}" for a, b in res.items()), flush=True)
    del q, ks, vs, out, lse, po, pl
    cp.get_default_memory_pool().free_all_blocks()
