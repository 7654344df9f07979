"""The span grid's inputs for the exploration scripts: fresh float16 normals of the span
benchmark's shape (gpukernels.bench.SPAN_*), and buffers for a planned run's output."""
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
