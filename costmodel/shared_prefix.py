"""One prefix shared by every sequence, plus a suffix of each sequence's own tokens.

Three ways to run it, all predicted here (`METHODS`):

* `"hydragen"` (Juravsky et al., 2024), as `gpukernels.shared_prefix` runs it: two launches
  (`HydragenPlan`). The prefix pass reads the prefix once: the queries of all sequences and all
  heads of a GQA group form one matrix per KV head, 64 rows a block (on Hopper past 64 rows, 128
  rows a block in two warpgroups taking turns, fed by a third through the TMA:
  `costmodel.segments.prefix_block_rows`), multiplied
  with each prefix chunk on the tensor cores (chunks of `prefix_pass_chunk`), at the rate its
  kernel's counted clocks give (`costmodel.segments.attend_rows_flops_per_s`,
  `pingpong_flops_per_s`); the suffixes by split-KV with the kernels'
  plan, whose blocks that write a row's output merge the prefix chunks' states into it by LSE
  (a separate merge launch only without suffixes). `fused=True` predicts instead one fused launch
  that would do it all (`FusedHydragenPlan`, chunk sizes chosen by the model), for comparison.
* `"bifurcated"` (Athiwaratkun et al., 2024), as this project's kernels run the published method
  (`bifurcated_launches`): the prefix logits of all samples as one product per KV head, the
  suffix logits, one softmax over their concatenation, and the output as P V over the prefix
  (again one product per KV head) plus P V over each suffix; five launches, the float32 logits
  written to memory once and read twice. `fused=True` predicts instead a single-launch kernel of
  the same arithmetic, which costs what Hydragen's fused launch costs.
* `"naive"`: the existing approach: the prefix copied into every sequence's cache and the whole
  cache read by split-KV decode (`costmodel.split_kv`'s own plan).

Bytes per the bifurcated paper's Eq. 5/6: without sharing `g*k*b*(m_c + m_d)` KV elements, with it
`g*k*(m_c + b*m_d)` (g KV heads, k head dim, b batch, m_c prefix, m_d suffix); FLOPs the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from decode_attention.contract import check_positive_int

from .calibration import Calibration
from .gpus import GPUSpec, get_gpu, plan_gpu
from .prediction import (F32, Launch, Prediction, calibration_for, check_int_tuple, check_shape_fields,
                         check_shape_type, dtype_bytes, predict_launches)
from .segments import (MMA_ROWS, QUERY_TILE_ROWS, SegmentGroup, WorkItem, attend_rows_geometry,
                       attend_rows_launch, best_chunks, predict_kernel_launches, prefix_block_rows,
                       segments_launch)
from .split_kv import (DEFAULT_NUM_SMS, SplitKVPlan, persistent_launch, plan_split_kv, runs_persistent,
                       split_kv_launch)
from .split_kv import predict as _predict_split_kv

__all__ = ["SharedPrefixShape", "HydragenPlan", "FusedHydragenPlan", "plan_hydragen", "hydragen_launches",
           "prefix_pass_chunk", "predict", "METHODS"]

METHODS = ("hydragen", "bifurcated", "naive")


@dataclass(frozen=True)
class SharedPrefixShape:
    batch: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    prefix_len: int
    suffix_len: int                       # the suffix cache's length (the longest suffix)
    dtype: str = "float16"
    suffix_lens: tuple[int, ...] | None = None   # valid suffix tokens per sequence; None: all suffix_len

    def __post_init__(self):
        check_shape_fields(self, ("batch", "num_qo_heads", "num_kv_heads", "head_dim"),
                           ("prefix_len", "suffix_len"))
        dtype_bytes(self.dtype)
        if self.suffix_lens is not None:
            lens = check_int_tuple(self.suffix_lens, "suffix_lens")
            if len(lens) != self.batch or max(lens) > self.suffix_len:
                raise ValueError(f"suffix_lens must be [batch] = [{self.batch}] values in "
                                 f"[0, {self.suffix_len}], got {self.suffix_lens!r}")
            object.__setattr__(self, "suffix_lens", lens)

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads

    def lens(self) -> tuple[int, ...]:
        return self.suffix_lens if self.suffix_lens is not None else (self.suffix_len,) * self.batch

    def suffix_groups(self) -> dict[int, int]:
        """Distinct suffix length -> number of sequences with it."""
        out: dict[int, int] = {}
        for n in self.lens():
            out[n] = out.get(n, 0) + 1
        return out


def prefetched_states(head_dim: int) -> int:
    """Prefix states a suffix block loads at its start (split_kv.cu: prefetched_states)."""
    return 8 if head_dim == 128 else 2

STATES_BATCH = 8        # states loaded at once at a block's end (merge_states_into)


@dataclass(frozen=True)
class HydragenPlan:
    """Hydragen as `gpukernels.shared_prefix` runs it, two launches (`launches`): the prefix pass
    (`shared_prefix_kernel`: per KV head, tiles of QUERY_TILE_ROWS query rows against chunks of
    `prefix_chunk_size` prefix tokens, chunks fastest, then tiles, then KV heads), then the
    suffixes by split-KV with `suffix` (the plan the kernels make:
    `costmodel.split_kv.plan_split_kv` for the longest suffix), whose blocks that write a row's
    output also read and merge every prefix chunk's state (split_kv.cu: ExtraStates). Without
    suffixes the merge of the chunks' states is a launch of its own
    (`merge_prefix_chunks_kernel`). `merge_launch`: three launches instead, the suffixes' merging
    no states and starting on the SMs the prefix pass leaves free (`predict` overlaps the two:
    `merge_launch_time_s`), then the merge of the chunks' states and the suffixes' in place."""

    shape: SharedPrefixShape
    prefix_chunk_size: int       # tokens of the prefix per block of the prefix pass
    suffix: "SplitKVPlan | None"  # the suffixes' split-KV plan; None without suffixes
    num_sms: int = DEFAULT_NUM_SMS
    prefix_block_rows: int = QUERY_TILE_ROWS   # query rows per prefix-pass block (`prefix_block_rows`)
    merge_launch: bool = False   # the suffixes merge no states; a merge launch after them does
    # In three launches, the suffixes by the persistent kernel (`costmodel.split_kv.runs_persistent`)
    # instead of one block per item: where the model predicts it faster (`plan_hydragen`).
    suffix_persistent: bool = False

    @property
    def num_chunks(self) -> int:
        """Prefix chunks (the prefix pass's grid x)."""
        return -(-self.shape.prefix_len // self.prefix_chunk_size) if self.shape.prefix_len else 0

    @property
    def row_tiles(self) -> int:
        """Tiles of `prefix_block_rows` query rows per KV head (the prefix pass's grid y)."""
        s = self.shape
        return -(-(s.batch * s.group_size) // self.prefix_block_rows)

    @property
    def prefix_blocks(self) -> int:
        return self.num_chunks * self.row_tiles * self.shape.num_kv_heads

    @property
    def three_launches(self) -> bool:
        """Whether the plan runs the merge launch: asked for, with suffixes and prefix chunks."""
        return self.merge_launch and self.suffix is not None and self.num_chunks > 0

    @property
    def suffix_runs_persistent(self) -> bool:
        """Whether the suffixes' launch runs the persistent kernel: asked for, in three launches, where
        that kernel runs (one split, suffixes of one length, `runs_persistent`)."""
        return (self.suffix_persistent and self.three_launches
                and runs_persistent(self.suffix, lengths=self.shape.suffix_lens is not None))

    @property
    def suffix_chunk_size(self) -> int:
        """Tokens of a suffix per split-KV block (0 without suffixes)."""
        return self.suffix.chunk_size if self.suffix is not None else 0

    @property
    def parts_per_sequence(self) -> int:
        """States the merge reads per (sequence, query head): the prefix chunks' and the suffix's."""
        return self.num_chunks + (1 if self.suffix is not None else 0)

    def prefix_items(self) -> list[WorkItem]:
        """The prefix pass's blocks of one KV head in dispatch order: chunks of each row tile."""
        s = self.shape
        rows = s.batch * s.group_size
        items = []
        for t in range(self.row_tiles):
            tile_rows = min(self.prefix_block_rows, rows - t * self.prefix_block_rows)
            for c in range(self.num_chunks):
                tokens = min(self.prefix_chunk_size, s.prefix_len - c * self.prefix_chunk_size)
                items.append(WorkItem(tokens, tile_rows, rereads=t > 0, label="prefix"))
        return items

    def suffix_launch(self) -> Launch:
        """The suffixes' split-KV launch, one block per item, their K and V named as the suffixes'."""
        launch = split_kv_launch(self.suffix, list(self.shape.lens()), name="suffixes")
        renamed = {f"{k}_suffix" if k in ("k", "v") else k: v for k, v in launch.bytes_by_tensor.items()}
        return dataclasses.replace(launch, bytes_by_tensor=renamed)

    def launches(self, gpu: "GPUSpec | str") -> list[tuple[Launch, float | None]]:
        """The launches, each with its tensor-core rate (None: the GPU's): the prefix pass at
        `costmodel.segments.attend_rows_flops_per_s` over its blocks' tiles, then the suffixes
        (with the chunks' states: their bytes, and for a block that writes its output directly
        one more round trip per STATES_BATCH states when there are more than it prefetches,
        which it loads at its end instead of its start), or the merge."""
        s = self.shape
        spec = get_gpu(gpu)
        out: list[tuple[Launch, float | None]] = []
        if self.num_chunks:
            out.append(attend_rows_launch("prefix_pass", self.prefix_items(), num_kv_heads=s.num_kv_heads,
                                          head_dim=s.head_dim, dtype=s.dtype, gpu=spec,
                                          block_rows=self.prefix_block_rows))
        if self.suffix is not None:
            launch = self.suffix_launch()
            if self.three_launches:
                if self.suffix_runs_persistent:
                    launch = persistent_launch(launch, self.suffix)
                out.append((launch, None))
                out.append((merge_chunks_launch(self.num_chunks, s.batch * s.num_qo_heads, s.head_dim, s.dtype,
                                                suffix=True), None))
            else:
                out.append((with_merged_states(launch, self.suffix, self.num_chunks, "prefix_states"), None))
        else:
            out.append((merge_chunks_launch(max(self.num_chunks, 1), s.batch * s.num_qo_heads, s.head_dim, s.dtype,
                                            suffix=False), None))
        return out


MERGE_THREADS = 128           # merge_prefix_chunks_kernel: a thread per 4 dims of a row
MERGE_BLOCKS_PER_SM = 16      # its 128-thread blocks without shared memory: the thread limit decides


def merge_chunks_launch(num_chunks: int, rows: int, head_dim: int, dtype: str, *, suffix: bool) -> Launch:
    """`merge_prefix_chunks_kernel`: per (sequence, query head) row, `num_chunks` float32 states
    read STATES_BATCH at a time (a round trip each batch) and, with `suffix`, the suffixes' state
    in out and lse first (one more); the merged row written in `dtype`. A thread per 4 dims,
    MERGE_THREADS a block."""
    elem = dtype_bytes(dtype)
    blocks = max(1, -(-rows * (head_dim // 4) // MERGE_THREADS))
    bytes_by_tensor = {"prefix_states": num_chunks * rows * (head_dim + 1) * F32,
                       "out": rows * (head_dim * elem + F32)}
    if suffix:
        bytes_by_tensor["suffix_state"] = rows * (head_dim * elem + F32)
    trips = -(-num_chunks // STATES_BATCH) + (1 if suffix else 0)
    return Launch(name="merge", bytes_by_tensor=bytes_by_tensor,
                  block_runs=((sum(bytes_by_tensor.values()) / blocks, trips, blocks),),
                  vector_flops=3 * (num_chunks + suffix) * rows * head_dim, blocks_per_sm=MERGE_BLOCKS_PER_SM)


def merge_launch_time_s(plan: HydragenPlan, gpu: GPUSpec, calibration: Calibration, *,
                        alone: "tuple[float, float, float] | None" = None) -> dict[str, float]:
    """The three launches of `plan.merge_launch` overlapped as they run: the prefix pass, in fewer
    blocks than SMs at one block an SM (the two-warpgroup pass), leaves the other SMs to the
    suffixes' blocks, which start with it and stream on the free SMs (their launch timed on a GPU of
    that many SMs and the whole memory system) until the pass ends, then on all; the merge after
    both. Otherwise (a pass that fills the GPU) the three one after another. Returns the terms
    'prefix_s', 'suffixes_s', 'merge_s' (each launch alone, launch included), 'overlap_s' (what
    the overlap saves) and 'time_s'. `alone`: those three launches' times where the caller has them
    (`predict`'s per-launch terms)."""
    prefix, suffixes, merge = plan.launches(gpu)
    t_prefix, t_suffixes, t_merge = alone or tuple(
        predict_kernel_launches(launch.name, [(launch, rate)], gpu=gpu, calibration=calibration).time_s
        for launch, rate in (prefix, suffixes, merge))
    launch_s = calibration.launch_s
    sequential = t_prefix + t_suffixes + t_merge
    _, blocks_per_sm = attend_rows_geometry(plan.prefix_block_rows, plan.shape.head_dim)
    free = gpu.num_sms - prefix[0].num_blocks
    time_s = sequential
    if blocks_per_sm == 1 and free > 0:
        # Beside the pass, the suffixes stream at the rate of one block per item whichever kernel
        # runs them (measured: the persistent kernel's faster streaming there slows the pass as
        # much as it gains); the persistent kernel gains on the rest, after the pass.
        beside = (plan.suffix_launch(), None) if plan.suffix_runs_persistent else suffixes
        on_free = predict_kernel_launches("suffixes", [beside], gpu=dataclasses.replace(gpu, num_sms=free),
                                          calibration=calibration).time_s - launch_s
        body, rest = t_prefix - launch_s, t_suffixes - launch_s
        done = min(1.0, body / on_free)   # the suffixes' share done on the free SMs while the pass runs
        time_s = min(sequential, launch_s + max(body, done * on_free) + (1.0 - done) * rest + t_merge)
    return {"prefix_s": t_prefix, "suffixes_s": t_suffixes, "merge_s": t_merge, "overlap_s": sequential - time_s,
            "time_s": time_s}


def with_merged_states(launch: Launch, plan: SplitKVPlan, num_states: int, name: str) -> Launch:
    """A split-KV launch of `plan` whose blocks that write a row's output also read and merge
    `num_states` float32 states of every row (split_kv.cu: ExtraStates): their bytes (as `name`),
    and for a block that writes its output directly one more round trip per STATES_BATCH states
    when there are more than `prefetched_states(head_dim)`, which it loads at its end instead of
    its start."""
    if not num_states:
        return launch
    n, rows = num_states, plan.batch * plan.num_qo_heads
    bytes_by_tensor = dict(launch.bytes_by_tensor)
    bytes_by_tensor[name] = n * rows * (plan.head_dim + 1) * F32
    direct = plan.num_splits == 1
    trips = -(-n // STATES_BATCH) if direct and n > prefetched_states(plan.head_dim) else 0
    per_block = n * (rows // max(launch.busy_blocks, 1)) * (plan.head_dim + 1) * F32 if direct else 0
    runs = tuple((b + per_block, t + trips, c) if (b or t) else (b, t, c) for b, t, c in launch.block_runs)
    return dataclasses.replace(launch, bytes_by_tensor=bytes_by_tensor, block_runs=runs)


@dataclass(frozen=True)
class FusedHydragenPlan:
    """Hydragen as one fused launch (`costmodel.segments.segments_launch`), which the kernels do
    not have: prefix and suffix chunks in one grid, the merge by the last block of each row.
    Chunk sizes chosen by the model (`plan_hydragen(..., fused=True)`). Predicted with
    `predict(..., fused=True)`, to compare with the two launches that run."""

    shape: SharedPrefixShape
    prefix_chunk_size: int       # tokens of the prefix per block
    suffix_chunk_size: int       # tokens of a suffix per block
    num_sms: int = DEFAULT_NUM_SMS

    def groups(self) -> list[SegmentGroup]:
        s = self.shape
        groups = [SegmentGroup("prefix", s.prefix_len, s.batch, 1, self.prefix_chunk_size)]
        for n, count in sorted(s.suffix_groups().items()):
            groups.append(SegmentGroup("suffix", n, 1, count, self.suffix_chunk_size))
        return groups

    @property
    def parts_per_sequence(self) -> int:
        """Partial states merged per query head (the longest suffix's sequence)."""
        s = self.shape
        prefix_parts = -(-s.prefix_len // self.prefix_chunk_size)
        return prefix_parts + -(-s.suffix_len // self.suffix_chunk_size)

    def launch(self) -> Launch:
        s = self.shape
        return segments_launch(
            "hydragen", batch=s.batch, num_qo_heads=s.num_qo_heads, num_kv_heads=s.num_kv_heads,
            head_dim=s.head_dim, dtype=s.dtype, groups=self.groups(),
            parts_per_sequence=max(1, self.parts_per_sequence),
        )


def plan_hydragen(
    shape: SharedPrefixShape,
    *,
    num_sms: int | None = None,
    gpu: "GPUSpec | str | None" = None,
    calibration: Calibration | None = None,
    prefix_chunk_size: int | None = None,
    suffix_chunk_size: int | None = None,
    fused: bool = False,
    merge_launch: bool | None = None,
    suffix_persistent: bool = True,
) -> "HydragenPlan | FusedHydragenPlan":
    """The plan the kernels make (`gpukernels.shared_prefix.plan_shared_prefix`): the prefix chunk
    and whether a merge launch follows the suffixes (`hydragen_schedule`: the model's fastest), the
    suffixes' split-KV plan; given sizes and `merge_launch` are kept (a given `suffix_chunk_size`
    replaces the split plan's chunk; with a given prefix chunk, `merge_launch` None is the model's
    choice at that chunk). `fused=True`: the single fused launch's plan instead, its chunk sizes
    those the model predicts fastest. The plan is for `gpu` and takes its SM count; `num_sms`, if
    also given, must agree (see `plan_split_kv`). `suffix_persistent`: in three launches, the
    suffixes by the persistent kernel where the model predicts the call faster so (chosen after the
    chunk and the launches, which are chosen without it); False: one block per item."""
    check_shape_type(shape, SharedPrefixShape)
    spec, num_sms = plan_gpu(gpu, num_sms, default_num_sms=DEFAULT_NUM_SMS)
    fixed = [check_positive_int(prefix_chunk_size, "prefix_chunk_size", allow_none=True),
             check_positive_int(suffix_chunk_size, "suffix_chunk_size", allow_none=True)]
    if fused:
        cal = calibration_for(spec, calibration)

        def time_of(chunks):
            plan = FusedHydragenPlan(shape, *(f or c for f, c in zip(fixed, chunks)), num_sms=num_sms)
            return predict_launches("shared_prefix:hydragen", [plan.launch()], gpu=spec, calibration=cal).time_s

        chunks = best_chunks([shape.prefix_len, shape.suffix_len], time_of)
        return FusedHydragenPlan(shape, *(f or c for f, c in zip(fixed, chunks)), num_sms=num_sms)
    if merge_launch is not None and not isinstance(merge_launch, bool):
        raise TypeError(f"merge_launch must be a bool or None, got {type(merge_launch).__name__}")
    s = shape
    if fixed[0] is None or merge_launch is None:
        chunk, chosen = hydragen_schedule(s, gpu=spec, num_sms=num_sms, calibration=calibration,
                                          prefix_chunk_size=fixed[0], suffix_chunk_size=fixed[1],
                                          merge_launch=merge_launch)
        return plan_hydragen(s, gpu=spec, num_sms=num_sms, prefix_chunk_size=chunk, suffix_chunk_size=fixed[1],
                             merge_launch=chosen, suffix_persistent=suffix_persistent)
    block_rows = prefix_block_rows(spec, s.head_dim, s.dtype, s.batch * s.group_size)
    suffix = None
    if s.suffix_len:
        suffix = plan_split_kv(s.batch, s.num_qo_heads, s.num_kv_heads, s.head_dim, s.suffix_len, dtype=s.dtype,
                               num_sms=num_sms, gpu=spec)
        if fixed[1] is not None and fixed[1] != suffix.chunk_size:
            suffix = dataclasses.replace(suffix, chunk_size=fixed[1], num_splits=-(-s.suffix_len // fixed[1]))
    plan = HydragenPlan(shape, fixed[0], suffix, num_sms=num_sms, prefix_block_rows=block_rows,
                        merge_launch=merge_launch and suffix is not None and s.prefix_len > 0)
    persistent = dataclasses.replace(plan, suffix_persistent=True)
    if suffix_persistent and persistent.suffix_runs_persistent:
        # The persistent kernel streams the suffixes faster, but beside the prefix pass it also
        # takes more of the memory system from it: only where the suffixes outlast the pass (the
        # model then predicts it faster, on the rest after the pass; where they end within it, the
        # two tie and one block per item stays). Measured on H200 in three launches at the chunk
        # of 4096: 32/32 heads x 256 x 4096 + 128 199.2 -> 183.2 us, 32/8 89.2 -> 92.4
        # (logs/explore-prefix-merge-launch-persistent.log). The chunk and the launches are chosen
        # without it (the model puts its gain at the chunk of 2048 too, where it measured 199.9
        # and 98.4: the pass then leaves no SMs free, and the model's persistent launch alone is
        # 10-20% too fast, counting no ramp of the memory system).
        times = [predict(s, method="hydragen", gpu=spec, calibration=calibration, plan=p).time_s
                 for p in (plan, persistent)]
        if times[1] < times[0] * (1.0 - PERSISTENT_SUFFIX_MARGIN):
            return persistent
    return plan


# A merge launch is planned only where the model predicts it this much faster than the best two-
# launch plan: its overlap of the prefix pass with the suffixes is the model's least-measured part.
MERGE_LAUNCH_MARGIN = 0.03
# The suffixes of a three-launch plan run the persistent kernel only where the model predicts the
# call this much faster with it (on a tie, one block per item).
PERSISTENT_SUFFIX_MARGIN = 0.01


def hydragen_schedule(shape: SharedPrefixShape, *, gpu: "GPUSpec | str", num_sms: int | None = None,
                      calibration: Calibration | None = None, prefix_chunk_size: int | None = None,
                      suffix_chunk_size: int | None = None,
                      merge_launch: bool | None = None) -> tuple[int, bool]:
    """(prefix chunk, merge launch) of Hydragen's kernels' plan: of the one-wave chunk
    (`prefix_pass_chunk`), its half and its doublings (x2, x4) (or the given chunk), each in two
    launches and, with suffixes, in three (`HydragenPlan.merge_launch`; or as given), the one whose
    whole call the model predicts fastest: in two launches the one-wave chunk on a tie, in three
    only when MERGE_LAUNCH_MARGIN faster than the best in two. Fewer, longer chunks leave SMs idle
    in the prefix pass but shorten the merge of one state per chunk; in three launches the idle SMs
    run the suffixes meanwhile. Measured on H200 (whole call, us; `logs/explore-prefix-chunk-sweep.log`):
    32/8 heads, batch 16, 8192 + 256: c256 33.3, c512 31.3, c1024 35.4 (the model: 35.1, 32.1,
    34.2); three launches (`logs/explore-prefix-merge-launch.log`): 32/8 heads, batch 256, 4096 +
    128: c2048 in two 96.6, c4096 in three 88.7 (the model: 100.8, 91.2)."""
    check_shape_type(shape, SharedPrefixShape)
    spec, num_sms = plan_gpu(gpu, num_sms, default_num_sms=DEFAULT_NUM_SMS)
    s = shape
    block_rows = prefix_block_rows(spec, s.head_dim, s.dtype, s.batch * s.group_size)
    tile, blocks_per_sm = attend_rows_geometry(block_rows, s.head_dim)
    one_wave = prefix_pass_chunk(max(s.prefix_len, 1), s.batch * s.group_size, s.num_kv_heads, num_sms,
                                 blocks_per_sm, tile, block_rows=block_rows)
    longest = max(tile, -(-max(s.prefix_len, 1) // tile) * tile)
    if prefix_chunk_size is not None:
        candidates = [prefix_chunk_size]
    else:
        candidates = sorted({one_wave, max(tile, one_wave // 2 // tile * tile), min(longest, 2 * one_wave),
                             min(longest, 4 * one_wave)})
    modes = [merge_launch] if merge_launch is not None else [False, True] if s.suffix_len and s.prefix_len else [False]

    def time_of(chunk: int, mode: bool) -> float:
        plan = plan_hydragen(s, gpu=spec, num_sms=num_sms, prefix_chunk_size=chunk, suffix_chunk_size=suffix_chunk_size,
                             merge_launch=mode, suffix_persistent=False)
        return predict(s, method="hydragen", gpu=spec, calibration=calibration, plan=plan).time_s

    times = {(c, m): time_of(c, m) for c in candidates for m in modes}
    best = {m: min(candidates, key=lambda c: (times[c, m], c != one_wave)) for m in modes}
    if len(modes) == 2 and times[best[True], True] < times[best[False], False] * (1.0 - MERGE_LAUNCH_MARGIN):
        return best[True], True
    return best[modes[0]], modes[0]


def hydragen_prefix_chunk(shape: SharedPrefixShape, *, gpu: "GPUSpec | str", num_sms: int | None = None,
                          calibration: Calibration | None = None) -> int:
    """The prefix chunk of Hydragen's kernels' plan (`hydragen_schedule`)."""
    return hydragen_schedule(shape, gpu=gpu, num_sms=num_sms, calibration=calibration)[0]


def prefix_pass_chunk(prefix_len: int, query_rows: int, num_kv_heads: int, num_sms: int,
                      blocks_per_sm: int, tile: int, *, block_rows: int = QUERY_TILE_ROWS) -> int:
    """The prefix chunk of the kernels' prefix pass (a launch of its own; the suffixes and the
    merge follow in two more): the shortest whole-tile chunk whose blocks (chunks x tiles of
    `block_rows` query rows x KV heads) still fit in one wave of resident blocks, the whole
    prefix when the rows alone fill the wave. Fewer blocks leave SMs idle; a second wave adds its
    length. Measured on H200, float16, 32 query heads, head_dim 128 (prefix pass alone, us, chunk
    x chunks): 32/32 heads, batch 16, prefix 8192: 512x16 53.7, 1024x8 51.5, 2048x4 54.0, 4096x2
    98.2; batch 64, 16384: 2048x8 96.2, 4096x4 106.3, 8192x2 192.5; 32/8, batch 16, 8192: 256x32
    21.2, 512x16 19.6, 1024x8 29.5; batch 64, 16384: 1024x16 88.3, 2048x8 83.5, 4096x4 101.1;
    batch 128, 32768: 4096x8 299.6, 8192x4 298.8, 16384x2 378.4. Blocks of two warpgroups (128
    rows, one an SM, copying their own tiles, before the producer warpgroup;
    `logs/explore-prefix-pingpong.log`): 32/8, batch 128, 32768: 2048x16 161.0,
    4096x8 148.9, 8192x4 143.1; batch 256, 4096: 1024x4 48.1, 2048x2 42.5, 4096x1 72.5."""
    for name, value in (("prefix_len", prefix_len), ("query_rows", query_rows), ("num_kv_heads", num_kv_heads),
                        ("num_sms", num_sms), ("blocks_per_sm", blocks_per_sm), ("tile", tile),
                        ("block_rows", block_rows)):
        check_positive_int(value, name)
    row_tiles = -(-query_rows // block_rows)
    chunks = max(1, num_sms * blocks_per_sm // (row_tiles * num_kv_heads))
    chunk = -(-prefix_len // chunks)
    return max(tile, -(-chunk // tile) * tile)


def _tiles(rows: int) -> list[int]:
    return [min(QUERY_TILE_ROWS, rows - t) for t in range(0, rows, QUERY_TILE_ROWS)]


# The bifurcated kernels (gpukernels.bifurcated, cuda/bifurcated.cu), their tiles and residency.
BIFURCATED_LOGIT_TILE = 64        # prefix tokens per tensor-core logits block
BIFURCATED_SIMT_TOKENS = 32       # tokens per CUDA-core logits tile (suffixes; the float32 prefix)
BIFURCATED_SIMT_ROWS = 16         # query rows per CUDA-core values block (float32)
BIFURCATED_TENSOR_CORE_DTYPES = ("float16", "bfloat16")
ROW_KERNEL_BLOCKS_PER_SM = 8      # the softmax and finish launches: one small block per query row
LOGITS_BLOCKS_PER_SM = 4          # the logits launches: up to 37 KB of shared memory a block


def _blocks(total_bytes: float, blocks: int, round_trips: int = 1) -> tuple:
    """Block runs for a launch of `blocks` blocks sharing its traffic evenly."""
    blocks = max(1, blocks)
    return ((total_bytes / blocks, round_trips, blocks),)


def bifurcated_values_chunk(shape: SharedPrefixShape, num_sms: int) -> int:
    """The prefix chunk of the bifurcated values pass (as `gpukernels.shared_prefix.plan_shared_prefix`
    chooses it): one wave of resident blocks."""
    s = shape
    rows = s.batch * s.group_size
    if s.dtype in BIFURCATED_TENSOR_CORE_DTYPES:
        tile = 32 if s.head_dim >= 256 else 64
        return prefix_pass_chunk(max(s.prefix_len, 1), rows, s.num_kv_heads, num_sms,
                                 1 if s.head_dim >= 256 else 2, tile)
    return prefix_pass_chunk(max(s.prefix_len, 1), rows * (QUERY_TILE_ROWS // BIFURCATED_SIMT_ROWS), s.num_kv_heads,
                             num_sms, 2, BIFURCATED_SIMT_TOKENS)


def bifurcated_logits_row_tiles(shape: SharedPrefixShape, num_sms: int) -> int:
    """Row tiles of 64 query rows per block of the prefix-logits launch (all of them unless that
    leaves fewer than two blocks per SM)."""
    s = shape
    row_tiles = -(-(s.batch * s.group_size) // QUERY_TILE_ROWS)
    tokens = BIFURCATED_LOGIT_TILE if s.dtype in BIFURCATED_TENSOR_CORE_DTYPES else BIFURCATED_SIMT_TOKENS
    key_tiles = -(-max(s.prefix_len, 1) // tokens)
    return max(1, min(row_tiles, key_tiles * s.num_kv_heads * row_tiles // (2 * num_sms)))


def bifurcated_launches(shape: SharedPrefixShape, num_sms: int = DEFAULT_NUM_SMS) -> list[Launch]:
    """The launches of the bifurcated kernels, in order: prefix logits (all query rows of a KV
    group against each prefix tile, the tile read once per run of row tiles), suffix logits,
    the softmax's max and sum per row, P V over the prefix in chunks (float32 partials), and the
    finish (partials summed, P V over the suffix, divided by the sum). The float32 logits are
    written once and read twice (softmax, then values and finish): the method's cost."""
    s = shape
    elem = dtype_bytes(s.dtype)
    b, hq, hkv, d, p = s.batch, s.num_qo_heads, s.num_kv_heads, s.head_dim, s.prefix_len
    tensor_cores = s.dtype in BIFURCATED_TENSOR_CORE_DTYPES
    suffix_tokens = sum(s.lens())
    rows = b * s.group_size                       # query rows per KV head
    tiles = _tiles(rows)
    padded = sum(MMA_ROWS * -(-r // MMA_ROWS) for r in tiles) if tensor_cores else rows
    q = b * hq * d * elem
    prefix_kv = p * hkv * d * elem                # one of K or V of the prefix
    suffix_kv = suffix_tokens * hkv * d * elem
    logits_p, logits_s = b * hq * p * F32, hq * suffix_tokens * F32
    row_stats = b * hq * 3 * F32                  # (max, sum) and lse per query row
    out = b * hq * d * elem
    prefix_flops = 2 * hkv * padded * p * d
    useful_prefix, useful_suffix = 2 * b * hq * p * d, 2 * hq * suffix_tokens * d

    # The prefix products: tensor cores, or the CUDA cores for float32.
    prefix_matmul, prefix_vector = (prefix_flops, 0) if tensor_cores else (0, prefix_flops)
    launches = []
    if p:
        key_tiles = -(-p // (BIFURCATED_LOGIT_TILE if tensor_cores else BIFURCATED_SIMT_TOKENS))
        runs = -(-len(tiles) // bifurcated_logits_row_tiles(s, num_sms))
        tensors = {"q": q * key_tiles, "k_prefix": prefix_kv * runs, "logits_prefix_write": logits_p}
        launches.append(Launch(
            name="prefix_logits", bytes_by_tensor=tensors,
            block_runs=_blocks(sum(tensors.values()), key_tiles * hkv * runs),
            matmul_flops=prefix_matmul, vector_flops=prefix_vector, useful_flops=useful_prefix,
            l2_hit_bytes=q * (key_tiles - 1) + prefix_kv * (runs - 1), blocks_per_sm=LOGITS_BLOCKS_PER_SM))
    if s.suffix_len:
        suffix_tiles = sum(-(-n // BIFURCATED_SIMT_TOKENS) for n in s.lens())
        tensors = {"q": q, "k_suffix": suffix_kv, "logits_suffix_write": logits_s}
        launches.append(Launch(
            name="suffix_logits", bytes_by_tensor=tensors,
            block_runs=_blocks(sum(tensors.values()), suffix_tiles * hkv),
            vector_flops=useful_suffix, blocks_per_sm=LOGITS_BLOCKS_PER_SM))
    tensors = {"logits_read": logits_p + logits_s, "row_stats_write": row_stats}
    launches.append(Launch(
        name="softmax", bytes_by_tensor=tensors, block_runs=_blocks(sum(tensors.values()), b * hq),
        vector_flops=3 * (b * hq * p + hq * suffix_tokens), useful_flops=0, blocks_per_sm=ROW_KERNEL_BLOCKS_PER_SM))
    n_chunks = -(-p // bifurcated_values_chunk(s, num_sms)) if p else 0
    partials = n_chunks * b * hq * d * F32
    if p:
        value_tiles = len(tiles) if tensor_cores else -(-rows // BIFURCATED_SIMT_ROWS)
        tensors = {"logits_prefix_read": logits_p, "v_prefix": prefix_kv * value_tiles, "partials_write": partials}
        launches.append(Launch(
            name="prefix_values", bytes_by_tensor=tensors,
            block_runs=_blocks(sum(tensors.values()), n_chunks * value_tiles * hkv),
            matmul_flops=prefix_matmul, vector_flops=prefix_vector, useful_flops=useful_prefix,
            l2_hit_bytes=prefix_kv * (value_tiles - 1), blocks_per_sm=1 if d >= 256 else 2))
    # The finish reads each suffix value row once per query head of its group (from L2 after the first).
    tensors = {"partials_read": partials, "logits_suffix_read": logits_s, "v_suffix": suffix_kv * s.group_size,
               "out": out}
    launches.append(Launch(
        name="finish", bytes_by_tensor=tensors, block_runs=_blocks(sum(tensors.values()), b * hq),
        vector_flops=useful_suffix, l2_hit_bytes=suffix_kv * (s.group_size - 1),
        blocks_per_sm=ROW_KERNEL_BLOCKS_PER_SM))
    return launches


def hydragen_launches(shape: SharedPrefixShape, *, gpu: "GPUSpec | str") -> list[Launch]:
    """The launches of Hydragen's kernels on `gpu` (the plan `plan_hydragen` makes), in order:
    prefix pass, suffixes, merge."""
    return [launch for launch, _ in plan_hydragen(shape, gpu=gpu).launches(gpu)]


def predict(
    shape: SharedPrefixShape,
    *,
    method: str = "hydragen",
    gpu: "GPUSpec | str",
    calibration: Calibration | None = None,
    plan: "HydragenPlan | FusedHydragenPlan | None" = None,
    fused: bool = False,
) -> Prediction:
    """Prediction for one shared-prefix call by `method` (see METHODS): Hydragen as the three
    launches of its kernels, or with `fused=True` as one fused launch (`FusedHydragenPlan`; for
    "bifurcated" too: a single-launch kernel of the same arithmetic costs what that launch costs).
    A given `HydragenPlan` with `fused=True` gives its chunk sizes to the fused launch."""
    check_shape_type(shape, SharedPrefixShape)
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, one of {', '.join(METHODS)}, got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if plan is not None and not isinstance(plan, (HydragenPlan, FusedHydragenPlan)):
        raise TypeError(f"plan must be a HydragenPlan, a FusedHydragenPlan or None, got {type(plan).__name__}")
    if plan is not None and plan.shape != shape:
        raise ValueError("plan was made for another shape")
    spec = get_gpu(gpu)
    cal = calibration_for(spec, calibration)
    variant = f"shared_prefix:{method}"
    if method == "naive":
        total = shape.prefix_len + shape.suffix_len
        naive = plan_split_kv(shape.batch, shape.num_qo_heads, shape.num_kv_heads, shape.head_dim,
                              total, dtype=shape.dtype, num_sms=spec.num_sms, gpu=spec)
        lens = [shape.prefix_len + n for n in shape.lens()]
        return _predict_split_kv(naive, kv_lens=lens, gpu=spec, calibration=cal, variant=variant)
    if method == "bifurcated" and not fused:
        return predict_launches(variant, bifurcated_launches(shape, spec.num_sms), gpu=spec, calibration=cal)
    if fused:
        if isinstance(plan, HydragenPlan):
            plan = FusedHydragenPlan(shape, plan.prefix_chunk_size, max(plan.suffix_chunk_size, 1),
                                     num_sms=plan.num_sms)
        elif plan is None:
            plan = plan_hydragen(shape, num_sms=spec.num_sms, gpu=spec, calibration=cal, fused=True)
        return predict_launches(variant, [plan.launch()], gpu=spec, calibration=cal)
    if isinstance(plan, FusedHydragenPlan):
        raise ValueError("a FusedHydragenPlan is predicted with fused=True; the kernels' launches take a "
                         "HydragenPlan")
    if plan is None:
        plan = plan_hydragen(shape, num_sms=spec.num_sms, gpu=spec, calibration=cal)
    launches = plan.launches(spec)
    prediction = predict_kernel_launches(variant, launches, gpu=spec, calibration=cal)
    if plan.three_launches:
        overlapped = merge_launch_time_s(plan, spec, cal,
                                         alone=tuple(prediction.terms[f"{l.name}.time_s"] for l, _ in launches))
        prediction = dataclasses.replace(prediction, time_s=overlapped["time_s"],
                                         terms={**prediction.terms, "overlap_s": overlapped["overlap_s"],
                                                "time_s": overlapped["time_s"]})
    return prediction
