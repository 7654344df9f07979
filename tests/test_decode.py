"""refattn.decode: the definition itself, checked against independent formulations."""

import doctest
import importlib
import tracemalloc

import numpy as np
import pytest
import scipy.special
from hypothesis import example, given
from hypothesis import strategies as st

import refattn
from strategies import (
    NP_DTYPE,
    DecodeCase,
    assert_same_state,
    decode_cases,
    dtypes,
    float_arrays,
    head_layouts,
    oracle_decode,
)


@given(decode_cases(dtype="float64"))
def test_matches_oracle_to_1e12(case):
    got = refattn.decode(case.q, case.k, case.v, case.kv_lens, sm_scale=case.sm_scale)
    assert_same_state(got, oracle_decode(case.q, case.k, case.v, case.kv_lens, case.scale))


def scipy_decode(case):
    """Masked dense scores over the whole cache, softmax and logsumexp from scipy."""
    q = case.q.astype(np.float64)
    k = case.k.astype(np.float64)
    v = case.v.astype(np.float64)
    batch, num_qo_heads, head_dim = q.shape
    group = num_qo_heads // k.shape[2]
    k_q = np.repeat(k, group, axis=2)  # [B, S, Hq, D]
    v_q = np.repeat(v, group, axis=2)
    scores = np.einsum("bhd,bshd->bhs", q, k_q) * case.scale  # [B, Hq, S]
    outside = np.arange(k.shape[1])[None, :] >= case.lens[:, None]  # [B, S]
    scores = np.where(outside[:, None, :], -np.inf, scores)
    empty = case.lens == 0
    if k.shape[1] == 0:
        return np.zeros(q.shape), np.full(q.shape[:2], -np.inf)
    lse = scipy.special.logsumexp(scores, axis=-1)
    probs = scipy.special.softmax(np.where(empty[:, None, None], 0.0, scores), axis=-1)
    out = np.einsum("bhs,bshd->bhd", probs, v_q)
    out[empty] = 0.0
    lse[empty] = -np.inf
    return out, lse


@given(decode_cases())
@example(DecodeCase(  # an empty cache: scipy's softmax has no axis to reduce (a test bug, once)
    q=np.zeros((1, 1, 1), np.float16), k=np.zeros((1, 0, 1, 1), np.float16),
    v=np.zeros((1, 0, 1, 1), np.float16), kv_lens=None, sm_scale=None,
))
def test_matches_scipy_formulation(case):
    got = refattn.decode(case.q, case.k, case.v, case.kv_lens, sm_scale=case.sm_scale)
    assert got[0].dtype == np.float64 and got[1].dtype == np.float64
    assert_same_state(got, scipy_decode(case))


@given(decode_cases())
def test_tokens_past_kv_lens_are_never_read(case):
    lens = case.lens
    junk_k, junk_v = case.k.copy(), case.v.copy()
    for b, n in enumerate(lens):
        junk_k[b, n:] = 1e3
        junk_v[b, n:] = np.nan
    want = refattn.decode(case.q, case.k, case.v, lens, sm_scale=case.sm_scale)
    got = refattn.decode(case.q, junk_k, junk_v, lens, sm_scale=case.sm_scale)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@given(decode_cases())
def test_gqa_equals_mha_with_repeated_kv_heads(case):
    group = case.q.shape[1] // case.k.shape[2]
    k_mha = np.repeat(case.k, group, axis=2)
    v_mha = np.repeat(case.v, group, axis=2)
    got = refattn.decode(case.q, case.k, case.v, case.kv_lens, sm_scale=case.sm_scale)
    want = refattn.decode(case.q, k_mha, v_mha, case.kv_lens, sm_scale=case.sm_scale)
    assert_same_state(got, want)


def test_query_head_h_reads_kv_head_h_over_group():
    # 12 query heads, 3 KV heads: heads 0-3 read KV head 0, 4-7 head 1, 8-11 head 2.
    batch, kv_len, num_kv_heads, head_dim = 2, 5, 3, 4
    rng = np.random.default_rng(1)
    q = rng.standard_normal((batch, 12, head_dim))
    k = rng.standard_normal((batch, kv_len, num_kv_heads, head_dim))
    v = np.broadcast_to(
        np.arange(num_kv_heads, dtype=np.float64)[None, None, :, None],
        (batch, kv_len, num_kv_heads, head_dim),
    )
    out, _ = refattn.decode(q, k, v)
    np.testing.assert_allclose(out[:, :, 0], np.repeat([[0.0] * 4 + [1.0] * 4 + [2.0] * 4], 2, 0))


@given(decode_cases(max_kv_len=0))
def test_empty_cache_gives_zero_and_minus_inf(case):
    out, lse = refattn.decode(case.q, case.k, case.v, case.kv_lens, sm_scale=case.sm_scale)
    assert np.all(out == 0.0) and np.all(np.isneginf(lse))


def test_zero_kv_lens_give_zero_and_minus_inf():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((3, 4, 8))
    k, v = rng.standard_normal((2, 3, 9, 2, 8))
    out, lse = refattn.decode(q, k, v, np.array([0, 9, 0]))
    assert np.all(out[[0, 2]] == 0.0) and np.all(np.isneginf(lse[[0, 2]]))
    assert np.all(np.isfinite(lse[1]))


@st.composite
def huge_score_cases(draw):
    """Scores 1e4 + c_l (or -(1e4 + c_l)) with small exactly representable offsets c_l.

    q = sign * e_0 and k[l, :, 0] = 1e4 + c_l, sm_scale = 1, so s_l = sign * (1e4 + c_l) exactly.
    The answer depends only on the offsets: p = softmax(sign * c), lse = sign * 1e4 + logsumexp.
    """
    dtype = draw(st.sampled_from(["float32", "float64"]))
    batch = draw(st.integers(1, 3))
    num_qo_heads, num_kv_heads = draw(head_layouts())
    head_dim = draw(st.integers(1, 8))
    kv_len = draw(st.integers(1, 40))
    sign = draw(st.sampled_from([1.0, -1.0]))
    offsets = np.array(
        draw(st.lists(st.integers(-160, 0), min_size=kv_len, max_size=kv_len)), dtype=np.float64
    ) / 8.0  # [S], multiples of 1/8: 1e4 + c is exact in float32 and float64
    q = np.zeros((batch, num_qo_heads, head_dim))
    q[..., 0] = sign
    k = draw(float_arrays((batch, kv_len, num_kv_heads, head_dim), "float64"))
    k[..., 0] = (1e4 + offsets)[None, :, None]
    v = draw(float_arrays((batch, kv_len, num_kv_heads, head_dim), "float64"))
    np_dtype = NP_DTYPE[dtype]
    q, k, v = q.astype(np_dtype), k.astype(np_dtype), v.astype(np_dtype)
    rel = sign * offsets
    weights = np.exp(rel - rel.max())
    weights /= weights.sum()
    v_per_head = np.repeat(v.astype(np.float64), num_qo_heads // num_kv_heads, axis=2)
    want_out = np.einsum("s,bshd->bhd", weights, v_per_head)
    want_lse = sign * 1e4 + rel.max() + np.log(np.sum(np.exp(rel - rel.max())))
    return q, k, v, want_out, np.full((batch, num_qo_heads), want_lse)


@given(huge_score_cases())
def test_scores_of_1e4_neither_overflow_nor_lose_accuracy(case):
    q, k, v, want_out, want_lse = case
    out, lse = refattn.decode(q, k, v, sm_scale=1.0)
    assert_same_state((out, lse), (want_out, want_lse))


@given(decode_cases(), st.sampled_from([0.5, 2.0, 4.0]))
def test_sm_scale_multiplies_the_scores(case, factor):
    # Doubling q (exact in binary) is the same as doubling sm_scale.
    q, k, v = (x.astype(np.float64) for x in (case.q, case.k, case.v))
    got = refattn.decode(q * factor, k, v, case.kv_lens, sm_scale=case.scale)
    want = refattn.decode(q, k, v, case.kv_lens, sm_scale=case.scale * factor)
    assert_same_state(got, want)


def test_default_sm_scale_is_one_over_sqrt_head_dim():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 9))
    k, v = rng.standard_normal((2, 2, 7, 4, 9))
    assert_same_state(refattn.decode(q, k, v), refattn.decode(q, k, v, sm_scale=1 / 3))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_low_precision_inputs_are_upcast_exactly(dtype):
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 8, 16)).astype(NP_DTYPE[dtype])
    k, v = rng.standard_normal((2, 2, 33, 2, 16)).astype(NP_DTYPE[dtype])
    got = refattn.decode(q, k, v)
    want = refattn.decode(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_fixed_larger_case_with_odd_sizes():
    # 28 query heads over 4 KV heads, head_dim 64, kv_len 339 with ragged lengths.
    rng = np.random.default_rng(5)
    q = rng.standard_normal((3, 28, 64))
    k, v = rng.standard_normal((2, 3, 339, 4, 64))
    kv_lens = np.array([339, 1, 200])
    got = refattn.decode(q, k, v, kv_lens)
    assert_same_state(got, oracle_decode(q, k, v, kv_lens, 1 / 8))


def test_long_cache_is_never_copied_whole_in_float64():
    # One 128k-token sequence, 32 query / 8 KV heads, head_dim 128, float16, cut to 2048 tokens.
    # One KV head's K and V in float64 take half the inputs' bytes (8 bytes, not 2, for 1 of 8
    # heads); a float64 copy of the whole cache takes 4x them, with heads repeated over the
    # group of 4, 16x more. numpy reports its allocations to tracemalloc.
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 32, 128)).astype(np.float16)
    k, v = rng.standard_normal((2, 1, 2048, 8, 128), dtype=np.float32).astype(np.float16)
    tracemalloc.start()
    try:
        got = refattn.decode(q, k, v)
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    input_bytes = k.nbytes + v.nbytes
    assert peak_bytes < 2 * input_bytes, f"peak {peak_bytes / input_bytes:.1f}x the cache's bytes"
    assert_same_state(got, refattn.split_kv(q, k, v, chunk_size=300))


@given(decode_cases())
@example(DecodeCase(
    q=np.ones((1, 1, 1)), k=np.zeros((1, 1, 1, 1)), v=np.ones((1, 1, 1, 1)),
    kv_lens=None, sm_scale=None,
))
def test_output_is_a_convex_combination_of_values(case):
    out, lse = refattn.decode(case.q, case.k, case.v, case.kv_lens, sm_scale=case.sm_scale)
    v = case.v.astype(np.float64)
    group = case.q.shape[1] // case.k.shape[2]
    for b, n in enumerate(case.lens):
        if n == 0:
            continue
        lo = np.repeat(v[b, :n].min(axis=0), group, axis=0)  # [Hq, D]
        hi = np.repeat(v[b, :n].max(axis=0), group, axis=0)
        slack = 1e-12 * (1 + np.abs(v[b, :n]).max())
        assert np.all(out[b] >= lo - slack) and np.all(out[b] <= hi + slack)


@given(dtypes)
def test_accepts_every_float_dtype(dtype):
    rng = np.random.default_rng(6)
    q = rng.standard_normal((1, 2, 4)).astype(NP_DTYPE[dtype])
    k, v = rng.standard_normal((2, 1, 3, 1, 4)).astype(NP_DTYPE[dtype])
    out, lse = refattn.decode(q, k, v)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    assert out.shape == (1, 2, 4) and lse.shape == (1, 2)


def test_docstring_example_runs():
    assert doctest.testmod(importlib.import_module("refattn.decode"), raise_on_error=True).attempted > 0
