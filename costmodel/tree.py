"""Tree-shaped sharing: each sequence's context is a path of segments, each segment shared by the
sequences below it (Hydragen's hierarchy; FlashInfer's cascade).

The shape is given by levels: level i has `num_segments` segments of `seg_len` tokens, and the
sequences are split evenly among them (segment j of a level is shared by sequences
`j * batch / num_segments ...`). `gpukernels.tree` runs two launches (`TreePlan.launches`): the
segments launch, one block per (segment, chunk, tile of 64 query rows) and KV head, every segment
shared by two sequences or more read once for all of them as a tensor-core product
(`costmodel.segments.attend_rows_launch`, the blocks of Hydragen's prefix pass), then each
sequence's own tokens (the segments no other sequence reads) by split-KV over windows of its
rows, whose blocks merge the shared segments' states into their outputs (as Hydragen's suffixes
merge the prefix's; `own_tokens_launch`). One chunk size for every shared segment, as the kernels
choose it (`tree_chunk_size`). `fused=True` predicts instead one fused launch with a chunk size
per level chosen by the model (`FusedTreePlan`).

Example: the tree of docs/benchmarks.md, 64 sequences, a 4096-token root, 8 groups of 8 sharing 2048 more and
256 own tokens each: `TreeShape(64, 32, 32, 128, levels=((1, 4096), (8, 2048), (64, 256)))`.
"""

from __future__ import annotations

from dataclasses import dataclass

import dataclasses

from decode_attention.contract import check_nonnegative_int

from .calibration import Calibration
from .gpus import GPUSpec, get_gpu, plan_gpu
from .merge_states import MergeStatesShape, merge_states_launch
from .prediction import (Launch, Prediction, calibration_for, check_int_tuple, check_shape_fields,
                         check_shape_type, dtype_bytes, predict_launches, resolve_plan)
from .segments import (QUERY_TILE_ROWS, SegmentGroup, WorkItem, attend_rows_kv_tile, attend_rows_launch,
                       best_chunks, predict_kernel_launches, predict_planned, segments_launch)
from .shared_prefix import with_merged_states
from .split_kv import DEFAULT_NUM_SMS, ROWS_PER_WARP_TILE, SplitKVPlan, plan_split_kv, split_kv_launch

__all__ = ["TreeShape", "TreePlan", "FusedTreePlan", "plan_tree", "tree_chunk_size", "predict", "predict_work",
           "chunk_candidates_of_tree", "own_tokens_plan", "own_tokens_launch", "kernels_plan",
           "FORMS"]

LONGEST_CHUNK = 8192   # the kernels' first chunk size (gpukernels.tree.choose_work)
WINDOW_ROWS = ROWS_PER_WARP_TILE   # rows of a window of own tokens at most (gpukernels.split_kv.WINDOW_ROWS)


@dataclass(frozen=True)
class TreeShape:
    batch: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    levels: tuple[tuple[int, int], ...]    # (num_segments, seg_len) from the root down
    dtype: str = "float16"

    def __post_init__(self):
        check_shape_fields(self, ("batch", "num_qo_heads", "num_kv_heads", "head_dim"))
        dtype_bytes(self.dtype)
        levels = _check_levels(self.levels)
        if not levels:
            raise ValueError("levels must hold at least one (num_segments, seg_len)")
        previous = 1
        for n, length in levels:
            if n < 1 or length < 0 or self.batch % n or n % previous:
                raise ValueError(
                    f"levels must be (num_segments, seg_len) with num_segments dividing batch = "
                    f"{self.batch} and a multiple of the level above's, got {self.levels!r}")
            previous = n
        object.__setattr__(self, "levels", levels)

    @property
    def context_len(self) -> int:
        """Tokens each sequence attends to (its whole path)."""
        return sum(length for _, length in self.levels)


def _check_levels(levels) -> tuple[tuple[int, int], ...]:
    """(num_segments, seg_len) pairs of integers (NumPy integers too) as ints."""
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
        raise TypeError(f"levels must be a sequence of (num_segments, seg_len), got {type(levels).__name__}")
    out = []
    for i, level in enumerate(levels):
        pair = check_int_tuple(level, f"levels[{i}]")
        if len(pair) != 2:
            raise ValueError(f"levels[{i}] must be (num_segments, seg_len), got {level!r}")
        out.append(pair)
    return tuple(out)


def _items(shape: TreeShape, chunk_size: int, shared_only: bool = True) -> list[WorkItem]:
    """The segments launch's blocks of one KV head in the work list's order: segment by segment
    (root first), chunk by chunk, tiles of QUERY_TILE_ROWS of its sharers' query rows; with
    `shared_only` ("own" form) only the shared segments (the levels of one segment per sequence are
    its own tokens, read by split-KV)."""
    s = shape
    group_size = s.num_qo_heads // s.num_kv_heads
    items = []
    for level, (n, length) in enumerate(s.levels):
        if shared_only and n == s.batch:
            continue
        rows = s.batch // n * group_size
        for _ in range(n if length else 0):
            for c in range(-(-length // chunk_size)):
                tokens = min(chunk_size, length - c * chunk_size)
                for first_row in range(0, rows, QUERY_TILE_ROWS):
                    items.append(WorkItem(tokens, min(QUERY_TILE_ROWS, rows - first_row), rereads=first_row > 0,
                                          label=f"level{level}"))
    return items


def chunk_candidates_of_tree(tile: int) -> list[int]:
    """The chunk sizes the kernels consider: powers of two from LONGEST_CHUNK down to one tile."""
    out, chunk = [], LONGEST_CHUNK
    while chunk >= tile:
        out.append(chunk)
        chunk //= 2
    return out or [tile]


def own_tokens_plan(batch: int, num_qo_heads: int, num_kv_heads: int, head_dim: int, longest_rows: int, *,
                    dtype: str, gpu: "GPUSpec | str", num_sms: int) -> SplitKVPlan:
    """The split-KV plan of the sequences' own tokens: windows of WINDOW_ROWS rows, as a paged
    plan for the longest sequence's `longest_rows` (its windows' rows; at least 1)."""
    return plan_split_kv(batch, num_qo_heads, num_kv_heads, head_dim, max(int(longest_rows), 1), dtype=dtype,
                         num_sms=num_sms, page_size=WINDOW_ROWS, gpu=gpu)


def own_tokens_launch(plan: SplitKVPlan, rows: "list[int]", num_states: int) -> Launch:
    """The launch of the sequences' own tokens (`rows`: each sequence's windows' rows) that merges
    `num_states` states of every row (the shared segments' chunks, empty ones included)."""
    launch = split_kv_launch(plan, list(rows), name="own")
    renamed = {f"{k}_own" if k in ("k", "v") else k: v for k, v in launch.bytes_by_tensor.items()}
    return with_merged_states(dataclasses.replace(launch, bytes_by_tensor=renamed), plan, num_states,
                              "shared_states")


def work_launches(items: "list[WorkItem]", *, batch: int, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                  dtype: str, parts_per_sequence: int, gpu: GPUSpec,
                  own: "tuple[SplitKVPlan, list[int]] | None" = None,
                  page_size: int = 0) -> list[tuple[Launch, float | None]]:
    """The segments launch of `items` (one KV head's blocks; with its tensor-core rate; `page_size`
    > 0: the segments in a paged cache), then with `own` (the own tokens' plan and each sequence's
    rows) the own tokens' launch merging `parts_per_sequence` states per (sequence, query head),
    without it the merge of that many."""
    out: list[tuple[Launch, float | None]] = []
    if items:
        out.append(attend_rows_launch("segments", items, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
                                      gpu=gpu, page_size=page_size))
    if own is not None:
        out.append((own_tokens_launch(own[0], own[1], parts_per_sequence), None))
        return out
    merge = MergeStatesShape(max(1, parts_per_sequence), batch, num_qo_heads, head_dim, "float32")
    out.append((dataclasses.replace(merge_states_launch(merge), name="merge"), None))
    return out


def predict_work(items: "list[WorkItem]", *, batch: int, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: str, parts_per_sequence: int, gpu: "GPUSpec | str",
                 calibration: Calibration | None = None,
                 own: "tuple[SplitKVPlan, list[int]] | None" = None) -> Prediction:
    """The two launches of any tree's work list (`gpukernels.tree.plan_tree_work` as WorkItems;
    `own` as for `work_launches`)."""
    spec = get_gpu(gpu)
    launches = work_launches(items, batch=batch, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
                             head_dim=head_dim, dtype=dtype, parts_per_sequence=parts_per_sequence, gpu=spec,
                             own=own)
    return predict_kernel_launches("tree", launches, gpu=spec, calibration=calibration_for(spec, calibration))


FORMS = ("own", "merge")   # the kernels' forms of a tree (gpukernels.tree), in the order the plans try them


def kernels_plan(shape: TreeShape, num_sms: int, gpu: "GPUSpec | str | None" = None) -> "TreePlan":
    """The plan `gpukernels.tree.plan_tree` makes: of the forms ("own" first) and the chunks (powers
    of two from LONGEST_CHUNK down to one pipeline tile), the one whose two launches the model
    predicts fastest (the first, and the longer chunk, on a tie)."""
    spec, num_sms = plan_gpu(gpu, num_sms, default_num_sms=DEFAULT_NUM_SMS)
    best, best_s = None, None
    for form in FORMS:
        for c in chunk_candidates_of_tree(attend_rows_kv_tile(shape.head_dim)):
            plan = TreePlan(shape, c, num_sms=num_sms, form=form)
            t = predict(shape, gpu=spec, plan=plan).time_s
            if best is None or t < best_s:
                best, best_s = plan, t
    return best


def tree_chunk_size(shape: TreeShape, num_sms: int, gpu: "GPUSpec | str | None" = None) -> int:
    """The chunk of `kernels_plan`."""
    return kernels_plan(shape, num_sms, gpu).chunk_size


@dataclass(frozen=True)
class TreePlan:
    """The tree as `gpukernels.tree` runs it. "own" form: every shared segment in chunks of
    `chunk_size` tokens, then each sequence's own tokens by split-KV merging their states.
    "merge" form: every segment in chunks, then the merge of each sequence's states.
    `page_size` > 0: the segments lie in a paged cache of pages of that many tokens (the segments
    launch looks up its rows' pages); 0: contiguous."""

    shape: TreeShape
    chunk_size: int
    num_sms: int = DEFAULT_NUM_SMS
    form: str = "own"
    page_size: int = 0

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}, got {self.form!r}")
        object.__setattr__(self, "page_size", check_nonnegative_int(self.page_size, "page_size (0: contiguous)"))

    @property
    def parts_per_sequence(self) -> int:
        """States merged per (sequence, query head): the chunks of its path's segments (in the
        "own" form its shared segments'; their merge is the own tokens' launch's)."""
        n_own = self.shape.batch if self.form == "own" else None
        chunks = sum(-(-length // self.chunk_size) for n, length in self.shape.levels if n != n_own)
        return chunks if self.form == "own" else max(1, chunks)

    @property
    def own_rows(self) -> int:
        """Rows of each sequence's windows over its own tokens."""
        return sum(-(-length // WINDOW_ROWS) * WINDOW_ROWS for n, length in self.shape.levels
                   if n == self.shape.batch)

    def items(self) -> list[WorkItem]:
        return _items(self.shape, self.chunk_size, shared_only=self.form == "own")

    def launches(self, gpu: "GPUSpec | str") -> list[tuple[Launch, float | None]]:
        """The segments launch (with its tensor-core rate), then the own tokens' launch or the merge."""
        s = self.shape
        spec = get_gpu(gpu)
        if self.form == "merge":
            return work_launches(self.items(), batch=s.batch, num_qo_heads=s.num_qo_heads,
                                 num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, dtype=s.dtype,
                                 parts_per_sequence=self.parts_per_sequence, gpu=spec, page_size=self.page_size)
        own = own_tokens_plan(s.batch, s.num_qo_heads, s.num_kv_heads, s.head_dim, self.own_rows, dtype=s.dtype,
                              gpu=spec, num_sms=self.num_sms)
        return work_launches(self.items(), batch=s.batch, num_qo_heads=s.num_qo_heads, num_kv_heads=s.num_kv_heads,
                             head_dim=s.head_dim, dtype=s.dtype, parts_per_sequence=self.parts_per_sequence,
                             gpu=spec, own=(own, [self.own_rows] * s.batch), page_size=self.page_size)


@dataclass(frozen=True)
class FusedTreePlan:
    """The tree as one fused launch (`costmodel.segments.segments_launch`), which the kernels do
    not have; a chunk size per level, chosen by the model."""

    shape: TreeShape
    chunk_sizes: tuple[int, ...]     # tokens per block, one per level
    num_sms: int = DEFAULT_NUM_SMS

    def groups(self) -> list[SegmentGroup]:
        s = self.shape
        return [SegmentGroup(f"level{i}", length, s.batch // n, n, chunk)
                for i, ((n, length), chunk) in enumerate(zip(s.levels, self.chunk_sizes))]

    @property
    def parts_per_sequence(self) -> int:
        return max(1, sum(g.chunks for g in self.groups()))

    def launch(self) -> Launch:
        s = self.shape
        return segments_launch(
            "tree", batch=s.batch, num_qo_heads=s.num_qo_heads, num_kv_heads=s.num_kv_heads,
            head_dim=s.head_dim, dtype=s.dtype, groups=self.groups(),
            parts_per_sequence=self.parts_per_sequence,
        )


def plan_tree(
    shape: TreeShape,
    *,
    num_sms: int | None = None,
    gpu: "GPUSpec | str | None" = None,
    calibration: Calibration | None = None,
    fused: bool = False,
) -> "TreePlan | FusedTreePlan":
    """The kernels' plan (`tree_chunk_size`), or with `fused=True` the fused launch's chunk sizes
    per level that the model predicts fastest (`calibration` is only used there). The plan is for
    `gpu` and takes its SM count; `num_sms`, if also given, must agree (see `plan_split_kv`)."""
    check_shape_type(shape, TreeShape)
    spec, num_sms = plan_gpu(gpu, num_sms, default_num_sms=DEFAULT_NUM_SMS)
    if not fused:
        return kernels_plan(shape, num_sms, gpu=spec)
    cal = calibration_for(spec, calibration)

    def time_of(chunks):
        plan = FusedTreePlan(shape, tuple(chunks), num_sms=num_sms)
        return predict_launches("tree", [plan.launch()], gpu=spec, calibration=cal).time_s

    chunks = best_chunks([length for _, length in shape.levels], time_of)
    return FusedTreePlan(shape, tuple(chunks), num_sms=num_sms)


def predict(
    shape: TreeShape,
    *,
    gpu: "GPUSpec | str",
    calibration: Calibration | None = None,
    plan: "TreePlan | FusedTreePlan | None" = None,
    fused: bool = False,
) -> Prediction:
    """The kernels' two launches, or with `fused=True` (or a FusedTreePlan) one fused launch."""
    if fused or isinstance(plan, FusedTreePlan):
        make = lambda sh, **kw: plan_tree(sh, fused=True, **kw)  # noqa: E731
        return predict_planned("tree", shape, TreeShape, make, FusedTreePlan, gpu=gpu,
                               calibration=calibration, plan=plan)
    spec, cal, plan = resolve_plan(shape, TreeShape, plan, TreePlan,
                                   lambda sh, spec, cal: plan_tree(sh, num_sms=spec.num_sms, gpu=spec),
                                   gpu=gpu, calibration=calibration, accepted="a TreePlan, a FusedTreePlan or None")
    return predict_kernel_launches("tree", plan.launches(spec), gpu=spec, calibration=cal)
