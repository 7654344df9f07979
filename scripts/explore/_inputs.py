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
