"""refattn.span: attending to listed intervals equals decode on the gathered tokens and a masked
dense computation."""

import doctest
import importlib

import numpy as np
import scipy.special
from hypothesis import given
from hypothesis import strategies as st

import refattn
from strategies import assert_same_state, decode_cases, oracle


@st.composite
def span_cases(draw, dtype=None):
    """A contiguous case and a random token mask (runs of any length, gaps, empty rows)."""
    case = draw(decode_cases(dtype=dtype, ragged=False))
    batch, kv_len = case.k.shape[:2]
    seed = draw(st.integers(0, 2**32 - 1))
    density = draw(st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]))
    mask = np.random.default_rng(seed).random((batch, kv_len)) < density  # [B, S]
    return case, mask


def _gathered(case, mask):
    return [(case.k[b, mask[b]], case.v[b, mask[b]]) for b in range(mask.shape[0])]


@given(span_cases())
def test_equals_decode_on_the_gathered_tokens(args):
    case, mask = args
    got = refattn.span(case.q, case.k, case.v, *refattn.spans_from_mask(mask), sm_scale=case.sm_scale)
    for b in range(mask.shape[0]):
        k_b = case.k[b : b + 1, mask[b]]
        v_b = case.v[b : b + 1, mask[b]]
        want = refattn.decode(case.q[b : b + 1], k_b, v_b, sm_scale=case.sm_scale)
        assert_same_state((got[0][b : b + 1], got[1][b : b + 1]), want)


@given(span_cases())
def test_equals_a_masked_dense_computation(args):
    case, mask = args
    got = refattn.span(case.q, case.k, case.v, *refattn.spans_from_mask(mask), sm_scale=case.sm_scale)
    q, k, v = (x.astype(np.float64) for x in (case.q, case.k, case.v))
    group = q.shape[1] // k.shape[2]
    scores = np.einsum("bhd,bshd->bhs", q, np.repeat(k, group, axis=2)) * case.scale  # [B, Hq, S]
    scores = np.where(mask[:, None, :], scores, -np.inf)
    empty = ~mask.any(axis=1)  # [B]
    if k.shape[1] == 0:
        want_out, want_lse = np.zeros(q.shape), np.full(q.shape[:2], -np.inf)
    else:
        want_lse = scipy.special.logsumexp(scores, axis=-1)
        probs = scipy.special.softmax(np.where(empty[:, None, None], 0.0, scores), axis=-1)
        want_out = np.einsum("bhs,bshd->bhd", probs, np.repeat(v, group, axis=2))
        want_out[empty] = 0.0
        want_lse[empty] = -np.inf
    assert_same_state(got, (want_out, want_lse))


@given(span_cases(dtype="float64"))
def test_matches_oracle_to_1e12(args):
    case, mask = args
    got = refattn.span(case.q, case.k, case.v, *refattn.spans_from_mask(mask), sm_scale=case.sm_scale)
    assert_same_state(got, oracle(case.q, _gathered(case, mask), case.scale))


@given(decode_cases(), st.integers(0, 6), st.integers(0, 20))
def test_sinks_and_window_equal_decode_on_kept_tokens(case, num_sinks, window):
    lens = case.lens
    span_indptr, spans = refattn.spans_from_sinks_window(lens, num_sinks=num_sinks, window=window)
    got = refattn.span(case.q, case.k, case.v, span_indptr, spans, sm_scale=case.sm_scale)
    keep = np.zeros(case.k.shape[:2], dtype=bool)
    for b, n in enumerate(lens):
        keep[b, : min(num_sinks, n)] = True
        keep[b, max(0, n - window) : n] = True
    assert_same_state(got, oracle(case.q, _gathered(case, keep), case.scale))


@given(decode_cases())
def test_one_span_over_the_valid_tokens_is_decode(case):
    lens = case.lens
    nonempty = np.flatnonzero(lens > 0)
    spans = np.stack([np.zeros_like(lens[nonempty]), lens[nonempty]], axis=1).reshape(-1, 2)
    span_indptr = np.concatenate([[0], np.cumsum(lens > 0)])
    got = refattn.span(case.q, case.k, case.v, span_indptr, spans, sm_scale=case.sm_scale)
    assert_same_state(got, refattn.decode(case.q, case.k, case.v, case.kv_lens, sm_scale=case.sm_scale))


def test_touching_spans_equal_their_union():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 4))
    k, v = rng.standard_normal((2, 1, 20, 1, 4))
    split = refattn.span(q, k, v, [0, 3], [[2, 5], [5, 9], [9, 12]])
    whole = refattn.span(q, k, v, [0, 1], [[2, 12]])
    assert_same_state(split, whole)


def test_no_spans_give_zero_and_minus_inf():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 2, 4))
    k = rng.standard_normal((2, 6, 1, 4))
    out, lse = refattn.span(q, k, k, [0, 0, 1], [[1, 3]])
    assert np.all(out[0] == 0.0) and np.all(np.isneginf(lse[0]))
    out, lse = refattn.span(q, k, k, [0, 0, 0], np.zeros((0, 2), dtype=np.int32))
    assert np.all(out == 0.0) and np.all(np.isneginf(lse))


def test_tokens_outside_the_spans_are_never_read():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 4, 8))
    k, v = rng.standard_normal((2, 1, 30, 2, 8))
    spans = [[0, 4], [10, 11], [25, 30]]
    k_poisoned, v_poisoned = np.full_like(k, np.nan), np.full_like(v, np.nan)
    for start, end in spans:
        k_poisoned[:, start:end] = k[:, start:end]
        v_poisoned[:, start:end] = v[:, start:end]
    want = refattn.span(q, k, v, [0, 3], spans)
    got = refattn.span(q, k_poisoned, v_poisoned, [0, 3], spans)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_docstring_example_runs():
    module = importlib.import_module("refattn.span")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0
