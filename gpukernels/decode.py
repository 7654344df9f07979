"""Single-query attention over a contiguous cache, one pass per (sequence, KV head): no split.

The query heads of a GQA group are served from one read of each K/V row. This is `split_kv` with
one chunk per sequence; use `split_kv` when batch x KV heads is too small to fill the GPU.
"""

from __future__ import annotations

from .split_kv import split_kv

__all__ = ["decode"]


def decode(q, k, v, kv_lens=None, *, sm_scale=None, out=None, lse=None, check_values=False):
    """q: [batch, num_qo_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads, head_dim].

    Returns (out, lse): out in q's dtype and kind, lse float32 (natural log); an empty sequence
    gets out = 0, lse = -inf. Checks as in `split_kv` (kv_lens on the GPU: checked by the kernel).
    """
    return split_kv(q, k, v, kv_lens, num_splits=1, sm_scale=sm_scale, out=out, lse=lse,
                    check_values=check_values)
