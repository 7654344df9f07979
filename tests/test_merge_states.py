"""refattn.merge_states: the associative, commutative LSE merge with the empty state as identity."""

import doctest
import importlib

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import refattn
from strategies import (
    assert_same_state,
    decode_cases,
    float_arrays,
    merged_out_rtol,
    oracle,
    oracle_decode,
    states,
)


def _merge(*parts):
    """Merge states given as (out [B, H, D], lse [B, H]) pairs."""
    return refattn.merge_states(np.stack([o for o, _ in parts]), np.stack([l for _, l in parts]))


def _rtol(*lses):
    finite = np.concatenate([np.ravel(l[np.isfinite(l)]) for l in lses] + [np.zeros(1)])
    return merged_out_rtol(float(np.max(np.abs(finite))))


@st.composite
def three_states(draw):
    outs, lses = draw(states(num_states=3))
    return [(outs[i], lses[i]) for i in range(3)]


@given(three_states())
@example(parts=[  # outs of mixed sign cancel far below themselves; errors scale with |outs|
    (np.array([[[-0.00209787]]]), np.array([[10000.34558419]])),
    (np.array([[[0.01060785]]]), np.array([[10000.82161814]])),
    (np.array([[[-0.01500749]]]), np.array([[10000.33043708]])),
])
def test_associative(parts):
    a, b, c = parts
    left = _merge(_merge(a, b), c)
    right = _merge(a, _merge(b, c))
    flat = _merge(a, b, c)
    magnitude = _merge(*[(np.abs(o), l) for o, l in parts])[0]
    rtol = _rtol(a[1], b[1], c[1])
    assert_same_state(left, flat, out_rtol=rtol, magnitude=magnitude)
    assert_same_state(right, flat, out_rtol=rtol, magnitude=magnitude)


@given(states(), st.randoms(use_true_random=False))
def test_commutative(parts, random):
    outs, lses = parts
    order = list(range(outs.shape[0]))
    random.shuffle(order)
    assert_same_state(
        refattn.merge_states(outs[order], lses[order]), refattn.merge_states(outs, lses),
        out_rtol=_rtol(lses), magnitude=refattn.merge_states(np.abs(outs), lses)[0],
    )


@given(states(num_states=1), st.integers(0, 3))
def test_empty_states_change_nothing(parts, num_empty):
    outs, lses = parts
    junk = np.full((num_empty, *outs.shape[1:]), np.nan)  # an empty state's out is never read
    empties = np.full((num_empty, *lses.shape[1:]), -np.inf)
    merged = refattn.merge_states(np.concatenate([junk, outs]), np.concatenate([empties, lses]))
    empty = np.isneginf(lses[0])
    want_out = np.where(empty[..., None], 0.0, outs[0])
    np.testing.assert_array_equal(merged[1], lses[0])
    np.testing.assert_allclose(merged[0], want_out, rtol=1e-15, atol=0)


@given(st.integers(0, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 5))
def test_all_empty_gives_zero_and_minus_inf(num_states, batch, heads, head_dim):
    outs = np.ones((num_states, batch, heads, head_dim))
    lses = np.full((num_states, batch, heads), -np.inf)
    out, lse = refattn.merge_states(outs, lses)
    assert np.all(out == 0.0) and np.all(np.isneginf(lse))


@given(states(num_states=1))
def test_single_state_is_returned_unchanged(parts):
    outs, lses = parts
    out, lse = refattn.merge_states(outs, lses)
    np.testing.assert_array_equal(lse, lses[0])
    np.testing.assert_array_equal(out, np.where(np.isneginf(lses[0])[..., None], 0.0, outs[0]))


@given(decode_cases(dtype="float64"), st.data())
def test_merging_disjoint_token_sets_equals_attention_over_their_union(case, data):
    # Partition every sequence's tokens into random (not contiguous) groups, attend to each group
    # with the independent oracle, merge: the result is the oracle over all tokens.
    num_parts = data.draw(st.integers(1, 4), label="num_parts")
    lens = case.lens
    parts = []
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    labels = [rng.integers(0, num_parts, size=n) for n in lens]  # part of each token
    for p in range(num_parts):
        contexts = [
            (case.k[b, :n][labels[b] == p], case.v[b, :n][labels[b] == p]) for b, n in enumerate(lens)
        ]
        parts.append(oracle(case.q, contexts, case.scale))
    got = _merge(*parts)
    want = oracle_decode(case.q, case.k, case.v, case.kv_lens, case.scale)
    magnitude = oracle_decode(case.q, case.k, np.abs(case.v), case.kv_lens, case.scale)[0]
    assert_same_state(got, want, out_rtol=_rtol(want[1]), magnitude=magnitude)


def test_lse_of_1e4_merges_exactly():
    # Two states with lse 1e4 and 1e4 - log(3): weights 3/4 and 1/4.
    outs = np.array([[[[1.0, 0.0]]], [[[0.0, 1.0]]]])
    lses = np.array([[[1e4]], [[1e4 - np.log(3.0)]]])
    out, lse = refattn.merge_states(outs, lses)
    np.testing.assert_allclose(out, [[[0.75, 0.25]]], rtol=merged_out_rtol(1e4))
    np.testing.assert_allclose(lse, [[1e4 + np.log(4.0 / 3.0)]], rtol=1e-15)


@given(st.sampled_from(["float16", "bfloat16", "float32", "float64"]),
       st.sampled_from([np.float32, np.float64]), st.data())
def test_accepts_every_float_dtype_for_outs(dtype, lse_dtype, data):
    outs = data.draw(float_arrays((2, 1, 3, 4), dtype))
    lses = np.array([[[0.0, 1.0, -np.inf]], [[2.0, -np.inf, -np.inf]]], dtype=lse_dtype)
    out, lse = refattn.merge_states(outs, lses)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    assert np.isneginf(lse[0, 2]) and np.all(out[0, 2] == 0.0)


# ----------------------------------------------------------------------------------------------
# Non-finite input: a NaN or +inf lse poisons its (sequence, head); -inf is the empty state.


@given(states(), st.data())
def test_nan_or_plus_inf_lse_makes_its_head_nan(parts, data):
    outs, lses = parts
    num_states, batch, num_heads = lses.shape
    sites = data.draw(st.lists(
        st.tuples(st.integers(0, num_states - 1), st.integers(0, batch - 1),
                  st.integers(0, num_heads - 1), st.sampled_from([np.nan, np.inf])),
        min_size=1, max_size=3,
    ), label="sites")
    bad = lses.copy()
    poisoned = np.zeros((batch, num_heads), dtype=bool)
    for i, b, h, value in sites:
        bad[i, b, h] = value
        poisoned[b, h] = True
    out, lse = refattn.merge_states(outs, bad)
    assert np.all(np.isnan(out[poisoned])) and np.all(np.isnan(lse[poisoned]))
    clean_out, clean_lse = refattn.merge_states(outs, lses)
    np.testing.assert_array_equal(out[~poisoned], clean_out[~poisoned])
    np.testing.assert_array_equal(lse[~poisoned], clean_lse[~poisoned])


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_bad_lse_is_not_hidden_by_empty_states(value):
    # Alone, or among empty states: still NaN, never the empty state's 0 / -inf.
    for lses in ([value], [-np.inf, value, -np.inf]):
        lses = np.array(lses)[:, None, None]  # [N, 1, 1]
        out, lse = refattn.merge_states(np.ones((len(lses), 1, 1, 2)), lses)
        assert np.all(np.isnan(out)) and np.isnan(lse[0, 0])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("state", [0, 1])
def test_bad_out_of_a_nonempty_state_makes_its_element_nan(value, state):
    # State 1 weighs exp(-1e4) = 0 in float64, yet it is not empty: its bad element still shows.
    outs = np.ones((2, 1, 1, 3))
    outs[state, 0, 0, 1] = value
    out, lse = refattn.merge_states(outs, np.array([[[0.0]], [[-1e4]]]))
    assert np.isnan(out[0, 0, 1])
    assert out[0, 0, 0] == 1.0 and out[0, 0, 2] == 1.0 and lse[0, 0] == 0.0


def test_docstring_example_runs():
    module = importlib.import_module("refattn.merge_states")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0
