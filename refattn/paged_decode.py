"""Decode attention over a paged KV cache addressed by a page table.

Sequence b owns pages kv_indices[kv_indptr[b]:kv_indptr[b+1]] of the cache, in that order; all are
full except the last, which holds kv_last_page_len[b] tokens. Pages may sit anywhere in the cache
and may be shared by several sequences.

Example:
    >>> import numpy as np
    >>> from refattn import decode, paged_decode, paged_from_contiguous
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 4, 8))
    >>> k, v = rng.standard_normal((2, 2, 21, 1, 8))
    >>> kv_lens = np.array([21, 9])
    >>> paged = paged_from_contiguous(k, v, kv_lens, page_size=4, shuffle=0, extra_pages=3)
    >>> k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len = paged
    >>> k_cache.shape, kv_indptr.tolist(), kv_last_page_len.tolist()   # 6 + 3 pages, 3 unused
    ((12, 4, 1, 8), [0, 6, 9], [1, 1])
    >>> out, lse = paged_decode(q, *paged)
    >>> bool(np.allclose(out, decode(q, k, v, kv_lens)[0]))
    True
"""

import numpy as np

from decode_attention import contract

from ._common import attend


def paged_decode(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, *, sm_scale=None):
    """Decode attention where sequence b's tokens are its pages, concatenated and cut to length:

        pages_b = kv_indices[kv_indptr[b]:kv_indptr[b+1]]                       (n_b pages)
        K_b     = concat_p k_cache[p]  for p in pages_b, first kv_len_b tokens
        kv_len_b = (n_b - 1) * page_size + kv_last_page_len[b]   (0 when n_b = 0)
        out[b], lse[b] = attention of q[b] to (K_b, V_b), as in `refattn.decode`

    q [batch, num_qo_heads, head_dim]; k_cache, v_cache [num_pages, page_size, num_kv_heads,
    head_dim]; kv_indptr int [batch+1]; kv_indices int [nnz_pages]; kv_last_page_len int [batch].
    Returns float64 out [batch, num_qo_heads, head_dim], lse [batch, num_qo_heads]. Non-finite
    input as in `refattn.decode`; slots outside a sequence's tokens are never read.
    """
    problem, kv_lens = contract.check_paged(
        q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, sm_scale=sm_scale
    )
    kv_indptr = contract.as_index_array(kv_indptr, "kv_indptr")  # [B+1]
    kv_indices = contract.as_index_array(kv_indices, "kv_indices")  # [nnz_pages]
    q = np.asarray(q)  # [B, Hq, D]
    # [P, page_size, Hkv, D], in their own dtype: `attend` upcasts one sequence's head at a time
    k_cache, v_cache = np.asarray(k_cache), np.asarray(v_cache)
    hkv_d = (problem.num_kv_heads, problem.head_dim)
    out = np.zeros((problem.batch, problem.num_qo_heads, problem.head_dim))  # [B, Hq, D]
    lse = np.zeros((problem.batch, problem.num_qo_heads))  # [B, Hq]
    for b in range(problem.batch):
        pages = kv_indices[kv_indptr[b]:kv_indptr[b + 1]]  # [n_b]
        n = kv_lens[b]
        k_seq = k_cache[pages].reshape(-1, *hkv_d)[:n]  # [kv_len_b, Hkv, D]
        v_seq = v_cache[pages].reshape(-1, *hkv_d)[:n]  # [kv_len_b, Hkv, D]
        out[b], lse[b] = attend(q[b], k_seq, v_seq, problem.sm_scale)
    return out, lse
