"""The split-KV (Flash-Decoding) plan: how one decode call is cut into thread blocks.

A plan is plain frozen data computed on the host. The CUDA kernels in `gpukernels` run it and the
cost model predicts from it, so a prediction always describes the schedule that actually runs.

Schedule: every (sequence, KV head, head group) pair is cut along the KV length into
`splits_for(kv_len) = ceil(kv_len / chunk_size)` splits. The rows are grouped in tiles of
TILE_TOKENS, and with S splits split `s` takes tiles s, s + S, s + 2S, ... (`split_rows`), so the
blocks of a sequence stream one front of adjacent rows rather than S fronts a chunk apart (measured
on H100: 1-3% faster at batch 1). One thread block handles one split for the `heads_per_block`
query heads of one head group, reading each K/V row once for all of them. A sequence with one split
writes its output directly. With more, each block writes a float32 partial `(out, lse)` to the
workspace and the last block of its (sequence, KV head, head group) to finish merges the partials
(an atomic counter decides which block is last), so a call is one launch.

The split count is the cost model's decision: `choose_num_splits` predicts the time of every
candidate count (waves of blocks over the SMs, the partial-result write and read traffic, the
merging block's extra work) and takes the fastest. `predict` is the prediction for a plan.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from decode_attention.contract import as_index_array, check_nonnegative_int, check_positive_int

from .calibration import Calibration, load_calibration
from .gpus import GPUSpec, plan_gpu
from .prediction import (F32, Launch, Prediction, calibration_for, check_head_grouping, dtype_bytes,
                         predict_launches)

# Kernel constants the plan must agree with (gpukernels/cuda/split_kv.cu has the same numbers).
NUM_WARPS = 4                # warps per thread block
TILE_TOKENS = 64             # tokens one block consumes per iteration (NUM_WARPS warps x 16 rows)
# Tiles per warp in flight on the tensor-core path, by (head_dim, paged). Head_dim 128: 3 stages
# from a contiguous cache (96 KB, two blocks per SM), 2 from pages (two blocks per SM: registers).
# With the page indices arriving ahead of use, 3 stages read the decode grid's paged rows 1-2%
# faster (H200, pages of 16, 2 / 3 stages: 1 x 8 x 128k 141.4 / 138.3 us, 8 x 8 x 32k 259.5 /
# 254.4, 64 x 8 x 16k 974.4 / 961.5) but the span grid at its plans' split counts up to 9% slower
# (75% in 96 spans, 3 splits: 206.3 / 225.0; 4 sinks + 4096 window: 48.8 / 51.9).
# Head_dim 256: one block per SM, 2 stages (128 KB); measured on H200 against 3 stages (192 KB):
# 1 x 8/1 x 262147 105 vs 115 us, 2 x 16/16 x 32k 256 vs 294, 16 x 64/8 x 16385 489 vs 575.
# Head_dim 64: 6 stages, the bytes in flight of head_dim 128 (H200, 3 / 4 / 6 stages: 4 x 32/4 x
# 64k 83.5 / 84.4 / 76.4 us, 16 x 20/4 x 8191 50.8 / 51.0 / 46.0, 1 x 32/32 x 131071 295.6 / 256.6
# / 255.9).
PIPELINE_STAGES_BY_HEAD_DIM = {(64, False): 6, (64, True): 4, (128, False): 3, (128, True): 2,
                               (256, False): 2, (256, True): 2}
TENSOR_CORE_HEAD_DIMS = (64, 128, 256)
TENSOR_CORE_DTYPES = ("float16", "bfloat16")  # the kernel's mma path; float32 runs on CUDA cores
SMEM_PER_SM_BYTES = 228 * 1024  # Hopper; what the pipeline stages of resident blocks share
REGISTERS_PER_SM = 65536
# Registers per thread of the tensor-core kernel by (head_dim, paged): the most over the
# instantiations of that key, as ptxas reports them for sm_90. `python -m gpukernels.compile_check`
# fails when a kernel's count would give an SM a different number of resident blocks than this does.
TENSOR_CORE_REGISTERS = {(64, False): 114, (64, True): 124, (128, False): 180, (128, True): 188,
                         (256, False): 200, (256, True): 218}
MIN_CHUNK_TOKENS = 256       # the shortest chunk the split choice considers
HEADS_PER_BLOCK_CHOICES = (1, 2, 4, 8)  # query heads served by one block (template parameter)
ROWS_PER_WARP_TILE = TILE_TOKENS // NUM_WARPS  # rows one warp reads per step (page lookups per tile)
MAX_GRID_Y = 65535           # blocks a CUDA grid holds along y (and z)
MMA_ROWS = 16                # rows of a tensor-core tile: a block's query heads are padded to it
MERGE_BATCH = 8              # partials the merging block loads per round trip (finish_block)
# A split count must beat a smaller one by more than this to be chosen (fewer splits: less
# workspace, fewer partials). 2%: with 3%, the refitted paged model on H100 took half the best
# count on 4 rows of the committed sweeps, up to 4.4% slower; with 2%, every plan of both GPUs'
# result files is within 1.4% of the sweep's best.
SPLIT_TIE_TOLERANCE = 0.02
DEFAULT_NUM_SMS = 132        # H100 SXM; plans for another GPU pass its count


def pipeline_stages(head_dim: int, paged: bool = False) -> int:
    """Pipeline stages of the tensor-core kernel for one head_dim and cache layout."""
    return PIPELINE_STAGES_BY_HEAD_DIM[head_dim, bool(paged)]


def pipeline_stage_bytes(head_dim: int) -> int:
    """Shared memory of one pipeline stage of a block: each lane's 16-byte K and V pieces of a tile."""
    slots = 2 * (head_dim // 32) + 4 * (head_dim // 64)
    return NUM_WARPS * 32 * slots * 16


def uses_tensor_cores(dtype: str, head_dim: int) -> bool:
    """Whether the tensor-core (mma.sync) kernel serves this dtype and head_dim."""
    return dtype in TENSOR_CORE_DTYPES and head_dim in TENSOR_CORE_HEAD_DIMS


def blocks_per_sm_by_registers(registers_per_thread: int) -> int:
    """Blocks of NUM_WARPS warps an SM's registers hold (allocated 8 per thread at a time)."""
    return REGISTERS_PER_SM // (-(-registers_per_thread // 8) * 8 * NUM_WARPS * 32)


def tensor_core_blocks_per_sm(head_dim: int, stages: int, paged: bool = False, *,
                              registers: int | None = None) -> int:
    """Blocks of the tensor-core kernel an SM holds: as many as its shared memory (1 KB reserved
    each) and its registers (default: TENSOR_CORE_REGISTERS) allow. Head_dim 128: 2 with the
    contiguous cache's 3 stages (shared memory) and with the paged cache's 2 (registers)."""
    by_smem = SMEM_PER_SM_BYTES // (stages * pipeline_stage_bytes(head_dim) + 1024)
    if registers is None:
        registers = TENSOR_CORE_REGISTERS[head_dim, paged]
    by_registers = blocks_per_sm_by_registers(registers)
    return max(1, min(by_smem, by_registers))


def heads_per_block_for(group_size: int) -> int:
    """Smallest template width that holds the group, capped at the widest one."""
    for g in HEADS_PER_BLOCK_CHOICES:
        if g >= group_size:
            return g
    return HEADS_PER_BLOCK_CHOICES[-1]


@dataclass(frozen=True)
class SplitKVPlan:
    batch: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    max_kv_len: int
    chunk_size: int          # tokens per split (a sequence has ceil(kv_len / chunk_size) splits)
    num_splits: int          # splits of the longest sequence (grid width), >= 1
    heads_per_block: int     # query heads per block (template width)
    head_groups: int         # blocks per KV head along the query heads
    num_sms: int
    page_size: int = 0       # 0: contiguous cache; otherwise tokens per page

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads

    @property
    def seq_heads(self) -> int:
        """(sequence, KV head, head group) rows: the blocks of one split."""
        return self.batch * self.num_kv_heads * self.head_groups

    @property
    def num_blocks(self) -> int:
        return self.num_splits * self.seq_heads

    @property
    def grid(self) -> tuple[int, int, int]:
        """(x, y, z) grid of the decode kernel: x over splits, y over (sequence, KV head, head group),
        continued in z past the MAX_GRID_Y rows y can hold (fewer than z blocks of the last z row
        are empty)."""
        z = max(1, -(-self.seq_heads // MAX_GRID_Y))
        return (self.num_splits, -(-self.seq_heads // z), z)

    @property
    def partial_out_elems(self) -> int:
        """float32 partial outputs: [num_splits, batch, num_qo_heads, head_dim] when split."""
        if self.num_splits == 1:
            return 0
        return self.num_splits * self.batch * self.num_qo_heads * self.head_dim

    @property
    def partial_lse_elems(self) -> int:
        if self.num_splits == 1:
            return 0
        return self.num_splits * self.batch * self.num_qo_heads

    @property
    def counter_elems(self) -> int:
        """int32 arrival counters, one per (sequence, KV head, head group); reset by the merging block."""
        if self.num_splits == 1:
            return 0
        return self.seq_heads

    @property
    def workspace_bytes(self) -> int:
        return 4 * (self.partial_out_elems + self.partial_lse_elems + self.counter_elems)

    def splits_for(self, kv_len: int) -> int:
        """Splits that hold tokens for a sequence of this length (at least one, even when empty; at
        most the grid's: a sequence longer than the plan's max_kv_len gets longer chunks)."""
        return min(self.num_splits, max(1, -(-kv_len // self.chunk_size)))

    def split_rows(self, kv_len: int) -> list[range]:
        """Per split of a sequence of this length, the first token of each tile it reads (tiles of
        TILE_TOKENS tokens, the last one clipped to kv_len)."""
        splits = self.splits_for(kv_len)
        return [range(s * TILE_TOKENS, kv_len, splits * TILE_TOKENS) for s in range(splits)]

    def split_tokens(self, kv_len: int) -> list[int]:
        """Tokens each split of a sequence of this length reads: whole tiles, less the last tile's
        shortfall in the split that holds it."""
        splits = self.splits_for(kv_len)
        tiles = -(-kv_len // TILE_TOKENS)
        tokens = [len(range(s, tiles, splits)) * TILE_TOKENS for s in range(splits)]
        if tiles:
            tokens[(tiles - 1) % splits] -= tiles * TILE_TOKENS - kv_len
        return tokens


def _make_plan(batch, num_qo_heads, num_kv_heads, head_dim, max_kv_len, dtype, num_splits, num_sms,
               page_size, chunk_size=None) -> SplitKVPlan:
    """The plan for a given split count (inputs already checked): equal chunks of whole tiles (a
    power of two unless `chunk_size` is given); the split count may shrink when rounding makes
    chunks cover more."""
    group_size = num_qo_heads // num_kv_heads
    heads_per_block = heads_per_block_for(group_size)
    head_groups = -(-group_size // heads_per_block)
    if chunk_size is None:
        chunk_size = chunk_size_for(max_kv_len, num_splits)
    num_splits = max(1, -(-max_kv_len // chunk_size))
    return SplitKVPlan(
        batch=batch, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        dtype=dtype, max_kv_len=max_kv_len, chunk_size=chunk_size, num_splits=num_splits,
        heads_per_block=heads_per_block, head_groups=head_groups, num_sms=num_sms,
        page_size=page_size,
    )


def chunk_size_for(max_kv_len: int, num_splits: int) -> int:
    """Tokens per split: the power of two (at least TILE_TOKENS) that covers max_kv_len in at most
    num_splits splits. Measured on H100 when splits still read contiguous chunks (1 x 8 KV heads x
    4k, fp16): chunks of 512 and 256 rows ran in 18.3 and 19.4 us, chunks of 384 and 320 rows in
    23.0 and 25.0 us; at 32k, 2048-row chunks beat 2240 and 1088 by 12-24%. With interleaved tiles
    the split count still has to be a power of two: at 1 x 8 x 128k, 10, 12 and 14 splits (chunks
    of whole tiles) ran in 214-215, 214 and 199 us against 189 at 8 and 192 at 16; at 32k, 10 and
    12 splits in 66 us against 61 at 8 and 16."""
    want = max(1, math.ceil(max(max_kv_len, 1) / num_splits))
    return max(TILE_TOKENS, 1 << (want - 1).bit_length())


def one_wave_chunk(base_blocks: int, max_kv_len: int, num_sms: int, head_dim: int, dtype: str,
                   page_size: int) -> int | None:
    """For the kernel that holds one block per SM (tensor cores, head_dim 256): the chunk (whole
    tiles, any multiple) whose blocks fill the SMs in exactly one wave, when the rows alone leave
    SMs idle; None otherwise. A power-of-two chunk leaves up to half the SMs idle there, and one
    block more than the SMs hold doubles the time. Measured on H200 (us): 1 x 16/2 x 256 x 333333,
    bfloat16: chunks of 8192 (82 blocks) 215.3, 5056 (132) 183.4, 4096 (164) 259.7, 2560 (262)
    200.6; 1 x 16/4 x 100000: 4096 (100 blocks) 116.3, 3136 (128) 111.9; 3 x 24/3 x 50000: 4096
    (117 blocks) 123.9, 3392 (135 blocks, two waves) 196.9."""
    if not uses_tensor_cores(dtype, head_dim):
        return None
    if tensor_core_blocks_per_sm(head_dim, pipeline_stages(head_dim, bool(page_size)), bool(page_size)) != 1:
        return None
    splits = num_sms // base_blocks
    if splits < 2:
        return None
    chunk = -(-max(max_kv_len, 1) // splits)
    chunk = -(-chunk // TILE_TOKENS) * TILE_TOKENS
    return chunk if chunk >= MIN_CHUNK_TOKENS else None


def candidate_num_splits(base_blocks: int, max_kv_len: int, num_sms: int, blocks_per_sm: int) -> range:
    """Split counts worth predicting: from 1 up to chunks of MIN_CHUNK_TOKENS or two full waves of
    resident blocks, whichever comes first (more blocks than that cannot fill the GPU better)."""
    by_length = max(1, max_kv_len // MIN_CHUNK_TOKENS)
    by_waves = max(1, -(-2 * num_sms * blocks_per_sm // base_blocks))
    return range(1, min(by_length, by_waves) + 1)


def choose_num_splits(
    batch: int,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_kv_len: int,
    *,
    dtype: str = "float16",
    num_sms: int | None = None,
    page_size: int = 0,
    gpu: "GPUSpec | str | None" = None,
    calibration: Calibration | None = None,
) -> int:
    """The split count with the least predicted time, every sequence at `max_kv_len`.

    More splits add blocks (filling more SMs, shortening each block's stream) but also partial
    results to write and read back and a longer merge; the prediction weighs both. Among counts
    within SPLIT_TIE_TOLERANCE of the best, the smallest wins (less workspace, fewer partials).
    The GPU and SM count are resolved as in `plan_split_kv`.
    """
    args = _check_plan_args(batch, num_qo_heads, num_kv_heads, head_dim, max_kv_len, dtype, page_size)
    spec, num_sms = plan_gpu(gpu, num_sms, default_num_sms=DEFAULT_NUM_SMS)
    cal = calibration_for(spec, calibration)
    return _choose_num_splits(*args, num_sms, spec, cal)


def _check_plan_args(batch, num_qo_heads, num_kv_heads, head_dim, max_kv_len, dtype, page_size) -> tuple:
    """The sizes of a plan as ints (NumPy integers accepted), in `_make_plan`'s order less num_splits
    and num_sms: TypeError for a wrong type, ValueError for a wrong value."""
    batch, num_qo_heads, num_kv_heads, head_dim = (
        check_positive_int(value, name) for name, value in (
            ("batch", batch), ("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim)))
    max_kv_len = check_nonnegative_int(max_kv_len, "max_kv_len")
    page_size = check_nonnegative_int(page_size, "page_size (0: contiguous)")
    dtype_bytes(dtype)
    check_head_grouping(num_qo_heads, num_kv_heads)
    return batch, num_qo_heads, num_kv_heads, head_dim, max_kv_len, dtype, page_size


@functools.lru_cache(maxsize=4096)
def _choose_num_splits(batch, num_qo_heads, num_kv_heads, head_dim, max_kv_len, dtype, page_size,
                       num_sms, spec, cal, max_blocks_per_sm=None) -> int:
    base = _make_plan(batch, num_qo_heads, num_kv_heads, head_dim, max_kv_len, dtype, 1, num_sms,
                      page_size)
    base_blocks = base.num_blocks
    times: dict[int, float] = {}
    for s in candidate_num_splits(base_blocks, max_kv_len, num_sms, cal.blocks_per_sm):
        plan = base if s == 1 else _make_plan(batch, num_qo_heads, num_kv_heads, head_dim,
                                              max_kv_len, dtype, s, num_sms, page_size)
        if max_blocks_per_sm is not None and s > 1 and plan.num_blocks > max_blocks_per_sm * num_sms:
            continue
        if plan.num_splits not in times:
            times[plan.num_splits] = predict(plan, gpu=spec, calibration=cal).time_s
    best = min(times.values())
    return min(s for s, t in times.items() if t <= best * (1.0 + SPLIT_TIE_TOLERANCE))


def plan_split_kv(
    batch: int,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_kv_len: int,
    *,
    dtype: str = "float16",
    num_splits: int | None = None,
    num_sms: int | None = None,
    page_size: int = 0,
    gpu: "GPUSpec | str | None" = None,
    max_blocks_per_sm: int | None = None,
) -> SplitKVPlan:
    """Cut a decode call into blocks. `num_splits=None` lets the cost model choose; 1 means no split.
    `max_blocks_per_sm`, with `num_splits=None`: the choice is made among the split counts whose grid
    holds at most this many blocks per SM (one split is always allowed).

    The plan is for `gpu` (a name or a GPUSpec) and takes its SM count; `num_sms`, if also given,
    must agree. Without a GPU, `num_sms` (default DEFAULT_NUM_SMS) picks the listed GPU with that
    many SMs. Sizes are ints (NumPy integers too): a wrong type is a TypeError, a wrong value a
    ValueError.

    >>> plan_split_kv(1, 32, 8, 128, 32768, gpu="A100").num_sms
    108
    """
    args = _check_plan_args(batch, num_qo_heads, num_kv_heads, head_dim, max_kv_len, dtype, page_size)
    batch, num_qo_heads, num_kv_heads, head_dim, max_kv_len, dtype, page_size = args
    num_splits = check_positive_int(num_splits, "num_splits", allow_none=True)
    spec, num_sms = plan_gpu(gpu, num_sms, default_num_sms=DEFAULT_NUM_SMS)
    if num_splits is None:
        base = _make_plan(batch, num_qo_heads, num_kv_heads, head_dim, max_kv_len, dtype, 1, num_sms,
                          page_size)
        chunk = one_wave_chunk(base.num_blocks, max_kv_len, num_sms, head_dim, dtype, page_size)
        if chunk is not None:
            return _make_plan(batch, num_qo_heads, num_kv_heads, head_dim, max_kv_len, dtype, 0,
                              num_sms, page_size, chunk_size=chunk)
        max_blocks_per_sm = check_positive_int(max_blocks_per_sm, "max_blocks_per_sm", allow_none=True)
        num_splits = _choose_num_splits(*args, num_sms, spec, load_calibration(spec.key), max_blocks_per_sm)
    return _make_plan(batch, num_qo_heads, num_kv_heads, head_dim, max_kv_len, dtype, num_splits,
                      num_sms, page_size)


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------

def _kv_lens(plan: SplitKVPlan, kv_lens) -> np.ndarray:
    if kv_lens is None:
        return np.full(plan.batch, plan.max_kv_len, dtype=np.int64)
    lens = as_index_array(kv_lens, "kv_lens")
    if lens.shape != (plan.batch,):
        raise ValueError(f"kv_lens must be int [batch] = [{plan.batch}], got {lens.shape}")
    covered = plan.num_splits * plan.chunk_size
    if lens.size and (lens.min() < 0 or lens.max() > covered):
        raise ValueError(f"kv_lens must lie in [0, {covered}] for this plan, got {lens.min()}..{lens.max()}")
    return lens


def page_lookups(start: int, end: int, page_size: int) -> int:
    """Page-table lookups to read tokens [start, end) of one KV head, `start` a multiple of the
    warp tile: one per page each warp tile touches (0 for a contiguous cache)."""
    if page_size == 0 or end <= start:
        return 0
    r0 = np.arange(start, end, ROWS_PER_WARP_TILE, dtype=np.int64)
    r1 = np.minimum(r0 + ROWS_PER_WARP_TILE, end)
    return int(np.sum((r1 - 1) // page_size - r0 // page_size + 1))


def _append_run(runs: list, block_bytes: int, round_trips: int, count: int) -> None:
    if count <= 0:
        return
    if runs and runs[-1][0] == block_bytes and runs[-1][1] == round_trips:
        runs[-1][2] += count
    else:
        runs.append([block_bytes, round_trips, count])


@functools.lru_cache(maxsize=1024)
def _sequence_runs(plan: SplitKVPlan, kv_len: int, served_by_group: tuple, elem: int) -> tuple:
    """Blocks of one KV head of one sequence, in dispatch order: (bytes, round trips, count)."""
    d = plan.head_dim
    splits = plan.splits_for(kv_len)
    runs: list = []
    for served in served_by_group:
        q_b = served * d * elem
        out_b = served * (d * elem + F32)
        if splits == 1:                                              # writes its output directly
            _append_run(runs, 2 * kv_len * d * elem + q_b + out_b, 1, 1)
            _append_run(runs, 0, 0, plan.num_splits - 1)
            continue
        part_b = served * (d + 1) * F32 + F32                        # partial (out, lse) + arrival
        merge = splits * served * (d + 1) * F32 + out_b + F32        # read partials, write out, reset
        tokens = plan.split_tokens(kv_len)
        for s, t in enumerate(tokens):                               # the last split counts the merge
            last = s == splits - 1
            _append_run(runs, 2 * t * d * elem + q_b + part_b + (merge if last else 0), 2 if last else 1, 1)
        _append_run(runs, 0, 0, plan.num_splits - splits)            # no split here: exits at once
    return tuple(map(tuple, runs))


def split_kv_launch(plan: SplitKVPlan, kv_lens=None, *, name: str = "split_kv") -> Launch:
    """What one launch of the plan moves: bytes per tensor as the kernel's schedule moves them
    (each head group reads its chunk's K/V rows; each block reads its heads' q; with splits every
    block writes a float32 partial and the merging block reads them back) and every block's bytes
    in dispatch order (splits of one (sequence, KV head, head group) row first, row after row)."""
    lens = _kv_lens(plan, kv_lens)
    elem = dtype_bytes(plan.dtype)
    d, hq, hkv, hg = plan.head_dim, plan.num_qo_heads, plan.num_kv_heads, plan.head_groups
    splits = np.maximum(1, -(-lens // plan.chunk_size))
    rows_per_seq = hkv * hg
    kv_rows = int(lens.sum()) * rows_per_seq
    q_heads = int(splits.sum()) * hq
    # Sequences with more than one split: every block writes a partial per served head and bumps
    # the counter; one block per (sequence, KV head, head group) merges and resets it. A sequence
    # with one split writes its output directly.
    merged = splits[splits > 1]
    partial_states = int(merged.sum()) * hq
    counter_ops = (int(merged.sum()) + merged.size) * rows_per_seq
    lookups = rows_per_seq * sum(page_lookups(0, int(L), plan.page_size) * int(n)
                                 for L, n in zip(*np.unique(lens, return_counts=True)))
    bytes_by_tensor = {
        "k": kv_rows * d * elem,
        "v": kv_rows * d * elem,
        "q": q_heads * d * elem,
        "out": plan.batch * hq * d * elem,
        "lse": plan.batch * hq * F32,
        "partial_out_write": partial_states * d * F32,
        "partial_lse_write": partial_states * F32,
        "partial_out_read": partial_states * d * F32,
        "partial_lse_read": partial_states * F32,
        "counters": counter_ops * F32,
        "page_table": lookups * 4,
    }
    # Re-reads of the same rows by the other head groups of a KV head: expected from L2.
    l2_hit = (bytes_by_tensor["k"] + bytes_by_tensor["v"]) * (hg - 1) // hg

    served_by_group = [min(plan.heads_per_block, plan.group_size - g * plan.heads_per_block)
                       for g in range(hg)]
    runs: list = []
    for L in lens.tolist():
        seq_runs = _sequence_runs(plan, L, tuple(served_by_group), elem)
        for _kh in range(hkv):
            for run in seq_runs:
                _append_run(runs, *run)
    useful_flops = 4 * int(lens.sum()) * hq * d
    if uses_tensor_cores(plan.dtype, plan.head_dim):
        # mma.sync m16n8k16: a block's query heads are the 16 rows of A, zero-padded
        padded_rows = sum(MMA_ROWS * -(-served // MMA_ROWS) for served in served_by_group)
        flops = {"matmul_flops": 4 * int(lens.sum()) * hkv * padded_rows * d}
    else:
        flops = {"vector_flops": useful_flops}
    # The calibration measures the contiguous tensor-core kernel; its paged form streams at a rate of
    # its own (fitted: cal.paged_stream_fraction), and its pipeline's shared memory and its registers
    # set how many of its blocks an SM holds.
    paged_pipeline = bool(plan.page_size) and uses_tensor_cores(plan.dtype, plan.head_dim)
    blocks_per_sm = (tensor_core_blocks_per_sm(plan.head_dim, pipeline_stages(plan.head_dim, True), paged=True)
                     if paged_pipeline else None)
    return Launch(
        name=name,
        bytes_by_tensor=bytes_by_tensor,
        block_runs=tuple(map(tuple, runs)),
        useful_flops=useful_flops,
        l2_hit_bytes=l2_hit,
        page_lookups=lookups,
        paged_pipeline=paged_pipeline,
        blocks_per_sm=blocks_per_sm,
        **flops,
    )


# The persistent form of the tensor-core kernel (split_kv.cu: split_kv_mma_persistent_kernel; the
# kernels' switches in gpukernels.split_kv, which must agree): a grid of the resident blocks taking
# the (sequence, KV head, head group) items from a counter, its copies running on from item to item,
# for a contiguous cache of one length (no lengths given), one split, no merged states, more items
# than the GPU holds blocks. At head_dim 128 only for sequences of at most 128 tokens, with 2
# stages (3 blocks an SM by its registers): measured on H200 (scripts/explore/suffix_launch.py)
# 137.2 against 151.2 us at 256 x 32/32 heads x 128 tokens, 48.2 against 49.8 at 256 x 32/8; at 256
# tokens 2 stages ran 1-17% slower than one block per item and 3 stages within 3% of it.
PERSISTENT_HEAD_DIMS = (64, 128)
PERSISTENT_STAGES = {64: 5, 128: 2}
PERSISTENT_MAX_KV_LEN = {128: 128}
PERSISTENT_BLOCKS_PER_SM = {64: 2, 128: 3}


def runs_persistent(plan: SplitKVPlan, *, lengths: bool = False, paged: bool = False, states: bool = False) -> bool:
    """Whether a launch of `plan` runs the persistent kernel (`lengths`: per-sequence lengths given;
    `paged`: a paged cache; `states`: states merged into its outputs)."""
    d = plan.head_dim
    return (not (lengths or paged or states or plan.page_size) and plan.num_splits == 1
            and d in PERSISTENT_HEAD_DIMS and uses_tensor_cores(plan.dtype, d)
            and plan.max_kv_len <= PERSISTENT_MAX_KV_LEN.get(d, plan.max_kv_len)
            and plan.seq_heads > PERSISTENT_BLOCKS_PER_SM[d] * plan.num_sms)


def persistent_launch(launch: Launch, plan: SplitKVPlan) -> Launch:
    """`launch` (of `plan`, one block per item) as the persistent kernel runs it: its resident
    blocks, each streaming an equal share of the items' bytes after one round trip (the copies run on
    from item to item, so no item starts or ends without reads in flight)."""
    blocks = min(plan.seq_heads, PERSISTENT_BLOCKS_PER_SM[plan.head_dim] * plan.num_sms)
    total = sum(b * n for b, _, n in launch.block_runs)
    return dataclasses.replace(launch, block_runs=((-(-total // blocks), 1, blocks),),
                               blocks_per_sm=PERSISTENT_BLOCKS_PER_SM[plan.head_dim])


def predict(
    plan: SplitKVPlan,
    *,
    kv_lens=None,
    gpu: "GPUSpec | str",
    calibration: Calibration | None = None,
    variant: str = "split_kv",
) -> Prediction:
    """Predicted time of one launch of `plan` on `gpu`; `kv_lens` [batch] default all at max_kv_len.

    >>> p = predict(plan_split_kv(1, 32, 8, 128, 32768), gpu="H100")
    >>> p.bound, p.launches, p.bytes_by_tensor["k"] == 32768 * 8 * 128 * 2
    ('memory', 1, True)
    """
    if not isinstance(plan, SplitKVPlan):
        raise TypeError(f"plan must be a SplitKVPlan, got {type(plan).__name__}")
    launch = split_kv_launch(plan, kv_lens, name=variant)
    if runs_persistent(plan, lengths=kv_lens is not None):
        launch = persistent_launch(launch, plan)
    return predict_launches(variant, [launch], gpu=gpu, calibration=calibration)
