"""refattn.shared_prefix: both methods equal decode on the concatenated [prefix ; suffix] cache."""

import doctest
import importlib
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from strategies import (
    INDEX_DTYPES,
    NP_DTYPE,
    assert_same_state,
    dtypes,
    float_arrays,
    head_dims,
    head_layouts,
    lengths,
    merged_out_rtol,
    oracle,
    sm_scales,
)

METHODS = ("hydragen", "bifurcated")


@dataclass
class PrefixCase:
    q: np.ndarray         # [B, Hq, D]
    k_prefix: np.ndarray  # [P, Hkv, D]
    v_prefix: np.ndarray
    k_suffix: np.ndarray  # [B, S, Hkv, D]
    v_suffix: np.ndarray
    suffix_lens: object   # None or int [B]
    sm_scale: object

    @property
    def args(self):
        return (self.q, self.k_prefix, self.v_prefix, self.k_suffix, self.v_suffix, self.suffix_lens)

    @property
    def lens(self):
        if self.suffix_lens is None:
            return np.full(self.q.shape[0], self.k_suffix.shape[1])
        return np.asarray(self.suffix_lens)

    @property
    def scale(self):
        return 1 / np.sqrt(self.q.shape[-1]) if self.sm_scale is None else self.sm_scale

    def concatenated(self):
        """The same context as one contiguous cache: k, v [B, P + S, Hkv, D] and kv_lens."""
        batch = self.q.shape[0]
        k_prefix = np.broadcast_to(self.k_prefix, (batch, *self.k_prefix.shape))  # [B, P, Hkv, D]
        v_prefix = np.broadcast_to(self.v_prefix, (batch, *self.v_prefix.shape))
        k = np.concatenate([k_prefix, self.k_suffix], axis=1)
        v = np.concatenate([v_prefix, self.v_suffix], axis=1)
        return k, v, self.k_prefix.shape[0] + self.lens

    def magnitude(self):
        """The output over |values|: the scale of the rounding errors of the output."""
        k, v, kv_lens = self.concatenated()
        q, k, v = (x.astype(np.float64) for x in (self.q, k, v))
        return refattn.decode(q, k, np.abs(v), kv_lens, sm_scale=self.sm_scale)[0]

    def contexts(self):
        return [
            (np.concatenate([self.k_prefix, self.k_suffix[b, :n]]),
             np.concatenate([self.v_prefix, self.v_suffix[b, :n]]))
            for b, n in enumerate(self.lens)
        ]


@st.composite
def prefix_cases(draw, dtype=None, max_prefix_len=32, max_suffix_len=16):
    dtype = draw(dtypes) if dtype is None else dtype
    batch = draw(st.integers(1, 4))
    num_qo_heads, num_kv_heads = draw(head_layouts())
    head_dim = draw(head_dims)
    prefix_len = draw(lengths(max_prefix_len))
    suffix_len = draw(lengths(max_suffix_len))
    q = draw(float_arrays((batch, num_qo_heads, head_dim), dtype))
    k_prefix = draw(float_arrays((prefix_len, num_kv_heads, head_dim), dtype))
    v_prefix = draw(float_arrays((prefix_len, num_kv_heads, head_dim), dtype))
    k_suffix = draw(float_arrays((batch, suffix_len, num_kv_heads, head_dim), dtype))
    v_suffix = draw(float_arrays((batch, suffix_len, num_kv_heads, head_dim), dtype))
    suffix_lens = None
    if draw(st.booleans()):
        lens = draw(st.lists(st.integers(0, suffix_len), min_size=batch, max_size=batch))
        suffix_lens = np.asarray(lens, dtype=draw(st.sampled_from(INDEX_DTYPES)))
    return PrefixCase(q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens, draw(sm_scales))


@pytest.mark.parametrize("method", METHODS)
@given(case=prefix_cases())
def test_equals_decode_on_the_concatenated_cache(method, case):
    got = refattn.shared_prefix(*case.args, method=method, sm_scale=case.sm_scale)
    k, v, kv_lens = case.concatenated()
    want = refattn.decode(case.q, k, v, kv_lens, sm_scale=case.sm_scale)
    assert_same_state(got, want, out_rtol=merged_out_rtol(want[1]), magnitude=case.magnitude())


@pytest.mark.parametrize("method", METHODS)
@given(case=prefix_cases(dtype="float64"))
def test_matches_oracle_to_1e12(method, case):
    got = refattn.shared_prefix(*case.args, method=method, sm_scale=case.sm_scale)
    want = oracle(case.q, case.contexts(), case.scale)
    assert_same_state(got, want, out_rtol=merged_out_rtol(want[1]), magnitude=case.magnitude())


@given(prefix_cases())
def test_methods_agree(case):
    hydragen = refattn.shared_prefix(*case.args, method="hydragen", sm_scale=case.sm_scale)
    bifurcated = refattn.shared_prefix(*case.args, method="bifurcated", sm_scale=case.sm_scale)
    assert_same_state(
        hydragen, bifurcated, out_rtol=merged_out_rtol(bifurcated[1]), magnitude=case.magnitude()
    )


@pytest.mark.parametrize("method", METHODS)
@given(case=prefix_cases(max_prefix_len=0))
def test_no_prefix_is_plain_decode_on_the_suffix(method, case):
    got = refattn.shared_prefix(*case.args, method=method, sm_scale=case.sm_scale)
    want = refattn.decode(case.q, case.k_suffix, case.v_suffix, case.suffix_lens, sm_scale=case.sm_scale)
    assert_same_state(got, want)


@pytest.mark.parametrize("method", METHODS)
def test_nothing_to_attend_to_gives_zero_and_minus_inf(method):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 8))
    k_prefix = np.zeros((0, 2, 8))
    k_suffix = rng.standard_normal((2, 5, 2, 8))
    out, lse = refattn.shared_prefix(q, k_prefix, k_prefix, k_suffix, k_suffix, [0, 3], method=method)
    assert np.all(out[0] == 0.0) and np.all(np.isneginf(lse[0]))
    assert np.all(np.isfinite(lse[1]))


@pytest.mark.parametrize("method", METHODS)
@given(case=prefix_cases(dtype="float64"))
def test_suffix_padding_is_never_read(method, case):
    k_suffix, v_suffix = case.k_suffix.copy(), case.v_suffix.copy()
    for b, n in enumerate(case.lens):
        k_suffix[b, n:] = 1e300
        v_suffix[b, n:] = 1e300
    want = refattn.shared_prefix(*case.args, method=method, sm_scale=case.sm_scale)
    got = refattn.shared_prefix(case.q, case.k_prefix, case.v_prefix, k_suffix, v_suffix,
                                case.suffix_lens, method=method, sm_scale=case.sm_scale)
    assert_same_state(got, want)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_scores_of_1e4(method, sign):
    # Scores sign * (1e4 + c) with c exact multiples of 1/8: the answer depends on c only.
    rng = np.random.default_rng(1)
    prefix_len, suffix_len, batch = 24, 6, 3
    offsets = rng.integers(-80, 1, size=(batch, prefix_len + suffix_len)) / 8.0
    offsets[:, :prefix_len] = offsets[0, :prefix_len]  # the prefix is shared
    k = rng.standard_normal((batch, prefix_len + suffix_len, 1, 4))
    k[..., 0, 0] = 1e4 + offsets
    k[:, :prefix_len] = k[0, :prefix_len]
    v = rng.standard_normal((batch, prefix_len + suffix_len, 1, 4))
    v[:, :prefix_len] = v[0, :prefix_len]
    q = np.zeros((batch, 2, 4))
    q[..., 0] = sign
    rel = sign * offsets  # [B, P + S]
    top = rel.max(axis=1, keepdims=True)
    weights = np.exp(rel - top) / np.exp(rel - top).sum(axis=1, keepdims=True)
    want_out = np.repeat(np.einsum("bs,bsd->bd", weights, v[:, :, 0])[:, None], 2, axis=1)
    lse = sign * 1e4 + top + np.log(np.exp(rel - top).sum(axis=1, keepdims=True))  # [B, 1]
    want_lse = np.repeat(lse, 2, axis=1)
    got = refattn.shared_prefix(q, k[0, :prefix_len], v[0, :prefix_len], k[:, prefix_len:],
                                v[:, prefix_len:], method=method, sm_scale=1.0)
    magnitude = np.repeat(np.einsum("bs,bsd->bd", weights, np.abs(v[:, :, 0]))[:, None], 2, axis=1)
    assert_same_state(got, (want_out, want_lse), out_rtol=merged_out_rtol(1e4), magnitude=magnitude)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_fixed_larger_case(dtype):
    rng = np.random.default_rng(2)
    np_dtype = NP_DTYPE[dtype]
    q = rng.standard_normal((5, 28, 32)).astype(np_dtype)
    k_prefix, v_prefix = rng.standard_normal((2, 339, 4, 32)).astype(np_dtype)
    k_suffix, v_suffix = rng.standard_normal((2, 5, 17, 4, 32)).astype(np_dtype)
    suffix_lens = np.array([17, 0, 1, 9, 16])
    case = PrefixCase(q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens, None)
    want = oracle(q, case.contexts(), case.scale)
    for method in METHODS:
        assert_same_state(refattn.shared_prefix(*case.args, method=method), want)


def test_docstring_example_runs():
    module = importlib.import_module("refattn.shared_prefix")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0


# ---------------------------------------------------------------------------------------------
# The GPU's bifurcated formulation (float32 library products), run with NumPy arrays on the CPU.


@given(
    st.sampled_from(["float16", "float32"]), st.sampled_from([(8, 8), (8, 2), (6, 1)]),
    st.integers(1, 4), st.integers(0, 40), st.integers(0, 12), st.booleans(), st.integers(0, 2**31 - 1),
)
def test_gpu_bifurcated_formulation_matches_the_reference(dtype, heads, batch, prefix_len, suffix_len,
                                                          ragged, seed):
    import importlib

    from decode_attention.contract import check_shared_prefix

    gsp = importlib.import_module("gpukernels.shared_prefix")
    hq, hkv = heads
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, hq, 16)).astype(dtype)
    kp, vp = (rng.standard_normal((prefix_len, hkv, 16)).astype(dtype) for _ in range(2))
    ks, vs = (rng.standard_normal((batch, suffix_len, hkv, 16)).astype(dtype) for _ in range(2))
    lens = rng.integers(0, suffix_len + 1, size=batch) if ragged else None
    if suffix_len and batch > 1:
        vs[-1, -1] = np.nan          # padding or attended, as lens has it
    ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, lens, method="bifurcated")
    problem, _ = check_shared_prefix(q, kp, vp, ks, vs, lens, method="bifurcated")
    out, lse = gsp._bifurcated(problem, q, kp, vp, ks, vs, lens, None, None)
    assert np.array_equal(np.isnan(out), np.isnan(ref_out)) and np.array_equal(np.isnan(lse), np.isnan(ref_lse))
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    ok = ~np.isnan(ref_out)
    np.testing.assert_allclose(out[ok].astype(np.float64), ref_out[ok], rtol=2e-2 if dtype == "float16" else 1e-4,
                               atol=2e-3 if dtype == "float16" else 1e-5)
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=1e-4, atol=1e-4)
