"""The tree row of the benchmark (4096 + 8 x 2048 + 64 x 256 tokens, 64 sequences, 32/32 heads) in
both forms of the tree plan ("own": the shared segments in the segments launch, each sequence's own
tokens by split-KV merging their states; "merge": every segment in the segments launch, then the
merge), its shared segments cut into chunks of several sizes, each beside the cost model's
prediction (the plan's choice marked *); the "own" form also with its second launch waiting for the
first at its start (no overlap). Planned runs (`Tree`), so that the times are the kernels'.

An exploration, not a benchmark: lines of text (us), no result file.
Run: PYTHONPATH=. python3 scripts/explore/tree_chunk_sweep.py
"""
import importlib

import cupy as cp

from gpukernels.bench import HEAD_DIM, NUM_QO_HEADS, TREE_BATCH, TREE_KV_HEADS, TREE_LEVELS, Timer, _randn16, tree_layout
from gpukernels.split_kv import device_gpu
from gpukernels.tree import Tree, plan_tree

sk = importlib.import_module("gpukernels.split_kv")
timer = Timer(30)
seg_indptr, path_indptr, path_segs = tree_layout(TREE_LEVELS, TREE_BATCH)
total = int(seg_indptr[-1])
q = _randn16((TREE_BATCH, NUM_QO_HEADS, HEAD_DIM))
k, v = _randn16((total, TREE_KV_HEADS, HEAD_DIM)), _randn16((total, TREE_KV_HEADS, HEAD_DIM))
out = cp.empty((TREE_BATCH, NUM_QO_HEADS, HEAD_DIM), cp.float16)
lse = cp.empty((TREE_BATCH, NUM_QO_HEADS), cp.float32)
gpu = device_gpu(cp.cuda.Device().id)
kwargs = dict(num_qo_heads=NUM_QO_HEADS, num_kv_heads=TREE_KV_HEADS, head_dim=HEAD_DIM, gpu=gpu)
chosen = plan_tree(seg_indptr, path_indptr, path_segs, **kwargs)
print(f"tree: the plan takes the {chosen.form} form, chunk {chosen.chunk_size}", flush=True)
for form in ("own", "merge"):
    res = {}
    for chunk in (256, 512, 1024, 2048, 4096, 8192):
        plan = plan_tree(seg_indptr, path_indptr, path_segs, form=form, chunk_size=chunk, **kwargs)
        runner = Tree(plan)
        mark = "*" if (form, chunk) == (chosen.form, chosen.chunk_size) else ""
        ms = timer(lambda: runner.run(q, k, v, out=out, lse=lse), lead_ms=0.3)  # noqa: B023
        res[f"c{chunk}{mark}"] = f"{ms * 1e3:.1f} (model {plan.predicted_s * 1e6:.1f})"
        if form == "own":
            sk.STATES_OVERLAP = False
            try:
                res[f"c{chunk} waiting"] = f"{timer(lambda: runner.run(q, k, v, out=out, lse=lse), lead_ms=0.3) * 1e3:.1f}"  # noqa: B023,E501
            finally:
                sk.STATES_OVERLAP = True
    print(f"tree {form}: " + ", ".join(f"{name}={t}" for name, t in res.items()), flush=True)

# The chosen plan's two launches alone: the segments launch, and the second (the merge, or the own
# tokens merging the states), each timed by itself with the other's outputs in place.
tree_module = importlib.import_module("gpukernels.tree")
runner = Tree(chosen)
runner.run(q, k, v, out=out, lse=lse)
tables = runner._device_tables("cupy", 0)
part_out, part_lse = runner._states_for("cupy", 0, cp.cuda.get_current_stream().ptr)
w = chosen.work
segments = tree_module._segments_kernel("float16", HEAD_DIM)
args = (q.data.ptr, k.data.ptr, v.data.ptr, tables["work"].data.ptr, tables["sharers"].data.ptr,
        tables["first_state"].data.ptr, part_out.data.ptr, part_lse.data.ptr, NUM_QO_HEADS, TREE_KV_HEADS,
        w.state_stride, HEAD_DIM ** -0.5 * 1.4426950408889634)
alone = timer(lambda: segments((len(w.work), TREE_KV_HEADS), (tree_module.THREADS,), args,
                               stream_ptr=cp.cuda.get_current_stream().ptr, device_id=0), lead_ms=0.3)
whole = timer(lambda: runner.run(q, k, v, out=out, lse=lse), lead_ms=0.3)
print(f"tree {chosen.form} c{chosen.chunk_size}: whole={whole * 1e3:.1f}, segments launch={alone * 1e3:.1f}, "
      f"second launch={(whole - alone) * 1e3:.1f} (by difference)", flush=True)
