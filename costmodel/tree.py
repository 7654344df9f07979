"""Tree-shaped sharing: each sequence's context is a path of segments, each segment shared by the
sequences below it (Hydragen's hierarchy; FlashInfer's cascade).

The shape is given by levels: level i has `num_segments` segments of `seg_len` tokens, and the
sequences are split evenly among them (segment j of a level is shared by sequences
`j * batch / num_segments ...`). The kernel is one fused launch: every segment read once for all
its sequences (a tensor-core product when shared), partial states merged by LSE at the end; see
`costmodel.segments`. The chunk size of each level is the model's choice (`plan_tree`).

Example: the tree of docs/benchmarks.md, 64 sequences, a 4096-token root, 8 groups of 8 sharing 2048 more and
256 own tokens each: `TreeShape(64, 32, 32, 128, levels=((1, 4096), (8, 2048), (64, 256)))`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .calibration import Calibration
from .gpus import GPUSpec, plan_gpu
from .prediction import (Launch, Prediction, calibration_for, check_int_tuple, check_shape_fields,
                         check_shape_type, dtype_bytes, predict_launches)
from .segments import SegmentGroup, best_chunks, predict_planned, segments_launch
from .split_kv import DEFAULT_NUM_SMS

__all__ = ["TreeShape", "TreePlan", "plan_tree", "predict"]


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


@dataclass(frozen=True)
class TreePlan:
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
) -> TreePlan:
    """Chunk sizes per level that the model predicts fastest. The plan is for `gpu` and takes its
    SM count; `num_sms`, if also given, must agree (see `plan_split_kv`)."""
    check_shape_type(shape, TreeShape)
    spec, num_sms = plan_gpu(gpu, num_sms, default_num_sms=DEFAULT_NUM_SMS)
    cal = calibration_for(spec, calibration)

    def time_of(chunks):
        plan = TreePlan(shape, tuple(chunks), num_sms=num_sms)
        return predict_launches("tree", [plan.launch()], gpu=spec, calibration=cal).time_s

    chunks = best_chunks([length for _, length in shape.levels], time_of)
    return TreePlan(shape, tuple(chunks), num_sms=num_sms)


def predict(
    shape: TreeShape,
    *,
    gpu: "GPUSpec | str",
    calibration: Calibration | None = None,
    plan: TreePlan | None = None,
) -> Prediction:
    return predict_planned("tree", shape, TreeShape, plan_tree, TreePlan, gpu=gpu,
                           calibration=calibration, plan=plan)
