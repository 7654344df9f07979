"""Tree-shaped sharing on the GPU: every segment read once for all the sequences under it, in two
launches whatever the depth of the tree.

The work list is tested on the CPU (tests/test_tree_work.py: the list executed in NumPy gives
`refattn.tree`'s answer), the kernels on the GPU (tests/test_tree_gpu.py).

Sequence b attends to the concatenation of segments path_segs[path_indptr[b]:path_indptr[b+1]] of
k_segs, v_segs ([total_tokens, num_kv_heads, head_dim], segment s = rows seg_indptr[s] ..
seg_indptr[s+1] - 1). The host turns the tree into a plan (`plan_tree`), in one of two forms:

* "own" (the usual one): the segments that two sequences or more share are cut into chunks, their
  sharers' query rows (all heads of a GQA group) into tiles of 64, and every (segment, chunk,
  tile) is one block of `tree_segments_kernel`, which serves those rows from one read of the
  chunk on the tensor cores (as Hydragen's prefix pass does for a single shared prefix) and writes
  a float32 state per row. Each sequence's own tokens (the segments no other sequence reads) are
  then read by split-KV through windows of up to 16 rows of k_segs (`SplitKV.run_windows`), whose
  blocks merge the sequence's shared states into its output by LSE, as Hydragen's suffix pass
  merges the prefix's. That launch starts on the SMs the segments launch frees: its first wave
  reads its own tokens while the segments launch still runs.
* "merge": every segment by the segments launch, then `merge_parts_kernel` merges each sequence's
  states. For pools of more rows than windows address (2**27).

The segments may lie in a paged cache instead ([num_pages, page_size, num_kv_heads, head_dim], each
segment owning a list of pages as a sequence does in `paged_decode`): the work list then names the
rows of the segments' pages back to back, which the segments launch finds through the page table,
and the own tokens' windows are cut at page boundaries.

The cost model picks the form and the chunk size (`costmodel.tree`), once per tree. float32, which
the tensor-core kernels do not take, runs a third form, "paths": each sequence's whole path as a
page table of one-row pages for split-KV, every segment read once per sequence under it (from L2
where they share it), not once in all.

Three ways to call it:

* `tree(q, k_segs, v_segs, seg_indptr, path_indptr, path_segs)`: one-shot. The tree is checked and
  planned on the host, and the plan kept with its arrays on the GPU for the next call with the same
  tree and shapes (the most recent 64): a repeated call compares bytes, then runs.
* `Tree(plan_tree(seg_indptr, path_indptr, path_segs, ...)).run(q, k_segs, v_segs)`: the plan made
  once, for many calls (the layers of a model); `run` allocates nothing given `out` and `lse`, and
  never synchronises (CUDA-graph capturable).
* `plan_tree_work` for the work list alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from costmodel.tree import FORMS   # the forms the cost model chooses between (float16, bfloat16)
from decode_attention.contract import (check_paged_layout, check_positive_int, check_tree, check_tree_index,
                                       check_tree_pages)

from . import _runtime as rt
from .shared_prefix import (MERGE_THREADS, PREFIX_DTYPES, QUERY_ROWS, THREADS, kv_tile, merge_blocks,
                            pipeline_stages, stage_bytes)
from .split_kv import (WINDOW_LEN_BITS, WINDOW_ROWS, SplitKV, SplitKVPlan, StatePointers, _launch, _length_bucket,
                       device_gpu, num_sms, outputs, planning_gpu)

__all__ = ["TreeWork", "plan_tree_work", "OwnWindows", "own_windows", "TreePlan", "plan_tree", "Tree",
           "choose_work", "choose_chunk_size", "tree", "FORMS", "PATHS", "PathRows", "path_rows", "Segments",
           "contiguous_segments", "paged_segments"]

_LOG2E = 1.4426950408889634
PATHS = "paths"   # float32 (or when asked for): each sequence's whole path by split-KV
# Windows address rows with the bits above WINDOW_LEN_BITS of an int32.
MAX_WINDOW_ROWS = 1 << (31 - WINDOW_LEN_BITS)


class TreeWork(NamedTuple):
    """The segments launch's work list of one tree (host int32 arrays) and where its states go.

    Chunk c of a sharer's segment writes state first_state[entry] + c * state_stride of
    [num_states, num_qo_heads] rows. "merge" form: a sequence's states back to back
    (state_stride 1), sequence b's being part_indptr[b] .. part_indptr[b+1] - 1. "own" form (only
    the shared segments): slot-major, sequence b's j-th state at j * batch + b (state_stride =
    batch), part_indptr counting them; the slots a sequence does not fill stay empty states."""

    chunk_size: int
    work: np.ndarray          # [num_items, 6]: token begin, token end, sharer offset, sharers, first row, chunk
    sharers: np.ndarray       # [nnz]: sequences, grouped by segment (in path order within a segment)
    first_state: np.ndarray   # [nnz]: the state of the sharer's first chunk of that segment
    part_indptr: np.ndarray   # [batch + 1]: sequence b's states (their count: part_indptr[b+1] - part_indptr[b])
    num_states: int
    state_stride: int = 1

    @property
    def num_slots(self) -> int:
        """States per sequence at most."""
        return int(np.diff(self.part_indptr).max(initial=0))


def _sharer_counts(path_segs: np.ndarray, num_segs: int) -> np.ndarray:
    return np.bincount(path_segs, minlength=num_segs).astype(np.int64)


class Segments(NamedTuple):
    """Where a tree's segments lie: segment s is rows start[s] .. start[s] + length[s] - 1 of the
    rows the work list names. Contiguous (page_size 0): rows of k_segs. Paged: row r lies in page
    table[r // page_size] of the cache, at r % page_size (each segment's pages back to back, the
    segment starting on a page: start = its first page's place in the table times page_size)."""

    start: np.ndarray          # int64 [num_segs]
    length: np.ndarray         # int64 [num_segs]
    page_size: int = 0
    table: "np.ndarray | None" = None   # int64 [pages]: the cache's page of each


def contiguous_segments(seg_indptr) -> Segments:
    seg_indptr = np.asarray(seg_indptr, dtype=np.int64)
    return Segments(seg_indptr[:-1], np.diff(seg_indptr))


def paged_segments(seg_kv_indptr, seg_kv_indices, seg_lens, page_size: int) -> Segments:
    """The segments of page tables checked by `contract.check_tree_pages`."""
    indptr = np.asarray(seg_kv_indptr, dtype=np.int64)
    return Segments(indptr[:-1] * page_size, np.asarray(seg_lens, dtype=np.int64), int(page_size),
                    np.asarray(seg_kv_indices, dtype=np.int64))


def plan_tree_work(seg_indptr, path_indptr, path_segs, *, group_size: int, chunk_size: int,
                   shared_only: bool = False, segments: "Segments | None" = None) -> TreeWork:
    """Cut every segment (`shared_only`: every segment two sequences or more read, with the states
    slot-major, see TreeWork) into chunks of `chunk_size` tokens and its sharers' query rows
    (`group_size` per sharer) into tiles of QUERY_ROWS; number each sequence's states in path
    order (segment by segment, chunk by chunk). `segments` (then seg_indptr is ignored): where the
    segments lie, for segments in pages."""
    segs = segments if segments is not None else contiguous_segments(seg_indptr)
    path_indptr = np.asarray(path_indptr, dtype=np.int64)
    path_segs = np.asarray(path_segs, dtype=np.int64)
    num_segs, batch = len(segs.start), len(path_indptr) - 1
    seg_len = segs.length                                                       # [num_segs]
    counts = _sharer_counts(path_segs, num_segs)
    taken = counts >= 2 if shared_only else np.ones(num_segs, dtype=bool)      # segments in the launch
    seg_chunks = np.where(taken, -(-seg_len // chunk_size), 0)                  # [num_segs]
    seq_of_entry = np.repeat(np.arange(batch), np.diff(path_indptr))           # [nnz]
    entry_states = seg_chunks[path_segs]                                        # [nnz]
    states_per_seq = np.zeros(batch, dtype=np.int64)
    np.add.at(states_per_seq, seq_of_entry, entry_states)
    part_indptr = np.concatenate([[0], np.cumsum(states_per_seq)])
    entry_first = np.cumsum(entry_states) - entry_states                        # [nnz]: path order
    if shared_only:   # slot of the entry's first state within its sequence, then slot-major
        entry_first = (entry_first - part_indptr[seq_of_entry]) * batch + seq_of_entry
        stride, num_states = batch, int(states_per_seq.max(initial=0)) * batch
    else:
        stride, num_states = 1, int(part_indptr[-1])
    order = np.argsort(path_segs, kind="stable")                                # group by segment
    sharers, first_state = seq_of_entry[order], entry_first[order]
    sharer_indptr = np.concatenate([[0], np.cumsum(counts)])
    items = []
    for s in np.flatnonzero(taken & (counts > 0) & (seg_len > 0)):
        n = int(counts[s])
        for c in range(int(seg_chunks[s])):
            begin = int(segs.start[s]) + c * chunk_size
            end = min(int(segs.start[s] + seg_len[s]), begin + chunk_size)
            for first_row in range(0, n * group_size, QUERY_ROWS):
                items.append((begin, end, int(sharer_indptr[s]), n, first_row, c))
    work = np.array(items, dtype=np.int64).reshape(-1, 6)
    for name, a in (("work", work), ("states", np.array([num_states, stride]))):
        if a.size and a.max() >= 2**31:
            raise ValueError(f"the tree is too large for int32 work lists ({name} reaches {int(a.max())})")
    return TreeWork(chunk_size, work.astype(np.int32), sharers.astype(np.int32),
                    first_state.astype(np.int32), part_indptr.astype(np.int32), num_states, stride)


class OwnWindows(NamedTuple):
    """Each sequence's own tokens (the segments of its path no other sequence reads) as windows
    over k_segs seen as rows: each such segment cut into runs of WINDOW_ROWS rows, the last one
    shorter where its length is not a multiple."""

    kv_indptr: np.ndarray   # int32 [batch + 1]
    windows: np.ndarray     # int32 [num_windows]: (first row << WINDOW_LEN_BITS) | (rows - 1)
    rows: np.ndarray        # int64 [batch]: rows of each sequence's windows (WINDOW_ROWS per window)


def _runs(start: np.ndarray, length: np.ndarray, size: int):
    """Each interval [start, start + length) cut into runs of `size` (its last one shorter):
    (interval of each run, first row, rows)."""
    count = -(-length // size)
    total = int(count.sum())
    run_start = np.repeat(np.cumsum(count) - count, count)
    i = np.arange(total, dtype=np.int64) - run_start
    owner = np.repeat(np.arange(len(start), dtype=np.int64), count)
    return owner, start[owner] + i * size, np.minimum(size, length[owner] - i * size)


def own_windows(seg_indptr, path_indptr, path_segs, *, segments: "Segments | None" = None) -> OwnWindows:
    """The windows of every sequence's own segments, in path order (index arrays as checked by
    `check_tree_index`; `segments` as for `plan_tree_work`). Segments in pages: each page's rows cut
    into windows (a window never crosses a page), which address the cache seen as rows."""
    segs = segments if segments is not None else contiguous_segments(seg_indptr)
    path_indptr = np.asarray(path_indptr, dtype=np.int64)
    path_segs = np.asarray(path_segs, dtype=np.int64)
    num_segs, batch = len(segs.start), len(path_indptr) - 1
    own = _sharer_counts(path_segs, num_segs) == 1
    seq_of_entry = np.repeat(np.arange(batch, dtype=np.int64), np.diff(path_indptr))
    mine = own[path_segs]
    chosen, seqs = path_segs[mine], seq_of_entry[mine]
    start, length = segs.start[chosen], segs.length[chosen]
    if segs.page_size:   # first the segments' pages (a segment starts on a page)
        owner, start, length = _runs(start, length, segs.page_size)
        seqs = seqs[owner]
    owner, first, rows = _runs(start, length, WINDOW_ROWS)
    seqs = seqs[owner]
    if segs.page_size:   # where those rows lie in the cache
        first = segs.table[first // segs.page_size] * segs.page_size + first % segs.page_size
    if first.size and first.max() + WINDOW_ROWS > MAX_WINDOW_ROWS:
        raise ValueError(f"windows address at most {MAX_WINDOW_ROWS} rows, the segments reach row {int(first.max())}")
    windows = (first << WINDOW_LEN_BITS) | (rows - 1)
    per_seq = np.bincount(seqs, minlength=batch).astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(per_seq)])
    return OwnWindows(indptr.astype(np.int32), windows.astype(np.int32), per_seq * WINDOW_ROWS)


class PathRows(NamedTuple):
    """Each sequence's whole path as a page table of one-row pages over k_segs (or the caches) seen
    as rows: the "paths" form, which reads every segment once for each sequence under it."""

    kv_indptr: np.ndarray          # int32 [batch + 1]
    kv_indices: np.ndarray         # int32 [nnz]: the rows, path order
    kv_last_page_len: np.ndarray   # int32 [batch]: 1, or 0 for an empty path


def path_rows(seg_indptr, path_indptr, path_segs, *, segments: "Segments | None" = None) -> PathRows:
    """The rows of each sequence's path, segment by segment (`segments` as for `plan_tree_work`)."""
    segs = segments if segments is not None else contiguous_segments(seg_indptr)
    path_indptr = np.asarray(path_indptr, dtype=np.int64)
    path_segs = np.asarray(path_segs, dtype=np.int64)
    batch = len(path_indptr) - 1
    seq_of_entry = np.repeat(np.arange(batch, dtype=np.int64), np.diff(path_indptr))
    owner, first, count = _runs(segs.start[path_segs], segs.length[path_segs], 1)
    rows = first
    if segs.page_size:
        rows = segs.table[first // segs.page_size] * segs.page_size + first % segs.page_size
    if rows.size and rows.max() >= 2**31:
        raise ValueError(f"the segments reach row {int(rows.max())}, more than an int32 page table addresses")
    per_seq = np.bincount(seq_of_entry[owner], minlength=batch).astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(per_seq)])
    return PathRows(indptr.astype(np.int32), rows.astype(np.int32), (per_seq > 0).astype(np.int32))


def work_items(work: TreeWork, group_size: int) -> list:
    """The work list as the cost model's WorkItems (tokens, query rows, whether a later row tile)."""
    from costmodel.segments import WorkItem  # noqa: PLC0415

    return [WorkItem(int(end - begin), min(QUERY_ROWS, int(n) * group_size - int(first_row)), int(first_row) > 0)
            for begin, end, _, n, first_row, _ in work.work]


@dataclass(frozen=True, eq=False)
class TreePlan:
    """One tree's launches for one shape: the segments launch's work list (`work`), and in the
    "own" form the windows of each sequence's own tokens with their split-KV plan (`own`,
    `split`; None in the "merge" form). `page_size` 0: segments contiguous in k_segs
    [total_tokens, ...]; otherwise in a paged cache [num_pages, page_size, ...] of at least
    `total_tokens` // page_size pages (the segments' page table in `segments`). See the module's
    docstring."""

    batch: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    total_tokens: int    # contiguous: rows of k_segs; paged: rows of the pages the tables name (at least)
    work: TreeWork
    own: "OwnWindows | None"
    split: "SplitKVPlan | None"
    predicted_s: float   # the cost model's time of these launches (on the GPU planned for)
    segments: "Segments | None" = None
    paths: "PathRows | None" = None   # the "paths" form: `split` reads these (work empty, own None)

    @property
    def form(self) -> str:
        return PATHS if self.paths is not None else "own" if self.own is not None else "merge"

    @property
    def chunk_size(self) -> int:
        return self.work.chunk_size

    @property
    def page_size(self) -> int:
        return self.segments.page_size if self.segments is not None else 0


def _predicted(work: TreeWork, own: "OwnWindows | None", split, *, group_size, num_kv_heads, head_dim, dtype,
               spec) -> float:
    from costmodel.tree import predict_work  # noqa: PLC0415

    # Segments in pages are planned on these contiguous costs: the model's page lookups (which
    # follow the tokens read) put the benchmark tree's chunks of 512 and 1024 within 0.1%.
    batch = len(work.part_indptr) - 1
    parts = work.num_slots if own is not None else max(1, work.num_slots)
    return predict_work(work_items(work, group_size), batch=max(batch, 1), num_qo_heads=group_size * num_kv_heads,
                        num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, parts_per_sequence=parts,
                        gpu=spec, own=None if own is None else (split, [int(r) for r in own.rows])).time_s


def _own_plan(own: OwnWindows, batch, num_qo_heads, num_kv_heads, head_dim, dtype, spec, sms) -> SplitKVPlan:
    from costmodel.tree import own_tokens_plan  # noqa: PLC0415

    longest = int(own.rows.max(initial=0))
    return own_tokens_plan(batch, num_qo_heads, num_kv_heads, head_dim, _length_bucket(max(longest, 1)),
                           dtype=dtype, gpu=spec, num_sms=sms)


def plan_tree(seg_indptr, path_indptr, path_segs, *, num_qo_heads: int, num_kv_heads: int, head_dim: int,
              dtype: str = "float16", chunk_size: int | None = None, form: str | None = None,
              num_sms: int | None = None, gpu=None, seg_kv_indptr=None, seg_kv_indices=None,
              seg_kv_last_page_len=None, page_size: int | None = None) -> TreePlan:
    """The plan of a tree (index arrays on the host, checked as `refattn.tree` checks them) for
    q [batch, num_qo_heads, head_dim] and segments of `dtype` (float16, bfloat16). `form` ("own",
    "merge") and `chunk_size` (tokens of a shared segment per block, a multiple of the pipeline
    tile) None: the ones the cost model predicts fastest. Made on the host (no GPU needed); the
    plan is for `gpu` and takes its SM count (`num_sms`, if also given, must agree; neither:
    the GPU this process runs on, `gpukernels.split_kv.planning_gpu`).

    Segments in a paged cache: seg_indptr None, and segment s owns pages
    seg_kv_indices[seg_kv_indptr[s]:seg_kv_indptr[s+1]] of pages of `page_size` tokens, the last
    one filled to seg_kv_last_page_len[s] (as a sequence owns its pages in `paged_decode`)."""
    for name, value in (("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        check_positive_int(value, name)
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if not isinstance(dtype, str) or dtype not in rt.KERNEL_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(rt.KERNEL_DTYPES)} for the tree kernels, got {dtype!r}")
    if head_dim not in rt.HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {rt.HEAD_DIMS} for the GPU kernels, got {head_dim}")
    _check_form(form, dtype)
    ind_h = rt.host_ints(path_indptr, "path_indptr")
    segs_h = rt.host_ints(path_segs, "path_segs")
    if ind_h.ndim != 1 or ind_h.size < 1:
        raise ValueError(f"path_indptr must be [batch + 1] with at least one entry, got {ind_h.shape}")
    segments = _checked_segments(seg_indptr, (seg_kv_indptr, seg_kv_indices, seg_kv_last_page_len), page_size,
                                 num_pages=None)
    _check_paths(segments, ind_h, segs_h)
    return _plan(segments, ind_h, segs_h, num_qo_heads, num_kv_heads, head_dim, dtype, chunk_size, form, num_sms,
                 planning_gpu(gpu, num_sms))


_PAGE_TABLE_NAMES = ("seg_kv_indptr", "seg_kv_indices", "seg_kv_last_page_len")


def _check_form(form, dtype: str) -> None:
    allowed = (*FORMS, PATHS) if dtype in PREFIX_DTYPES else (PATHS,)
    if form is not None and (not isinstance(form, str) or form not in allowed):
        raise ValueError(f"form must be one of {', '.join(map(repr, allowed))} or None for {dtype}, got {form!r}")


def _checked_segments(seg_indptr, tables, page_size, *, num_pages) -> Segments:
    """The Segments of seg_indptr (contiguous) or of the page tables (with page_size), checked."""
    given = [name for name, t in zip(_PAGE_TABLE_NAMES, tables) if t is not None]
    if not given:
        if page_size is not None:
            raise ValueError("page_size is for segments in pages: give seg_kv_indptr, seg_kv_indices and "
                             "seg_kv_last_page_len too")
        if seg_indptr is None:
            raise ValueError("seg_indptr must be given for contiguous segments (or the segments' page tables)")
        seg_h = rt.host_ints(seg_indptr, "seg_indptr")
        if seg_h.ndim != 1 or seg_h.size < 1:
            raise ValueError(f"seg_indptr must be [num_segs + 1] with at least one entry, got {seg_h.shape}")
        return contiguous_segments(seg_h)
    if len(given) < 3:
        missing = [name for name in _PAGE_TABLE_NAMES if name not in given]
        raise ValueError(f"segments in pages take {', '.join(_PAGE_TABLE_NAMES)} together; "
                         f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    if seg_indptr is not None:
        raise ValueError("seg_indptr must be None for segments in pages: their lengths come from seg_kv_indptr "
                         "and seg_kv_last_page_len")
    if page_size is None:
        raise ValueError("page_size must be given with the segments' page tables")
    indptr, indices, seg_lens = check_tree_pages(*(rt.host_ints(t, name) for t, name in zip(tables, _PAGE_TABLE_NAMES)),
                                                 num_pages=num_pages, page_size=page_size)
    return paged_segments(indptr, indices, seg_lens, int(page_size))


def _check_chunk(chunk_size, tile: int) -> None:
    """A chunk size given: an int, a positive multiple of the pipeline tile."""
    if chunk_size is None:
        return
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < tile or chunk_size % tile:
        raise ValueError(f"chunk_size must be a positive multiple of {tile}, got {chunk_size}")


def _check_paths(segments: Segments, ind_h, segs_h) -> None:
    """The paths, checked against the segments (as `check_tree_index` checks them)."""
    seg_indptr = np.concatenate([[0], np.cumsum(segments.length)])
    check_tree_index(seg_indptr, ind_h, segs_h, ind_h.size - 1, int(seg_indptr[-1]))


def _plan(segments: Segments, ind_h, segs_h, num_qo_heads, num_kv_heads, head_dim, dtype, chunk_size, form,
          num_sms, gpu):
    """plan_tree after its checks."""
    from costmodel.gpus import plan_gpu  # noqa: PLC0415
    from costmodel.split_kv import DEFAULT_NUM_SMS  # noqa: PLC0415
    from costmodel.tree import chunk_candidates_of_tree  # noqa: PLC0415

    spec, sms = plan_gpu(gpu, num_sms, default_num_sms=DEFAULT_NUM_SMS)
    tile = kv_tile(head_dim)
    _check_chunk(chunk_size, tile)
    batch = ind_h.size - 1
    if segments.page_size:   # the pages the tables name, as rows
        total = (int(segments.table.max(initial=-1)) + 1) * segments.page_size
    else:
        total = int(segments.start[-1] + segments.length[-1]) if len(segments.start) else 0
    group_size = num_qo_heads // num_kv_heads
    if form == PATHS or dtype not in PREFIX_DTYPES:
        return _paths_plan(segments, ind_h, segs_h, num_qo_heads, num_kv_heads, head_dim, dtype, total, spec, sms)
    forms = [form] if form is not None else [f for f in FORMS if f == "merge" or total <= MAX_WINDOW_ROWS]
    chunks = [int(chunk_size)] if chunk_size is not None else chunk_candidates_of_tree(tile)
    best = None
    for f in forms:
        own = own_windows(None, ind_h, segs_h, segments=segments) if f == "own" else None
        split = _own_plan(own, batch, num_qo_heads, num_kv_heads, head_dim, dtype, spec, sms) if own else None
        for c in chunks:   # longest first: the longer chunk on a tie
            work = plan_tree_work(None, ind_h, segs_h, group_size=group_size, chunk_size=c,
                                  shared_only=own is not None, segments=segments)
            t = _predicted(work, own, split, group_size=group_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
                           dtype=dtype, spec=spec)
            if best is None or t < best.predicted_s:
                best = TreePlan(batch, num_qo_heads, num_kv_heads, head_dim, dtype, total, work, own, split, t,
                                segments)
    return best


def _paths_plan(segments, ind_h, segs_h, num_qo_heads, num_kv_heads, head_dim, dtype, total, spec, sms) -> TreePlan:
    """The "paths" form: each sequence's path rows by split-KV over pages of one row."""
    from costmodel.split_kv import plan_split_kv  # noqa: PLC0415
    from costmodel.split_kv import predict as predict_split_kv  # noqa: PLC0415

    paths = path_rows(None, ind_h, segs_h, segments=segments)
    lens = np.diff(paths.kv_indptr).astype(np.int64)
    batch = ind_h.size - 1
    split = plan_split_kv(batch, num_qo_heads, num_kv_heads, head_dim, _length_bucket(max(int(lens.max(initial=0)), 1)),
                          dtype=dtype, num_sms=sms, page_size=1, gpu=spec)
    predicted = predict_split_kv(split, kv_lens=lens, gpu=spec).time_s if batch else 0.0
    empty = TreeWork(0, np.zeros((0, 6), np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32),
                     np.zeros(batch + 1, np.int32), 0)
    return TreePlan(batch, num_qo_heads, num_kv_heads, head_dim, dtype, total, empty, None, split, predicted,
                    segments, paths)


def choose_work(seg_indptr, path_indptr, path_segs, *, group_size: int, num_kv_heads: int,
                sms: int, tile: int, head_dim: int = 128, dtype: str = "float16", gpu=None) -> TreeWork:
    """The work list `plan_tree` chooses for this tree (a GPUSpec or name `gpu`, the H100's when
    None, with `sms` SMs; `tile` must be the pipeline tile of `head_dim`)."""
    if tile != kv_tile(head_dim):
        raise ValueError(f"tile must be {kv_tile(head_dim)} at head_dim {head_dim}, got {tile}")
    from costmodel.gpus import get_gpu  # noqa: PLC0415

    if gpu is not None and get_gpu(gpu).num_sms != sms:
        gpu = None   # the SM count decides (as the one-shot call does for a GPU the model does not know)
    return plan_tree(seg_indptr, path_indptr, path_segs, num_qo_heads=group_size * num_kv_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, num_sms=sms, gpu=gpu).work


def choose_chunk_size(seg_indptr, path_indptr, path_segs, **kwargs) -> int:
    """The chunk size `choose_work` picks (same keyword arguments)."""
    return choose_work(seg_indptr, path_indptr, path_segs, **kwargs).chunk_size


def segments_name_expression(dtype: str, head_dim: int, paged: bool) -> str:
    return (f"decode_attention::tree_segments_kernel<{rt.C_TYPES[dtype]}, {head_dim}, {pipeline_stages(head_dim)}, "
            f"{'true' if paged else 'false'}>")


@functools.lru_cache(maxsize=None)
def _segments_kernel(dtype: str, head_dim: int, paged: bool = False) -> rt.Kernel:
    return rt.Kernel("shared_prefix", segments_name_expression(dtype, head_dim, paged), SEGMENTS_SIGNATURE,
                     shared_mem=pipeline_stages(head_dim) * stage_bytes(head_dim))


@functools.lru_cache(maxsize=None)
def _merge_kernel(dtype: str) -> rt.Kernel:
    return rt.Kernel("shared_prefix", f"decode_attention::merge_parts_kernel<{rt.C_TYPES[dtype]}>",
                     MERGE_PARTS_SIGNATURE)


def all_name_expressions() -> list[str]:
    """Every instantiation the launcher can ask for (also compiled by the CI compile check)."""
    return ([segments_name_expression(dt, d, paged) for dt in PREFIX_DTYPES for d in rt.HEAD_DIMS
             for paged in (False, True)]
            + [f"decode_attention::merge_parts_kernel<{rt.C_TYPES[dt]}>" for dt in PREFIX_DTYPES])


# q, k_segs, v_segs, work, sharers, first_state, part_out, part_lse; num_qo_heads, num_kv_heads,
# state_stride; scale_log2; page_table, page_size (segments in pages; null and 0 otherwise).
SEGMENTS_SIGNATURE = "pppppppp" + "iii" + "f" + "pi"
# part_out, part_lse, part_indptr, out, lse; rows, num_qo_heads, head_dim.
MERGE_PARTS_SIGNATURE = "ppppp" + "qii"


class Tree:
    """A tree plan bound to its arrays on the GPU (the work list, windows and page table, copied
    once per array kind and device; the states, one set per stream) and, in the "own" form, its
    split-KV runner; `run` many times without host synchronisation, allocating nothing when `out`
    and `lse` are given (CUDA-graph capturable).

    >>> plan = plan_tree(seg_indptr, path_indptr, path_segs, num_qo_heads=32,  # doctest: +SKIP
    ...                  num_kv_heads=32, head_dim=128, gpu="H200")
    >>> t = Tree(plan)                                                     # doctest: +SKIP
    >>> out, lse = t.run(q, k_segs, v_segs)                                # doctest: +SKIP
    """

    def __init__(self, plan: TreePlan):
        if not isinstance(plan, TreePlan):
            raise TypeError(f"plan must be a TreePlan, got {type(plan).__name__}")
        self.plan = plan
        self._own = SplitKV(plan.split) if plan.split is not None else None
        self._tables: dict = {}   # (kind, device) -> the index arrays on the GPU
        self._states: dict = {}   # (kind, device, stream) -> part_out, part_lse

    def _device_tables(self, kind: str, device_id: int) -> dict:
        key = (kind, device_id)
        tables = self._tables.get(key)
        if tables is None:
            w = self.plan.work
            dev = lambda a, name: rt.device_int32(a if a.size else np.zeros(1, np.int32), kind, device_id,  # noqa: E731
                                                  name)
            tables = {name: dev(getattr(w, name), name) for name in ("work", "sharers", "first_state", "part_indptr")}
            paths = self.plan.paths
            if paths is not None:
                arrays = (dev(paths.kv_indptr, "kv_indptr"), dev(paths.kv_indices, "kv_indices")[: len(paths.kv_indices)],
                          dev(paths.kv_last_page_len, "kv_last_page_len"))
                tables["paths"] = tuple(rt.device_array(a, name) for a, name in zip(
                    arrays, ("kv_indptr", "kv_indices", "kv_last_page_len")))
            if self.plan.page_size:
                tables["pages"] = dev(self.plan.segments.table, "seg_kv_indices")
            own = self.plan.own
            if own is not None:
                last = np.where(np.diff(own.kv_indptr) > 0, WINDOW_ROWS, 0).astype(np.int32)
                arrays = (dev(own.kv_indptr, "kv_indptr"), dev(own.windows, "windows")[: len(own.windows)],
                          dev(last, "kv_last_page_len"))
                # viewed once: each run passes the views (pointer, shape, dtype) instead of the arrays
                tables["own"] = tuple(rt.device_array(a, name) for a, name in zip(
                    arrays, ("kv_indptr", "kv_indices", "kv_last_page_len")))
            self._tables[key] = tables
        return tables

    def _states_for(self, kind: str, device_id: int, stream_ptr: int):
        key = (kind, device_id, stream_ptr)
        states = self._states.get(key)
        if states is None:
            p = self.plan
            n = max(p.work.num_states, 1)
            part_out = rt.empty(kind, (n, p.num_qo_heads, p.head_dim), "float32", device_id, zero=True)
            part_lse = rt.empty(kind, (n, p.num_qo_heads), "float32", device_id)
            # The slots no chunk writes (a sequence with fewer shared states) stay empty states.
            part_lse.fill_(-np.inf) if kind == "torch" else part_lse.fill(-np.inf)
            states = self._states[key] = (part_out, part_lse)
        return states

    def run(self, q, k_segs, v_segs, *, sm_scale=None, out=None, lse=None):
        """q [batch, num_qo_heads, head_dim]; k_segs, v_segs [total_tokens, num_kv_heads, head_dim]
        (segments in pages: the caches [num_pages, page_size, num_kv_heads, head_dim], holding every
        page the plan's tables name), contiguous, of the planned dtype, on q's GPU. Returns (out, lse)
        like `split_kv`; a sequence with an empty path gets out = 0, lse = -inf."""
        p = self.plan
        qa, ka, va = (rt.device_array(x, name) for x, name in ((q, "q"), (k_segs, "k_segs"), (v_segs, "v_segs")))
        if qa.shape != (p.batch, p.num_qo_heads, p.head_dim):
            raise ValueError(f"q must be [batch, num_qo_heads, head_dim] = {[p.batch, p.num_qo_heads, p.head_dim]} "
                             f"as planned, got {qa.shape}")
        ps = p.page_size
        for name, a in (("k_segs", ka), ("v_segs", va)):
            if not ps and a.shape != (p.total_tokens, p.num_kv_heads, p.head_dim):
                raise ValueError(f"{name} must be [total_tokens, num_kv_heads, head_dim] = "
                                 f"{[p.total_tokens, p.num_kv_heads, p.head_dim]} as planned, got {a.shape}")
            if ps and (len(a.shape) != 4 or a.shape[1:] != (ps, p.num_kv_heads, p.head_dim)
                       or a.shape[0] * ps < p.total_tokens):
                raise ValueError(f"{name} must be [num_pages, page_size, num_kv_heads, head_dim] = "
                                 f"[>= {p.total_tokens // ps}, {ps}, {p.num_kv_heads}, {p.head_dim}] as planned (its "
                                 f"pages holding every page of the tables), got {a.shape}")
        for name, a in (("q", qa), ("k_segs", ka), ("v_segs", va)):
            if a.dtype != p.dtype:
                raise TypeError(f"{name} must be {p.dtype} as planned, got {a.dtype}")
            rt.require_rows(a, name)
        if ka.shape != va.shape:
            raise ValueError(f"v_segs must have the shape of k_segs {ka.shape}, got {va.shape}")
        rt.require_same_device({"q": qa, "k_segs": ka, "v_segs": va})
        if sm_scale is None:
            sm_scale = 1.0 / float(np.sqrt(p.head_dim))
        if not (isinstance(sm_scale, (int, float, np.floating, np.integer)) and np.isfinite(sm_scale)):
            raise ValueError(f"sm_scale must be a finite real number, got {sm_scale!r}")
        return self._run((qa, ka, va), float(sm_scale), out, lse)

    def _run(self, views, sm_scale: float, out, lse):
        """`run` after its checks, on the views of q, k_segs, v_segs."""
        p = self.plan
        qa, ka, va = views
        kind, device_id = qa.kind, qa.device_id
        out, lse, out_ptr, lse_ptr = outputs(out, lse, kind, (p.batch, p.num_qo_heads, p.head_dim), p.dtype, device_id)
        if p.batch == 0:
            return out, lse
        tables = self._device_tables(kind, device_id)
        ps = p.page_size
        if p.paths is not None:   # every path's rows as pages of one row of k_segs (or the caches) seen as rows
            rows = ((ka.shape[0] * ps if ps else ka.shape[0]), 1, p.num_kv_heads, p.head_dim)
            return _launch(p.split, qa.obj, ka.obj, va.obj, kv_lens=None, paged=tables["paths"], sm_scale=sm_scale,
                           out=out, lse=lse, workspace=self._own._workspace_for,
                           views=(qa, ka._replace(shape=rows), va._replace(shape=rows)))
        stream_ptr = rt.current_stream_ptr(kind, device_id)
        part_out, part_lse = self._states_for(kind, device_id, stream_ptr)
        w = p.work
        if len(w.work):
            _segments_kernel(p.dtype, p.head_dim, bool(ps))(
                (len(w.work), p.num_kv_heads), (THREADS,),
                (qa.ptr, ka.ptr, va.ptr, rt.address(tables["work"]), rt.address(tables["sharers"]),
                 rt.address(tables["first_state"]), rt.address(part_out), rt.address(part_lse), p.num_qo_heads,
                 p.num_kv_heads, w.state_stride, sm_scale * _LOG2E, rt.address(tables.get("pages")), ps),
                stream_ptr=stream_ptr, device_id=device_id)
        if p.own is None:
            _merge_kernel(p.dtype)(
                (merge_blocks(p.batch * p.num_qo_heads, p.head_dim),), (MERGE_THREADS,),
                (rt.address(part_out), rt.address(part_lse), rt.address(tables["part_indptr"]), out_ptr, lse_ptr,
                 p.batch * p.num_qo_heads, p.num_qo_heads, p.head_dim),
                stream_ptr=stream_ptr, device_id=device_id)
            return out, lse
        # The own tokens, merging the shared states (launched dependent on the segments launch
        # when there is one: its first wave reads its windows while that launch still runs).
        slots = w.num_slots
        states = StatePointers(rt.address(part_out), rt.address(part_lse), slots) if slots else None
        # k_segs (or the caches) seen as rows: the same memory
        rows = ((ka.shape[0] * ps if ps else ka.shape[0]), p.num_kv_heads, p.head_dim)
        return _launch(p.split, qa.obj, ka.obj, va.obj, kv_lens=None, paged=tables["own"], sm_scale=sm_scale,
                       out=out, lse=lse, workspace=self._own._workspace_for,
                       views=(qa, ka._replace(shape=rows), va._replace(shape=rows)), windows=True,
                       states=states, states_overlap=bool(len(w.work)))


# One-shot calls by everything their checks read: the bytes of the index arrays, the shapes and
# dtypes of q, k_segs, v_segs, sm_scale, chunk_size and the device. A call that matches one of the
# most recent ONE_SHOT_CACHE_SIZE skips the checks it already passed and reuses that tree's runner.
ONE_SHOT_CACHE_SIZE = 64
_ONE_SHOT = rt.RecentCache(ONE_SHOT_CACHE_SIZE)


def tree(q, k_segs, v_segs, seg_indptr, path_indptr, path_segs, *, sm_scale=None, out=None, lse=None,
         chunk_size=None, seg_kv_indptr=None, seg_kv_indices=None, seg_kv_last_page_len=None):
    """Sequence b attends to the concatenation of its path's segments (see `refattn.tree`).

    q [batch, num_qo_heads, head_dim]; k_segs, v_segs [total_tokens, num_kv_heads, head_dim];
    seg_indptr [num_segs + 1], path_indptr [batch + 1], path_segs [nnz] on the host (read there
    to build the plan; arrays on the GPU are copied to the host first, which synchronises).
    Segments in a paged cache: k_segs, v_segs the caches [num_pages, page_size, num_kv_heads,
    head_dim], seg_indptr None, and segment s owns pages seg_kv_indices[seg_kv_indptr[s]:
    seg_kv_indptr[s+1]], the last one filled to seg_kv_last_page_len[s] (as `paged_decode`'s
    sequences own theirs). float16 and bfloat16 (float32: the "paths" form); head_dim 64, 128,
    256. `chunk_size`: tokens of a
    shared segment per block (None: the cost model's choice). Returns (out, lse) like `split_kv`.
    The plan of a tree is kept for the next call with the same tree and shapes (`Tree` runs one
    without the checks).
    """
    qa, ka, va = rt.device_array(q, "q"), rt.device_array(k_segs, "k_segs"), rt.device_array(v_segs, "v_segs")
    tables = (seg_kv_indptr, seg_kv_indices, seg_kv_last_page_len)
    index = [None if x is None else np.ascontiguousarray(rt.host_ints(x, name), dtype=np.int64) for x, name in (
        (seg_indptr, "seg_indptr"), (path_indptr, "path_indptr"), (path_segs, "path_segs"),
        *zip(tables, _PAGE_TABLE_NAMES))]
    cacheable = (sm_scale is None or type(sm_scale) in (float, int)) and \
        (chunk_size is None or type(chunk_size) is int)
    key = (*(None if a is None else (a.shape, a.tobytes()) for a in index), qa.shape, ka.shape, va.shape,
           qa.dtype, ka.dtype, va.dtype, qa.device_id, sm_scale, chunk_size) if cacheable else None
    problem, runner = _ONE_SHOT.get_or_make(key, lambda: _one_shot_plan(q, k_segs, v_segs, qa, index, sm_scale,
                                                                         chunk_size))
    for name, a in (("q", qa), ("k_segs", ka), ("v_segs", va)):
        rt.require_rows(a, name)
    rt.require_same_device({"q": qa, "k_segs": ka, "v_segs": va})
    if runner is None:   # no sequences
        out, lse, _, _ = outputs(out, lse, qa.kind, (0, problem.num_qo_heads, problem.head_dim), problem.dtype,
                                 qa.device_id)
        return out, lse
    return runner._run((qa, ka, va), problem.sm_scale, out, lse)


def _one_shot_plan(q, k_segs, v_segs, qa, index, sm_scale, chunk_size):
    """The (problem, Tree) of a one-shot call (Tree None without sequences), checked and planned."""
    seg_h, ind_h, segs_h, *tables = index
    if any(t is not None for t in tables):   # segments in pages
        problem = check_paged_layout(q, k_segs, v_segs, sm_scale=sm_scale, dtypes=rt.KERNEL_DTYPES)
        if ind_h is None or segs_h is None:
            raise ValueError("path_indptr and path_segs must be given")
        if ind_h.ndim != 1 or ind_h.size != problem.batch + 1:
            raise ValueError(f"path_indptr must be [batch + 1] = [{problem.batch + 1}], got {ind_h.shape}")
        segments = _checked_segments(seg_h, tables, problem.page_size, num_pages=problem.num_pages)
        _check_paths(segments, ind_h, segs_h)
    else:
        problem = check_tree(q, k_segs, v_segs, seg_h, ind_h, segs_h, sm_scale=sm_scale, dtypes=rt.KERNEL_DTYPES)
        segments = contiguous_segments(seg_h)
    if problem.head_dim not in rt.HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {rt.HEAD_DIMS} for the GPU kernels, got {problem.head_dim}")
    _check_chunk(chunk_size, kv_tile(problem.head_dim))
    if problem.batch == 0:
        return problem, None
    device_id = qa.device_id
    gpu = device_gpu(device_id)
    plan = _plan(segments, ind_h, segs_h, problem.num_qo_heads, problem.num_kv_heads, problem.head_dim,
                 problem.dtype, chunk_size, None, None if gpu is not None else num_sms(device_id), gpu)
    return problem, Tree(plan)
