"""The tree kernel (gpukernels.tree: one launch over a work list of segments, one merge) against
the float64 reference. Skipped with a reason without CuPy and a CUDA GPU."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from test_kernels_gpu import _HAVE_GPU, _check_with_empty, _compare_nonfinite, _device, _poisoned, _random, cp
from test_tree_work import trees

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _HAVE_GPU, reason="needs CuPy and a CUDA GPU (run on the GPU machine)"),
]


def _tree_inputs(rng, dtype, hq, hkv, d, lens, paths):
    segs_k = [_random(rng, (n, hkv, d), dtype) for n in lens]
    segs_v = [_random(rng, (n, hkv, d), dtype) for n in lens]
    k_segs, v_segs, seg_indptr, path_indptr, path_segs = refattn.tree_from_paths(segs_k, segs_v, paths)
    q = _random(rng, (len(paths), hq, d), dtype)
    return q, k_segs, v_segs, seg_indptr, path_indptr, path_segs


@given(trees(), st.sampled_from(["float16", "bfloat16"]), st.sampled_from([64, 128, 256]))
def test_tree_matches_the_reference(case, dtype, d):
    from gpukernels.tree import tree

    hq, hkv, lens, paths, chunk, seed = case
    rng = np.random.default_rng(seed)
    q, k_segs, v_segs, *index = _tree_inputs(rng, dtype, hq, hkv, d, lens, paths)
    ref_out, ref_lse = refattn.tree(q, k_segs, v_segs, *index)
    qd = _device(q)
    out = _poisoned(qd, q.shape, dtype)
    lse = _poisoned(qd, q.shape[:2], "float32")
    tree(qd, _device(k_segs), _device(v_segs), *index, out=out, lse=lse,
         chunk_size=max(chunk, 32) if d >= 256 else max(chunk, 64))
    _check_with_empty(out, lse, ref_out, ref_lse, dtype)


def test_the_benchmark_tree():
    """A 4096-token root for all 64 sequences, 8 groups of 8 sharing 2048 more, 256 own tokens each."""
    from gpukernels.tree import tree

    rng = np.random.default_rng(9)
    lens = [4096] + [2048] * 8 + [256] * 64
    paths = [[0, 1 + b // 8, 9 + b] for b in range(64)]
    q, k_segs, v_segs, *index = _tree_inputs(rng, "float16", 32, 32, 128, lens, paths)
    q[3, 7, 0] = np.nan                       # one head of one sequence
    ref_out, ref_lse = refattn.tree(q, k_segs, v_segs, *index)
    out, lse = tree(cp.asarray(q), cp.asarray(k_segs), cp.asarray(v_segs), *index)
    _compare_nonfinite(out, lse, ref_out, ref_lse, "float16")


@pytest.mark.parametrize("bad, exc", [
    (dict(path_segs=np.array([0, 5])), ValueError),
    (dict(path_indptr=np.array([0, 3])), ValueError),
    (dict(seg_indptr=np.array([0, 10, 5])), ValueError),
    (dict(chunk_size=100), ValueError),
])
def test_malformed_trees_raise_before_launch(bad, exc):
    from gpukernels.tree import tree

    q = cp.zeros((1, 8, 64), cp.float16)
    k = cp.zeros((20, 2, 64), cp.float16)
    args = dict(seg_indptr=np.array([0, 10, 20]), path_indptr=np.array([0, 2]), path_segs=np.array([0, 1]))
    kwargs = {}
    for key, value in bad.items():
        (kwargs if key == "chunk_size" else args)[key] = value
    with pytest.raises(exc):
        tree(q, k, k, args["seg_indptr"], args["path_indptr"], args["path_segs"], **kwargs)


@pytest.mark.parametrize("form", ["own", "merge"])
def test_a_tree_plan_runs_many_times_and_in_a_cuda_graph(form):
    """Tree(plan_tree(...)): fresh inputs through one plan, then the same launches captured in a CUDA
    graph and replayed on new queries; both forms."""
    from gpukernels.tree import Tree, plan_tree

    rng = np.random.default_rng(21)
    lens = [300, 0, 77, 1000, 16, 5]
    paths = [[0, 1, 2], [0, 1, 3], [0, 4], [3], [], [0, 5, 2, 1]]   # segment 2 shared out of order
    q, k_segs, v_segs, *index = _tree_inputs(rng, "float16", 16, 4, 64, lens, paths)
    plan = plan_tree(*index, num_qo_heads=16, num_kv_heads=4, head_dim=64, dtype="float16", form=form,
                     chunk_size=64, gpu="H200")
    assert plan.form == form
    runner = Tree(plan)
    for _ in range(2):
        q, k_segs, v_segs, *_ = _tree_inputs(rng, "float16", 16, 4, 64, lens, paths)
        ref_out, ref_lse = refattn.tree(q, k_segs, v_segs, *index)
        qd = _device(q)
        out = _poisoned(qd, q.shape, "float16")
        lse = _poisoned(qd, q.shape[:2], "float32")
        res = runner.run(qd, _device(k_segs), _device(v_segs), out=out, lse=lse)
        assert res[0] is out and res[1] is lse
        _check_with_empty(out, lse, ref_out, ref_lse, "float16")
    qd, kd, vd = (cp.asarray(x) for x in (q, k_segs, v_segs))
    out = cp.full(q.shape, np.nan, dtype=cp.float16)
    lse = cp.full(q.shape[:2], np.nan, dtype=cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        runner.run(qd, kd, vd, out=out, lse=lse)   # this stream's states
        stream.synchronize()
        stream.begin_capture()
        runner.run(qd, kd, vd, out=out, lse=lse)
        graph = stream.end_capture()
        for _ in range(2):
            qd[...] = cp.asarray(_random(rng, q.shape, "float16"))
            out.fill(np.nan)
            lse.fill(np.nan)
            graph.launch(stream)
            stream.synchronize()
            ref_out, ref_lse = refattn.tree(cp.asnumpy(qd), k_segs, v_segs, *index)
            _check_with_empty(out, lse, ref_out, ref_lse, "float16")


def test_both_forms_and_the_overlap_give_the_same_bits(monkeypatch):
    """The own tokens' launch overlapping the segments launch (its first wave waiting for the states
    only before the merge, the later blocks prefetching them) computes what it computes waiting at
    its start, bit for bit; the two forms agree with the reference. 16 sequences under a 2048-token
    root and 4 groups of 1000 tokens, 300 own tokens each, 32/32 heads: 512 blocks of own tokens,
    two waves."""
    import gpukernels._runtime as rt
    sk = importlib.import_module("gpukernels.split_kv")   # the module (the package exports a function by its name)
    from gpukernels.tree import Tree, plan_tree

    launches = []
    call = rt.Kernel.__call__

    def spy(self, grid, block, args, **kwargs):
        launches.append(kwargs.get("programmatic", False))
        return call(self, grid, block, args, **kwargs)

    monkeypatch.setattr(rt.Kernel, "__call__", spy)
    rng = np.random.default_rng(22)
    lens = [2048] + [1000] * 4 + [300] * 16
    paths = [[0, 1 + b // 4, 5 + b] for b in range(16)]
    q, k_segs, v_segs, *index = _tree_inputs(rng, "float16", 32, 32, 128, lens, paths)
    ref_out, ref_lse = refattn.tree(q, k_segs, v_segs, *index)
    qd, kd, vd = (cp.asarray(x) for x in (q, k_segs, v_segs))
    results = {}
    for form, overlap in (("own", True), ("own", False), ("merge", True)):
        runner = Tree(plan_tree(*index, num_qo_heads=32, num_kv_heads=32, head_dim=128, form=form, gpu="H200"))
        sk.STATES_OVERLAP = overlap
        launches.clear()
        try:
            out, lse = runner.run(qd, kd, vd)
        finally:
            sk.STATES_OVERLAP = True
        assert launches == [False, overlap and form == "own"]
        _check_with_empty(out, lse, ref_out, ref_lse, "float16")
        results[form, overlap] = (cp.asnumpy(out), cp.asnumpy(lse))
    for a, b in zip(results["own", True], results["own", False]):
        np.testing.assert_array_equal(a, b)


def test_a_tree_plan_rejects_what_it_was_not_made_for():
    from gpukernels.tree import Tree, plan_tree

    index = (np.array([0, 10, 20]), np.array([0, 2, 3]), np.array([0, 1, 0]))
    plan = plan_tree(*index, num_qo_heads=8, num_kv_heads=2, head_dim=64, gpu="H200")
    runner = Tree(plan)
    q = cp.zeros((2, 8, 64), cp.float16)
    k = cp.zeros((20, 2, 64), cp.float16)
    strided = cp.zeros((20, 2, 128), cp.float16)[:, :, :64]
    for args, exc in (((q[:1], k, k), ValueError), ((q, k[:19], k[:19]), ValueError),
                      ((q.astype(cp.float32), k, k), TypeError), ((q, k, k.astype(cp.float32)), TypeError),
                      ((q, k[:, :1], k[:, :1]), ValueError), ((q, strided, k), ValueError)):
        with pytest.raises(exc):
            runner.run(*args)
    with pytest.raises(ValueError, match="sm_scale"):
        runner.run(q, k, k, sm_scale=float("nan"))
    with pytest.raises(TypeError, match="TreePlan"):
        Tree("plan")


@given(trees(), st.sampled_from(["float16", "bfloat16"]), st.sampled_from([64, 128, 256]),
       st.sampled_from([1, 7, 16, 64]), st.sampled_from(["own", "merge", None]))
def test_a_tree_in_pages_matches_the_reference(case, dtype, d, page_size, form):
    """Segments in a paged cache (pages shuffled, junk in the pages no segment owns): the one-shot
    call (form None) and both forms of the plan."""
    from test_tree_work import tree_pages

    from gpukernels.tree import Tree, plan_tree, tree

    hq, hkv, lens, paths, chunk, seed = case
    rng = np.random.default_rng(seed)
    q, k_segs, v_segs, seg_indptr, path_indptr, path_segs = _tree_inputs(rng, dtype, hq, hkv, d, lens, paths)
    ref_out, ref_lse = refattn.tree(q, k_segs, v_segs, seg_indptr, path_indptr, path_segs)
    k_cache, v_cache, indptr, indices, last = tree_pages(k_segs.astype(np.float64), v_segs.astype(np.float64),
                                                         seg_indptr, page_size, seed)
    tables = dict(seg_kv_indptr=indptr, seg_kv_indices=indices, seg_kv_last_page_len=last)
    qd, kd, vd = _device(q), _device(k_cache.astype(k_segs.dtype)), _device(v_cache.astype(v_segs.dtype))
    out = _poisoned(qd, q.shape, dtype)
    lse = _poisoned(qd, q.shape[:2], "float32")
    chunk = max(chunk, 32) if d >= 256 else max(chunk, 64)
    if form is None:
        tree(qd, kd, vd, None, path_indptr, path_segs, out=out, lse=lse, chunk_size=chunk, **tables)
    else:
        plan = plan_tree(None, path_indptr, path_segs, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype,
                         form=form, chunk_size=chunk, page_size=page_size, gpu="H200", **tables)
        Tree(plan).run(qd, kd, vd, out=out, lse=lse)
    _check_with_empty(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("bad, match", [
    (dict(seg_kv_indices=np.array([0, 1, 2, 9])), "seg_kv_indices"),          # a page past the cache
    (dict(seg_kv_indptr=np.array([0, 3, 2])), "seg_kv_indptr"),               # decreasing
    (dict(seg_kv_last_page_len=np.array([5, 3])), "seg_kv_last_page_len"),   # longer than a page
    (dict(seg_kv_last_page_len=np.array([4])), "seg_kv_last_page_len"),      # one per segment
    (dict(seg_kv_indices=None), "missing"),
    (dict(seg_indptr=np.array([0, 10, 20])), "seg_indptr must be None"),
    (dict(path_segs=np.array([0, 2])), "path_segs"),                          # no segment 2
])
def test_malformed_trees_in_pages_raise_before_launch(bad, match):
    from gpukernels.tree import tree

    q = cp.zeros((1, 8, 64), cp.float16)
    cache = cp.zeros((4, 4, 2, 64), cp.float16)
    args = dict(seg_indptr=None, path_indptr=np.array([0, 2]), path_segs=np.array([0, 1]),
                seg_kv_indptr=np.array([0, 3, 4]), seg_kv_indices=np.array([0, 2, 1, 3]),
                seg_kv_last_page_len=np.array([2, 4]))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        tree(q, cache, cache, args.pop("seg_indptr"), args.pop("path_indptr"), args.pop("path_segs"), **args)


@given(trees(), st.sampled_from([64, 128, 256]), st.sampled_from([0, 16]),
       st.sampled_from([("float32", None), ("float16", "paths")]))
def test_the_paths_form_matches_the_reference(case, d, page_size, dtype_form):
    """float32 trees (the "paths" form: each sequence's path as one-row pages for split-KV), and the
    same form asked for in float16; segments contiguous or in shuffled pages."""
    from test_tree_work import tree_pages

    from gpukernels.tree import Tree, plan_tree, tree

    dtype, form = dtype_form
    hq, hkv, lens, paths, _, seed = case
    rng = np.random.default_rng(seed)
    q, k_segs, v_segs, seg_indptr, path_indptr, path_segs = _tree_inputs(rng, dtype, hq, hkv, d, lens, paths)
    ref_out, ref_lse = refattn.tree(q, k_segs, v_segs, seg_indptr, path_indptr, path_segs)
    qd = _device(q)
    out = _poisoned(qd, q.shape, dtype)
    lse = _poisoned(qd, q.shape[:2], "float32")
    if page_size:
        k_cache, v_cache, indptr, indices, last = tree_pages(k_segs.astype(np.float64), v_segs.astype(np.float64),
                                                             seg_indptr, page_size, seed)
        tables = dict(seg_kv_indptr=indptr, seg_kv_indices=indices, seg_kv_last_page_len=last)
        kd, vd = _device(k_cache.astype(k_segs.dtype)), _device(v_cache.astype(v_segs.dtype))
        index = (None, path_indptr, path_segs)
    else:
        tables, kd, vd, index = {}, _device(k_segs), _device(v_segs), (seg_indptr, path_indptr, path_segs)
    if form is None:
        tree(qd, kd, vd, *index, out=out, lse=lse, **tables)
    else:
        plan = plan_tree(*index, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype, form=form, gpu="H200",
                         page_size=page_size or None, **tables)
        assert plan.form == "paths"
        Tree(plan).run(qd, kd, vd, out=out, lse=lse)
    _check_with_empty(out, lse, ref_out, ref_lse, dtype)
