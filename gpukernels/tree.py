"""Tree-shaped sharing on the GPU: every segment read once for all the sequences under it, all
segments in one launch.

The work list is tested on the CPU (tests/test_tree_work.py: the list executed in NumPy gives
`refattn.tree`'s answer), the kernels on the GPU (tests/test_tree_gpu.py).

Sequence b attends to the concatenation of segments path_segs[path_indptr[b]:path_indptr[b+1]] of
k_segs, v_segs ([total_tokens, num_kv_heads, head_dim], segment s = rows seg_indptr[s] ..
seg_indptr[s+1] - 1). The host turns the tree into a work list (`plan_tree_work`): each segment is
cut into chunks, its sharers' query rows (all heads of a GQA group) into tiles of 64, and every
(segment, chunk, tile) is one block of `tree_segments_kernel`, which serves those rows from one
read of the chunk on the tensor cores (as Hydragen's prefix pass does for a single shared prefix)
and writes a float32 state per row. `merge_parts_kernel` then merges each sequence's states (its
segments' chunks) by LSE. Two launches, whatever the depth of the tree.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from decode_attention.contract import check_tree

from . import _runtime as rt
from .shared_prefix import (MERGE_THREADS, PREFIX_DTYPES, QUERY_ROWS, THREADS, kv_tile, merge_blocks,
                            pipeline_stages, stage_bytes)
from .split_kv import device_gpu, num_sms, outputs

__all__ = ["TreeWork", "plan_tree_work", "choose_work", "choose_chunk_size", "tree"]

_LOG2E = 1.4426950408889634


class TreeWork(NamedTuple):
    """The work list of one tree (host int32 arrays)."""

    chunk_size: int
    work: np.ndarray          # [num_items, 6]: token begin, token end, sharer offset, sharers, first row, chunk
    sharers: np.ndarray       # [nnz]: sequences, grouped by segment (in path order within a segment)
    first_state: np.ndarray   # [nnz]: the state of the sharer's first chunk of that segment
    part_indptr: np.ndarray   # [batch + 1]: sequence b's states
    num_states: int


def plan_tree_work(seg_indptr, path_indptr, path_segs, *, group_size: int, chunk_size: int) -> TreeWork:
    """Cut every segment into chunks of `chunk_size` tokens and its sharers' query rows
    (`group_size` per sharer) into tiles of QUERY_ROWS; number each sequence's states in path
    order (segment by segment, chunk by chunk)."""
    seg_indptr = np.asarray(seg_indptr, dtype=np.int64)
    path_indptr = np.asarray(path_indptr, dtype=np.int64)
    path_segs = np.asarray(path_segs, dtype=np.int64)
    num_segs, batch = len(seg_indptr) - 1, len(path_indptr) - 1
    seg_len = np.diff(seg_indptr)                                               # [num_segs]
    seg_chunks = -(-seg_len // chunk_size)                                      # [num_segs]
    seq_of_entry = np.repeat(np.arange(batch), np.diff(path_indptr))           # [nnz]
    entry_states = seg_chunks[path_segs]                                        # [nnz]
    entry_first = np.cumsum(entry_states) - entry_states                        # [nnz]: path order
    states_per_seq = np.zeros(batch, dtype=np.int64)
    np.add.at(states_per_seq, seq_of_entry, entry_states)
    part_indptr = np.concatenate([[0], np.cumsum(states_per_seq)])
    order = np.argsort(path_segs, kind="stable")                                # group by segment
    sharers, first_state = seq_of_entry[order], entry_first[order]
    sharer_indptr = np.concatenate([[0], np.cumsum(np.bincount(path_segs, minlength=num_segs))])
    items = []
    for s in range(num_segs):
        n = int(sharer_indptr[s + 1] - sharer_indptr[s])
        if n == 0 or seg_len[s] == 0:
            continue
        for c in range(int(seg_chunks[s])):
            begin = int(seg_indptr[s]) + c * chunk_size
            end = min(int(seg_indptr[s + 1]), begin + chunk_size)
            for first_row in range(0, n * group_size, QUERY_ROWS):
                items.append((begin, end, int(sharer_indptr[s]), n, first_row, c))
    work = np.array(items, dtype=np.int64).reshape(-1, 6)
    for name, a in (("work", work), ("part_indptr", part_indptr)):
        if a.size and a.max() >= 2**31:
            raise ValueError(f"the tree is too large for int32 work lists ({name} reaches {int(a.max())})")
    return TreeWork(chunk_size, work.astype(np.int32), sharers.astype(np.int32),
                    first_state.astype(np.int32), part_indptr.astype(np.int32), int(part_indptr[-1]))


def work_items(work: TreeWork, group_size: int) -> list:
    """The work list as the cost model's WorkItems (tokens, query rows, whether a later row tile)."""
    from costmodel.segments import WorkItem  # noqa: PLC0415

    return [WorkItem(int(end - begin), min(QUERY_ROWS, int(n) * group_size - int(first_row)), int(first_row) > 0)
            for begin, end, _, n, first_row, _ in work.work]


def choose_work(seg_indptr, path_indptr, path_segs, *, group_size: int, num_kv_heads: int,
                sms: int, tile: int, head_dim: int = 128, dtype: str = "float16", gpu=None) -> TreeWork:
    """The work list of the chunk (a power of two from 8192 down to one pipeline tile) whose two
    launches the cost model predicts fastest (`costmodel.tree.fastest_chunk`), for `gpu` (a
    GPUSpec or name; the H100's when None) with `sms` SMs. Chosen once per tree and shape."""
    key = (np.asarray(seg_indptr, np.int64).tobytes(), np.asarray(path_indptr, np.int64).tobytes(),
           np.asarray(path_segs, np.int64).tobytes(), group_size, num_kv_heads, sms, tile, head_dim, dtype,
           getattr(gpu, "key", gpu))
    chunk = _CHOSEN.get(key)
    if chunk is None:
        from costmodel.gpus import plan_gpu  # noqa: PLC0415
        from costmodel.tree import fastest_chunk, predict_work  # noqa: PLC0415

        spec, _ = plan_gpu(gpu, None, default_num_sms=sms)
        batch = len(path_indptr) - 1

        def time_of(c: int) -> float:
            work = plan_tree_work(seg_indptr, path_indptr, path_segs, group_size=group_size, chunk_size=c)
            parts = int(np.diff(work.part_indptr).max()) if batch else 1
            return predict_work(work_items(work, group_size), batch=max(batch, 1), num_qo_heads=group_size * num_kv_heads,
                                num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, parts_per_sequence=parts,
                                gpu=spec).time_s

        chunk = _CHOSEN[key] = fastest_chunk(time_of, tile)
    return plan_tree_work(seg_indptr, path_indptr, path_segs, group_size=group_size, chunk_size=chunk)


_CHOSEN: dict = {}


def choose_chunk_size(seg_indptr, path_indptr, path_segs, **kwargs) -> int:
    """The chunk size `choose_work` picks (same keyword arguments)."""
    return choose_work(seg_indptr, path_indptr, path_segs, **kwargs).chunk_size


@functools.lru_cache(maxsize=None)
def _segments_kernel(dtype: str, head_dim: int) -> rt.Kernel:
    expr = (f"decode_attention::tree_segments_kernel<{rt.C_TYPES[dtype]}, {head_dim}, "
            f"{pipeline_stages(head_dim)}>")
    return rt.Kernel("shared_prefix", expr, SEGMENTS_SIGNATURE,
                     shared_mem=pipeline_stages(head_dim) * stage_bytes(head_dim))


@functools.lru_cache(maxsize=None)
def _merge_kernel(dtype: str) -> rt.Kernel:
    return rt.Kernel("shared_prefix", f"decode_attention::merge_parts_kernel<{rt.C_TYPES[dtype]}>",
                     MERGE_PARTS_SIGNATURE)


def all_name_expressions() -> list[str]:
    """Every instantiation the launcher can ask for (also compiled by the CI compile check)."""
    return ([f"decode_attention::tree_segments_kernel<{rt.C_TYPES[dt]}, {d}, {pipeline_stages(d)}>"
             for dt in PREFIX_DTYPES for d in rt.HEAD_DIMS]
            + [f"decode_attention::merge_parts_kernel<{rt.C_TYPES[dt]}>" for dt in PREFIX_DTYPES])


# q, k_segs, v_segs, work, sharers, first_state, part_out, part_lse; num_qo_heads, num_kv_heads;
# scale_log2.
SEGMENTS_SIGNATURE = "pppppppp" + "ii" + "f"
# part_out, part_lse, part_indptr, out, lse; rows, num_qo_heads, head_dim.
MERGE_PARTS_SIGNATURE = "ppppp" + "qii"


def tree(q, k_segs, v_segs, seg_indptr, path_indptr, path_segs, *, sm_scale=None, out=None, lse=None,
         chunk_size=None):
    """Sequence b attends to the concatenation of its path's segments (see `refattn.tree`).

    q [batch, num_qo_heads, head_dim]; k_segs, v_segs [total_tokens, num_kv_heads, head_dim];
    seg_indptr [num_segs + 1], path_indptr [batch + 1], path_segs [nnz] on the host (read there
    to build the work list; arrays on the GPU are copied to the host first, which synchronises).
    float16 and bfloat16; head_dim 64, 128, 256. Returns (out, lse) like `split_kv`.
    """
    qa, ka, va = rt.device_array(q, "q"), rt.device_array(k_segs, "k_segs"), rt.device_array(v_segs, "v_segs")
    seg_h, ind_h, segs_h = (rt.host_ints(x, name) for x, name in (
        (seg_indptr, "seg_indptr"), (path_indptr, "path_indptr"), (path_segs, "path_segs")))
    problem = check_tree(q, k_segs, v_segs, seg_h, ind_h, segs_h, sm_scale=sm_scale, dtypes=rt.KERNEL_DTYPES)
    if problem.dtype not in PREFIX_DTYPES:
        raise TypeError(f"q must be float16 or bfloat16 for the tree kernel, got {problem.dtype}")
    if problem.head_dim not in rt.HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {rt.HEAD_DIMS} for the GPU kernels, got {problem.head_dim}")
    for name, a in (("q", qa), ("k_segs", ka), ("v_segs", va)):
        rt.require_contiguous(a, name)
    device_id = rt.require_same_device({"q": qa, "k_segs": ka, "v_segs": va})
    kind = qa.kind
    B, Hq, Hkv, D = problem.batch, problem.num_qo_heads, problem.num_kv_heads, problem.head_dim
    G = Hq // Hkv
    out, lse, out_ptr, lse_ptr = outputs(out, lse, kind, (B, Hq, D), problem.dtype, device_id)
    if B == 0:
        return out, lse
    tile = kv_tile(D)
    if chunk_size is None:
        work = choose_work(seg_h, ind_h, segs_h, group_size=G, num_kv_heads=Hkv, sms=num_sms(device_id),
                           tile=tile, head_dim=D, dtype=problem.dtype, gpu=device_gpu(device_id))
    elif not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    elif chunk_size < tile or chunk_size % tile:
        raise ValueError(f"chunk_size must be a positive multiple of {tile}, got {chunk_size}")
    else:
        work = plan_tree_work(seg_h, ind_h, segs_h, group_size=G, chunk_size=int(chunk_size))
    dev = lambda a: rt.device_int32(a if a.size else np.zeros(1, np.int32), kind, device_id, "tree")  # noqa: E731
    work_d, sharers_d, first_d, indptr_d = (dev(a) for a in (work.work, work.sharers, work.first_state,
                                                             work.part_indptr))
    part_out = rt.empty(kind, (max(work.num_states, 1), Hq, D), "float32", device_id)
    part_lse = rt.empty(kind, (max(work.num_states, 1), Hq), "float32", device_id)
    stream_ptr = rt.current_stream_ptr(kind, device_id)
    if len(work.work):
        _segments_kernel(problem.dtype, D)(
            (len(work.work), Hkv), (THREADS,),
            (qa.ptr, ka.ptr, va.ptr, rt.address(work_d), rt.address(sharers_d), rt.address(first_d),
             rt.address(part_out), rt.address(part_lse), Hq, Hkv, problem.sm_scale * _LOG2E),
            stream_ptr=stream_ptr, device_id=device_id)
    _merge_kernel(problem.dtype)(
        (merge_blocks(B * Hq, D),), (MERGE_THREADS,),
        (rt.address(part_out), rt.address(part_lse), rt.address(indptr_d), out_ptr, lse_ptr, B * Hq, Hq, D),
        stream_ptr=stream_ptr, device_id=device_id)
    return out, lse
