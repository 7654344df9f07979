"""refattn.split_kv: chunked attention merged by LSE equals attention over the whole cache."""

import doctest
import importlib

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import refattn
from refattn.split_kv import DEFAULT_CHUNK_SIZE, chunk_size_for
from strategies import (
    abs_values,
    assert_same_state,
    decode_cases,
    merged_out_rtol,
    oracle_decode,
)

split_kv_module = importlib.import_module("refattn.split_kv")


def _whole(case):
    return refattn.decode(case.q, case.k, case.v, case.kv_lens, sm_scale=case.sm_scale)


def _magnitude(case):
    return _whole(abs_values(case))[0]


@given(decode_cases(), st.data())
def test_any_num_splits_equals_decode(case, data):
    # Up to three more splits than tokens: the trailing chunks are empty states.
    num_splits = data.draw(st.integers(1, case.k.shape[1] + 3), label="num_splits")
    got = refattn.split_kv(
        case.q, case.k, case.v, case.kv_lens, num_splits=num_splits, sm_scale=case.sm_scale
    )
    assert_same_state(got, _whole(case), magnitude=_magnitude(case))


@given(decode_cases(), st.data())
def test_any_chunk_size_equals_decode(case, data):
    chunk_size = data.draw(st.integers(1, case.k.shape[1] + 3), label="chunk_size")
    got = refattn.split_kv(
        case.q, case.k, case.v, case.kv_lens, chunk_size=chunk_size, sm_scale=case.sm_scale
    )
    assert_same_state(got, _whole(case), magnitude=_magnitude(case))


@given(decode_cases(dtype="float64"), st.integers(1, 9))
def test_matches_oracle_to_1e12(case, num_splits):
    got = refattn.split_kv(
        case.q, case.k, case.v, case.kv_lens, num_splits=num_splits, sm_scale=case.sm_scale
    )
    want = oracle_decode(case.q, case.k, case.v, case.kv_lens, case.scale)
    assert_same_state(got, want, magnitude=_magnitude(case))


def test_default_chunking_equals_decode_on_a_long_cache():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 8))
    k, v = rng.standard_normal((2, 2, 3 * DEFAULT_CHUNK_SIZE + 5, 2, 8))
    kv_lens = np.array([3 * DEFAULT_CHUNK_SIZE + 5, DEFAULT_CHUNK_SIZE])
    assert_same_state(refattn.split_kv(q, k, v, kv_lens), refattn.decode(q, k, v, kv_lens))


@pytest.mark.parametrize(
    "kv_len, num_splits, chunk_size, want",
    [
        (100, 4, None, (25, 4)),
        (101, 4, None, (26, 4)),
        (3, 5, None, (1, 5)),          # more splits than tokens: two empty chunks
        (0, 3, None, (1, 3)),
        (100, None, 30, (30, 4)),
        (0, None, 30, (30, 1)),
        (1000, None, None, (DEFAULT_CHUNK_SIZE, 4)),
    ],
)
def test_chunking_rule(kv_len, num_splits, chunk_size, want):
    assert chunk_size_for(kv_len, num_splits, chunk_size) == want


@given(decode_cases(), st.integers(1, 6))
def test_really_cuts_into_chunks_and_merges(case, num_splits):
    seen = []
    real_merge = split_kv_module.merge_states

    def recording_merge(outs, lses):
        seen.append(outs.shape[0])
        return real_merge(outs, lses)

    split_kv_module.merge_states = recording_merge
    try:
        refattn.split_kv(case.q, case.k, case.v, case.kv_lens, num_splits=num_splits)
    finally:
        split_kv_module.merge_states = real_merge
    assert seen == [num_splits]


@given(st.integers(1, 40), st.integers(1, 8), st.sampled_from([1.0, -1.0]), st.integers(0, 2**32 - 1))
@example(kv_len=34, num_splits=3, sign=1.0, seed=34)  # merge error 1.8e-12: an lse of 1e4's rounding
def test_scores_of_1e4_across_chunks(kv_len, num_splits, sign, seed):
    rng = np.random.default_rng(seed)
    offsets = rng.integers(-160, 1, size=kv_len) / 8.0  # exact in float64 next to 1e4
    q = np.zeros((1, 2, 3))
    q[..., 0] = sign
    k = rng.standard_normal((1, kv_len, 1, 3))
    k[0, :, 0, 0] = 1e4 + offsets
    v = rng.standard_normal((1, kv_len, 1, 3))
    rel = sign * offsets
    weights = np.exp(rel - rel.max()) / np.exp(rel - rel.max()).sum()
    want_out = np.broadcast_to(weights @ v[0, :, 0], (1, 2, 3))
    want_lse = np.full((1, 2), sign * 1e4 + rel.max() + np.log(np.exp(rel - rel.max()).sum()))
    got = refattn.split_kv(q, k, v, num_splits=num_splits, sm_scale=1.0)
    # The chunks' lse values sit near 1e4, so the merge is as exact as an lse of 1e4 can be.
    magnitude = np.broadcast_to(weights @ np.abs(v[0, :, 0]), (1, 2, 3))
    assert_same_state(got, (want_out, want_lse), out_rtol=merged_out_rtol(1e4), magnitude=magnitude)


@given(decode_cases(max_kv_len=0), st.integers(1, 4))
def test_empty_cache_gives_zero_and_minus_inf(case, num_splits):
    out, lse = refattn.split_kv(case.q, case.k, case.v, case.kv_lens, num_splits=num_splits)
    assert np.all(out == 0.0) and np.all(np.isneginf(lse))


def test_docstring_example_runs():
    assert doctest.testmod(split_kv_module, raise_on_error=True).attempted > 0
