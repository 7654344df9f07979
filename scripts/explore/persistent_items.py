"""The persistent split-KV kernel (a grid of the resident blocks running on from item to item)
against one block per (sequence, KV head, head group) item, on shapes with more items than the GPU
holds blocks at once, beside PyTorch SDPA's best backend.

An exploration, not a benchmark: lines of text (us), no result file. Each shape's planned run
(no lengths given) is timed with gpukernels.split_kv.PERSISTENT off and on in alternating rounds
(the median of 30 calls after the benchmark's L2 flush, each round), with the read-only time of
its K and V; with STAGES=3,4 in the environment, also the persistent kernel at those pipeline
depths.
Run: PYTHONPATH=. python3 scripts/explore/persistent_items.py
"""
import functools
import importlib
import os

import cupy as cp
import numpy as np
import torch

import gpukernels
from gpukernels.bench import Timer, _sdpa_peers, stream_read

sk = importlib.import_module("gpukernels.split_kv")
rt = importlib.import_module("gpukernels._runtime")
# The persistent kernel also at other pipeline depths (env STAGES=3,4: one more column each).
EXTRA_STAGES = [int(x) for x in os.environ.get("STAGES", "").split(",") if x]
_own_persistent = sk._persistent_kernel_for
_depth = {"stages": None}


@functools.lru_cache(None)
def _persistent_at(dtype, head_dim, heads_per_block, stages):
    return rt.Kernel("split_kv", sk.persistent_name_expression(dtype, head_dim, heads_per_block, stages),
                     sk.KERNEL_SIGNATURE, shared_mem=sk.dynamic_smem_bytes(dtype, head_dim, False, stages=stages))


def _persistent_kernel_for(dtype, head_dim, heads_per_block, take=False):
    if _depth["stages"] is None or take:
        return _own_persistent(dtype, head_dim, heads_per_block, take)
    return _persistent_at(dtype, head_dim, heads_per_block, _depth["stages"])


sk._persistent_kernel_for = _persistent_kernel_for

SHAPES = [   # dtype, batch, num_qo_heads, num_kv_heads, head_dim, kv_len
    ("bfloat16", 64, 16, 16, 64, 1000),      # the coverage row behind cuDNN
    ("bfloat16", 128, 28, 4, 128, 2049),
    ("float16", 32, 32, 32, 128, 4099),
    ("float16", 64, 32, 8, 128, 16384),      # decode grid rows of one split
    ("float16", 16, 32, 32, 128, 8192),
    ("float16", 256, 32, 8, 128, 512),
    ("float16", 128, 32, 32, 128, 256),
    ("bfloat16", 512, 8, 1, 64, 2000),
    ("float16", 96, 40, 8, 64, 3000),
]
ROUNDS = 3
timer = Timer(30)
stream = stream_read()

for dtype, batch, hq, hkv, d, n in SHAPES:
    tdtype = getattr(torch, dtype)
    q = torch.randn((batch, hq, d), device="cuda", dtype=tdtype)
    k = torch.randn((batch, n, hkv, d), device="cuda", dtype=tdtype)
    v = torch.randn((batch, n, hkv, d), device="cuda", dtype=tdtype)
    plan = gpukernels.plan_split_kv(batch, hq, hkv, d, n, dtype=dtype, num_sms=sk.num_sms(0), gpu=sk.device_gpu(0))
    runner = gpukernels.SplitKV(plan)
    out, lse = torch.empty_like(q), torch.empty((batch, hq), device="cuda", dtype=torch.float32)
    times = {False: [], True: []}
    grid = None
    for _ in range(ROUNDS):
        for persistent in (False, True):
            sk.PERSISTENT = persistent
            if persistent:
                grid = sk.persistent_grid(plan, 0)
            times[persistent].append(timer(lambda: runner.run(q, k, v, out=out, lse=lse)) * 1e3)  # noqa: B023
    sk.PERSISTENT = True
    k16, v16 = (cp.asarray(x.view(torch.int16)) for x in (k, v))
    read = timer(lambda: stream(k16, v16)) * 1e3  # noqa: B023
    peers = {name: timer(fn) * 1e3 for name, fn in _sdpa_peers(q, k, v).items()}
    best = min(peers.items(), key=lambda kv: kv[1]) if peers else ("none", float("nan"))
    one, pers = float(np.median(times[False])), float(np.median(times[True]))
    extra = ""
    for st in EXTRA_STAGES:
        _depth["stages"] = st
        sk._persistent_grid.cache_clear()   # the grid follows the depth's resident blocks
        g = sk.persistent_grid(plan, 0)
        extra += f", persistent at {st} stages {timer(lambda: runner.run(q, k, v, out=out, lse=lse)) * 1e3:.1f} (grid {g})"  # noqa: B023
        _depth["stages"] = None
        sk._persistent_grid.cache_clear()
    print(f"{dtype} {batch}x{hq}/{hkv}x{d} L={n}: {plan.seq_heads} items, {plan.num_splits} split(s), persistent grid "
          f"{grid}; read {read:.1f}, one block per item {one:.1f}, persistent {pers:.1f} ({one / pers:.3f}x), "
          f"best SDPA {best[1]:.1f} ({best[0]}){extra}; rounds {', '.join(f'{t:.1f}' for t in times[False])} / "
          f"{', '.join(f'{t:.1f}' for t in times[True])}", flush=True)
    del q, k, v, k16, v16
    torch.cuda.empty_cache()
    cp.get_default_memory_pool().free_all_blocks()
