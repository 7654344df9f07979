"""The time model shared by every variant: from what each launch moves and computes to seconds.

A variant's module describes its call as one or more `Launch`es: bytes per tensor, FLOPs, and the
bytes each thread block streams, in the order the GPU dispatches the blocks. This module turns
that into a `Prediction`. For one launch::

    hbm_s      = (hbm_bytes + lookup_bytes) / (bw_fraction * stream_bytes_per_s)
    l2_s       = (hbm_bytes + l2_hit_bytes) / l2_bytes_per_s            (re-reads served by L2)
    memory_s   = max(hbm_s, l2_s)
    compute_s  = (matmul_flops / (matmul_fraction * matmul_flops_per_s)
                  + vector_flops / (vector_fraction * vector_flops_per_s)) / min(1, blocks / num_sms)
    schedule_s = makespan of the blocks on num_sms * blocks_per_sm slots, every block streaming its
                 bytes at the smooth minimum (exponent contention_exponent) of block_bytes_per_s and
                 delivered_bytes_per_s / streaming_blocks, after block_round_trip_s per dependent
                 round trip; page_lookup_s per page-table lookup lowers block_bytes_per_s (in
                 seconds per byte), and a block whose own arithmetic is slower
                 (block_compute_bytes_per_s) streams at that; delivered_bytes_per_s is the stream ceiling, or bytes /
                 memory_s when L2 hits make the memory system faster
    time_s     = launch_s + max(memory_s, compute_s, schedule_s)

`memory_s` and `compute_s` are the roofline; `schedule_s` adds what the roofline ignores: too few
blocks to keep enough bytes in flight, a last partial wave, blocks that wait on a merge. A
multi-launch variant sums its launches. `bound` says which term decided: "memory" or "compute"
when the roofline explains most of the time, "latency" when launches, round trips and idle SMs
take more than the roofline does.
"""

from __future__ import annotations

import heapq
import math
import numbers
from dataclasses import dataclass, field

from decode_attention.contract import check_nonnegative_int, check_positive_int

from .calibration import Calibration, load_calibration
from .display import format_prediction, prediction_html
from .gpus import GPUSpec, get_gpu

__all__ = ["Launch", "Prediction", "predict_launches", "makespan_s", "stream_rate", "DTYPE_BYTES", "dtype_bytes"]

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
F32 = 4  # bytes of a float32 / int32


def dtype_bytes(dtype: str) -> int:
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a name, one of {', '.join(DTYPE_BYTES)}, got "
                        f"{type(dtype).__name__} {dtype!r}")
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}") from None


def check_shape_fields(shape, positive=(), nonnegative=()) -> None:
    """The checks every workload shape of the model shares: the named fields are integers >= 1
    (`positive`) or >= 0 (`nonnegative`), NumPy integers too, stored back as int (TypeError for
    another type, bool included; ValueError for a value out of range), and the query heads split
    evenly over the KV heads when the shape has both. `shape` is a frozen dataclass."""
    for name in positive:
        object.__setattr__(shape, name, check_positive_int(getattr(shape, name), name))
    for name in nonnegative:
        object.__setattr__(shape, name, check_nonnegative_int(getattr(shape, name), name))
    if "num_kv_heads" in positive:
        check_head_grouping(shape.num_qo_heads, shape.num_kv_heads)


def check_shape_type(shape, shape_type) -> None:
    if not isinstance(shape, shape_type):
        raise TypeError(f"shape must be a {shape_type.__name__}, got {type(shape).__name__}")


def check_int_tuple(values, name: str) -> tuple[int, ...]:
    """A sequence of integers >= 0 (NumPy integers too, not bool, not float) as a tuple of ints."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__} {values!r}")
    return tuple(check_nonnegative_int(v, f"{name}[{i}]") for i, v in enumerate(values))


def check_fraction(value, name: str, *, low_open: bool) -> float:
    """A real number in (0, 1] (`low_open`) or [0, 1], as float; TypeError for a string, a bool
    or a complex number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    inside = 0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0
    if not inside:
        raise ValueError(f"{name} must lie in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")
    return value


def check_calibration(calibration) -> Calibration:
    if not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be a Calibration or None, got {type(calibration).__name__}")
    return calibration


def calibration_for(gpu: GPUSpec, calibration: "Calibration | None") -> Calibration:
    """The given calibration (checked), else the GPU's own (or the default) from the data file."""
    return load_calibration(gpu.key) if calibration is None else check_calibration(calibration)


def resolve_plan(shape, shape_type, plan, plan_type, make_plan, *, gpu, calibration=None, accepted: str = ""):
    """(GPU spec, calibration, plan) of one prediction: `shape` checked to be a `shape_type`, a
    given `plan` checked to be a `plan_type` made for it, else `make_plan(shape, spec, cal)`.
    `accepted`: what the TypeError names as allowed (default: a `plan_type` or None)."""
    check_shape_type(shape, shape_type)
    if plan is not None and not isinstance(plan, plan_type):
        raise TypeError(f"plan must be {accepted or f'a {plan_type.__name__} or None'}, got {type(plan).__name__}")
    spec = get_gpu(gpu)
    cal = calibration_for(spec, calibration)
    if plan is None:
        plan = make_plan(shape, spec, cal)
    elif plan.shape != shape:
        raise ValueError("plan was made for another shape")
    return spec, cal, plan


def check_head_grouping(num_qo_heads: int, num_kv_heads: int) -> None:
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"num_qo_heads must be a multiple of num_kv_heads, got "
                         f"{num_qo_heads} and {num_kv_heads}")


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the time model sees it.

    `block_runs`: (bytes one block streams, dependent round trips it waits, number of such blocks),
    run-length encoded in dispatch order (blockIdx.x fastest). Empty blocks that exit at once are
    (0, 0, n).
    """

    name: str
    bytes_by_tensor: dict[str, int]
    block_runs: tuple[tuple[int, int, int], ...]
    matmul_flops: int = 0
    vector_flops: int = 0
    l2_hit_bytes: int = 0       # part of bytes_by_tensor expected to come from L2, not HBM
    page_lookups: int = 0       # dependent page-table loads (paged caches)
    paged_pipeline: bool = False  # the tensor-core kernel on a paged cache: blocks stream at
                                  # cal.paged_stream_fraction of the calibrated kernel's rate
    blocks_per_sm: int | None = None  # resident blocks per SM; None: the calibrated decode kernel's
    useful_flops: int | None = None   # FLOPs of the math (padding excluded); None: matmul + vector
    block_compute_bytes_per_s: float | None = None  # a block's bytes over the time its own tiles'
                                                    # arithmetic takes at its share of the SM: it
                                                    # streams no faster; None: no such bound

    @property
    def flops(self) -> int:
        return self.matmul_flops + self.vector_flops if self.useful_flops is None else self.useful_flops

    @property
    def num_blocks(self) -> int:
        return sum(n for _, _, n in self.block_runs)

    @property
    def busy_blocks(self) -> int:
        return sum(n for b, trips, n in self.block_runs if b or trips)


class TimeAndRates:
    """Time in us and ms and the achieved rates of a prediction with `time_s`, `hbm_bytes` and
    `flops`."""

    @property
    def time_us(self) -> float:
        return self.time_s * 1e6

    @property
    def time_ms(self) -> float:
        return self.time_s * 1e3

    @property
    def achieved_flops_per_s(self) -> float:
        return self.flops / self.time_s if self.time_s else 0.0

    @property
    def achieved_bytes_per_s(self) -> float:
        return self.hbm_bytes / self.time_s if self.time_s else 0.0


@dataclass(frozen=True, repr=False)
class Prediction(TimeAndRates):
    """Predicted cost of one call. Prints as a short table with units (`str`, `repr`) and renders
    as one in a notebook (`_repr_html_`); the numbers themselves are in bytes, FLOPs and seconds,
    every time term in `terms` (per launch as '<launch>.<term>' when there are several)."""

    variant: str
    bytes_by_tensor: dict[str, int]   # bytes the blocks move per tensor (what the schedule reads/writes)
    hbm_bytes: int                    # of those, the DRAM traffic (L2 re-reads excluded)
    l2_hit_bytes: int
    flops: int
    num_blocks: int
    waves: float                      # blocks / (num_sms * blocks_per_sm) of the largest launch
    launches: int
    bound: str                        # "memory", "compute" or "latency"
    time_s: float
    terms: dict[str, float] = field(default_factory=dict)  # every time term, seconds

    @property
    def intensity_flops_per_byte(self) -> float:
        return self.flops / self.hbm_bytes if self.hbm_bytes else float("inf")

    def __str__(self) -> str:
        return format_prediction(self)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return prediction_html(self)


def stream_rate(streaming: int, *, block_bytes_per_s: float, total_bytes_per_s: float,
                contention_exponent: float) -> float:
    """Bytes per second each of `streaming` blocks gets: a smooth minimum of what one block can
    keep in flight and its equal share of the memory system, (a^-p + b^-p)^(-1/p). Queues grow as
    the load nears the ceiling, so the knee is rounded; p = inf is the hard minimum."""
    share = total_bytes_per_s / streaming
    if math.isinf(contention_exponent):
        return min(block_bytes_per_s, share)
    p = contention_exponent
    return (block_bytes_per_s ** -p + share ** -p) ** (-1.0 / p)


def makespan_s(
    block_runs, *, slots: int, block_bytes_per_s: float, total_bytes_per_s: float,
    contention_exponent: float = math.inf,
) -> float:
    """Fluid schedule of blocks over `slots` resident places, dispatched in order as places free up.

    `block_runs`: (bytes to stream, seconds to wait, number of such blocks) in dispatch order. A
    block first waits (dependent round trips: it holds its place, using no bandwidth), then streams
    its bytes; the streaming blocks share the memory system equally (`stream_rate`). Event-driven:
    one step per distinct group of blocks becoming ready or finishing.
    """
    streaming_heap: list[float] = []   # finishing points on the common progress axis (bytes per block)
    streaming: dict[float, int] = {}
    waiting_heap: list[tuple[float, float]] = []   # (ready time, bytes to stream)
    waiting: dict[tuple[float, float], int] = {}
    n_streaming = n_waiting = 0
    progress = 0.0                     # bytes every streaming block has moved since time 0
    time = 0.0

    def stream(work: float, count: int) -> None:
        nonlocal n_streaming
        end = progress + work
        if end in streaming:
            streaming[end] += count
        else:
            streaming[end] = count
            heapq.heappush(streaming_heap, end)
        n_streaming += count

    runs = iter(block_runs)
    run = next(runs, None)
    left = run[2] if run else 0
    while True:
        while n_streaming + n_waiting < slots and run is not None:
            if left:
                take = min(slots - n_streaming - n_waiting, left)
                work, wait_s = float(run[0]), float(run[1])
                if wait_s > 0:
                    key = (time + wait_s, work)
                    if key in waiting:
                        waiting[key] += take
                    else:
                        waiting[key] = take
                        heapq.heappush(waiting_heap, key)
                    n_waiting += take
                elif work:
                    stream(work, take)
                left -= take
            if left == 0:
                run = next(runs, None)
                left = run[2] if run else 0
        if n_streaming + n_waiting == 0:
            return time
        rate = stream_rate(n_streaming, block_bytes_per_s=block_bytes_per_s,
                           total_bytes_per_s=total_bytes_per_s,
                           contention_exponent=contention_exponent) if n_streaming else 0.0
        finish_dt = (streaming_heap[0] - progress) / rate if n_streaming else float("inf")
        ready_dt = waiting_heap[0][0] - time if n_waiting else float("inf")
        if finish_dt <= ready_dt:
            end = heapq.heappop(streaming_heap)
            time += finish_dt
            progress = end
            n_streaming -= streaming.pop(end)
        else:
            key = heapq.heappop(waiting_heap)
            count = waiting.pop(key)
            progress += rate * ready_dt
            time = key[0]
            n_waiting -= count
            if key[1]:
                stream(key[1], count)


def _launch_terms(launch: Launch, gpu: GPUSpec, cal: Calibration) -> dict[str, float]:
    bytes_moved = sum(launch.bytes_by_tensor.values())
    hbm_bytes = bytes_moved - launch.l2_hit_bytes
    stream = cal.bw_fraction * gpu.stream_bytes_per_s
    lookup_bytes = launch.page_lookups * cal.page_lookup_bytes
    hbm_s = (hbm_bytes + lookup_bytes) / stream
    l2_s = bytes_moved / gpu.l2_bytes_per_s
    sm_share = min(1.0, max(launch.busy_blocks, 1) / gpu.num_sms)
    compute_s = (
        launch.matmul_flops / (cal.matmul_fraction * gpu.matmul_flops_per_s)
        + launch.vector_flops / (cal.vector_fraction * gpu.vector_flops_per_s)
    ) / sm_share
    # each block waits its round trips, then streams its bytes; page lookups add their traffic
    # (spread over the blocks by bytes) and slow each block's own stream by their latency per byte
    scale = 1.0 + lookup_bytes / bytes_moved if bytes_moved else 1.0
    runs = [(b * scale, trips * cal.block_round_trip_s, n) for b, trips, n in launch.block_runs]
    lookup_s_per_byte = launch.page_lookups * cal.page_lookup_s / bytes_moved if bytes_moved else 0.0
    fraction = cal.paged_stream_fraction if launch.paged_pipeline else 1.0
    block_bytes_per_s = 1.0 / (1.0 / (cal.block_bytes_per_s * fraction) + lookup_s_per_byte)
    if launch.block_compute_bytes_per_s:
        block_bytes_per_s = min(block_bytes_per_s, launch.block_compute_bytes_per_s)
    memory_s = max(hbm_s, l2_s)
    # Blocks share the rate at which the memory system delivers all their bytes: the stream rate,
    # or faster when part of the bytes are L2 hits.
    delivered = (bytes_moved + lookup_bytes) / memory_s if memory_s > 0 else stream
    schedule_s = makespan_s(
        runs,
        slots=gpu.num_sms * (launch.blocks_per_sm or cal.blocks_per_sm),
        block_bytes_per_s=block_bytes_per_s,
        total_bytes_per_s=max(stream, delivered),
        contention_exponent=cal.contention_exponent,
    )
    return {
        "launch_s": cal.launch_s,
        "hbm_s": hbm_s,
        "page_lookup_s": lookup_bytes / stream,
        "l2_s": l2_s,
        "memory_s": memory_s,
        "compute_s": compute_s,
        "schedule_s": schedule_s,
        "time_s": cal.launch_s + max(memory_s, compute_s, schedule_s),
    }


def predict_launches(
    variant: str,
    launches: "list[Launch] | tuple[Launch, ...]",
    *,
    gpu: "GPUSpec | str",
    calibration: Calibration | None = None,
) -> Prediction:
    """Sum the launches of one call into a Prediction."""
    gpu = get_gpu(gpu)
    cal = calibration_for(gpu, calibration)
    terms: dict[str, float] = {}
    totals = dict.fromkeys(("launch_s", "hbm_s", "page_lookup_s", "l2_s", "memory_s", "compute_s",
                            "schedule_s", "time_s"), 0.0)
    bytes_by_tensor: dict[str, int] = {}
    for launch in launches:
        t = _launch_terms(launch, gpu, cal)
        for k, v in t.items():
            totals[k] += v
            if len(launches) > 1:
                terms[f"{launch.name}.{k}"] = v
        for k, v in launch.bytes_by_tensor.items():
            bytes_by_tensor[k] = bytes_by_tensor.get(k, 0) + int(v)
    terms = {**totals, **terms}
    roofline_s = max(totals["memory_s"], totals["compute_s"])
    overhead_s = totals["time_s"] - roofline_s
    if overhead_s > roofline_s:
        bound = "latency"
    else:
        bound = "compute" if totals["compute_s"] > totals["memory_s"] else "memory"
    l2_hit = sum(l.l2_hit_bytes for l in launches)
    return Prediction(
        variant=variant,
        bytes_by_tensor=bytes_by_tensor,
        hbm_bytes=sum(bytes_by_tensor.values()) - l2_hit,
        l2_hit_bytes=l2_hit,
        flops=sum(l.flops for l in launches),
        num_blocks=sum(l.num_blocks for l in launches),
        waves=max((l.num_blocks / (gpu.num_sms * (l.blocks_per_sm or cal.blocks_per_sm))
                   for l in launches), default=0.0),
        launches=len(launches),
        bound=bound,
        time_s=totals["time_s"],
        terms=terms,
    )
