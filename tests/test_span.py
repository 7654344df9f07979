"""refattn.span: attending to listed intervals equals decode on the gathered tokens and a masked
dense computation; per-head sink logits join the softmax denominator without a value."""

import doctest
import importlib

import ml_dtypes
import numpy as np
import pytest
import scipy.special
from hypothesis import given
from hypothesis import strategies as st

import refattn
from strategies import NP_DTYPE, assert_same_state, decode_cases, oracle


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


# ----------------------------------------------------------------------------------------------
# Sink logits


def _dense_with_sinks(case, mask, sinks):
    """The masked dense computation with each head's sink logit as one more score, whose value is
    dropped: lse = logsumexp([s_1, ..., s_L, sink]), out = softmax(...)[:L] @ v."""
    q, k, v = (x.astype(np.float64) for x in (case.q, case.k, case.v))
    group = q.shape[1] // k.shape[2]
    scores = np.einsum("bhd,bshd->bhs", q, np.repeat(k, group, axis=2)) * case.scale  # [B, Hq, S]
    scores = np.where(mask[:, None, :], scores, -np.inf)
    sink_column = np.broadcast_to(sinks[None, :, None], (*scores.shape[:2], 1))  # [B, Hq, 1]
    extended = np.concatenate([scores, sink_column], axis=-1)  # [B, Hq, S + 1]
    empty = np.all(np.isneginf(extended), axis=-1)  # [B, Hq]: no tokens and no sink
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = scipy.special.logsumexp(extended, axis=-1)
        probs = scipy.special.softmax(np.where(empty[..., None], 0.0, extended), axis=-1)
    out = np.einsum("bhs,bshd->bhd", probs[..., :-1], np.repeat(v, group, axis=2))
    out[empty] = 0.0
    lse[empty] = -np.inf
    return out, lse


sink_values = st.one_of(st.floats(-30, 30), st.just(-np.inf), st.sampled_from([0.0, 1.0, 5.0]))


@given(span_cases(), st.data())
def test_sinks_equal_a_dense_softmax_with_one_more_score(args, data):
    case, mask = args
    num_qo_heads = case.q.shape[1]
    dtype = data.draw(st.sampled_from(["float16", "bfloat16", "float32", "float64"]))
    sinks = np.array(
        data.draw(st.lists(sink_values, min_size=num_qo_heads, max_size=num_qo_heads))
    ).astype(NP_DTYPE[dtype])
    got = refattn.span(case.q, case.k, case.v, *refattn.spans_from_mask(mask),
                       sm_scale=case.sm_scale, sinks=sinks)
    want = _dense_with_sinks(case, mask, sinks.astype(np.float64))
    assert_same_state(got, want)


@given(span_cases())
def test_sinks_of_minus_inf_are_no_sinks(args):
    case, mask = args
    span_args = (case.q, case.k, case.v, *refattn.spans_from_mask(mask))
    none = refattn.span(*span_args, sm_scale=case.sm_scale)
    minus_inf = refattn.span(*span_args, sm_scale=case.sm_scale,
                             sinks=np.full(case.q.shape[1], -np.inf))
    np.testing.assert_array_equal(minus_inf[0], none[0])
    np.testing.assert_array_equal(minus_inf[1], none[1])


@pytest.mark.parametrize("sm_scale", [None, 0.1, 3.0])
def test_sink_logit_is_not_scaled(sm_scale):
    # q = 0: every score is 0 whatever sm_scale, so n tokens and a sink s give
    # lse = log(n + e^s) and out = mean(v) * n / (n + e^s).
    rng = np.random.default_rng(3)
    q = np.zeros((1, 2, 4))
    k, v = rng.standard_normal((2, 1, 10, 1, 4))
    sinks = np.array([0.5, 2.0])
    out, lse = refattn.span(q, k, v, [0, 2], [[1, 3], [5, 9]], sm_scale=sm_scale, sinks=sinks)
    n = 6
    np.testing.assert_allclose(lse[0], np.log(n + np.exp(sinks)), rtol=1e-15)
    mean = v[0, np.r_[1:3, 5:9], 0].mean(axis=0)  # [D]
    np.testing.assert_allclose(out[0], mean * (n / (n + np.exp(sinks)))[:, None], rtol=1e-14)


def test_no_spans_with_a_sink_give_zero_and_the_sink():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 3, 4))
    q[1, 0] = np.nan  # never read: sequence 1 attends to nothing
    k = rng.standard_normal((2, 6, 1, 4))
    sinks = np.array([-1.5, 0.0, -np.inf], dtype=np.float32)
    out, lse = refattn.span(q, k, k, [0, 1, 1], [[0, 6]], sinks=sinks)
    assert np.all(out[1] == 0.0)
    np.testing.assert_array_equal(lse[1], sinks.astype(np.float64))
    assert np.all(np.isfinite(out[0])) and np.all(np.isfinite(lse[0]))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_plus_inf_sink_makes_its_head_nan_in_every_sequence(bad):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((3, 4, 4))
    k, v = rng.standard_normal((2, 3, 8, 2, 4))
    sinks = np.array([0.0, bad, 1.0, -np.inf])
    span_args = (q, k, v, [0, 1, 1, 3], [[0, 8], [0, 2], [4, 5]])  # sequence 1 has no spans
    out, lse = refattn.span(*span_args, sinks=sinks)
    assert np.all(np.isnan(out[:, 1])) and np.all(np.isnan(lse[:, 1]))
    others = [0, 2, 3]
    clean = refattn.span(*span_args, sinks=np.where(np.isfinite(sinks), sinks, -np.inf))
    np.testing.assert_array_equal(out[:, others], clean[0][:, others])
    np.testing.assert_array_equal(lse[:, others], clean[1][:, others])


def test_non_finite_tokens_with_sinks_are_not_hidden():
    rng = np.random.default_rng(6)
    q = rng.standard_normal((1, 4, 4))
    k, v = rng.standard_normal((2, 1, 8, 2, 4))
    sinks = np.full(4, 50.0)  # a sink that outweighs every token: their weights underflow
    clean = refattn.span(q, k, v, [0, 1], [[0, 8]], sinks=sinks)
    v[0, 3, 1, 2] = np.inf  # a value of KV head 1 (query heads 2, 3)
    k[0, 5, 0, 0] = np.nan  # a key of KV head 0 (query heads 0, 1)
    out, lse = refattn.span(q, k, v, [0, 1], [[0, 8]], sinks=sinks)
    assert np.all(np.isnan(out[0, :2])) and np.all(np.isnan(lse[0, :2]))
    assert np.all(np.isnan(out[0, 2:, 2])) and not np.any(np.isnan(np.delete(out[0, 2:], 2, -1)))
    np.testing.assert_array_equal(lse[0, 2:], clean[1][0, 2:])  # the lse does not read v


@pytest.mark.parametrize(
    "sinks, error, message",
    [
        ([0.0, 1.0, 2.0, 3.0], TypeError, r"sinks must be None or an array \[num_qo_heads\]"),
        (np.zeros(4, dtype=np.int32), TypeError, r"sinks must have dtype .*, got int32"),
        (np.zeros(4, dtype=np.complex64), TypeError, r"sinks must have dtype .*, got complex64"),
        (np.zeros(5), ValueError, r"sinks must be \[num_qo_heads\] = \[4\], got \(5,\)"),
        (np.zeros((1, 4)), ValueError, r"sinks must be \[num_qo_heads\] = \[4\], got \(1, 4\)"),
        (np.float64(0.0), ValueError, r"sinks must be \[num_qo_heads\] = \[4\], got \(\)"),
    ],
)
def test_bad_sinks_are_rejected(sinks, error, message):
    q = np.zeros((1, 4, 2))
    k = np.zeros((1, 3, 2, 2))
    with pytest.raises(error, match=message):
        refattn.span(q, k, k, [0, 1], [[0, 3]], sinks=sinks)


def test_sinks_of_any_float_dtype_are_read_as_their_values():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 2, 4)).astype(np.float16)
    k = rng.standard_normal((1, 5, 1, 4)).astype(np.float16)
    sinks = np.array([0.3, -2.0]).astype(ml_dtypes.bfloat16)
    want = refattn.span(q, k, k, [0, 1], [[0, 5]], sinks=sinks.astype(np.float64))
    got = refattn.span(q, k, k, [0, 1], [[0, 5]], sinks=sinks)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_docstring_example_runs():
    module = importlib.import_module("refattn.span")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0
