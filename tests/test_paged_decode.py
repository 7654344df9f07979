"""refattn.paged_decode: a paged cache, pages anywhere and of any size, equals the contiguous one."""

import doctest
import importlib

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import refattn
from strategies import assert_same_state, decode_cases, oracle, oracle_decode


@st.composite
def paged_cases(draw, dtype=None):
    """A contiguous case and the same tokens in pages: any page size, shuffled, with junk pages."""
    case = draw(decode_cases(dtype=dtype))
    page_size = draw(st.one_of(st.sampled_from([1, 2, 3, 16]), st.integers(1, case.k.shape[1] + 2)))
    shuffle = draw(st.one_of(st.none(), st.integers(0, 2**32 - 1)))
    extra_pages = draw(st.integers(0, 3))
    paged = refattn.paged_from_contiguous(
        case.k, case.v, case.kv_lens, page_size=page_size, shuffle=shuffle, extra_pages=extra_pages
    )
    return case, paged


@given(paged_cases())
def test_equals_decode(args):
    case, paged = args
    got = refattn.paged_decode(case.q, *paged, sm_scale=case.sm_scale)
    assert_same_state(got, refattn.decode(case.q, case.k, case.v, case.kv_lens, sm_scale=case.sm_scale))


@given(paged_cases(dtype="float64"))
def test_matches_oracle_to_1e12(args):
    case, paged = args
    got = refattn.paged_decode(case.q, *paged, sm_scale=case.sm_scale)
    assert_same_state(got, oracle_decode(case.q, case.k, case.v, case.kv_lens, case.scale))


@given(paged_cases())
def test_slots_outside_the_sequences_are_never_read(args):
    case, (k_cache, v_cache, kv_indptr, kv_indices, last) = args
    owned = np.zeros(k_cache.shape[:2], dtype=bool)  # [num_pages, page_size]
    for b in range(len(last)):
        pages = kv_indices[kv_indptr[b]:kv_indptr[b + 1]]
        owned[pages] = True
        if len(pages):
            owned[pages[-1], last[b]:] = False
    k_poisoned, v_poisoned = k_cache.copy(), v_cache.copy()
    k_poisoned[~owned] = np.nan
    v_poisoned[~owned] = np.nan
    want = refattn.paged_decode(case.q, k_cache, v_cache, kv_indptr, kv_indices, last)
    got = refattn.paged_decode(case.q, k_poisoned, v_poisoned, kv_indptr, kv_indices, last)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_sequences_may_share_pages():
    # Pages 2 and 0 hold a shared prefix; sequence 1 adds page 3, sequence 2 reads page 0 alone.
    rng = np.random.default_rng(0)
    page_size, heads, head_dim = 4, 2, 8
    k_cache = rng.standard_normal((5, page_size, heads, head_dim))
    v_cache = rng.standard_normal((5, page_size, heads, head_dim))
    q = rng.standard_normal((3, 4, head_dim))
    kv_indptr = np.array([0, 2, 5, 6])
    kv_indices = np.array([2, 0, 2, 0, 3, 0])
    last = np.array([4, 1, 3])
    got = refattn.paged_decode(q, k_cache, v_cache, kv_indptr, kv_indices, last)
    def tokens(cache, pages, n):
        return cache[pages].reshape(-1, heads, head_dim)[:n]

    contexts = [
        (tokens(k_cache, [2, 0], 8), tokens(v_cache, [2, 0], 8)),
        (tokens(k_cache, [2, 0, 3], 9), tokens(v_cache, [2, 0, 3], 9)),
        (tokens(k_cache, [0], 3), tokens(v_cache, [0], 3)),
    ]
    assert_same_state(got, oracle(q, contexts, 1 / np.sqrt(head_dim)))


def test_sequences_without_pages_give_zero_and_minus_inf():
    rng = np.random.default_rng(1)
    k_cache = rng.standard_normal((2, 3, 1, 4))
    q = rng.standard_normal((3, 2, 4))
    out, lse = refattn.paged_decode(q, k_cache, k_cache, [0, 0, 1, 1], [1], [0, 2, 0])
    assert np.all(out[[0, 2]] == 0.0) and np.all(np.isneginf(lse[[0, 2]]))
    assert_same_state((out[1:2], lse[1:2]), oracle(q[1:2], [(k_cache[1, :2], k_cache[1, :2])], 0.5))


def test_long_sequence_over_many_small_pages():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 28, 16))
    k, v = rng.standard_normal((2, 2, 339, 4, 16))
    kv_lens = np.array([339, 17])
    paged = refattn.paged_from_contiguous(k, v, kv_lens, page_size=16, shuffle=3, extra_pages=5)
    assert_same_state(refattn.paged_decode(q, *paged), refattn.decode(q, k, v, kv_lens))


def test_docstring_example_runs():
    module = importlib.import_module("refattn.paged_decode")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0
