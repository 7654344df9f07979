"""Builders of the index structures the variants take, from plain descriptions.

- `paged_from_contiguous`: a page table and paged caches holding the same tokens as a contiguous
  cache, pages optionally shuffled, unused slots filled with junk.
- `tree_from_paths`: segments back to back plus the CSR arrays of the paths through them.
- `spans_from_sinks_window`, `spans_from_mask`: span lists.

All index outputs are int32 NumPy arrays, the width the GPU kernels read.

Example:
    >>> import numpy as np
    >>> from refattn import spans_from_mask
    >>> mask = np.array([[1, 1, 0, 1], [0, 0, 0, 0]], dtype=bool)
    >>> span_indptr, spans = spans_from_mask(mask)
    >>> span_indptr.tolist(), spans.tolist()
    ([0, 2, 2], [[0, 2], [3, 4]])
"""

import numbers

import numpy as np

from decode_attention import contract

INDEX_DTYPE = np.int32
JUNK_STD = 3.0  # spread of the values in unused cache slots; any read of them shows in the output


def _generator(shuffle):
    """None -> None (pages in order); an int seed or a Generator -> a Generator."""
    if shuffle is None or isinstance(shuffle, np.random.Generator):
        return shuffle
    if isinstance(shuffle, numbers.Integral) and not isinstance(shuffle, bool):
        return np.random.default_rng(int(shuffle))
    raise TypeError(
        f"shuffle must be None, an int seed or a numpy.random.Generator, got "
        f"{type(shuffle).__name__} {shuffle!r}"
    )


def paged_from_contiguous(k, v, kv_lens=None, *, page_size, shuffle=None, extra_pages=0):
    """Cut a contiguous cache into pages of `page_size` tokens.

    Sequence b needs n_b = ceil(kv_lens[b] / page_size) pages. The cache has sum_b n_b +
    extra_pages pages; with `shuffle` (an int seed or a Generator) the pages sit at a random
    permutation of the page ids, otherwise in order. Slots no sequence owns (the tail of each last
    page and the extra pages) hold random junk, so a kernel that reads outside its pages is caught.

    k, v [batch, kv_len, num_kv_heads, head_dim]; kv_lens int [batch] (default kv_len).
    Returns k_cache, v_cache [num_pages, page_size, num_kv_heads, head_dim] in k's dtype, and int32
    kv_indptr [batch+1], kv_indices [nnz_pages], kv_last_page_len [batch].
    """
    batch, _, num_kv_heads, head_dim, kv_lens = contract.check_contiguous_cache(k, v, kv_lens)
    page_size = contract.check_positive_int(page_size, "page_size")
    extra_pages = contract.check_nonnegative_int(extra_pages, "extra_pages")
    rng = _generator(shuffle)
    k, v = np.asarray(k), np.asarray(v)  # [B, S, Hkv, D]

    pages_per_seq = -(-kv_lens // page_size)  # [B]
    kv_indptr = np.concatenate([[0], np.cumsum(pages_per_seq)])  # [B+1]
    used = int(kv_indptr[-1])
    num_pages = used + extra_pages
    page_ids = np.arange(num_pages) if rng is None else rng.permutation(num_pages)
    kv_indices = page_ids[:used]  # [nnz_pages]; the remaining ids are the extra pages

    junk = rng if rng is not None else np.random.default_rng(0)
    cache_shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = (JUNK_STD * junk.standard_normal(cache_shape)).astype(k.dtype)
    v_cache = (JUNK_STD * junk.standard_normal(cache_shape)).astype(v.dtype)
    for b in range(batch):
        for i, page in enumerate(kv_indices[kv_indptr[b]:kv_indptr[b + 1]]):
            start = i * page_size
            stop = min(start + page_size, int(kv_lens[b]))
            k_cache[page, : stop - start] = k[b, start:stop]
            v_cache[page, : stop - start] = v[b, start:stop]
    kv_last_page_len = np.where(pages_per_seq > 0, kv_lens - (pages_per_seq - 1) * page_size, 0)
    return (
        k_cache, v_cache, kv_indptr.astype(INDEX_DTYPE), kv_indices.astype(INDEX_DTYPE),
        kv_last_page_len.astype(INDEX_DTYPE),
    )


def tree_from_paths(segments_k, segments_v, paths):
    """Lay segments back to back and describe each sequence's path through them.

    segments_k, segments_v: equally long lists of [len_i, num_kv_heads, head_dim] arrays (one
    dtype, len_i may be 0); paths: one list of segment ids per sequence, each id at most once.
    Returns k_segs, v_segs [total_tokens, num_kv_heads, head_dim] and int32 seg_indptr
    [num_segs+1], path_indptr [batch+1], path_segs [nnz].
    """
    segments_k, segments_v = list(segments_k), list(segments_v)
    if len(segments_k) != len(segments_v):
        raise ValueError(
            f"segments_v must hold as many segments as segments_k ({len(segments_k)}), "
            f"got {len(segments_v)}"
        )
    if not segments_k:
        raise ValueError("segments_k must hold at least one segment, got none")
    first = segments_k[0]
    contract.check_contiguous_cache(first[None], first[None])  # a float array [len, Hkv, D]
    for i, (seg_k, seg_v) in enumerate(zip(segments_k, segments_v)):
        for name, seg in ((f"segments_k[{i}]", seg_k), (f"segments_v[{i}]", seg_v)):
            if contract.dtype_name(seg) != contract.dtype_name(first):
                raise TypeError(
                    f"{name} must have dtype {contract.dtype_name(first)} like segments_k[0], "
                    f"got {contract.dtype_name(seg)}"
                )
            if seg.ndim != 3 or tuple(seg.shape[1:]) != tuple(first.shape[1:]):
                raise ValueError(
                    f"{name} must be [len, num_kv_heads, head_dim] = [*, {first.shape[1]}, "
                    f"{first.shape[2]}], got {tuple(seg.shape)}"
                )
        if seg_v.shape[0] != seg_k.shape[0]:
            raise ValueError(
                f"segments_v[{i}] must have segments_k[{i}]'s length {seg_k.shape[0]}, "
                f"got {tuple(seg_v.shape)}"
            )
    paths = [list(path) for path in paths]
    if not paths:
        raise ValueError("paths must hold at least one path (batch >= 1), got none")

    k_segs = np.concatenate([np.asarray(s) for s in segments_k])  # [T, Hkv, D]
    v_segs = np.concatenate([np.asarray(s) for s in segments_v])  # [T, Hkv, D]
    seg_indptr = np.concatenate([[0], np.cumsum([s.shape[0] for s in segments_k])])
    path_indptr = np.concatenate([[0], np.cumsum([len(path) for path in paths])])
    path_segs = contract.as_index_array(
        np.concatenate([np.asarray(path, dtype=np.int64).reshape(-1) for path in paths]),
        "paths",
    )
    contract.check_tree_index(seg_indptr, path_indptr, path_segs, len(paths), k_segs.shape[0])
    return (
        k_segs, v_segs, seg_indptr.astype(INDEX_DTYPE), path_indptr.astype(INDEX_DTYPE),
        path_segs.astype(INDEX_DTYPE),
    )


def _csr(spans_per_seq) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence lists of (start, end) -> int32 (span_indptr [batch+1], spans [num_spans, 2])."""
    span_indptr = np.concatenate([[0], np.cumsum([len(s) for s in spans_per_seq])])
    spans = np.array([pair for seq in spans_per_seq for pair in seq], dtype=np.int64)
    return span_indptr.astype(INDEX_DTYPE), spans.reshape(-1, 2).astype(INDEX_DTYPE)


def spans_from_sinks_window(kv_lens, *, num_sinks, window):
    """Attention sinks plus a sliding window: the first `num_sinks` and the last `window` tokens.

    For a sequence of n tokens the spans are [0, min(num_sinks, n)) and [max(0, n - window), n),
    merged into [0, n) when they touch or overlap; empty ones are left out.
    kv_lens int [batch]. Returns int32 span_indptr [batch+1], spans [num_spans, 2].
    """
    kv_lens = contract.as_index_array(kv_lens, "kv_lens")
    if kv_lens.ndim != 1 or np.any(kv_lens < 0):
        raise ValueError(f"kv_lens must be [batch] with entries >= 0, got {kv_lens.tolist()}")
    num_sinks = contract.check_nonnegative_int(num_sinks, "num_sinks")
    window = contract.check_nonnegative_int(window, "window")
    spans_per_seq = []
    for n in kv_lens.tolist():
        sinks = (0, min(num_sinks, n))
        recent = (max(0, n - window), n)
        if sinks[1] > 0 and recent[1] > recent[0] and sinks[1] >= recent[0]:
            spans_per_seq.append([(0, n)])
        else:
            spans_per_seq.append([s for s in (sinks, recent) if s[1] > s[0]])
    return _csr(spans_per_seq)


def spans_from_mask(mask):
    """The maximal runs of True in each row of a bool mask [batch, kv_len], as spans.

    Returns int32 span_indptr [batch+1], spans [num_spans, 2].
    """
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must have dtype bool, got {contract.dtype_name(mask)}")
    if mask.ndim != 2:
        raise ValueError(f"mask must be [batch, kv_len], got {mask.shape}")
    spans_per_seq = []
    for row in mask:
        edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))  # +1: run starts, -1: ends
        spans_per_seq.append(list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))))
    return _csr(spans_per_seq)
