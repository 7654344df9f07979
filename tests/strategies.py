"""Hypothesis strategies shared by the CPU tests, the independent oracle they compare against, and
the comparison they use.

Shapes are drawn small (batch <= 4, heads <= 8, head_dim <= 16, kv_len <= 48) so that 200 examples
per property stay fast; contents come from a drawn seed, a drawn magnitude and a drawn kind
(normal values or small integers, the latter making ties and exact zeros likely), then are cast to
a drawn float dtype.
"""

from dataclasses import dataclass

import ml_dtypes
import numpy as np
from hypothesis import strategies as st
from tolerances import LSE_ATOL, OUT_RTOL, lse_error, rel_error

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
NP_DTYPE = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}
INDEX_DTYPES = (np.int32, np.int64)

MAX_BATCH = 4
MAX_KV_LEN = 48
MAX_HEAD_DIM = 16

dtypes = st.sampled_from(FLOAT_DTYPES)
head_dims = st.integers(1, MAX_HEAD_DIM)


@st.composite
def head_layouts(draw, max_qo_heads=8):
    """(num_qo_heads, num_kv_heads): MHA, GQA and MQA, at most `max_qo_heads` query heads."""
    num_kv_heads = draw(st.integers(1, 4))
    group_size = draw(st.integers(1, max(1, max_qo_heads // num_kv_heads)))
    return num_kv_heads * group_size, num_kv_heads


@st.composite
def lengths(draw, max_len=MAX_KV_LEN):
    """A length with 0, 1 and odd values made likely."""
    small = [n for n in (0, 1, 2, 3, 7) if n <= max_len]
    return draw(st.one_of(st.sampled_from(small), st.integers(0, max_len)))


@st.composite
def float_arrays(draw, shape, dtype="float64"):
    """An array of `shape` in `dtype` (a name), with drawn contents."""
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["normal", "normal", "integers"]))
    magnitude = draw(st.sampled_from([0.0, 0.01, 0.5, 1.0, 3.0]))
    rng = np.random.default_rng(seed)
    if kind == "integers":
        values = rng.integers(-3, 4, size=shape).astype(np.float64)
    else:
        values = magnitude * rng.standard_normal(shape)
    return values.astype(NP_DTYPE[dtype])


def index_array(values, dtype=np.int64):
    return np.asarray(values, dtype=dtype)


sm_scales = st.one_of(st.none(), st.floats(0.01, 2.0))


@dataclass
class DecodeCase:
    q: np.ndarray       # [B, Hq, D]
    k: np.ndarray       # [B, S, Hkv, D]
    v: np.ndarray       # [B, S, Hkv, D]
    kv_lens: object     # None or int [B]
    sm_scale: object    # None or float

    @property
    def lens(self) -> np.ndarray:
        """kv_lens with None resolved."""
        if self.kv_lens is None:
            return np.full(self.q.shape[0], self.k.shape[1])
        return np.asarray(self.kv_lens)

    @property
    def scale(self) -> float:
        return 1 / np.sqrt(self.q.shape[-1]) if self.sm_scale is None else self.sm_scale


@st.composite
def decode_cases(draw, dtype=None, max_batch=MAX_BATCH, max_kv_len=MAX_KV_LEN, ragged=True):
    """q, k, v, kv_lens (None or ragged, zeros included) and sm_scale for a contiguous cache."""
    dtype = draw(dtypes) if dtype is None else dtype
    batch = draw(st.integers(1, max_batch))
    num_qo_heads, num_kv_heads = draw(head_layouts())
    head_dim = draw(head_dims)
    kv_len = draw(lengths(max_kv_len))
    q = draw(float_arrays((batch, num_qo_heads, head_dim), dtype))
    k = draw(float_arrays((batch, kv_len, num_kv_heads, head_dim), dtype))
    v = draw(float_arrays((batch, kv_len, num_kv_heads, head_dim), dtype))
    kv_lens = None
    if ragged and draw(st.booleans()):
        lens = draw(st.lists(st.integers(0, kv_len), min_size=batch, max_size=batch))
        kv_lens = index_array(lens, draw(st.sampled_from(INDEX_DTYPES)))
    return DecodeCase(q, k, v, kv_lens, draw(sm_scales))


@st.composite
def states(draw, num_states=None, shape=None, empty_fraction=0.25):
    """Partial states (outs [N, B, H, D], lses [N, B, H]) with some entries empty (lse = -inf)."""
    if shape is None:
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 8)))
    if num_states is None:
        num_states = draw(st.integers(1, 5))
    outs = draw(float_arrays((num_states, *shape), "float64"))
    seed = draw(st.integers(0, 2**32 - 1))
    spread = draw(st.sampled_from([0.0, 1.0, 10.0, 100.0]))
    rng = np.random.default_rng(seed)
    lses = draw(st.sampled_from([0.0, -50.0, 1e4])) + spread * rng.standard_normal(
        (num_states, *shape[:2])
    )
    lses[rng.random(lses.shape) < empty_fraction] = -np.inf
    return outs, lses


# ----------------------------------------------------------------------------------------------
# The independent oracle: softmax, then a weighted sum, one query head at a time. It shares no code
# with refattn and follows the definition literally.


def oracle_one(q_heads, k_tokens, v_tokens, sm_scale):
    """q_heads [Hq, D], k_tokens, v_tokens [L, Hkv, D] -> out [Hq, D], lse [Hq] (float64)."""
    q_heads = np.asarray(q_heads, dtype=np.float64)
    k_tokens = np.asarray(k_tokens, dtype=np.float64)
    v_tokens = np.asarray(v_tokens, dtype=np.float64)
    num_qo_heads, head_dim = q_heads.shape
    group_size = num_qo_heads // k_tokens.shape[1]
    out = np.zeros((num_qo_heads, head_dim))
    lse = np.full(num_qo_heads, -np.inf)
    if k_tokens.shape[0] == 0:
        return out, lse
    for h in range(num_qo_heads):
        kv_head = h // group_size
        logits = np.array([sm_scale * float(np.dot(q_heads[h], key)) for key in k_tokens[:, kv_head]])
        top = logits.max()
        unnormalized = np.exp(logits - top)
        weights = unnormalized / unnormalized.sum()
        out[h] = sum(w * value for w, value in zip(weights, v_tokens[:, kv_head]))
        lse[h] = top + np.log(unnormalized.sum())
    return out, lse


def oracle(q, contexts, sm_scale):
    """q [B, Hq, D]; contexts: per sequence a pair (k_tokens, v_tokens) [L_b, Hkv, D]."""
    pairs = [oracle_one(q[b], k_b, v_b, sm_scale) for b, (k_b, v_b) in enumerate(contexts)]
    return np.stack([o for o, _ in pairs]), np.stack([lse for _, lse in pairs])


def oracle_decode(q, k, v, kv_lens, sm_scale):
    lens = np.full(q.shape[0], k.shape[1]) if kv_lens is None else np.asarray(kv_lens)
    return oracle(q, [(k[b, : lens[b]], v[b, : lens[b]]) for b in range(q.shape[0])], sm_scale)


def random_f64(rng, *shape):
    return rng.standard_normal(shape)


def merged_out_rtol(lse_magnitude) -> float:
    """Output bound for states merged by LSE when |lse| is about `lse_magnitude` (a number, or an
    lse array whose largest finite |entry| is taken).

    Each merged lse is a float64 rounded at its own magnitude (half an ulp of 1e4 is 9e-13), and
    that absolute error becomes a relative error of the merge weights. Four ulps of the lse on top
    of the float64 bound; nothing else is lost.
    """
    lse_magnitude = np.asarray(lse_magnitude, dtype=np.float64)
    lse_magnitude = np.max(np.abs(lse_magnitude[np.isfinite(lse_magnitude)]), initial=0.0)
    return OUT_RTOL["float64"] + 8 * np.finfo(np.float64).eps * float(lse_magnitude)


def assert_same_state(got, want, dtype="float64", out_rtol=None, magnitude=None):
    """Both (out, lse) pairs agree within the bounds of tests/tolerances.py for `dtype`.

    `magnitude`: the same output computed from the absolute values (|v|, or |outs| for a merge).
    A weighted mean of values of mixed sign can cancel to far below the values, while rounding
    errors scale with the values; when given, the output error is measured against
    max(||want||, ||magnitude||) rather than ||want|| alone.
    """
    got_out, got_lse = got
    want_out, want_lse = want
    assert got_out.shape == want_out.shape and got_lse.shape == want_lse.shape
    out_rtol = OUT_RTOL[dtype] if out_rtol is None else out_rtol
    error = rel_error(got_out, want_out)
    if magnitude is not None and np.isfinite(error):
        scale = max(np.linalg.norm(want_out), np.linalg.norm(magnitude))
        error = np.linalg.norm(got_out - want_out) / scale if scale > 0 else error
    assert error <= out_rtol, error
    assert lse_error(got_lse, want_lse) <= LSE_ATOL[dtype], lse_error(got_lse, want_lse)


def abs_values(case: DecodeCase) -> DecodeCase:
    """The case with |v|: its output is the scale of the rounding errors of the case's output."""
    q, k, v = (x.astype(np.float64) for x in (case.q, case.k, case.v))
    return DecodeCase(q, k, np.abs(v), case.kv_lens, case.sm_scale)
