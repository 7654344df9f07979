"""Span attention: each sequence attends only to listed token intervals of its cache.

Sequence b reads the half-open intervals spans[span_indptr[b]:span_indptr[b+1]] (sorted,
non-overlapping) and nothing else. Attention sinks plus a sliding window, or the spans a model
selects for itself, are cases of it.

Optionally each query head h has a learned sink logit s_h (gpt-oss; FlashInfer's `sinks`): a
pseudo-token with a score and no value, so it only adds exp(s_h) to the softmax denominator and
lets a head attend to "nothing" (the output shrinks towards 0).

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

    A sink logit joins each head's denominator as it is (not multiplied by sm_scale):
    >>> sinks = np.array([0.0, 1.0, -np.inf, 2.0])    # head 2: no sink
    >>> out_s, lse_s = span(q, k, v, span_indptr, spans, sinks=sinks)
    >>> bool(np.allclose(lse_s, np.logaddexp(lse, sinks)))
    True
    >>> bool(np.allclose(out_s, out * np.exp(lse - lse_s)[..., None]))
    True
    >>> span(q, k, v, [0, 0, 0], np.zeros((0, 2), int), sinks=sinks)[1][0].tolist()
    [0.0, 1.0, -inf, 2.0]
"""

import numpy as np

from decode_attention import contract

from ._common import attend, upcast
from .merge_states import merge_states


def span(q, k, v, span_indptr, spans, *, sm_scale=None, sinks=None):
    """Attention of sequence b to the tokens inside its spans only:

        T_b = union of [start, end) over spans[span_indptr[b]:span_indptr[b+1]]
        out[b], lse[b] = attention of q[b] to (k[b, T_b], v[b, T_b]), as in `refattn.decode`

    q [batch, num_qo_heads, head_dim]; k, v [batch, kv_len, num_kv_heads, head_dim];
    span_indptr int [batch+1]; spans int [num_spans, 2].
    Returns float64 out [batch, num_qo_heads, head_dim], lse [batch, num_qo_heads]; a sequence
    without spans gets out = 0, lse = -inf. Non-finite input as in `refattn.decode`; tokens
    outside a sequence's spans are never read.

    sinks: None, or a float array [num_qo_heads] (any float dtype, independent of q's) of
    per-head sink logits. With s[b, h, l] = sm_scale * <q[b, h], k[b, l, h // G]>:

        lse[b, h] = log(sum_{l in T_b} exp(s[b, h, l]) + exp(sinks[h]))
        out[b, h] = sum_{l in T_b} exp(s[b, h, l] - lse[b, h]) * v[b, l, h // G]

    sinks[h] is a natural-log logit on the scale of the scaled scores s: it is added as it is,
    not multiplied by sm_scale. It is the state (out 0, lse sinks[h]) merged once into the
    head's state (see `merge_sinks`), so a sequence without spans gets out = 0, lse = sinks[h].
    A sink of -inf is no sink (the result equals sinks=None exactly); a sink of NaN or +inf
    makes out and lse of that head NaN in every sequence, like a non-finite score.
    """
    problem = contract.check_span(q, k, v, span_indptr, spans, sm_scale=sm_scale)
    span_indptr, spans = contract.check_spans(span_indptr, spans, problem.batch, problem.kv_len)
    sinks = check_sinks(sinks, problem.num_qo_heads)
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)  # q: [B, Hq, D]; k, v: [B, S, Hkv, D]
    out = np.zeros((problem.batch, problem.num_qo_heads, problem.head_dim))  # [B, Hq, D]
    lse = np.zeros((problem.batch, problem.num_qo_heads))  # [B, Hq]
    for b in range(problem.batch):
        own = spans[span_indptr[b]:span_indptr[b + 1]]  # [n_b, 2]
        tokens = np.concatenate(
            [np.arange(start, end) for start, end in own] + [np.zeros(0, dtype=np.int64)]
        )  # [sum of span lengths]
        out[b], lse[b] = attend(q[b], k[b, tokens], v[b, tokens], problem.sm_scale)
    if sinks is not None:
        out, lse = merge_sinks(out, lse, sinks)
    return out, lse


def check_sinks(sinks, num_qo_heads: int):
    """None, or per-head sink logits: an array (NumPy, CuPy or PyTorch) [num_qo_heads] of dtype
    float16, bfloat16, float32 or float64, returned as host float64 [num_qo_heads].

    TypeError for something that is not an array or has another dtype, ValueError for another
    shape; values are not checked (non-finite sinks follow the rules of `span`).
    """
    if sinks is None:
        return None
    contract.check_sinks(sinks, num_qo_heads)
    return upcast(sinks)


def merge_sinks(out: np.ndarray, lse: np.ndarray, sinks: np.ndarray):
    """Join per-head sink logits to finished states: the sink of head h is a state with no value,
    (out 0, lse sinks[h]), merged once with `merge_states`:

        lse' = log(exp(lse) + exp(sinks[h])),   out' = exp(lse - lse') * out

    Merge it into the final state only, never into each partial state of a split: every merge
    would add exp(sinks[h]) to the denominator again.
    out [B, Hq, D], lse [B, Hq], sinks [Hq] -> float64 out [B, Hq, D], lse [B, Hq].
    """
    sink_outs = np.zeros_like(out)  # [B, Hq, D]: the sink has no value
    sink_lses = np.broadcast_to(sinks, lse.shape)  # [B, Hq]
    return merge_states(np.stack([out, sink_outs]), np.stack([lse, sink_lses]))
