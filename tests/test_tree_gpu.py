"""The tree kernel (gpukernels.tree: one launch over a work list of segments, one merge) against
the float64 reference. Skipped with a reason without CuPy and a CUDA GPU."""

from __future__ import annotations

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
