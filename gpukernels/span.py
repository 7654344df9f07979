"""Span attention on the GPU: each sequence reads only the tokens inside its spans.

A contiguous cache [batch, kv_len, num_kv_heads, head_dim] is, without a copy, a paged cache of
`batch * kv_len / page_size` pages; a sequence's spans are then a page table listing exactly
the pages inside them. The paged split-KV kernel reads those pages and nothing else, and its
plan cuts each sequence's attended tokens (not its positions) into equal splits, so few spans or
many, short or long, the splits stay balanced.

The page size is the largest power of two up to 64 that divides kv_len and every span start, and
every span end but at most one per sequence: that sequence's ragged end becomes its last page,
partly filled (`kv_last_page_len`), listed after its whole pages (attention does not depend on
the order of the tokens). Four sink tokens and a window of whole blocks thus run with pages of
64. Where that size falls below 16 (spans with arbitrary boundaries) the float16 and bfloat16
kernels read windows instead (`span_windows`): each span cut into runs of up to 16 rows that start
anywhere, each read whole like a page of 16 with its row count carried in its entry; float32 runs
on the page table (pages down to one token, one lookup per row).

Three ways to call it:

* `span(q, k, v, span_indptr, spans)`: one-shot. The span list is checked, its table built on
  the host and kept, with its copy on the GPU, for the next call with the same spans and shapes
  (the most recent 64): a repeated call only compares bytes, then runs.
* `Span(plan_span(span_indptr, spans, ...)).run(q, k, v)`: the table built and the split plan
  made once, for many calls (the layers of a model); `run` allocates nothing given `out` and
  `lse`, and never synchronises.
* `span_page_table(...)` for callers that keep their own tables and call `paged_decode`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from costmodel.span import MAX_SPAN_PAGE, PAGE_BLOCKS_PER_SM
from decode_attention.contract import check_positive_int, check_sinks, check_span, check_spans

from . import _runtime as rt
from .split_kv import (WINDOW_LEN_BITS, WINDOW_ROWS, SplitKV, SplitKVPlan, _launch, _length_bucket,
                       check_kernel_dtype_and_head_dim, device_gpu, num_sms, plan_split_kv, uses_tensor_cores)

__all__ = ["SpanPageTable", "span_page_table", "SpanWindows", "span_windows", "SpanPlan", "plan_span", "Span",
           "span"]


class SpanPageTable(NamedTuple):
    """A span list as a page table over the contiguous cache seen as pages of `page_size`."""

    page_size: int
    kv_indptr: np.ndarray          # int32 [batch + 1]
    kv_indices: np.ndarray         # int32 [nnz_pages]: page ids of the cache viewed as pages
    kv_last_page_len: np.ndarray   # int32 [batch]: tokens of the last page (0: no spans)


def _fits(page: int, spans: np.ndarray, seq_of_span: np.ndarray, batch: int, kv_len: int) -> bool:
    """Pages of `page` tokens hold the spans: kv_len and every start on a page boundary, and at most
    one end per sequence off one."""
    if kv_len % page or np.any(spans[:, 0] % page):
        return False
    ragged = (spans[:, 1] % page) != 0
    return not ragged.any() or int(np.bincount(seq_of_span[ragged], minlength=batch).max()) <= 1


def _span_page_size(spans: np.ndarray, seq_of_span: np.ndarray, batch: int, kv_len: int) -> int:
    """The largest power of two up to MAX_SPAN_PAGE whose pages hold the spans (`_fits`)."""
    page = MAX_SPAN_PAGE
    while page > 1 and not _fits(page, spans, seq_of_span, batch, kv_len):
        page //= 2
    return page


def span_page_table(span_indptr, spans, batch: int, kv_len: int) -> SpanPageTable:
    """The page table of a span list (checked as `refattn.span` checks it).

    Sequence b's pages are the pages of the cache viewed as [batch * kv_len / page_size,
    page_size, ...] that lie inside its spans: page (b * kv_len + t) / page_size for every
    page-aligned token t of each span, in span order, then the partly filled page of its one
    ragged span end, if it has one.
    """
    span_indptr, spans = check_spans(span_indptr, spans, batch, kv_len)
    seq_of_span = np.repeat(np.arange(batch, dtype=np.int64), np.diff(span_indptr))  # [num_spans]
    page = _span_page_size(spans, seq_of_span, batch, kv_len)
    first = (seq_of_span * kv_len + spans[:, 0]) // page                             # [num_spans]
    count = (spans[:, 1] - spans[:, 0]) // page                                      # whole pages
    total = int(count.sum())
    # Whole pages: each span's run first .. first + count - 1, the runs back to back.
    run_start = np.repeat(np.cumsum(count) - count, count)                           # [total]
    whole = np.repeat(first, count) + (np.arange(total, dtype=np.int64) - run_start)
    # The ragged ends' partial pages, each after its sequence's whole pages (a stable sort).
    ragged = (spans[:, 1] % page) != 0
    partial = first[ragged] + count[ragged]
    seqs = np.concatenate([np.repeat(seq_of_span, count), seq_of_span[ragged]])
    last_key = np.concatenate([np.zeros(total, dtype=np.int64), np.ones(len(partial), dtype=np.int64)])
    order = np.lexsort((last_key, seqs))
    indices = np.concatenate([whole, partial])[order]
    pages_per_seq = np.bincount(seqs, minlength=batch).astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(pages_per_seq)])
    last = np.where(pages_per_seq > 0, page, 0)
    last[seq_of_span[ragged]] = spans[ragged, 1] % page
    if indices.size and indices.max() >= 2**31:
        raise ValueError(f"the cache holds {batch * kv_len // page} pages of {page} tokens, more than "
                         f"an int32 page table can address")
    return SpanPageTable(page, indptr.astype(np.int32), indices.astype(np.int32), last.astype(np.int32))


class SpanWindows(NamedTuple):
    """A span list as windows over the contiguous cache seen as batch * kv_len rows: each span cut
    into runs of WINDOW_ROWS rows, its last run shorter where its length is not a multiple."""

    kv_indptr: np.ndarray   # int32 [batch + 1]
    windows: np.ndarray     # int32 [num_windows]: (first row << WINDOW_LEN_BITS) | (rows - 1)
    tokens: np.ndarray      # int64 [batch]: attended tokens of each sequence


# Windows address rows with the bits above WINDOW_LEN_BITS of an int32.
MAX_WINDOW_ROWS_OF_CACHE = 1 << (31 - WINDOW_LEN_BITS)


def span_windows(span_indptr, spans, batch: int, kv_len: int) -> SpanWindows:
    """The windows of a span list (checked as `refattn.span` checks it): span [start, end) of
    sequence b becomes the windows of rows b * kv_len + start + i * WINDOW_ROWS, in span order."""
    span_indptr, spans = check_spans(span_indptr, spans, batch, kv_len)
    if batch * kv_len > MAX_WINDOW_ROWS_OF_CACHE:
        raise ValueError(f"windows address at most {MAX_WINDOW_ROWS_OF_CACHE} rows, the cache has "
                         f"{batch} x {kv_len}")
    seq_of_span = np.repeat(np.arange(batch, dtype=np.int64), np.diff(span_indptr))  # [num_spans]
    lengths = spans[:, 1] - spans[:, 0]
    count = -(-lengths // WINDOW_ROWS)                                               # windows per span
    total = int(count.sum())
    run_start = np.repeat(np.cumsum(count) - count, count)                           # [total]
    i = np.arange(total, dtype=np.int64) - run_start                                 # window within its span
    first = np.repeat(seq_of_span * kv_len + spans[:, 0], count) + i * WINDOW_ROWS
    rows = np.minimum(WINDOW_ROWS, np.repeat(lengths, count) - i * WINDOW_ROWS)
    windows = (first << WINDOW_LEN_BITS) | (rows - 1)
    per_seq = np.bincount(np.repeat(seq_of_span, count), minlength=batch).astype(np.int64)
    tokens = np.bincount(seq_of_span, weights=lengths, minlength=batch).astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(per_seq)])
    return SpanWindows(indptr.astype(np.int32), windows.astype(np.int32), tokens)


@dataclass(frozen=True, eq=False)
class SpanPlan:
    """One span list over a cache shape, as a page table, and the split plan of its paged run."""

    batch: int
    kv_len: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    table: SpanPageTable
    split: SplitKVPlan
    windows: "SpanWindows | None" = None   # read by windows instead of the page table

    @property
    def layout(self) -> str:
        """"windows" or "pages": how the kernel reads the spans."""
        return "windows" if self.windows is not None else "pages"

    @property
    def attended_tokens(self) -> np.ndarray:
        """Tokens each sequence attends to [batch]."""
        if self.windows is not None:
            return self.windows.tokens.copy()
        t = self.table
        pages = np.diff(t.kv_indptr).astype(np.int64)
        return np.where(pages > 0, (pages - 1) * t.page_size + t.kv_last_page_len, 0)


def plan_span(span_indptr, spans, *, batch: int, kv_len: int, num_qo_heads: int, num_kv_heads: int,
              head_dim: int, dtype: str = "float16", num_splits: int | None = None, num_sms: int | None = None,
              gpu=None) -> SpanPlan:
    """The page table of a span list (checked) and the cost model's split plan for its longest
    sequence's attended tokens, for a cache [batch, kv_len, num_kv_heads, head_dim] of `dtype`.
    Made on the host (no GPU needed); `num_sms` and `gpu` as for `plan_split_kv`."""
    for name, value in (("batch", batch), ("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
        check_positive_int(value, name)
    if not isinstance(kv_len, (int, np.integer)) or isinstance(kv_len, bool) or kv_len < 0:
        raise ValueError(f"kv_len must be a non-negative int, got {kv_len!r}")
    check_kernel_dtype_and_head_dim(dtype, head_dim)
    table = span_page_table(span_indptr, spans, batch, int(kv_len))
    windows = None
    if table.page_size < WINDOW_ROWS and uses_tensor_cores(dtype, head_dim) and \
            batch * kv_len <= MAX_WINDOW_ROWS_OF_CACHE:
        windows = span_windows(span_indptr, spans, batch, int(kv_len))
    if windows is not None:
        page_size, per_seq = WINDOW_ROWS, np.diff(windows.kv_indptr).astype(np.int64)
    else:
        page_size, per_seq = table.page_size, np.diff(table.kv_indptr).astype(np.int64)
    longest = int(per_seq.max(initial=0)) * page_size
    split = plan_split_kv(batch, num_qo_heads, num_kv_heads, head_dim, _length_bucket(max(longest, 1)),
                          dtype=dtype, num_splits=num_splits, num_sms=num_sms, page_size=page_size, gpu=gpu,
                          max_blocks_per_sm=None if windows is not None else PAGE_BLOCKS_PER_SM)
    return SpanPlan(batch, int(kv_len), num_qo_heads, num_kv_heads, head_dim, dtype, table, split, windows)


class Span:
    """A span plan bound to its page table on the GPU (copied once per array kind and device) and
    its split-KV runner; `run` many times without host synchronisation.

    >>> plan = plan_span(span_indptr, spans, batch=8, kv_len=32768, num_qo_heads=32,  # doctest: +SKIP
    ...                  num_kv_heads=8, head_dim=128)
    >>> sp = Span(plan)                                                  # doctest: +SKIP
    >>> out, lse = sp.run(q, k, v)                                       # doctest: +SKIP
    """

    def __init__(self, plan: SpanPlan):
        if not isinstance(plan, SpanPlan):
            raise TypeError(f"plan must be a SpanPlan, got {type(plan).__name__}")
        self.plan = plan
        self._runner = SplitKV(plan.split)
        self._tables: dict = {}   # (kind, device) -> the three index arrays on the GPU

    def _device_tables(self, kind: str, device_id: int):
        key = (kind, device_id)
        tables = self._tables.get(key)
        if tables is None:
            w = self.plan.windows
            if w is not None:   # windows: a sequence with windows reads them as pages of WINDOW_ROWS
                indptr, indices = w.kv_indptr, w.windows
                last = np.where(np.diff(indptr) > 0, WINDOW_ROWS, 0).astype(np.int32)
            else:
                t = self.plan.table
                indptr, indices, last = t.kv_indptr, t.kv_indices, t.kv_last_page_len
            padded = indices if len(indices) else np.zeros(1, np.int32)
            arrays = (
                rt.device_int32(indptr, kind, device_id, "kv_indptr"),
                rt.device_int32(padded, kind, device_id, "kv_indices")[: len(indices)],
                rt.device_int32(last, kind, device_id, "kv_last_page_len"),
            )
            # viewed once: each run passes the views (pointer, shape, dtype) instead of the arrays
            tables = self._tables[key] = tuple(rt.device_array(a, name) for a, name in zip(
                arrays, ("kv_indptr", "kv_indices", "kv_last_page_len")))
        return tables

    def run(self, q, k, v, *, sinks=None, sm_scale=None, out=None, lse=None):
        """q [batch, num_qo_heads, head_dim]; k, v [batch, kv_len, num_kv_heads, head_dim], contiguous,
        as planned. `sinks`: optional per-head sink logits [num_qo_heads] (see `refattn.span`).
        Returns (out, lse) like `split_kv`; a sequence without spans gets out = 0, lse = -inf
        (lse = sinks[h] with sinks)."""
        return self._run((rt.device_array(q, "q"), rt.device_array(k, "k"), rt.device_array(v, "v")),
                         sinks=sinks, sm_scale=sm_scale, out=out, lse=lse)

    def _run(self, views, *, sinks, sm_scale, out, lse):
        """`run` on the views of q, k, v (`rt.Device`), which the one-shot call has already made."""
        p = self.plan
        qa, ka, va = views
        expected = (p.batch, p.kv_len, p.num_kv_heads, p.head_dim)
        for name, a in (("k", ka), ("v", va)):
            if a.shape != expected:
                raise ValueError(f"{name} must be [batch, kv_len, num_kv_heads, head_dim] = {list(expected)} "
                                 f"as planned, got {a.shape}")
            rt.require_rows(a, name)
        tables = self._device_tables(qa.kind, qa.device_id)
        # the cache seen as rows (windows) or pages: views of the same memory, by shape alone
        if p.windows is not None:
            shape, windows = (p.batch * p.kv_len, p.num_kv_heads, p.head_dim), True
        else:
            ps = p.table.page_size
            shape, windows = (p.batch * p.kv_len // ps, ps, p.num_kv_heads, p.head_dim), False
        ka, va = ka._replace(shape=shape), va._replace(shape=shape)
        out, lse = _launch(p.split, qa.obj, ka.obj, va.obj, kv_lens=None, paged=tables, sm_scale=sm_scale,
                           out=out, lse=lse, workspace=self._runner._workspace_for, views=(qa, ka, va),
                           windows=windows)
        if sinks is not None:
            out, lse = _merge_sinks(out, lse, _sinks_on_device(sinks, qa.kind, qa.device_id, p.num_qo_heads),
                                    qa.kind)
        return out, lse


# One-shot calls by everything their checks read: the bytes of the span list, the shapes and dtypes
# of q, k, v, sm_scale, num_splits and the device. A call that matches one of the most recent
# ONE_SHOT_CACHE_SIZE skips the span checks it already passed and reuses that list's Span.
ONE_SHOT_CACHE_SIZE = 64
_ONE_SHOT = rt.RecentCache(ONE_SHOT_CACHE_SIZE)


def _one_shot_span(key, device_id: int, q, k, v, indptr_h, spans_h, sm_scale, num_splits):
    """The (problem, Span) of a one-shot call: checked and planned once per `key`."""
    return _ONE_SHOT.get_or_make(key, lambda: _span_plan(device_id, q, k, v, indptr_h, spans_h, sm_scale,
                                                         num_splits))


def _span_plan(device_id: int, q, k, v, indptr_h, spans_h, sm_scale, num_splits):
    """The (problem, Span) of a one-shot call, checked and planned."""
    problem = check_span(q, k, v, indptr_h, spans_h, sm_scale=sm_scale, dtypes=rt.KERNEL_DTYPES)
    check_kernel_dtype_and_head_dim(problem.dtype, problem.head_dim)
    if num_splits is not None:
        check_positive_int(num_splits, "num_splits")
    plan = plan_span(indptr_h, spans_h, batch=problem.batch, kv_len=problem.kv_len,
                     num_qo_heads=problem.num_qo_heads, num_kv_heads=problem.num_kv_heads,
                     head_dim=problem.head_dim, dtype=problem.dtype, num_splits=num_splits,
                     num_sms=num_sms(device_id), gpu=device_gpu(device_id))
    return problem, Span(plan)


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
    The table and plan of a span list are kept for the next call with the same list (`Span`).
    """
    qa, ka, va = rt.device_array(q, "q"), rt.device_array(k, "k"), rt.device_array(v, "v")
    indptr_h = np.ascontiguousarray(rt.host_ints(span_indptr, "span_indptr"), dtype=np.int64)
    spans_h = np.ascontiguousarray(rt.host_ints(spans, "spans"), dtype=np.int64)
    cacheable = (sm_scale is None or type(sm_scale) in (float, int)) and \
        (num_splits is None or type(num_splits) is int)
    key = (indptr_h.shape, spans_h.shape, indptr_h.tobytes(), spans_h.tobytes(), qa.shape, ka.shape, va.shape,
           qa.dtype, ka.dtype, va.dtype, qa.device_id, sm_scale, num_splits) if cacheable else None
    problem, runner = _one_shot_span(key, qa.device_id, q, k, v, indptr_h, spans_h, sm_scale, num_splits)
    return runner._run((qa, ka, va), sinks=sinks, sm_scale=problem.sm_scale, out=out, lse=lse)
