"""Span attention: each sequence attends only to listed token intervals of its cache.

Sequence b reads the half-open intervals spans[span_indptr[b]:span_indptr[b+1]] (sorted,
non-overlapping) and nothing else. Attention sinks plus a sliding window, or the spans a model
selects for itself, are cases of it.

Example:
    >>> import numpy as np
    >>> from refattn import decode, span, spans_from_sinks_window
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 4, 8))
    >>> k, v = rng.standard_normal((2, 2, 30, 2, 8))
    >>> span_indptr, spans = spans_from_sinks_window([30, 12], num_sinks=2, window=10)
    >>> spans.tolist()                          # sequence 1: sinks and window touch, so merged
    [[0, 2], [20, 30], [0, 12]]
    >>> out, lse = span(q, k, v, span_indptr, spans)
    >>> keep = np.r_[0:2, 20:30]
    >>> bool(np.allclose(out[0], decode(q[:1], k[:1, keep], v[:1, keep])[0][0]))
    True
"""

import numpy as np

from decode_attention import contract

from ._common import attend


def span(q, k, v, span_indptr, spans, *, sm_scale=None):
    """Attention of sequence b to the tokens inside its spans only:

        T_b = union of [start, end) over spans[span_indptr[b]:span_indptr[b+1]]
        out[b], lse[b] = attention of q[b] to (k[b, T_b], v[b, T_b]), as in `refattn.decode`

    q [batch, num_qo_heads, head_dim]; k, v [batch, kv_len, num_kv_heads, head_dim];
    span_indptr int [batch+1]; spans int [num_spans, 2].
    Returns float64 out [batch, num_qo_heads, head_dim], lse [batch, num_qo_heads]; a sequence
    without spans gets out = 0, lse = -inf. Non-finite input as in `refattn.decode`; tokens
    outside a sequence's spans are never read.
    """
    problem = contract.check_span(q, k, v, span_indptr, spans, sm_scale=sm_scale)
    span_indptr, spans = contract.check_spans(span_indptr, spans, problem.batch, problem.kv_len)
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)  # q: [B, Hq, D]; k, v: [B, S, Hkv, D]
    out = np.zeros((problem.batch, problem.num_qo_heads, problem.head_dim))  # [B, Hq, D]
    lse = np.zeros((problem.batch, problem.num_qo_heads))  # [B, Hq]
    for b in range(problem.batch):
        own = spans[span_indptr[b]:span_indptr[b + 1]]  # [n_b, 2]
        tokens = np.concatenate(
            [np.arange(start, end) for start, end in own] + [np.zeros(0, dtype=np.int64)]
        )  # [sum of span lengths]
        out[b], lse[b] = attend(q[b], k[b, tokens], v[b, tokens], problem.sm_scale)
    return out, lse
