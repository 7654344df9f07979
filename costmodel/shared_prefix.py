"""One prefix shared by every sequence, plus a suffix of each sequence's own tokens.

Three ways to run it, all predicted here (`METHODS`):

* `"hydragen"` (Juravsky et al., 2024): one fused launch. The prefix is read once; the queries of
  all sequences and all heads of a GQA group form one matrix per KV head, multiplied with each
  prefix chunk on tensor cores; the suffixes are read like split-KV chunks; partial states are
  merged by LSE in the same launch. Plan: `HydragenPlan` (chunk sizes chosen by the model).
* `"bifurcated"` (Athiwaratkun et al., 2024), as the published method runs it: a logits product
  against the prefix for all samples at once, a batched one against each suffix, a softmax over
  their concatenation, and two products for the output; six launches with the logits and
  probabilities written to memory between them. `fused=True` predicts instead a single-launch
  kernel of the same arithmetic, which costs what Hydragen's launch costs.
* `"naive"`: the existing approach: the prefix copied into every sequence's cache and the whole
  cache read by split-KV decode (`costmodel.split_kv`'s own plan).

Bytes per the bifurcated paper's Eq. 5/6: without sharing `g*k*b*(m_c + m_d)` KV elements, with it
`g*k*(m_c + b*m_d)` (g KV heads, k head dim, b batch, m_c prefix, m_d suffix); FLOPs the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from decode_attention.contract import check_positive_int

from .calibration import Calibration
from .gpus import GPUSpec, get_gpu, plan_gpu
from .prediction import (Launch, Prediction, calibration_for, check_int_tuple, check_shape_fields,
                         check_shape_type, dtype_bytes, predict_launches)
from .segments import MMA_ROWS, QUERY_TILE_ROWS, SegmentGroup, best_chunks, segments_launch
from .split_kv import DEFAULT_NUM_SMS, plan_split_kv
from .split_kv import predict as _predict_split_kv

__all__ = ["SharedPrefixShape", "HydragenPlan", "plan_hydragen", "prefix_pass_chunk", "predict", "METHODS"]

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


@dataclass(frozen=True)
class HydragenPlan:
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
) -> HydragenPlan:
    """Chunk sizes the model predicts fastest (given ones are kept). The plan is for `gpu` and
    takes its SM count; `num_sms`, if also given, must agree (see `plan_split_kv`)."""
    check_shape_type(shape, SharedPrefixShape)
    spec, num_sms = plan_gpu(gpu, num_sms, default_num_sms=DEFAULT_NUM_SMS)
    cal = calibration_for(spec, calibration)
    fixed = [check_positive_int(prefix_chunk_size, "prefix_chunk_size", allow_none=True),
             check_positive_int(suffix_chunk_size, "suffix_chunk_size", allow_none=True)]

    def time_of(chunks):
        plan = HydragenPlan(shape, *(f or c for f, c in zip(fixed, chunks)), num_sms=num_sms)
        return predict_launches("shared_prefix:hydragen", [plan.launch()], gpu=spec, calibration=cal).time_s

    chunks = best_chunks([shape.prefix_len, shape.suffix_len], time_of)
    return HydragenPlan(shape, *(f or c for f, c in zip(fixed, chunks)), num_sms=num_sms)


def prefix_pass_chunk(prefix_len: int, query_rows: int, num_kv_heads: int, num_sms: int,
                      blocks_per_sm: int, tile: int) -> int:
    """The prefix chunk of the kernels' prefix pass (a launch of its own; the suffixes and the
    merge follow in two more): the shortest whole-tile chunk whose blocks (chunks x tiles of
    QUERY_TILE_ROWS query rows x KV heads) still fit in one wave of resident blocks, the whole
    prefix when the rows alone fill the wave. Fewer blocks leave SMs idle; a second wave adds its
    length. Measured on H200, float16, 32 query heads, head_dim 128 (prefix pass alone, us, chunk
    x chunks): 32/32 heads, batch 16, prefix 8192: 512x16 53.7, 1024x8 51.5, 2048x4 54.0, 4096x2
    98.2; batch 64, 16384: 2048x8 96.2, 4096x4 106.3, 8192x2 192.5; 32/8, batch 16, 8192: 256x32
    21.2, 512x16 19.6, 1024x8 29.5; batch 64, 16384: 1024x16 88.3, 2048x8 83.5, 4096x4 101.1;
    batch 128, 32768: 4096x8 299.6, 8192x4 298.8, 16384x2 378.4."""
    for name, value in (("prefix_len", prefix_len), ("query_rows", query_rows), ("num_kv_heads", num_kv_heads),
                        ("num_sms", num_sms), ("blocks_per_sm", blocks_per_sm), ("tile", tile)):
        check_positive_int(value, name)
    row_tiles = -(-query_rows // QUERY_TILE_ROWS)
    chunks = max(1, num_sms * blocks_per_sm // (row_tiles * num_kv_heads))
    chunk = -(-prefix_len // chunks)
    return max(tile, -(-chunk // tile) * tile)


def _tiles(rows: int) -> list[int]:
    return [min(QUERY_TILE_ROWS, rows - t) for t in range(0, rows, QUERY_TILE_ROWS)]


def _even_blocks(total_bytes: int, block_bytes: int, round_trips: int = 1) -> tuple:
    """Block runs for a launch whose traffic is spread evenly over blocks of about block_bytes."""
    n = max(1, -(-total_bytes // block_bytes))
    return ((total_bytes / n, round_trips, n),)


# Library kernels of the published bifurcated method (cuBLAS products, PyTorch elementwise):
# about 64 KiB of traffic per block, eight blocks resident per SM.
LIBRARY_BLOCK_BYTES = 64 * 1024
LIBRARY_BLOCKS_PER_SM = 8


def bifurcated_launches(shape: SharedPrefixShape) -> list[Launch]:
    """The six launches of the published bifurcated attention, in order."""
    s = shape
    elem = dtype_bytes(s.dtype)
    b, hq, hkv, d, p = s.batch, s.num_qo_heads, s.num_kv_heads, s.head_dim, s.prefix_len
    suffix_tokens = sum(s.lens())
    rows = b * s.group_size                       # query rows per KV head in the prefix products
    padded = sum(MMA_ROWS * -(-r // MMA_ROWS) for r in _tiles(rows))
    tiles = len(_tiles(rows))
    q = b * hq * d * elem
    prefix_kv = p * hkv * d * elem                # one of K or V of the prefix
    suffix_kv = suffix_tokens * hkv * d * elem
    logits_p, logits_s = b * hq * p * elem, b * hq * s.suffix_len * elem
    logits = logits_p + logits_s
    out = b * hq * d * elem

    def library(name, bytes_by_tensor, *, matmul=0, vector=0, useful=None, l2_hit=0):
        total = sum(bytes_by_tensor.values())
        return Launch(name=name, bytes_by_tensor=bytes_by_tensor,
                      block_runs=_even_blocks(total, LIBRARY_BLOCK_BYTES),
                      matmul_flops=matmul, vector_flops=vector, useful_flops=useful,
                      l2_hit_bytes=l2_hit, blocks_per_sm=LIBRARY_BLOCKS_PER_SM)

    return [
        library("prefix_logits", {"q": q, "k_prefix": prefix_kv * tiles, "logits_prefix_write": logits_p},
                matmul=2 * hkv * padded * p * d, useful=2 * b * hq * p * d,
                l2_hit=prefix_kv * (tiles - 1)),
        library("suffix_logits", {"q": q, "k_suffix": suffix_kv, "logits_suffix_write": logits_s},
                vector=2 * hq * suffix_tokens * d),
        library("concat", {"logits_read": logits, "logits_cat_write": logits}),
        library("softmax", {"logits_cat_read": logits, "probs_write": logits},
                vector=5 * b * hq * (p + s.suffix_len)),
        library("prefix_values", {"probs_prefix_read": logits_p, "v_prefix": prefix_kv * tiles,
                                  "out_prefix_write": out},
                matmul=2 * hkv * padded * p * d, useful=2 * b * hq * p * d,
                l2_hit=prefix_kv * (tiles - 1)),
        library("suffix_values", {"probs_suffix_read": logits_s, "v_suffix": suffix_kv,
                                  "out_prefix_read": out, "out": out},
                vector=2 * hq * suffix_tokens * d),
    ]


def predict(
    shape: SharedPrefixShape,
    *,
    method: str = "hydragen",
    gpu: "GPUSpec | str",
    calibration: Calibration | None = None,
    plan: HydragenPlan | None = None,
    fused: bool = False,
) -> Prediction:
    """Prediction for one shared-prefix call by `method` (see METHODS)."""
    check_shape_type(shape, SharedPrefixShape)
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, one of {', '.join(METHODS)}, got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if plan is not None and not isinstance(plan, HydragenPlan):
        raise TypeError(f"plan must be a HydragenPlan or None, got {type(plan).__name__}")
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
        return predict_launches(variant, bifurcated_launches(shape), gpu=spec, calibration=cal)
    if plan is None:
        plan = plan_hydragen(shape, num_sms=spec.num_sms, gpu=spec, calibration=cal)
    elif plan.shape != shape:
        raise ValueError("plan was made for another shape")
    return predict_launches(variant, [plan.launch()], gpu=spec, calibration=cal)

