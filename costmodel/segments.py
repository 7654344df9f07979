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

import dataclasses
from dataclasses import dataclass

from .calibration import Calibration
from .gpus import GPUSpec
from .prediction import F32, Launch, Prediction, dtype_bytes, predict_launches, resolve_plan
from .split_kv import MMA_ROWS, TILE_TOKENS, _append_run, heads_per_block_for, page_lookups

__all__ = ["SegmentGroup", "segments_launch", "QUERY_TILE_ROWS", "MMA_ROWS", "chunk_candidates", "best_chunks",
           "WorkItem", "attend_rows_launch", "attend_rows_kv_tile", "attend_rows_blocks_per_sm",
           "PINGPONG_ROWS", "PINGPONG_KV_TILE", "prefix_block_rows", "pingpong_flops_per_s", "attend_rows_geometry",
           "attend_rows_tile_counts", "attend_rows_flops_per_s", "tensor_flops_per_clock_per_sm",
           "attend_rows_uses_wgmma", "attend_rows_wgmma_tile_clocks", "CountedRate",
           "predict_kernel_launches"]

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
    spec, cal, plan = resolve_plan(
        shape, shape_type, plan, plan_type,
        lambda sh, spec, cal: make_plan(sh, num_sms=spec.num_sms, gpu=spec, calibration=cal),
        gpu=gpu, calibration=calibration)
    return predict_launches(variant, [plan.launch()], gpu=spec, calibration=cal)


# ---------------------------------------------------------------------------------------------
# The blocks the kernels run: `attend_rows` of cuda/shared_prefix.cu, shared by Hydragen's prefix
# pass (`shared_prefix_kernel`) and the tree's segments launch (`tree_segments_kernel`). A block
# serves up to QUERY_TILE_ROWS query rows (4 warps of MMA_ROWS rows; a warp whose rows are all
# padding skips its products) against one chunk of KV, streamed through shared memory in tiles of
# `attend_rows_kv_tile` rows. Per tile, each active warp reads the whole K and V tile from shared
# memory through ldmatrix.x4 for its 16 rows and issues mma.sync m16n8k16 on them; the tile's
# copies (cp.async) write it there once for the block.

WARP_ROWS = MMA_ROWS                  # query rows per warp: one m16 tile
LDMATRIX_X4_BYTES = 4 * 8 * 8 * 2     # four 8x8 matrices of 16-bit elements
MMA_FLOPS = 2 * 16 * 8 * 16           # one mma.sync m16n8k16
SMEM_BYTES_PER_CLOCK = 128            # per SM: 32 banks of 4 bytes (Volta through Hopper)
# Dense fp16 tensor-core FLOPs per clock per SM: 4 tensor cores x 512 FMA on Hopper, x 256 on
# Ampere (each GPU's datasheet rate / (SMs x boost clock)).
TENSOR_FLOPS_PER_CLOCK_PER_SM = {"h100_sxm": 4096, "h100_pcie": 4096, "h200": 4096,
                                 "a100_80gb": 2048, "a100_40gb": 2048}


# On Hopper (shared_prefix.cu compiled for sm_90a) up to head_dim 128 the products run on wgmma
# instead: the tensor cores read K and V from shared memory once for the block's 64 rows, every
# warp computes (padding rows too), and what bounds a tile is the softmax beside the products. Per
# warp and tile, its exponentials go through the SFU (16 results a clock per SM: a warp
# instruction takes 8 clocks of its scheduler's share) and its other instructions issue one a
# clock: about SOFTMAX_INSTRUCTIONS_PER_SCORE per score a lane (the non-finite check, the maximum,
# the scaled exponent's FMA, the row sum, half a pack) and COPY_INSTRUCTIONS per 16-byte copy
# (cp.async and its address). The products and the softmax of an SM's two blocks hardly overlap
# (H200, 32/8 heads, 128 sequences, 32k prefix: 408 TFLOP/s, `logs/explore-shared-prefix-parts-wgmma.log`),
# so a tile costs its tensor clocks plus its softmax clocks.
WGMMA_GPUS = ("h100_sxm", "h100_pcie", "h200")
WGMMA_MAX_HEAD_DIM = 128
SFU_RESULTS_PER_CLOCK = 16            # per SM (exp2, Volta through Hopper)
SCHEDULERS_PER_SM = 4
SOFTMAX_INSTRUCTIONS_PER_SCORE = 4.5
COPY_INSTRUCTIONS = 4


# Hydragen's prefix pass with more than QUERY_TILE_ROWS query rows a KV head runs on Hopper
# (head_dim 64 and 128) as blocks of two consumer warpgroups that take turns on the tensor cores and
# a producer warpgroup whose one thread copies the KV tiles by TMA (shared_prefix.cu:
# attend_rows_specialized): PINGPONG_ROWS query rows a block, one block an SM, KV tiles of
# PINGPONG_KV_TILE rows copied once for both consumers. A warpgroup's softmax runs while the
# other's products do; counted so, the tensor cores of a pair of turns run both warpgroups'
# products and wait out one softmax (`pingpong_flops_per_s`).
PINGPONG_ROWS = 128
PINGPONG_KV_TILE = 128
PINGPONG_HEAD_DIMS = (64, 128)


def prefix_block_rows(gpu: GPUSpec, head_dim: int, dtype: str, rows: int) -> int:
    """Query rows per block of Hydragen's prefix pass for `rows` query rows a KV head: PINGPONG_ROWS
    on wgmma GPUs at head_dim 64 and 128 when they are more than one block of QUERY_TILE_ROWS
    holds, QUERY_TILE_ROWS otherwise (gpukernels.shared_prefix launches the kernel of the plan's
    block rows)."""
    if attend_rows_uses_wgmma(gpu, head_dim, dtype) and head_dim in PINGPONG_HEAD_DIMS and rows > QUERY_TILE_ROWS:
        return PINGPONG_ROWS
    return QUERY_TILE_ROWS


def pingpong_tile_clocks(gpu: GPUSpec, head_dim: int, dtype: str) -> tuple[float, float]:
    """(tensor-core clocks of one consumer warpgroup's turn on a KV tile, softmax clocks a pair of
    turns leaves exposed) in the two-warpgroup pass. A consumer takes its softmax while its own
    P V and the other's products run, so of its softmax only the exponentials stay exposed: the
    SFU's clocks, counted as `attend_rows_wgmma_tile_clocks` counts them (H200, head_dim 128:
    4,194,304 FLOPs = 1,024 tensor clocks; 64 scores a lane: 512 SFU clocks). Counting the whole
    softmax (its 288 other instructions too, and 64 clocks of copies), as for the kernel before
    whose consumers copied their own tiles and took their softmax after both products, put the
    pass at 0.70 of the matmul rate against 0.63 measured."""
    t, d = PINGPONG_KV_TILE, head_dim
    rows = 4 * WARP_ROWS
    tensor = 4 * rows * t * d / tensor_flops_per_clock_per_sm(gpu)
    scores_per_lane = WARP_ROWS * t / 32
    return tensor, scores_per_lane * 32 / (SFU_RESULTS_PER_CLOCK / SCHEDULERS_PER_SM)


def pingpong_flops_per_s(gpu: GPUSpec, head_dim: int, dtype: str) -> float:
    """The tensor-core rate of the two-warpgroup pass: a pair of turns costs both warpgroups'
    tensor clocks plus one softmax's exposed clocks (H200, head_dim 128: 2,048 / 2,560, 0.80 of
    the matmul rate, 604 TFLOP/s at 755; measured 566-609 on the grid's long chunks:
    `logs/explore-prefix-specialized.log`)."""
    tensor, softmax = pingpong_tile_clocks(gpu, head_dim, dtype)
    return gpu.matmul_flops_per_s * 2 * tensor / (2 * tensor + softmax)


class CountedRate(float):
    """A launch's tensor-core rate counted whole from its kernel, the softmax beside the products
    included (the wgmma blocks): the calibration's `matmul_fraction`, which stands for what the
    mma.sync count leaves out, is not applied on top of it."""


def attend_rows_uses_wgmma(gpu: GPUSpec, head_dim: int, dtype: str) -> bool:
    """Whether the prefix pass and the tree's segments run on wgmma (Hopper, 16-bit, head_dim up
    to 128) rather than mma.sync."""
    return gpu.key in WGMMA_GPUS and head_dim <= WGMMA_MAX_HEAD_DIM and dtype in ("float16", "bfloat16")


def attend_rows_wgmma_tile_clocks(gpu: GPUSpec, head_dim: int, dtype: str) -> tuple[float, float]:
    """(tensor-core clocks, softmax clocks) of one block's KV tile on wgmma (H200, head_dim 128:
    2,097,152 FLOPs = 512 tensor clocks; 32 scores a lane: 256 SFU clocks, 144 instructions, and
    16 copies a thread: 64; so 464 softmax clocks)."""
    t, d = attend_rows_kv_tile(head_dim), head_dim
    rows = 4 * WARP_ROWS
    tensor = 4 * rows * t * d / tensor_flops_per_clock_per_sm(gpu)
    scores_per_lane = WARP_ROWS * t / 32
    sfu = scores_per_lane * 32 / (SFU_RESULTS_PER_CLOCK / SCHEDULERS_PER_SM)
    copies = 2 * t * d * dtype_bytes(dtype) // 16 // (4 * 32)
    return tensor, sfu + scores_per_lane * SOFTMAX_INSTRUCTIONS_PER_SCORE + copies * COPY_INSTRUCTIONS


def attend_rows_kv_tile(head_dim: int) -> int:
    """KV rows per pipeline stage (shared_prefix.cu: PrefixTile::KV_TILE)."""
    return 32 if head_dim >= 256 else 64


def attend_rows_blocks_per_sm(head_dim: int) -> int:
    """Resident blocks per SM (the kernels' launch bounds: registers and shared memory)."""
    return 1 if head_dim >= 256 else 2


def tensor_flops_per_clock_per_sm(gpu: GPUSpec) -> int:
    try:
        return TENSOR_FLOPS_PER_CLOCK_PER_SM[gpu.key]
    except KeyError:
        raise ValueError(f"no tensor-core rate per clock known for {gpu.key}; known: "
                         f"{', '.join(TENSOR_FLOPS_PER_CLOCK_PER_SM)}") from None


def attend_rows_tile_counts(head_dim: int, active_warps: int, dtype: str) -> dict[str, int]:
    """What one block does per KV tile, counted from the kernel's loops: ldmatrix.x4 of K for
    S = Q K^T ((head_dim / 32) x (tile / 8) per warp) and of V for O = P V ((tile / 16) x
    (head_dim / 16) per warp), two mma per ldmatrix; the shared-memory bytes those reads, the
    query fragments read back from shared memory (head_dim 256 keeps them there) and the tile's
    copies move."""
    t, d = attend_rows_kv_tile(head_dim), head_dim
    ldmatrix = active_warps * (d // 32 * (t // 8) + t // 16 * (d // 16))
    q_from_smem = active_warps * (d // 32) * 8 * 4 * 32 if d >= 256 else 0   # 8 registers a lane per c
    copies = 2 * t * d * dtype_bytes(dtype)
    return {"ldmatrix_x4": ldmatrix, "mma": 2 * ldmatrix,
            "smem_bytes": ldmatrix * LDMATRIX_X4_BYTES + q_from_smem + copies}


def _tile_clocks(gpu: GPUSpec, head_dim: int, active_warps: int, dtype: str) -> tuple[float, float]:
    """(tensor-core clocks, the clocks that bound the tile) of one block's KV tile on its SM: on
    mma.sync its shared-memory clocks, on wgmma tensor plus softmax clocks (all four warps)."""
    if attend_rows_uses_wgmma(gpu, head_dim, dtype):
        tensor, softmax = attend_rows_wgmma_tile_clocks(gpu, head_dim, dtype)
        return tensor, tensor + softmax
    c = attend_rows_tile_counts(head_dim, active_warps, dtype)
    return c["mma"] * MMA_FLOPS / tensor_flops_per_clock_per_sm(gpu), c["smem_bytes"] / SMEM_BYTES_PER_CLOCK


def attend_rows_flops_per_s(gpu: GPUSpec, head_dim: int, dtype: str, active_warps: int = 4) -> float:
    """The tensor-core rate of a launch of such blocks. On mma.sync: the GPU's matmul rate while
    its tensor cores wait on shared memory, i.e. scaled by tensor-core clocks / shared-memory
    clocks per tile (A100, head_dim 128, 4 warps: 512 mma = 1,024 clocks of the tensor cores
    against 163,840 bytes = 1,280 clocks of shared memory, so 0.8 of the rate). On wgmma
    (`attend_rows_uses_wgmma`; every warp computes): scaled by tensor / (tensor + softmax) clocks
    (H200, head_dim 128: 512 / 976, 0.52). The clock cancels: the counts are per SM per clock."""
    tensor, bound = _tile_clocks(gpu, head_dim, active_warps, dtype)
    return gpu.matmul_flops_per_s * tensor / max(tensor, bound)


@dataclass(frozen=True)
class WorkItem:
    """One block of `attend_rows` (per KV head): `tokens` KV rows against `rows` query rows;
    `rereads` whether another block read the same KV rows before it (a later row tile: from L2);
    `label` names their bytes (`k_<label>`, `v_<label>`; empty: `k`, `v`)."""

    tokens: int
    rows: int
    rereads: bool = False
    label: str = ""


def attend_rows_geometry(block_rows: int, head_dim: int) -> tuple[int, int]:
    """(KV rows per tile, resident blocks per SM) of the blocks of `block_rows` query rows:
    `attend_rows`' (QUERY_TILE_ROWS) or the two-warpgroup pass's (PINGPONG_ROWS)."""
    if block_rows == PINGPONG_ROWS:
        return PINGPONG_KV_TILE, 1
    if block_rows != QUERY_TILE_ROWS:
        raise ValueError(f"block_rows must be {QUERY_TILE_ROWS} or {PINGPONG_ROWS}, got {block_rows}")
    return attend_rows_kv_tile(head_dim), attend_rows_blocks_per_sm(head_dim)


def attend_rows_launch(name: str, items: "list[WorkItem]", *, num_kv_heads: int, head_dim: int, dtype: str,
                       gpu: GPUSpec, page_size: int = 0, block_rows: int = QUERY_TILE_ROWS) -> tuple[Launch, float]:
    """The launch of `items` (dispatch order of one KV head; the grid repeats them for every KV
    head, heads slowest) and its tensor-core rate (tensor clocks over the clocks that bound its
    blocks' tiles: `attend_rows_flops_per_s`, `pingpong_flops_per_s`). Each block reads its
    queries and its KV rows, writes a float32 state (out, lse) per row. `page_size` > 0: the KV
    rows lie in a paged cache (each item's rows starting on a page), and every block looks up the
    pages of its rows as split-KV does (`split_kv.page_lookups`, the costs the decode suite's paged
    rows fit); 0: contiguous. Each block streams no faster than its tiles are computed
    (`_block_compute_rate`). `block_rows` PINGPONG_ROWS: the blocks of the two-warpgroup pass
    (`prefix_block_rows`; contiguous rows only), one an SM, every row computed (padding too)."""
    kv_tile, blocks_per_sm = attend_rows_geometry(block_rows, head_dim)
    pingpong = block_rows == PINGPONG_ROWS
    if pingpong and page_size:
        raise ValueError("blocks of PINGPONG_ROWS rows read contiguous rows only (page_size must be 0)")
    elem = dtype_bytes(dtype)
    d, hkv = head_dim, num_kv_heads
    kv_by_label: dict[str, int] = {}
    reread = q_rows = matmul = useful = lookups = kv_bytes = 0
    tensor_clocks = sm_clocks = 0.0
    runs: list = []
    wgmma = pingpong or attend_rows_uses_wgmma(gpu, d, dtype)
    if pingpong:   # a pair of turns: both warpgroups' products and one softmax's exposed clocks
        tensor, softmax = pingpong_tile_clocks(gpu, d, dtype)
        pair = (2 * tensor, 2 * tensor + softmax)
    for it in items:
        if pingpong:
            computed = PINGPONG_ROWS
            tensor, bound = pair
        else:
            warps = 4 if wgmma and it.rows else -(-it.rows // WARP_ROWS)   # wgmma: the padding rows too
            computed = warps * WARP_ROWS
            tensor, smem = _tile_clocks(gpu, d, warps, dtype) if warps else (0.0, 0.0)
            bound = max(tensor, smem)
        block_kv = 2 * it.tokens * d * elem
        kv_by_label[it.label] = kv_by_label.get(it.label, 0) + block_kv
        reread += block_kv if it.rereads else 0
        lookups += page_lookups(0, it.tokens, page_size)
        q_rows += it.rows
        matmul += 4 * computed * it.tokens * d
        useful += 4 * it.rows * it.tokens * d
        tiles = -(-it.tokens // kv_tile)
        tensor_clocks += tiles * tensor
        sm_clocks += tiles * bound
        kv_bytes += block_kv
        _append_run(runs, block_kv + it.rows * d * elem + it.rows * (d + 1) * F32, 1, 1)
    head_runs = [tuple(r) for r in runs]
    launch = Launch(
        name=name,
        bytes_by_tensor={**{f"{kv}_{label}" if label else kv: hkv * both // 2
                            for label, both in kv_by_label.items() for kv in ("k", "v")},
                         "q": hkv * q_rows * d * elem,
                         "partial_out_write": hkv * q_rows * d * F32, "partial_lse_write": hkv * q_rows * F32,
                         **({"page_table": hkv * lookups * 4} if page_size else {})},
        block_runs=tuple(head_runs * hkv),
        matmul_flops=hkv * matmul,
        useful_flops=hkv * useful,
        l2_hit_bytes=hkv * reread,
        page_lookups=hkv * lookups,
        blocks_per_sm=blocks_per_sm,
        block_compute_bytes_per_s=_block_compute_rate(gpu, kv_bytes, sm_clocks, hkv * len(items), blocks_per_sm),
    )
    # (a head_dim the kernels are not built for, below 32, counts no ldmatrix: the GPU's rate)
    rate = gpu.matmul_flops_per_s * tensor_clocks / sm_clocks if tensor_clocks else gpu.matmul_flops_per_s
    return launch, CountedRate(rate) if wgmma else rate


def _block_compute_rate(gpu: GPUSpec, block_bytes: int, block_clocks: float, blocks: int,
                        blocks_per_sm: int) -> "float | None":
    """Bytes a block streams per second of its own arithmetic: `block_bytes` over `block_clocks`
    (both summed over the same blocks: the SM clocks of their tiles), times the blocks sharing an
    SM (up to `blocks_per_sm`, fewer when the launch's `blocks` do not fill its slots: the GPU
    gives each its own SM first), clocks at the rate the tensor-core counts give the measured matmul
    rate (H200: 4,096 FLOPs a clock per SM at 768 TFLOP/s over 132 SMs, 1.42 GHz). A block computes
    a tile while the next ones land, so it streams no faster than that (the launch's
    `block_compute_bytes_per_s`): the tree's short, one-row segments and the prefix pass's blocks
    are held to it where the decode kernel's calibrated per-block rate would let them run ahead."""
    if not block_bytes or not block_clocks:
        return None
    sharing = min(blocks_per_sm, max(1.0, blocks / gpu.num_sms))
    clock_s = tensor_flops_per_clock_per_sm(gpu) * gpu.num_sms / gpu.matmul_flops_per_s
    return block_bytes / (block_clocks * sharing * clock_s)


def predict_kernel_launches(variant: str, launches: "list[tuple[Launch, float | None]]", *, gpu: GPUSpec,
                            calibration: Calibration) -> Prediction:
    """`predict_launches` where a launch may have a tensor-core rate of its own (None: the GPU's):
    each launch is timed on the GPU with that rate, and the launches are summed as
    `predict_launches` sums them (every term, and per launch as '<launch>.<term>'). A
    `CountedRate` is taken whole (no `matmul_fraction`)."""
    whole = dataclasses.replace(calibration, matmul_fraction=1.0)
    parts = [(launch, predict_launches(launch.name, [launch],
                                       calibration=whole if isinstance(rate, CountedRate) else calibration,
                                       gpu=gpu if rate is None else dataclasses.replace(gpu, matmul_flops_per_s=rate)))
             for launch, rate in launches]
    keys = ("launch_s", "hbm_s", "page_lookup_s", "l2_s", "memory_s", "compute_s", "schedule_s", "time_s")
    totals = {k: sum(p.terms[k] for _, p in parts) for k in keys}
    terms = dict(totals)
    if len(parts) > 1:
        terms.update({f"{launch.name}.{k}": p.terms[k] for launch, p in parts for k in keys})
    bytes_by_tensor: dict[str, int] = {}
    for _, p in parts:
        for k, v in p.bytes_by_tensor.items():
            bytes_by_tensor[k] = bytes_by_tensor.get(k, 0) + v
    roofline_s = max(totals["memory_s"], totals["compute_s"])
    if totals["time_s"] - roofline_s > roofline_s:
        bound = "latency"
    else:
        bound = "compute" if totals["compute_s"] > totals["memory_s"] else "memory"
    return Prediction(
        variant=variant, bytes_by_tensor=bytes_by_tensor, hbm_bytes=sum(p.hbm_bytes for _, p in parts),
        l2_hit_bytes=sum(p.l2_hit_bytes for _, p in parts), flops=sum(p.flops for _, p in parts),
        num_blocks=sum(p.num_blocks for _, p in parts), waves=max((p.waves for _, p in parts), default=0.0),
        launches=len(parts), bound=bound, time_s=totals["time_s"], terms=terms)
