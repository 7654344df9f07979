"""Inputs of the exploration scripts: fresh float16 normals of a benchmark row's shape (the span
grid's, gpukernels.bench.SPAN_*; a shared-prefix row's), and buffers for a planned run's output."""
import cupy as cp

from gpukernels.bench import HEAD_DIM, NUM_QO_HEADS, SPAN_BATCH, SPAN_KV_HEADS, SPAN_KV_LEN, _randn16


def span_grid_inputs():
    """q [batch, num_qo_heads, head_dim], k and v [batch, kv_len, num_kv_heads, head_dim] (drawn
    in that order), then out (float16) and lse (float32) for `run(..., out=out, lse=lse)`."""
    q = _randn16((SPAN_BATCH, NUM_QO_HEADS, HEAD_DIM))
    k = _randn16((SPAN_BATCH, SPAN_KV_LEN, SPAN_KV_HEADS, HEAD_DIM))
    v = _randn16((SPAN_BATCH, SPAN_KV_LEN, SPAN_KV_HEADS, HEAD_DIM))
    out = cp.empty((SPAN_BATCH, NUM_QO_HEADS, HEAD_DIM), dtype=cp.float16)
    lse = cp.empty((SPAN_BATCH, NUM_QO_HEADS), dtype=cp.float32)
    return q, k, v, out, lse


def shared_prefix_inputs(num_kv_heads: int, batch: int, prefix_len: int, suffix_len: int, *, num_qo_heads: int = 32,
                         head_dim: int = 128):
    """q [batch, num_qo_heads, head_dim], the prefix's k and v [prefix_len, num_kv_heads, head_dim],
    the suffixes' k and v [batch, suffix_len, num_kv_heads, head_dim] (drawn in that order), then
    out (float16) and lse (float32)."""
    q = _randn16((batch, num_qo_heads, head_dim))
    kp, vp = _randn16((prefix_len, num_kv_heads, head_dim)), _randn16((prefix_len, num_kv_heads, head_dim))
    ks = _randn16((batch, suffix_len, num_kv_heads, head_dim))
    vs = _randn16((batch, suffix_len, num_kv_heads, head_dim))
    out = cp.empty((batch, num_qo_heads, head_dim), dtype=cp.float16)
    lse = cp.empty((batch, num_qo_heads), dtype=cp.float32)
    return q, kp, vp, ks, vs, out, lse


def prefix_pass_inputs(batch: int, hq: int, hkv: int, d: int, prefix_len: int, dtype: str):
    """q [batch, hq, d] and the prefix's k, v [prefix_len, hkv, d] of standard normals in `dtype`
    (float16, or bfloat16 as its uint16 bits), drawn in that order."""
    def draw(shape):
        x = cp.random.standard_normal(shape, dtype=cp.float32)
        return x.astype(cp.float16) if dtype == "float16" else (x.view(cp.uint32) >> 16).astype(cp.uint16)
    return draw((batch, hq, d)), draw((prefix_len, hkv, d)), draw((prefix_len, hkv, d))


def states_difference(a, b) -> "tuple[float, float]":
    """Two prefix passes' states (part_out, part_lse) apart: the largest |out| difference relative
    to the largest |out| of a, and the largest lse difference; NaN when either has a NaN (an
    unwritten state of an output poisoned with NaN)."""
    (oa, la), (ob, lb) = a, b
    if any(bool(cp.isnan(x).any()) for x in (oa, la, ob, lb)):
        return float("nan"), float("nan")
    return float(cp.abs(oa - ob).max() / cp.abs(oa).max()), float(cp.abs(la - lb).max())


# Edge shapes of the prefix pass (label, batch, query heads, KV heads, head_dim, prefix_len, chunk,
# keyword arguments): rows past a block, a partial last KV tile, head_dim 64, bfloat16, a negative
# scale, a prefix shorter than a tile.
PREFIX_PASS_EDGES = (
    ("edge 32/8 x 20, 1000", 20, 32, 8, 128, 1000, 512, {}),
    ("edge 32/8 x 20, 1000, one chunk", 20, 32, 8, 128, 1000, 1024, {}),
    ("edge 8/2 x 3, 4100, d64", 3, 8, 2, 64, 4100, 1024, {}),
    ("edge 8/2 x 70, 3000, d64", 70, 8, 2, 64, 3000, 512, {}),
    ("edge 32/8 x 40, 777, bf16", 40, 32, 8, 128, 777, 256, {"dtype": "bfloat16"}),
    ("edge 32/4 x 33, 3000, negative scale", 33, 32, 4, 128, 3000, 1024, {"scale": -0.09}),
    ("edge 32/32 x 256, 64", 256, 32, 32, 128, 64, 64, {}),
)
