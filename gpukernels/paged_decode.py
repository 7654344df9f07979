"""Decode over a paged KV cache: rows gathered through a page table, split along the length.

Sequence b owns pages `kv_indices[kv_indptr[b]:kv_indptr[b+1]]` of `k_cache`, `v_cache`
([num_pages, page_size, num_kv_heads, head_dim]), the last one filled to `kv_last_page_len[b]`.
Any page size from 1 up; the split plan is the same as for a contiguous cache.
"""

from __future__ import annotations

from .split_kv import paged_split_kv

__all__ = ["paged_decode"]


def paged_decode(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, *, num_splits=None,
                 plan=None, sm_scale=None, out=None, lse=None, check_values=False):
    """Returns (out, lse) like `decode`. `num_splits=None` lets the plan choose; 1 disables splitting.

    Page tables on the host are checked there before launch (ValueError). Page tables on the GPU
    are not copied to the host: the kernel checks them, and a sequence whose pages lie outside
    kv_indices, name a page outside the cache, or whose kv_last_page_len is outside [1, page_size]
    gets out and lse NaN; `check_values=True` copies them to the host and raises instead.
    """
    return paged_split_kv(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len,
                          num_splits=num_splits, plan=plan, sm_scale=sm_scale, out=out, lse=lse,
                          check_values=check_values)
