"""refattn.tree: attending segment by segment equals decode on each sequence's concatenated path."""

import doctest
import importlib

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import refattn
from strategies import (
    assert_same_state,
    dtypes,
    float_arrays,
    head_dims,
    head_layouts,
    merged_out_rtol,
    oracle,
    sm_scales,
)


@st.composite
def tree_cases(draw, dtype=None):
    """Segments of 0..10 tokens and paths through them: random subsets in random order, some empty,
    shared segments made likely by drawing paths from a few segments."""
    dtype = draw(dtypes) if dtype is None else dtype
    batch = draw(st.integers(1, 4))
    num_qo_heads, num_kv_heads = draw(head_layouts())
    head_dim = draw(head_dims)
    num_segs = draw(st.integers(1, 6))  # no segments at all: test_empty_paths_give_zero_and_minus_inf
    seg_lens = draw(st.lists(st.integers(0, 10), min_size=num_segs, max_size=num_segs))
    segments_k = [draw(float_arrays((n, num_kv_heads, head_dim), dtype)) for n in seg_lens]
    segments_v = [draw(float_arrays((n, num_kv_heads, head_dim), dtype)) for n in seg_lens]
    paths = [
        draw(st.lists(st.integers(0, num_segs - 1), unique=True, max_size=num_segs))
        for _ in range(batch)
    ]
    q = draw(float_arrays((batch, num_qo_heads, head_dim), dtype))
    return q, segments_k, segments_v, paths, draw(sm_scales)


def _contexts(segments_k, segments_v, paths):
    """Each sequence's path as one (k, v) pair [L_b, Hkv, D]."""
    empty = segments_k[0][:0]
    return [
        (np.concatenate([segments_k[s] for s in path] + [empty]),
         np.concatenate([segments_v[s] for s in path] + [empty]))
        for path in paths
    ]


def _padded_decode_inputs(contexts, batch):
    """Per-sequence contexts laid out as a contiguous cache with kv_lens."""
    lens = np.array([k.shape[0] for k, _ in contexts])
    kv_len = int(lens.max())
    k0 = contexts[0][0]
    k = np.zeros((batch, kv_len, *k0.shape[1:]), dtype=k0.dtype)
    v = np.zeros_like(k)
    for b, (k_b, v_b) in enumerate(contexts):
        k[b, : lens[b]] = k_b
        v[b, : lens[b]] = v_b
    return k, v, lens


def _magnitude(q, contexts, sm_scale):
    """The output over |v|: the scale of the rounding errors of the output."""
    k, v, kv_lens = _padded_decode_inputs(contexts, q.shape[0])
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    return refattn.decode(q, k, np.abs(v), kv_lens, sm_scale=sm_scale)[0]


@given(tree_cases())
def test_equals_decode_on_each_concatenated_path(case):
    q, segments_k, segments_v, paths, sm_scale = case
    got = refattn.tree(q, *refattn.tree_from_paths(segments_k, segments_v, paths), sm_scale=sm_scale)
    k, v, kv_lens = _padded_decode_inputs(_contexts(segments_k, segments_v, paths), q.shape[0])
    want = refattn.decode(q, k, v, kv_lens, sm_scale=sm_scale)
    magnitude = _magnitude(q, _contexts(segments_k, segments_v, paths), sm_scale)
    assert_same_state(got, want, out_rtol=merged_out_rtol(want[1]), magnitude=magnitude)


@given(tree_cases(dtype="float64"))
def test_matches_oracle_to_1e12(case):
    q, segments_k, segments_v, paths, sm_scale = case
    got = refattn.tree(q, *refattn.tree_from_paths(segments_k, segments_v, paths), sm_scale=sm_scale)
    scale = 1 / np.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    contexts = _contexts(segments_k, segments_v, paths)
    want = oracle(q, contexts, scale)
    assert_same_state(
        got, want, out_rtol=merged_out_rtol(want[1]), magnitude=_magnitude(q, contexts, sm_scale)
    )


@given(tree_cases(), st.randoms(use_true_random=False))
def test_order_of_segments_within_a_path_does_not_matter(case, random):
    q, segments_k, segments_v, paths, sm_scale = case
    shuffled = [random.sample(path, len(path)) for path in paths]
    a = refattn.tree(q, *refattn.tree_from_paths(segments_k, segments_v, paths), sm_scale=sm_scale)
    b = refattn.tree(q, *refattn.tree_from_paths(segments_k, segments_v, shuffled), sm_scale=sm_scale)
    magnitude = _magnitude(q, _contexts(segments_k, segments_v, paths), sm_scale)
    assert_same_state(a, b, out_rtol=merged_out_rtol(a[1]), magnitude=magnitude)


def test_three_level_tree():
    # system prompt -> two documents -> four questions; every sequence a root-to-leaf path.
    rng = np.random.default_rng(0)
    seg_lens = [40, 13, 21, 3, 1, 7, 5]
    paths = [[0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 2, 6]]
    segments_k = [rng.standard_normal((n, 2, 16)) for n in seg_lens]
    segments_v = [rng.standard_normal((n, 2, 16)) for n in seg_lens]
    q = rng.standard_normal((4, 8, 16))
    got = refattn.tree(q, *refattn.tree_from_paths(segments_k, segments_v, paths))
    assert_same_state(got, oracle(q, _contexts(segments_k, segments_v, paths), 0.25))


def test_empty_paths_give_zero_and_minus_inf():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, 2, 4))
    segments = [rng.standard_normal((3, 1, 4)), np.zeros((0, 1, 4))]
    out, lse = refattn.tree(q, *refattn.tree_from_paths(segments, segments, [[], [1], [0]]))
    assert np.all(out[:2] == 0.0) and np.all(np.isneginf(lse[:2]))
    assert np.all(np.isfinite(lse[2]))
    # No segments at all.
    out, lse = refattn.tree(q, np.zeros((0, 1, 4)), np.zeros((0, 1, 4)), [0], [0, 0, 0, 0], [])
    assert np.all(out == 0.0) and np.all(np.isneginf(lse))


def test_each_segment_is_attended_once_for_all_its_readers(monkeypatch):
    tree_module = importlib.import_module("refattn.tree")
    calls = []
    real = tree_module.attend_shared

    def counting(q, k, v, sm_scale):
        calls.append(q.shape[0])
        return real(q, k, v, sm_scale)

    monkeypatch.setattr(tree_module, "attend_shared", counting)
    rng = np.random.default_rng(2)
    segments = [rng.standard_normal((n, 1, 4)) for n in (5, 2, 3, 0)]
    q = rng.standard_normal((3, 1, 4))
    refattn.tree(q, *refattn.tree_from_paths(segments, segments, [[0, 1], [0, 2], [0, 1]]))
    assert sorted(calls) == [1, 2, 3]  # segment 0 for 3 sequences, 1 for 2, 2 for 1, 3 unread


def test_docstring_example_runs():
    module = importlib.import_module("refattn.tree")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0
