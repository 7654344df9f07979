"""Sparse spans: each sequence attends only to listed token intervals (self-selected attention
spans; attention sinks plus a sliding window are the two-span case).

A span is a contiguous read, so the plan cuts every span of every sequence into work items of at
most `chunk_size` tokens, one block per (item, KV head, head group), regardless of how the spans
are spread; partial states are merged per sequence in the same launch (see `costmodel.segments`).
Only the attended tokens are read: bytes scale with the density, the per-item overhead and the
merge with the number of items.
"""

from __future__ import annotations

from dataclasses import dataclass

from decode_attention.contract import check_nonnegative_int, check_positive_int

from .calibration import Calibration
from .gpus import GPUSpec, plan_gpu
from .prediction import (Launch, Prediction, calibration_for, check_fraction, check_int_tuple,
                         check_shape_fields, check_shape_type, dtype_bytes, predict_launches)
from .segments import SegmentGroup, best_chunks, predict_planned, segments_launch
from .split_kv import DEFAULT_NUM_SMS, heads_per_block_for

__all__ = ["SpanShape", "SpanPlan", "plan_span", "predict", "WORK_ITEM_BYTES"]

WORK_ITEM_BYTES = 12   # int32 (sequence, start, end) each block reads from the work list


@dataclass(frozen=True)
class SpanShape:
    batch: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    kv_len: int
    span_lens: tuple[int, ...]     # tokens of each span of a sequence (every sequence alike)
    dtype: str = "float16"

    def __post_init__(self):
        check_shape_fields(self, ("batch", "num_qo_heads", "num_kv_heads", "head_dim"), ("kv_len",))
        dtype_bytes(self.dtype)
        lens = check_int_tuple(self.span_lens, "span_lens")
        if sum(lens) > self.kv_len:
            raise ValueError(f"span_lens must be >= 0 and cover at most kv_len = {self.kv_len} "
                             f"tokens, got {self.span_lens!r}")
        object.__setattr__(self, "span_lens", lens)

    @classmethod
    def from_density(cls, batch, num_qo_heads, num_kv_heads, head_dim, kv_len, *, density: float,
                     num_spans: int, dtype: str = "float16") -> "SpanShape":
        """`num_spans` equal spans per sequence covering `density` of its `kv_len` tokens."""
        density = check_fraction(density, "density", low_open=False)
        num_spans = check_positive_int(num_spans, "num_spans")
        kv_len = check_nonnegative_int(kv_len, "kv_len")
        attended = round(density * kv_len)
        base, extra = divmod(attended, num_spans)
        lens = tuple(base + (i < extra) for i in range(num_spans))
        return cls(batch, num_qo_heads, num_kv_heads, head_dim, kv_len, lens, dtype)

    @classmethod
    def sinks_window(cls, batch, num_qo_heads, num_kv_heads, head_dim, kv_len, *, num_sinks: int,
                     window: int, dtype: str = "float16") -> "SpanShape":
        """The first `num_sinks` tokens plus the last `window` (overlap counted once)."""
        num_sinks = check_nonnegative_int(num_sinks, "num_sinks")
        window = check_nonnegative_int(window, "window")
        kv_len = check_nonnegative_int(kv_len, "kv_len")
        sinks = min(num_sinks, kv_len)
        recent = min(window, kv_len - sinks)
        return cls(batch, num_qo_heads, num_kv_heads, head_dim, kv_len, (sinks, recent), dtype)

    @property
    def attended_len(self) -> int:
        return sum(self.span_lens)

    @property
    def density(self) -> float:
        return self.attended_len / self.kv_len if self.kv_len else 0.0


@dataclass(frozen=True)
class SpanPlan:
    shape: SpanShape
    chunk_size: int          # longest work item, tokens
    num_sms: int = DEFAULT_NUM_SMS

    def groups(self) -> list[SegmentGroup]:
        s = self.shape
        counts: dict[int, int] = {}
        for n in s.span_lens:
            counts[n] = counts.get(n, 0) + s.batch
        return [SegmentGroup("", n, 1, c, self.chunk_size) for n, c in sorted(counts.items())]

    @property
    def items_per_sequence(self) -> int:
        return sum(-(-n // self.chunk_size) for n in self.shape.span_lens)

    def launch(self) -> Launch:
        s = self.shape
        head_groups = -(-(s.num_qo_heads // s.num_kv_heads) // heads_per_block_for(s.num_qo_heads // s.num_kv_heads))
        blocks = s.batch * self.items_per_sequence * s.num_kv_heads * head_groups
        return segments_launch(
            "span", batch=s.batch, num_qo_heads=s.num_qo_heads, num_kv_heads=s.num_kv_heads,
            head_dim=s.head_dim, dtype=s.dtype, groups=self.groups(),
            parts_per_sequence=max(1, self.items_per_sequence),
            extra_bytes={"work_items": blocks * WORK_ITEM_BYTES},
        )


def plan_span(
    shape: SpanShape,
    *,
    num_sms: int | None = None,
    gpu: "GPUSpec | str | None" = None,
    calibration: Calibration | None = None,
) -> SpanPlan:
    """The work-item length the model predicts fastest. The plan is for `gpu` and takes its SM
    count; `num_sms`, if also given, must agree (see `plan_split_kv`)."""
    check_shape_type(shape, SpanShape)
    spec, num_sms = plan_gpu(gpu, num_sms, default_num_sms=DEFAULT_NUM_SMS)
    cal = calibration_for(spec, calibration)

    def time_of(chunks):
        return predict_launches("span", [SpanPlan(shape, chunks[0], num_sms).launch()], gpu=spec,
                                calibration=cal).time_s

    longest = max(shape.span_lens, default=0)
    (chunk,) = best_chunks([longest], time_of)
    return SpanPlan(shape, chunk, num_sms)


def predict(
    shape: SpanShape,
    *,
    gpu: "GPUSpec | str",
    calibration: Calibration | None = None,
    plan: SpanPlan | None = None,
) -> Prediction:
    return predict_planned("span", shape, SpanShape, plan_span, SpanPlan, gpu=gpu,
                           calibration=calibration, plan=plan)
