"""Decode attention over a contiguous KV cache: one query per sequence; MHA, GQA and MQA.

Example:
    >>> import numpy as np
    >>> from refattn import decode
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 8, 16))         # [batch, num_qo_heads, head_dim]
    >>> k = rng.standard_normal((2, 10, 2, 16))     # [batch, kv_len, num_kv_heads, head_dim]
    >>> v = rng.standard_normal((2, 10, 2, 16))
    >>> out, lse = decode(q, k, v, np.array([10, 0]))
    >>> out.shape, lse.shape
    ((2, 8, 16), (2, 8))
    >>> bool(np.all(out[1] == 0) and np.all(lse[1] == -np.inf))   # sequence 1 is empty
    True
"""

import numpy as np

from decode_attention import contract

from ._common import attend


def decode(q, k, v, kv_lens=None, *, sm_scale=None):
    """Attention of each sequence's query to the first kv_lens[b] tokens of its cache.

        s[b, h, l] = sm_scale * <q[b, h], k[b, l, h // G]>          for l < kv_lens[b]
        out[b, h]  = sum_l softmax(s[b, h])_l * v[b, l, h // G]
        lse[b, h]  = log sum_l exp(s[b, h, l])

    with G = num_qo_heads // num_kv_heads and sm_scale = 1/sqrt(head_dim) by default.

    q [batch, num_qo_heads, head_dim]; k, v [batch, kv_len, num_kv_heads, head_dim];
    kv_lens int [batch] (default: kv_len for every sequence).
    Returns float64 out [batch, num_qo_heads, head_dim] and lse [batch, num_qo_heads];
    a sequence with kv_lens[b] = 0 gets out = 0, lse = -inf.

    Non-finite input: a non-finite score s[b, h, l] (a NaN or infinity in q[b, h] or in an
    attended key k[b, l, h // G] gives one) makes out[b, h] and lse[b, h] NaN; a NaN or infinity
    in an attended value v[b, l, j, d] makes out[b, h, d] NaN for the heads h of KV head j.
    Tokens at l >= kv_lens[b] are never read.

    One sequence and one KV head at a time, upcast to float64 only then: memory stays a few
    times one head's cache, not the whole cache in float64.
    """
    problem, kv_lens = contract.check_decode(q, k, v, kv_lens, sm_scale=sm_scale)
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)  # q: [B, Hq, D]; k, v: [B, S, Hkv, D]
    out = np.zeros((problem.batch, problem.num_qo_heads, problem.head_dim))  # [B, Hq, D]
    lse = np.zeros((problem.batch, problem.num_qo_heads))  # [B, Hq]
    for b in range(problem.batch):
        n = kv_lens[b]
        out[b], lse[b] = attend(q[b], k[b, :n], v[b, :n], problem.sm_scale)
    return out, lse
