"""Span attention on the GPU: each sequence reads only the tokens inside its spans.

A contiguous cache [batch, kv_len, num_kv_heads, head_dim] is, without a copy, a paged cache of
`batch * kv_len / page_size` pages; a sequence's spans are then a page table listing exactly
the pages inside them. The paged split-KV kernel reads those pages and nothing else, and its
plan cuts each sequence's attended tokens (not its positions) into equal splits, so few spans or
many, short or long, the splits stay balanced. The page size is the largest power of two up to
64 that divides every span boundary and kv_len: spans on 16-token boundaries (a Quest page, a
sliding window of whole blocks) copy whole warp tiles; arbitrary spans run with pages of one
token (one page lookup per row).

`span_page_table` builds the table on the host (the spans are read there); `span` builds it and
runs; to reuse a table across layers, build it once and call `gpukernels.paged_decode` or
`SplitKV(plan).run_paged` with it.

Not yet measured on a GPU; the paged kernel it runs is the tested one, and the table is tested
on the CPU against `refattn.span` (tests/test_span_pages.py).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from decode_attention.contract import check_sinks, check_span, check_spans

from . import _runtime as rt
from .paged_decode import paged_decode

__all__ = ["SpanPageTable", "span_page_table", "span"]

MAX_SPAN_PAGE = 64


class SpanPageTable(NamedTuple):
    """A span list as a page table over the contiguous cache seen as pages of `page_size`."""

    page_size: int
    kv_indptr: np.ndarray          # int32 [batch + 1]
    kv_indices: np.ndarray         # int32 [nnz_pages]: page ids of the cache viewed as pages
    kv_last_page_len: np.ndarray   # int32 [batch]: page_size, or 0 for a sequence without spans


def _span_page_size(spans: np.ndarray, kv_len: int) -> int:
    """The largest power of two up to MAX_SPAN_PAGE dividing kv_len and every span boundary."""
    page = MAX_SPAN_PAGE
    values = np.concatenate([spans.reshape(-1), [kv_len]]).astype(np.int64)
    while page > 1 and np.any(values % page):
        page //= 2
    return page


def span_page_table(span_indptr, spans, batch: int, kv_len: int) -> SpanPageTable:
    """The page table of a span list (checked as `refattn.span` checks it).

    Sequence b's pages are, in order, the pages of the cache viewed as [batch * kv_len /
    page_size, page_size, ...] that lie inside its spans: page (b * kv_len + t) / page_size for
    every page-aligned token t of each span.
    """
    span_indptr, spans = check_spans(span_indptr, spans, batch, kv_len)
    page = _span_page_size(spans, kv_len)
    seq_of_span = np.repeat(np.arange(batch, dtype=np.int64), np.diff(span_indptr))  # [num_spans]
    first = (seq_of_span * kv_len + spans[:, 0]) // page                             # [num_spans]
    count = (spans[:, 1] - spans[:, 0]) // page                                      # [num_spans]
    total = int(count.sum())
    # Page ids: each span's run first .. first + count - 1, the runs back to back.
    run_start = np.repeat(np.cumsum(count) - count, count)                           # [total]
    indices = np.repeat(first, count) + (np.arange(total, dtype=np.int64) - run_start)
    pages_per_seq = np.zeros(batch, dtype=np.int64)
    np.add.at(pages_per_seq, seq_of_span, count)
    indptr = np.concatenate([[0], np.cumsum(pages_per_seq)])
    last = np.where(pages_per_seq > 0, page, 0)
    if indices.size and indices.max() >= 2**31:
        raise ValueError(f"the cache holds {batch * kv_len // page} pages of {page} tokens, more than "
                         f"an int32 page table can address")
    return SpanPageTable(page, indptr.astype(np.int32), indices.astype(np.int32), last.astype(np.int32))


def _sinks_on_device(sinks, kind: str, device_id: int, num_qo_heads: int):
    """Per-head sink logits as a float32 array [num_qo_heads] of the caller's kind, checked."""
    check_sinks(sinks, num_qo_heads)
    if kind == "torch":
        import torch  # noqa: PLC0415

        return torch.as_tensor(sinks, device=f"cuda:{device_id}").to(torch.float32)
    cp = rt.cupy()
    if isinstance(sinks, np.ndarray):
        sinks = sinks.astype(np.float32)   # bfloat16 (ml_dtypes) included
    with cp.cuda.Device(device_id):
        return cp.asarray(sinks, dtype=np.float32)


def _merge_sinks(out, lse, sinks, kind: str):
    """The sink of head h is the state (out 0, lse sinks[h]), merged once into the final state by
    the merge_states kernel (its rules for empty and non-finite states included)."""
    from .merge_states import merge_states  # noqa: PLC0415

    batch, heads = lse.shape
    if kind == "torch":
        import torch  # noqa: PLC0415

        outs = torch.stack([out, torch.zeros_like(out)])
        lses = torch.stack([lse, sinks.expand(batch, heads)]).contiguous()
        merged_out, merged_lse = merge_states(outs, lses)
        out.copy_(merged_out)
        lse.copy_(merged_lse)
        return out, lse
    cp = rt.cupy()
    outs = cp.stack([out, cp.zeros_like(out)])
    lses = cp.stack([lse, cp.broadcast_to(sinks, (batch, heads))])
    merged_out, merged_lse = merge_states(outs, lses)
    out[...] = merged_out
    lse[...] = merged_lse
    return out, lse


def span(q, k, v, span_indptr, spans, *, sm_scale=None, num_splits=None, out=None, lse=None, sinks=None):
    """Attention of sequence b to the tokens inside spans[span_indptr[b]:span_indptr[b+1]] only
    (half-open [start, end) intervals, sorted, non-overlapping; see `refattn.span`).

    q [batch, num_qo_heads, head_dim]; k, v [batch, kv_len, num_kv_heads, head_dim] contiguous;
    span_indptr [batch + 1] and spans [num_spans, 2] on the host (NumPy or lists) or the GPU
    (copied to the host: the table is built there). `sinks`: optional per-head sink logits
    [num_qo_heads] (see `refattn.span`), joined once to each head's final state. Returns (out, lse)
    like `split_kv`; a sequence without spans gets out = 0, lse = -inf (lse = sinks[h] with sinks).
    """
    qa, ka, va = rt.device_array(q, "q"), rt.device_array(k, "k"), rt.device_array(v, "v")
    indptr_h = rt.host_ints(span_indptr, "span_indptr")
    spans_h = rt.host_ints(spans, "spans")
    problem = check_span(q, k, v, indptr_h, spans_h, sm_scale=sm_scale, dtypes=rt.KERNEL_DTYPES)
    rt.require_contiguous(ka, "k")
    rt.require_contiguous(va, "v")
    table = span_page_table(indptr_h, spans_h, problem.batch, problem.kv_len)
    B, L, Hkv, D = ka.shape
    pages = B * L // table.page_size
    k_pages = k.reshape(pages, table.page_size, Hkv, D)   # a view of the same memory
    v_pages = v.reshape(pages, table.page_size, Hkv, D)
    sinks_dev = None if sinks is None else _sinks_on_device(sinks, qa.kind, qa.device_id, problem.num_qo_heads)
    out, lse = paged_decode(q, k_pages, v_pages, table.kv_indptr, table.kv_indices, table.kv_last_page_len,
                            num_splits=num_splits, sm_scale=problem.sm_scale, out=out, lse=lse)
    if sinks_dev is not None:
        out, lse = _merge_sinks(out, lse, sinks_dev, qa.kind)
    return out, lse
