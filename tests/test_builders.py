"""refattn.builders: page tables, trees and span lists built from plain descriptions."""

import doctest
import importlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from strategies import decode_cases


@st.composite
def paging(draw):
    case = draw(decode_cases())
    page_size = draw(st.integers(1, case.k.shape[1] + 2))
    shuffle = draw(st.one_of(st.none(), st.integers(0, 2**32 - 1)))
    extra_pages = draw(st.integers(0, 3))
    return case, page_size, shuffle, extra_pages


@given(paging())
def test_paged_cache_holds_the_same_tokens(args):
    case, page_size, shuffle, extra_pages = args
    k_cache, v_cache, kv_indptr, kv_indices, last = refattn.paged_from_contiguous(
        case.k, case.v, case.kv_lens, page_size=page_size, shuffle=shuffle, extra_pages=extra_pages
    )
    for arr in (kv_indptr, kv_indices, last):
        assert arr.dtype == np.int32
    assert k_cache.dtype == case.k.dtype and v_cache.dtype == case.v.dtype
    lens = case.lens
    pages = -(-lens // page_size)
    np.testing.assert_array_equal(np.diff(kv_indptr), pages)
    assert k_cache.shape == (pages.sum() + extra_pages, page_size, *case.k.shape[2:])
    assert len(set(kv_indices.tolist())) == len(kv_indices)  # no page used twice
    for b, n in enumerate(lens):
        own = kv_indices[kv_indptr[b]:kv_indptr[b + 1]]
        if n == 0:
            assert last[b] == 0 and own.size == 0
            continue
        assert 1 <= last[b] <= page_size and (len(own) - 1) * page_size + last[b] == n
        np.testing.assert_array_equal(k_cache[own].reshape(-1, *case.k.shape[2:])[:n], case.k[b, :n])
        np.testing.assert_array_equal(v_cache[own].reshape(-1, *case.v.shape[2:])[:n], case.v[b, :n])


def test_pages_in_order_without_shuffle():
    k = np.ones((2, 7, 1, 2))
    _, _, kv_indptr, kv_indices, last = refattn.paged_from_contiguous(
        k, k, [7, 2], page_size=3, extra_pages=2
    )
    assert kv_indptr.tolist() == [0, 3, 4]
    assert kv_indices.tolist() == [0, 1, 2, 3]
    assert last.tolist() == [1, 2]


def test_shuffle_is_reproducible_and_accepts_a_generator():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, 40, 2, 4))
    a = refattn.paged_from_contiguous(k, k, page_size=4, shuffle=7, extra_pages=4)
    b = refattn.paged_from_contiguous(k, k, page_size=4, shuffle=7, extra_pages=4)
    c = refattn.paged_from_contiguous(k, k, page_size=4, shuffle=np.random.default_rng(7))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert sorted(c[3].tolist()) == list(range(30)) and c[3].tolist() != list(range(30))


def test_unused_slots_hold_junk():
    k = np.zeros((1, 5, 1, 2), dtype=np.float32)
    k_cache, _, _, kv_indices, _ = refattn.paged_from_contiguous(
        k, k, page_size=4, shuffle=1, extra_pages=2
    )
    unused = sorted(set(range(k_cache.shape[0])) - set(kv_indices.tolist()))
    assert len(unused) == 2 and np.all(k_cache[unused] != 0)
    assert np.all(k_cache[kv_indices[-1], 1:] != 0)  # the tail of the last page


@given(st.integers(1, 6), st.integers(1, 4), st.data())
def test_tree_from_paths_lays_segments_back_to_back(num_segs, batch, data):
    seg_lens = data.draw(st.lists(st.integers(0, 5), min_size=num_segs, max_size=num_segs))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    segments_k = [rng.standard_normal((n, 2, 3)) for n in seg_lens]
    segments_v = [rng.standard_normal((n, 2, 3)) for n in seg_lens]
    paths = [
        data.draw(st.lists(st.integers(0, num_segs - 1), unique=True, max_size=num_segs))
        for _ in range(batch)
    ]
    k_segs, v_segs, seg_indptr, path_indptr, path_segs = refattn.tree_from_paths(
        segments_k, segments_v, paths
    )
    for arr in (seg_indptr, path_indptr, path_segs):
        assert arr.dtype == np.int32
    assert seg_indptr.tolist() == [0, *np.cumsum(seg_lens).tolist()]
    for s in range(num_segs):
        np.testing.assert_array_equal(k_segs[seg_indptr[s]:seg_indptr[s + 1]], segments_k[s])
        np.testing.assert_array_equal(v_segs[seg_indptr[s]:seg_indptr[s + 1]], segments_v[s])
    for b, path in enumerate(paths):
        assert path_segs[path_indptr[b]:path_indptr[b + 1]].tolist() == path


@pytest.mark.parametrize(
    "kv_lens, num_sinks, window, want_indptr, want_spans",
    [
        ([30], 4, 8, [0, 2], [[0, 4], [22, 30]]),
        ([12], 4, 8, [0, 1], [[0, 12]]),           # sinks [0, 4) and window [4, 12) touch
        ([10], 4, 8, [0, 1], [[0, 10]]),           # they overlap
        ([3], 4, 8, [0, 1], [[0, 3]]),
        ([0], 4, 8, [0, 0], []),
        ([30], 0, 8, [0, 1], [[22, 30]]),
        ([30], 4, 0, [0, 1], [[0, 4]]),
        ([30], 0, 0, [0, 0], []),
        ([30, 5, 0, 13], 2, 3, [0, 2, 3, 3, 5], [[0, 2], [27, 30], [0, 5], [0, 2], [10, 13]]),
    ],
)
def test_spans_from_sinks_window(kv_lens, num_sinks, window, want_indptr, want_spans):
    span_indptr, spans = refattn.spans_from_sinks_window(kv_lens, num_sinks=num_sinks, window=window)
    assert span_indptr.dtype == np.int32 and spans.dtype == np.int32
    assert span_indptr.tolist() == want_indptr
    assert spans.shape == (len(want_spans), 2) and spans.tolist() == want_spans


def _mask_of(span_indptr, spans, shape):
    mask = np.zeros(shape, dtype=bool)
    for b in range(shape[0]):
        for start, end in spans[span_indptr[b]:span_indptr[b + 1]]:
            mask[b, start:end] = True
    return mask


@given(st.integers(1, 4), st.integers(0, 40), st.integers(0, 2**32 - 1), st.floats(0, 1))
def test_spans_from_mask_are_the_maximal_runs(batch, kv_len, seed, density):
    mask = np.random.default_rng(seed).random((batch, kv_len)) < density
    span_indptr, spans = refattn.spans_from_mask(mask)
    assert span_indptr.dtype == np.int32 and spans.dtype == np.int32
    np.testing.assert_array_equal(_mask_of(span_indptr, spans, mask.shape), mask)
    for b in range(batch):
        own = spans[span_indptr[b]:span_indptr[b + 1]]
        assert np.all(own[:, 0] < own[:, 1])
        assert np.all(own[1:, 0] > own[:-1, 1])  # maximal: runs never touch


@given(st.lists(st.integers(0, 40), min_size=1, max_size=4), st.integers(0, 8), st.integers(0, 50))
def test_sinks_window_spans_cover_exactly_sinks_and_window(kv_lens, num_sinks, window):
    span_indptr, spans = refattn.spans_from_sinks_window(kv_lens, num_sinks=num_sinks, window=window)
    kv_len = max(kv_lens)
    want = np.zeros((len(kv_lens), kv_len), dtype=bool)
    for b, n in enumerate(kv_lens):
        want[b, : min(num_sinks, n)] = True
        want[b, max(0, n - window) : n] = True
    np.testing.assert_array_equal(_mask_of(span_indptr, spans, want.shape), want)
    # A valid span list for the contract: checked by the span reference's own validation.
    q = np.zeros((len(kv_lens), 1, 1))
    k = np.zeros((len(kv_lens), kv_len, 1, 1))
    refattn.span(q, k, k, span_indptr, spans)


def test_docstring_example_runs():
    module = importlib.import_module("refattn.builders")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0
