"""Sparse spans: each sequence attends only to listed token intervals (self-selected attention
spans; attention sinks plus a sliding window are the two-span case).

The kernels (`gpukernels.span`) run the paged split-KV kernel over the spans: the contiguous cache
seen as pages of `page_size` tokens, each sequence's table listing the pages inside its spans, or,
where spans start at arbitrary tokens (float16 and bfloat16), windows of up to WINDOW_ROWS rows
that start anywhere, each read as one page (`page_size` WINDOWS). The split plan cuts each
sequence's listed rows, not its positions, into equal chunks. So the model is the split-KV model
(`costmodel.split_kv`) over those rows, with the plan the kernels make: through a page table only
the attended tokens move; a window counts as the whole warp tile of WINDOW_ROWS rows it fills,
bytes included (its masked rows are not read, but a tile's time hardly depends on its rows: on
H200, summarisation-like spans filling 81% of their windows' rows run within 3% of long spans
filling 99%); plans over a page table split to at most PAGE_BLOCKS_PER_SM blocks an SM.

On H200 (`results/h200/span.json`) the work-item model this replaces (a block per span chunk) put
102 spans of about 30 tokens a sequence at 77 us where the windows run in 42; this one, counting
the windows of 102 equal spans (the benchmark's unequal spans take more), at 35.
"""

from __future__ import annotations

from dataclasses import dataclass

from decode_attention.contract import check_nonnegative_int, check_positive_int

from . import split_kv
from .calibration import Calibration
from .gpus import GPUSpec
from .prediction import Prediction, check_fraction, check_int_tuple, check_shape_fields, check_shape_type, \
    dtype_bytes, resolve_plan
from .split_kv import SplitKVPlan

__all__ = ["SpanShape", "SpanPlan", "plan_span", "predict", "span_page_size", "WINDOWS", "WINDOW_ROWS",
           "MAX_SPAN_PAGE", "PAGE_BLOCKS_PER_SM"]

WINDOWS = 0            # the page_size of a shape whose spans are read through windows
WINDOW_ROWS = split_kv.ROWS_PER_WARP_TILE   # rows of a window at most: one warp tile of the tensor-core kernel
MAX_SPAN_PAGE = 64     # the largest page a span table uses
# Spans read through a page table are split at most to one block per SM. There a second resident
# block per SM adds no throughput, and the partials it adds cost time: on H200, 8 x 32/8 heads x 32k,
# head_dim 128 (64 rows of blocks), 2 splits (128 blocks) against 3 and 4 (192, 256): 75% density
# in 96 spans 198.3 us against 206.7 and 206.7; 4 sinks + a 4096 window 47.0 against 49.2 and 49.3;
# 12.5%, 25% and 50% within 1% of each other. The split-KV model, which counts two resident blocks
# per SM as twice the streams, picks 3 for the first two. Spans read by windows keep the model's
# count: their short windows leave each warp waiting on its loads, and the second block per SM
# hides that (summarisation-like spans of about 30 tokens: 43.1 us at 2 splits, 41.9 at 4).
PAGE_BLOCKS_PER_SM = 1


def span_page_size(bounds, kv_len: int, *, dtype: str = "float16", ragged_ends: int = 0) -> int:
    """The page a span table uses for spans with these start and end tokens (`bounds`) in a cache
    of `kv_len` tokens: the largest power of two up to MAX_SPAN_PAGE dividing kv_len and every
    bound (`ragged_ends` of the ends, one per sequence, may fall inside a page: the sinks' end of
    sinks + window); below WINDOW_ROWS, WINDOWS for float16 and bfloat16."""
    page = MAX_SPAN_PAGE
    while page > 1 and (kv_len % page or sum(b % page != 0 for b in bounds) > ragged_ends):
        page //= 2
    if page < WINDOW_ROWS and dtype in split_kv.TENSOR_CORE_DTYPES:
        return WINDOWS
    return page


@dataclass(frozen=True)
class SpanShape:
    batch: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    kv_len: int
    span_lens: tuple[int, ...]     # tokens of each span of a sequence (every sequence alike)
    dtype: str = "float16"
    page_size: int = WINDOW_ROWS   # the table's page (span_page_size), or WINDOWS

    def __post_init__(self):
        check_shape_fields(self, ("batch", "num_qo_heads", "num_kv_heads", "head_dim"), ("kv_len",))
        dtype_bytes(self.dtype)
        page = check_nonnegative_int(self.page_size, "page_size")
        if page != WINDOWS and (page > MAX_SPAN_PAGE or page & (page - 1)):
            raise ValueError(f"page_size must be a power of two up to {MAX_SPAN_PAGE}, or WINDOWS (0), got {page}")
        if page == WINDOWS and self.dtype not in split_kv.TENSOR_CORE_DTYPES:
            raise ValueError(f"windows are read by the float16 and bfloat16 kernels only, got {self.dtype}")
        object.__setattr__(self, "page_size", page)
        lens = check_int_tuple(self.span_lens, "span_lens")
        if sum(lens) > self.kv_len:
            raise ValueError(f"span_lens must be >= 0 and cover at most kv_len = {self.kv_len} "
                             f"tokens, got {self.span_lens!r}")
        object.__setattr__(self, "span_lens", lens)

    @classmethod
    def from_density(cls, batch, num_qo_heads, num_kv_heads, head_dim, kv_len, *, density: float,
                     num_spans: int, dtype: str = "float16", page_size: int = WINDOW_ROWS) -> "SpanShape":
        """`num_spans` equal spans per sequence covering `density` of its `kv_len` tokens, read
        through pages of `page_size` (default: spans on 16-token boundaries) or WINDOWS."""
        density = check_fraction(density, "density", low_open=False)
        num_spans = check_positive_int(num_spans, "num_spans")
        kv_len = check_nonnegative_int(kv_len, "kv_len")
        attended = round(density * kv_len)
        base, extra = divmod(attended, num_spans)
        lens = tuple(base + (i < extra) for i in range(num_spans))
        return cls(batch, num_qo_heads, num_kv_heads, head_dim, kv_len, lens, dtype, page_size)

    @classmethod
    def sinks_window(cls, batch, num_qo_heads, num_kv_heads, head_dim, kv_len, *, num_sinks: int,
                     window: int, dtype: str = "float16") -> "SpanShape":
        """The first `num_sinks` tokens plus the last `window` (overlap counted once), read through
        the page the span table takes for them (`span_page_size`)."""
        num_sinks = check_nonnegative_int(num_sinks, "num_sinks")
        window = check_nonnegative_int(window, "window")
        kv_len = check_nonnegative_int(kv_len, "kv_len")
        sinks = min(num_sinks, kv_len)
        recent = min(window, kv_len - sinks)
        page = span_page_size([0, sinks, kv_len - recent, kv_len], kv_len, dtype=dtype, ragged_ends=1)
        return cls(batch, num_qo_heads, num_kv_heads, head_dim, kv_len, (sinks, recent), dtype, page)

    @property
    def attended_len(self) -> int:
        return sum(self.span_lens)

    @property
    def density(self) -> float:
        return self.attended_len / self.kv_len if self.kv_len else 0.0

    @property
    def rows(self) -> int:
        """Rows the kernel's tiles cover per sequence: the attended tokens, or with windows
        WINDOW_ROWS for each window (a span of n tokens takes ceil(n / WINDOW_ROWS))."""
        if self.page_size == WINDOWS:
            return WINDOW_ROWS * sum(-(-n // WINDOW_ROWS) for n in self.span_lens)
        return self.attended_len

    @property
    def table_rows(self) -> int:
        """Rows of a sequence's table (pages or windows) as the kernel's plan counts them."""
        page = WINDOW_ROWS if self.page_size == WINDOWS else self.page_size
        return page * sum(-(-n // page) for n in self.span_lens)


@dataclass(frozen=True)
class SpanPlan:
    """A span shape and the split-KV plan the kernels run it with."""

    shape: SpanShape
    split: SplitKVPlan

    @property
    def num_sms(self) -> int:
        return self.split.num_sms

    @property
    def layout(self) -> str:
        """"windows" or "pages"."""
        return "windows" if self.shape.page_size == WINDOWS else "pages"


def plan_span(
    shape: SpanShape,
    *,
    num_splits: int | None = None,
    num_sms: int | None = None,
    gpu: "GPUSpec | str | None" = None,
    calibration: Calibration | None = None,
) -> SpanPlan:
    """The split-KV plan of the span kernels (`gpukernels.span.plan_span`): pages of the shape's
    page size (WINDOW_ROWS for windows) over its longest table, at most PAGE_BLOCKS_PER_SM blocks
    an SM for a page table. `num_splits` fixes the count. The plan is for `gpu` and takes its SM
    count; `num_sms`, if also given, must agree (see `plan_split_kv`)."""
    check_shape_type(shape, SpanShape)
    s = shape
    page = WINDOW_ROWS if s.page_size == WINDOWS else s.page_size
    split = split_kv.plan_split_kv(s.batch, s.num_qo_heads, s.num_kv_heads, s.head_dim, max(s.table_rows, 1),
                                   dtype=s.dtype, num_splits=num_splits, num_sms=num_sms, page_size=page, gpu=gpu,
                                   max_blocks_per_sm=None if s.page_size == WINDOWS else PAGE_BLOCKS_PER_SM)
    return SpanPlan(shape, split)


def predict(
    shape: SpanShape,
    *,
    gpu: "GPUSpec | str",
    calibration: Calibration | None = None,
    plan: SpanPlan | None = None,
) -> Prediction:
    """The paged split-KV launch of `plan` (default: `plan_span(shape)`) over each sequence's
    rows (`SpanShape.rows`)."""
    spec, cal, plan = resolve_plan(shape, SpanShape, plan, SpanPlan,
                                   lambda sh, spec, cal: plan_span(sh, gpu=spec, calibration=cal),
                                   gpu=gpu, calibration=calibration)
    return split_kv.predict(plan.split, kv_lens=[shape.rows] * shape.batch, gpu=spec, calibration=cal,
                            variant="span")
