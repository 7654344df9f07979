"""The tree row of the benchmark (4096 + 8 x 2048 + 64 x 256 tokens, 64 sequences, 32/32 heads) with
its segments cut into chunks of several sizes (the plan's marked *); the call's host work kept
ahead by a GPU wait, so that the times are the kernels'.

An exploration, not a benchmark: one line of text (us), no result file.
Run: PYTHONPATH=. python3 scripts/explore/tree_chunk_sweep.py
"""
import cupy as cp

from gpukernels.bench import (HEAD_DIM, NUM_QO_HEADS, TREE_BATCH, TREE_KV_HEADS, TREE_LEVELS, Timer, _randn16,
                              tree_layout)
from gpukernels.split_kv import device_gpu, num_sms
from gpukernels.tree import choose_chunk_size, kv_tile, tree

timer = Timer(30)
seg_indptr, path_indptr, path_segs = tree_layout(TREE_LEVELS, TREE_BATCH)
total = int(seg_indptr[-1])
q = _randn16((TREE_BATCH, NUM_QO_HEADS, HEAD_DIM))
k, v = _randn16((total, TREE_KV_HEADS, HEAD_DIM)), _randn16((total, TREE_KV_HEADS, HEAD_DIM))
out = cp.empty((TREE_BATCH, NUM_QO_HEADS, HEAD_DIM), cp.float16)
lse = cp.empty((TREE_BATCH, NUM_QO_HEADS), cp.float32)
chunk0 = choose_chunk_size(seg_indptr, path_indptr, path_segs, group_size=NUM_QO_HEADS // TREE_KV_HEADS,
                           num_kv_heads=TREE_KV_HEADS, sms=num_sms(cp.cuda.Device().id), tile=kv_tile(HEAD_DIM),
                           head_dim=HEAD_DIM, dtype="float16", gpu=device_gpu(cp.cuda.Device().id))
res = {}
for chunk in (256, 512, 1024, 2048, 4096, 8192):
    res[f"c{chunk}{'*' if chunk == chunk0 else ''}"] = timer(
        lambda: tree(q, k, v, seg_indptr, path_indptr, path_segs, out=out, lse=lse, chunk_size=chunk),  # noqa: B023
        lead_ms=3.0)
print("tree: " + ", ".join(f"{name}={ms * 1e3:.1f}" for name, ms in res.items()), flush=True)
