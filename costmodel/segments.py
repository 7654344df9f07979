"""Attention over segments of KV, some shared by many sequences: the schedule common to
`shared_prefix` (Hydragen), `tree` and `span`.

Every sequence attends to a list of segments. A segment attended by one sequence is read like a
split-KV chunk: one block per (chunk, KV head, head group), CUDA-core dot products. A segment
shared by `sharers` sequences is read once for all of them: the queries of those sequences and of
all heads of a GQA group form a matrix of `sharers * group_size` rows per KV head, cut into tiles
of QUERY_TILE_ROWS rows, each tile a tensor-core product with the chunk's keys and values (tiles
after the first re-read the chunk, mostly from L2). Every block writes a float32 partial
(out, lse) per query row it serves; per (sequence, KV head, head group) the partials are merged in
the same launch (modelled as a short block after the others). A sequence whose whole context is
one chunk writes its output directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gpus import get_gpu
from .prediction import F32, Launch, Prediction, calibration_for, check_shape_type, dtype_bytes, predict_launches
from .split_kv import MMA_ROWS, TILE_TOKENS, _append_run, heads_per_block_for

__all__ = ["SegmentGroup", "segments_launch", "QUERY_TILE_ROWS", "MMA_ROWS", "chunk_candidates", "best_chunks"]

QUERY_TILE_ROWS = 64   # query rows one tensor-core block serves


@dataclass(frozen=True)
class SegmentGroup:
    """`count` segments of `length` tokens, each attended by `sharers` sequences, read in chunks of
    `chunk_size` tokens. `label` names their bytes (`k_<label>`, `v_<label>`; empty: `k`, `v`)."""

    label: str
    length: int
    sharers: int
    count: int
    chunk_size: int

    def __post_init__(self):
        for name in ("length", "sharers", "count", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0 or (name in ("sharers", "chunk_size") and value < 1):
                raise ValueError(f"{name} must be a {'positive' if name in ('sharers', 'chunk_size') else 'non-negative'} int, got {value!r}")

    @property
    def chunks(self) -> int:
        """Chunks per segment (an empty segment has none)."""
        return -(-self.length // self.chunk_size)

    @property
    def shared(self) -> bool:
        return self.sharers > 1


def _row_tiles(rows: int) -> list[int]:
    """Query rows of each tile of a shared segment."""
    tiles = -(-rows // QUERY_TILE_ROWS)
    return [min(QUERY_TILE_ROWS, rows - t * QUERY_TILE_ROWS) for t in range(tiles)]


def segments_launch(
    name: str,
    *,
    batch: int,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: str,
    groups: "list[SegmentGroup] | tuple[SegmentGroup, ...]",
    parts_per_sequence: int,
    extra_bytes: "dict[str, int] | None" = None,
) -> Launch:
    """One fused launch over the groups; `parts_per_sequence` partial states per query head of a
    sequence are merged at the end (1: no partials, the blocks write the output)."""
    elem = dtype_bytes(dtype)
    d, hkv = head_dim, num_kv_heads
    group_size = num_qo_heads // num_kv_heads
    hpb = heads_per_block_for(group_size)
    served_by_group = [min(hpb, group_size - g * hpb) for g in range(-(-group_size // hpb))]
    direct = parts_per_sequence == 1
    state_bytes = (d + 1) * F32

    bytes_by_tensor: dict[str, int] = {}
    runs: list = []
    l2_hit = matmul = vector = useful = blocks = q_rows = 0
    for g in groups:
        if g.count == 0 or g.length == 0:
            continue
        kv_row_bytes = g.length * hkv * d * elem            # one of K or V of one segment
        if g.shared:
            row_sets = _row_tiles(g.sharers * group_size)    # query rows per block
        else:
            row_sets = served_by_group
        rereads = len(row_sets)
        for kv in ("k", "v"):
            key = f"{kv}_{g.label}" if g.label else kv
            bytes_by_tensor[key] = bytes_by_tensor.get(key, 0) + g.count * kv_row_bytes * rereads
        l2_hit += 2 * g.count * kv_row_bytes * (rereads - 1)
        useful += 4 * g.count * g.sharers * num_qo_heads * g.length * d
        if g.shared:
            padded = sum(MMA_ROWS * -(-r // MMA_ROWS) for r in row_sets)
            matmul += 4 * g.count * hkv * padded * g.length * d
        else:
            vector += 4 * g.count * num_qo_heads * g.length * d
        n_chunks = g.chunks
        blocks += g.count * hkv * len(row_sets) * n_chunks
        q_rows += g.count * hkv * sum(row_sets) * n_chunks
        last_tokens = g.length - (n_chunks - 1) * g.chunk_size
        seg_runs: list = []
        for rows in row_sets:
            tail = rows * (d * elem + F32) if direct else rows * state_bytes + F32
            per_block = rows * d * elem + tail
            _append_run(seg_runs, 2 * g.chunk_size * d * elem + per_block, 1, n_chunks - 1)
            _append_run(seg_runs, 2 * last_tokens * d * elem + per_block, 1, 1)
        for _ in range(g.count * hkv):
            for run in seg_runs:
                _append_run(runs, *run)

    merges = 0 if direct else batch * hkv * len(served_by_group)
    partial_states = 0 if direct else q_rows
    bytes_by_tensor.update({
        "q": q_rows * d * elem,
        "out": batch * num_qo_heads * d * elem,
        "lse": batch * num_qo_heads * F32,
        "partial_out_write": partial_states * d * F32,
        "partial_lse_write": partial_states * F32,
        "partial_out_read": partial_states * d * F32,
        "partial_lse_read": partial_states * F32,
        "counters": 0 if direct else (blocks + merges) * F32,
    })
    for key, value in (extra_bytes or {}).items():
        bytes_by_tensor[key] = bytes_by_tensor.get(key, 0) + int(value)
    if not direct:
        for _ in range(batch * hkv):
            for served in served_by_group:
                merge = parts_per_sequence * served * state_bytes + served * (d * elem + F32) + F32
                _append_run(runs, merge, 1, 1)
    return Launch(
        name=name,
        bytes_by_tensor=bytes_by_tensor,
        block_runs=tuple(map(tuple, runs)),
        matmul_flops=matmul,
        vector_flops=vector,
        useful_flops=useful,
        l2_hit_bytes=l2_hit,
    )


def chunk_candidates(length: int) -> list[int]:
    """Chunk sizes worth predicting for a segment: whole tiles from 256 tokens doubling up to the
    whole segment (which is always a candidate)."""
    if length <= 0:
        return [TILE_TOKENS]
    whole = TILE_TOKENS * -(-length // TILE_TOKENS)
    out = []
    c = 4 * TILE_TOKENS
    while c < whole:
        out.append(c)
        c *= 2
    out.append(whole)
    return out


def best_chunks(lengths: list[int], predict_time, *, passes: int = 2) -> list[int]:
    """Chunk size per segment group minimising `predict_time(chunks)`, by coordinate descent from
    whole segments (each group tried over its candidates with the others held)."""
    chunks = [chunk_candidates(n)[-1] for n in lengths]
    best = predict_time(chunks)
    for _ in range(passes):
        improved = False
        for i, n in enumerate(lengths):
            for c in chunk_candidates(n):
                if c == chunks[i]:
                    continue
                trial = chunks[:i] + [c] + chunks[i + 1:]
                t = predict_time(trial)
                if t < best * (1 - 1e-9):
                    best, chunks, improved = t, trial, True
        if not improved:
            break
    return chunks



def predict_planned(variant: str, shape, shape_type, make_plan, plan_type, *, gpu, calibration=None,
                    plan=None) -> Prediction:
    """Predict a one-launch segment variant (span, tree): check the shape, plan it unless a plan
    for it is given, and time the plan's launch."""
    check_shape_type(shape, shape_type)
    if plan is not None and not isinstance(plan, plan_type):
        raise TypeError(f"plan must be a {plan_type.__name__} or None, got {type(plan).__name__}")
    spec = get_gpu(gpu)
    cal = calibration_for(spec, calibration)
    if plan is None:
        plan = make_plan(shape, num_sms=spec.num_sms, gpu=spec, calibration=cal)
    elif plan.shape != shape:
        raise ValueError("plan was made for another shape")
    return predict_launches(variant, [plan.launch()], gpu=spec, calibration=cal)
