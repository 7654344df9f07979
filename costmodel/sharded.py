"""Decode over several GPUs: one sequence's KV cache sharded along its tokens over `num_gpus` GPUs.

Every rank attends to its shard with the split_kv kernel, packs its partial state (out and lse:
batch x num_qo_heads x (head_dim + 1) float32 values) into one buffer, one NCCL all-gather
exchanges the packed states, every rank unpacks them and merges them with the LSE merge. The step
is the kernels `gpukernels.sharded` launches on each rank (`STEP_KERNELS`, in order), captured
in one CUDA graph as `ShardedDecode` runs it, so

    time_s = shard_s + pack_s + collective_s + unpack_s + merge_s

    shard_s      = max over ranks of split_kv.predict(that rank's plan)     (the slowest shard)
    pack_s       = 2 copies: out (q's dtype -> float32) and lse into the send buffer
    collective_s = call_latency_s + (N - 1) x (step_latency_s + bytes_per_rank / link_bytes_per_s)
                   [+ eager_call_overhead_s when called outside a CUDA graph]
                   (of the collective model's segments, the faster for this message size)
    unpack_s     = 2 copies: the gathered outs (float32 -> q's dtype) and lses out of the gather buffer
    merge_s      = merge_states.predict(N states in q's dtype)

shard_s is the single-GPU model's prediction unchanged: the graph's first kernel starts like a
lone launch (`launch_s`, fitted on kernels timed one at a time). The copies and the merge run
behind it inside the graph, each at `end_to_end.graph_kernel_seconds` (a kernel's cost inside a
CUDA graph: the run's measurement, else `GRAPH_KERNEL_S`) plus its own roofline and schedule; called eagerly (`graph=False`) each
pays the fitted `launch_s` instead.

The collective's constants are data (`data/collectives.json`): its latency is the all-gather's
as measured alone on 2 H200 joined by NVLink, one graph replay at a time, as the step runs it
(`call_latency_s` once per call plus one ring step); the bandwidths come from larger messages.
Measured alone, the all-gather's time includes starting its graph, which inside the step the
shard's launch has already paid (a few microseconds counted twice), and waiting for the later
rank, which the step waits for too. More GPUs are extrapolated by the ring formula until measured.
The payload does not depend on the context length while the shard's read shrinks as 1/N, so one
GPU wins at short contexts and N GPUs approach 1/N of the time at long ones; `crossover_kv_len`
says where the two meet.

Shards: new tokens go round-robin over the ranks in blocks of `placement_block` tokens, so the
shard lengths differ by at most one block and a shard may be empty (fewer blocks than ranks).

>>> plan = plan_sharded(1, 32, 8, 128, 1 << 20, num_gpus=2, gpu="H200")
>>> plan.shard_lens, plan.payload_bytes
((524288, 524288), 16512)
>>> p = predict(plan)
>>> abs(p.shard_s + p.pack_s + p.collective_s + p.unpack_s + p.merge_s - p.time_s) < 1e-12
True
>>> p.launches == len(STEP_KERNELS)
True

`print(p)` shows the terms as a short table with units; `sharding_table(...)` prints the predicted
time on one and on N GPUs at a few context lengths; `crossover_table(...)` the crossover context
for every GPU count from 2 to MAX_NUM_GPUS.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

from decode_attention.contract import check_nonnegative_int, check_positive_int

from . import merge_states, split_kv
from .calibration import Calibration
from .display import Table, format_bytes, format_bytes_per_s, format_seconds
from .end_to_end import graph_kernel_seconds
from .gpus import GPUSpec, get_gpu, plan_gpu
from .prediction import (F32, Launch, Prediction, TimeAndRates, calibration_for, check_head_grouping,
                         dtype_bytes, predict_launches)

__all__ = ["MAX_NUM_GPUS", "DEFAULT_PLACEMENT_BLOCK", "TABLE_KV_LENS", "STEP_KERNELS", "CollectiveSegment",
           "Interconnect", "AllGather", "ShardedPlan", "ShardedPrediction", "ShardingTable",
           "check_num_gpus", "get_interconnect", "interconnect_for", "interconnect_names", "shard_lens",
           "plan_sharded", "step_copy_launches", "predict", "speedup", "crossover_kv_len", "sharding_table",
           "CrossoverTable", "crossover_table"]

MAX_NUM_GPUS = 8                 # GPUs of one host
DEFAULT_PLACEMENT_BLOCK = 32     # tokens placed on one rank before the next (Helix appends 32 at a time)
STATE_VALUES = 1                 # lse: one float32 per (sequence, head) besides the head_dim outputs
TABLE_KV_LENS = (32768, 131072, 1 << 20, 1 << 22)    # 32k, 128k, 1M, 4M tokens
MAX_SEARCH_KV_LEN = 1 << 28      # crossover_kv_len gives up above this context length
NO_COLLECTIVE = {"call_s": 0.0, "latency_s": 0.0, "transfer_s": 0.0, "eager_call_s": 0.0, "time_s": 0.0}  # one rank
# What one sharded step launches on every rank, in order (gpukernels.sharded: ShardedDecode.run ->
# _step): (term, what). One GPU launches the first alone.
STEP_KERNELS = (
    ("shard_s", "split_kv on the rank's shard (its merge of splits inside the same launch)"),
    ("pack_s", "copy of out into the send buffer, q's dtype -> float32"),
    ("pack_s", "copy of lse into the send buffer's last column"),
    ("collective_s", "the NCCL all-gather of the packed states"),
    ("unpack_s", "copy of the gathered outs, float32 -> q's dtype"),
    ("unpack_s", "copy of the gathered lses"),
    ("merge_s", "merge_states of the N states into out and lse"),
)
# The copies are PyTorch's elementwise kernels (`Tensor.copy_`; the benchmark's arrays are tensors):
# blocks of 128 threads, 4 elements each, no shared memory, so the thread limit (2048 a Hopper SM)
# decides how many are resident.
COPY_ELEMENTS_PER_BLOCK = 128 * 4
COPY_BLOCKS_PER_SM = 2048 // 128


# ---------------------------------------------------------------------------------------------
# The collective, as data
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CollectiveSegment:
    """One straight line of time against bytes (NCCL picks its protocol by message size)."""

    name: str
    step_latency_s: float        # one ring step inside a CUDA graph, with no bytes
    link_bytes_per_s: float      # bytes per second one step moves over a link


@dataclass(frozen=True)
class Interconnect:
    """A GPU-to-GPU link's collective model (an entry of `data/collectives.json`)."""

    key: str
    name: str
    gpus: tuple[str, ...]            # GPU keys whose link this is
    measured_on: str                 # GPU key the constants were measured on
    measured_ranks: int              # ranks of the measurements (more are extrapolated)
    assumed_for: tuple[tuple[str, str], ...]   # (GPU key, why the entry is taken for it), unmeasured
    algorithm: str                   # "ring"
    call_latency_s: float            # once per call: what a lone call inside a CUDA graph takes
                                     # beyond its ring steps (starting on idle GPUs, waiting for
                                     # the later rank)
    eager_call_overhead_s: float     # what calling outside a CUDA graph adds, once per call
    segments: tuple[CollectiveSegment, ...]
    source: str

    def all_gather_terms(self, bytes_per_rank: int, num_ranks: int, *, graph: bool = True) -> dict[str, float]:
        """Ring all-gather of `bytes_per_rank` from each of `num_ranks` ranks: the call latency
        once, (N - 1) steps of the faster segment's latency plus bytes over its link bandwidth,
        the eager overhead once. Keys: call_s, latency_s, transfer_s, eager_call_s, time_s (their
        sum), seconds."""
        steps = num_ranks - 1
        if steps <= 0:
            return dict(NO_COLLECTIVE)
        seg = self.segment_for(bytes_per_rank)
        latency_s = steps * seg.step_latency_s
        transfer_s = steps * bytes_per_rank / seg.link_bytes_per_s
        eager_s = 0.0 if graph else self.eager_call_overhead_s
        return {"call_s": self.call_latency_s, "latency_s": latency_s, "transfer_s": transfer_s,
                "eager_call_s": eager_s, "time_s": self.call_latency_s + latency_s + transfer_s + eager_s}

    def all_gather_s(self, bytes_per_rank: int, num_ranks: int, *, graph: bool = True) -> float:
        return self.all_gather_terms(bytes_per_rank, num_ranks, graph=graph)["time_s"]

    def segment_for(self, bytes_per_rank: int) -> CollectiveSegment:
        """The segment that applies to this message size: the faster one."""
        return min(self.segments, key=lambda s: s.step_latency_s + bytes_per_rank / s.link_bytes_per_s)

    def caveats(self, gpu_key: str, num_ranks: int) -> list[str]:
        """What in a prediction for this GPU and rank count is not measured."""
        notes = []
        assumed = dict(self.assumed_for)
        if gpu_key in assumed:
            notes.append(f"collective not measured on this GPU ({assumed[gpu_key]})")
        if num_ranks > self.measured_ranks:
            notes.append(f"collective extrapolated from {self.measured_ranks} ranks by the "
                         f"{self.algorithm} formula, not measured at {num_ranks}")
        return notes


@functools.lru_cache(maxsize=1)
def _collectives_data() -> dict:
    return json.loads(resources.files("costmodel").joinpath("data/collectives.json").read_text())


def interconnect_names() -> list[str]:
    """Keys of the interconnects in the data file."""
    return list(_collectives_data()["interconnects"])


@functools.lru_cache(maxsize=None)
def get_interconnect(key: str) -> Interconnect:
    """The collective model of one interconnect, by key ("nvlink4")."""
    if not isinstance(key, str):
        raise TypeError(f"interconnect must be a name (str) or None, got {type(key).__name__} {key!r}")
    entries = _collectives_data()["interconnects"]
    if key not in entries:
        raise ValueError(f"unknown interconnect {key!r}; known: {', '.join(entries)}")
    e = entries[key]
    return Interconnect(
        key=key, name=e["name"], gpus=tuple(e["gpus"]), measured_on=e["measured_on"],
        measured_ranks=int(e["measured_ranks"]), assumed_for=tuple(e.get("assumed_for", {}).items()),
        algorithm=e["algorithm"], call_latency_s=float(e["call_latency_s"]),
        eager_call_overhead_s=float(e["eager_call_overhead_s"]),
        segments=tuple(CollectiveSegment(s["name"], float(s["step_latency_s"]), float(s["link_bytes_per_s"]))
                       for s in e["segments"]),
        source=e["source"],
    )


def interconnect_for(gpu: "GPUSpec | str") -> Interconnect:
    """The interconnect joining GPUs of this kind; ValueError when the data file has none for it."""
    spec = get_gpu(gpu)
    for key in interconnect_names():
        if spec.key in get_interconnect(key).gpus:
            return get_interconnect(key)
    known = "; ".join(f"{k}: {', '.join(get_interconnect(k).gpus)}" for k in interconnect_names())
    raise ValueError(f"no collective model for {spec.name} in costmodel/data/collectives.json "
                     f"(GPUs with one: {known}); num_gpus > 1 needs one")


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AllGather:
    """The one collective of a sharded call: every rank sends its partial states to every other."""

    interconnect: str            # key into data/collectives.json
    num_ranks: int
    bytes_per_rank: int
    graph: bool                  # inside the step's CUDA graph (else called eagerly)

    @property
    def gathered_bytes(self) -> int:
        """What each rank holds afterwards: every rank's states."""
        return self.num_ranks * self.bytes_per_rank


@dataclass(frozen=True)
class ShardedPlan:
    """How a sharded call is cut: the shards, each rank's split_kv plan, the collective."""

    batch: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    kv_len: int                              # the whole context of each sequence
    num_gpus: int
    placement_block: int                     # tokens placed on one rank before the next
    shard_lens: tuple[int, ...]              # tokens on each rank; they sum to kv_len
    rank_plans: tuple[split_kv.SplitKVPlan, ...]   # each rank's split_kv plan for its shard
    collective: AllGather | None             # None with one GPU
    payload_bytes: int                       # partial states one rank sends (0 with one GPU)
    gpu: str                                 # GPU key (every rank the same kind)


def shard_lens(kv_len: int, num_gpus: int, placement_block: int = DEFAULT_PLACEMENT_BLOCK) -> tuple[int, ...]:
    """Tokens each rank holds when the context is placed round-robin in blocks of `placement_block`
    tokens (block i on rank i mod num_gpus, the last block possibly partial).

    >>> shard_lens(100, 4, 32)
    (32, 32, 32, 4)
    >>> shard_lens(40, 4, 32)
    (32, 8, 0, 0)
    """
    kv_len = check_nonnegative_int(kv_len, "kv_len")
    num_gpus = check_num_gpus(num_gpus)
    placement_block = check_positive_int(placement_block, "placement_block")
    blocks = -(-kv_len // placement_block)
    lens = [len(range(r, blocks, num_gpus)) * placement_block for r in range(num_gpus)]
    if blocks:
        lens[(blocks - 1) % num_gpus] -= blocks * placement_block - kv_len
    return tuple(lens)


def check_num_gpus(num_gpus) -> int:
    """An int in [1, MAX_NUM_GPUS] (NumPy integers too, bool not): TypeError, else ValueError."""
    num_gpus = check_positive_int(num_gpus, "num_gpus")
    if num_gpus > MAX_NUM_GPUS:
        raise ValueError(f"num_gpus must lie in [1, {MAX_NUM_GPUS}] (the GPUs of one host), got {num_gpus}")
    return num_gpus


def _check_graph(graph) -> bool:
    if not isinstance(graph, (bool, np.bool_)):
        raise TypeError(f"graph must be a bool (True: the collective runs inside a CUDA graph), got "
                        f"{type(graph).__name__} {graph!r}")
    return bool(graph)


def _check_shape(batch, num_qo_heads, num_kv_heads, head_dim, dtype) -> tuple:
    sizes = tuple(check_positive_int(v, name) for name, v in (
        ("batch", batch), ("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim)))
    check_head_grouping(sizes[1], sizes[2])
    dtype_bytes(dtype)
    return (*sizes, dtype)


def _resolve_interconnect(interconnect, spec: GPUSpec, num_gpus: int) -> "Interconnect | None":
    """The named interconnect, else the GPU's when there is a collective (none for one GPU)."""
    if interconnect is not None:
        return get_interconnect(interconnect)
    return interconnect_for(spec) if num_gpus > 1 else None


def plan_sharded(
    batch: int,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    kv_len: int,
    *,
    num_gpus: int,
    dtype: str = "float16",
    gpu: "GPUSpec | str" = "H200",
    placement_block: int = DEFAULT_PLACEMENT_BLOCK,
    graph: bool = True,
    interconnect: str | None = None,
) -> ShardedPlan:
    """Cut a decode call over `num_gpus` GPUs (1 to MAX_NUM_GPUS) of kind `gpu`: the shards of a
    round-robin placement in blocks of `placement_block` tokens, each rank's split_kv plan for its
    shard (the split count chosen as on one GPU), and the all-gather of the partial states; the
    whole step runs inside one CUDA graph unless `graph` is False. `interconnect` (default: the
    one the data file lists for `gpu`) names the collective model. One GPU is the plain split_kv
    plan with no collective.
    Sizes are ints (NumPy integers too): a wrong type is a TypeError, a wrong value a ValueError."""
    batch, num_qo_heads, num_kv_heads, head_dim, dtype = _check_shape(
        batch, num_qo_heads, num_kv_heads, head_dim, dtype)
    kv_len = check_nonnegative_int(kv_len, "kv_len")
    num_gpus = check_num_gpus(num_gpus)
    placement_block = check_positive_int(placement_block, "placement_block")
    graph = _check_graph(graph)
    spec, _ = plan_gpu(gpu, None, default_num_sms=split_kv.DEFAULT_NUM_SMS)
    net = _resolve_interconnect(interconnect, spec, num_gpus)
    lens = shard_lens(kv_len, num_gpus, placement_block)
    by_len = {n: split_kv.plan_split_kv(batch, num_qo_heads, num_kv_heads, head_dim, n, dtype=dtype, gpu=spec)
              for n in set(lens)}
    payload = batch * num_qo_heads * (head_dim + STATE_VALUES) * F32 if num_gpus > 1 else 0
    collective = AllGather(net.key, num_gpus, payload, graph) if num_gpus > 1 else None
    return ShardedPlan(
        batch=batch, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        dtype=dtype, kv_len=kv_len, num_gpus=num_gpus, placement_block=placement_block,
        shard_lens=lens, rank_plans=tuple(by_len[n] for n in lens), collective=collective,
        payload_bytes=payload, gpu=spec.key,
    )


# ---------------------------------------------------------------------------------------------
# The prediction
# ---------------------------------------------------------------------------------------------

def _copy_launch(name: str, num_elements: int, src_bytes: int, dst_bytes: int) -> Launch:
    """One elementwise copy of `num_elements` values: each block loads its elements, then stores
    them (one dependent round trip)."""
    full, rest = divmod(num_elements, COPY_ELEMENTS_PER_BLOCK)
    elem = src_bytes + dst_bytes
    runs = ((COPY_ELEMENTS_PER_BLOCK * elem, 1, full),) + (((rest * elem, 1, 1),) if rest else ())
    return Launch(name=name, bytes_by_tensor={f"{name}.src": num_elements * src_bytes,
                                              f"{name}.dst": num_elements * dst_bytes},
                  block_runs=runs, blocks_per_sm=COPY_BLOCKS_PER_SM)


def step_copy_launches(plan: "ShardedPlan") -> tuple[tuple[Launch, ...], tuple[Launch, ...]]:
    """The copies of a sharded step as `gpukernels.sharded._step` makes them: (pack, unpack).
    Pack: this rank's out [B, H, D] (q's dtype) and lse [B, H] into the float32 send buffer
    [B, H, D + 1]; unpack: the gathered [N, B, H, D + 1] into outs [N, B, H, D] (q's dtype) and
    lses [N, B, H], which the merge reads. None with one GPU: ((), ())."""
    if plan.num_gpus == 1:
        return (), ()
    rows = plan.batch * plan.num_qo_heads
    elem = dtype_bytes(plan.dtype)
    n = plan.num_gpus
    pack = (_copy_launch("pack_out", rows * plan.head_dim, elem, F32),
            _copy_launch("pack_lse", rows, F32, F32))
    unpack = (_copy_launch("unpack_outs", n * rows * plan.head_dim, F32, elem),
              _copy_launch("unpack_lses", n * rows, F32, F32))
    return pack, unpack


@dataclass(frozen=True, repr=False)
class ShardedPrediction(TimeAndRates):
    """Predicted cost of one sharded call (its achieved bytes per second: all GPUs' HBM traffic
    over the time, up to num_gpus times one GPU's ceiling). Prints as a short table with units (`str`, `repr`) and
    renders as one in a notebook; the numbers are in seconds and bytes: `terms` holds shard_s,
    pack_s, collective_s, unpack_s, merge_s and time_s (their sum) and the collective's parts as
    'collective.<part>', `shards[r]` each rank's split_kv prediction, `pack`, `unpack` and `merge`
    those of the step's copies and merge (None with one GPU).

    It also answers what an explanation's row reads from a Prediction (time, traffic, FLOPs,
    blocks, waves, bound), summed over the GPUs where a sum makes sense."""

    plan: ShardedPlan
    gpu: GPUSpec
    interconnect: Interconnect | None
    shards: tuple[Prediction, ...]
    pack: Prediction | None
    unpack: Prediction | None
    merge: Prediction | None
    kernel_launch_s: float           # what each kernel after the shard's costs to start (in a graph: `end_to_end.graph_kernel_seconds`)
    terms: dict[str, float]

    variant = "sharded"

    @property
    def num_gpus(self) -> int:
        return self.plan.num_gpus

    @property
    def time_s(self) -> float:
        return self.terms["time_s"]

    @property
    def shard_s(self) -> float:
        return self.terms["shard_s"]

    @property
    def pack_s(self) -> float:
        return self.terms["pack_s"]

    @property
    def collective_s(self) -> float:
        return self.terms["collective_s"]

    @property
    def unpack_s(self) -> float:
        return self.terms["unpack_s"]

    @property
    def merge_s(self) -> float:
        return self.terms["merge_s"]

    @property
    def exchange_s(self) -> float:
        """Everything after the shard: packing, the all-gather, unpacking and the merge."""
        return self.time_s - self.shard_s

    @property
    def slowest_rank(self) -> int:
        """The rank whose shard takes longest (the first of equals)."""
        times = [p.time_s for p in self.shards]
        return times.index(max(times))

    @property
    def slowest_shard(self) -> Prediction:
        return self.shards[self.slowest_rank]

    def _launch_predictions(self) -> list[Prediction]:
        small = [p for p in (self.pack, self.unpack, self.merge) if p is not None]
        return [*self.shards, *(small * self.num_gpus)]

    @property
    def hbm_bytes(self) -> int:
        """HBM traffic of all GPUs together (each rank's split_kv, copies and merge)."""
        return sum(p.hbm_bytes for p in self._launch_predictions())

    @property
    def l2_hit_bytes(self) -> int:
        return sum(p.l2_hit_bytes for p in self._launch_predictions())

    @property
    def flops(self) -> int:
        return sum(p.flops for p in self._launch_predictions())

    @property
    def num_blocks(self) -> int:
        """Thread blocks of all GPUs together."""
        return sum(p.num_blocks for p in self._launch_predictions())

    @property
    def waves(self) -> float:
        """Waves of the slowest shard's launch on its GPU."""
        return self.slowest_shard.waves

    @property
    def launches(self) -> int:
        """Kernels each GPU launches (`STEP_KERNELS`): split_kv alone on one GPU."""
        return 1 if self.num_gpus == 1 else len(STEP_KERNELS)

    @property
    def bound(self) -> str:
        """"collective" when exchanging and merging the states takes longer than the slowest
        shard; otherwise that shard's bound."""
        if self.exchange_s > self.shard_s:
            return "collective"
        return self.slowest_shard.bound

    def __str__(self) -> str:
        return "\n".join(t.text() for t in _prediction_tables(self))

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return "".join(t.html() for t in _prediction_tables(self))


def predict(plan: ShardedPlan, *, gpu: "GPUSpec | str | None" = None,
            calibration: Calibration | None = None) -> ShardedPrediction:
    """Predicted time of a sharded plan: the slowest rank's split_kv, the packing copies, the
    all-gather, the unpacking copies, the merge. `gpu` defaults to the plan's; one given must have
    the plan's SM count (a GPUSpec with measured ceilings, say). With one GPU the time is
    split_kv's prediction for the whole cache."""
    if not isinstance(plan, ShardedPlan):
        raise TypeError(f"plan must be a ShardedPlan, got {type(plan).__name__}")
    spec = get_gpu(plan.gpu if gpu is None else gpu)
    if spec.num_sms != plan.rank_plans[0].num_sms:
        raise ValueError(f"gpu = {spec.name!r} has {spec.num_sms} SMs, the plan was cut for "
                         f"{plan.rank_plans[0].num_sms} SMs ({plan.gpu}); plan again for that GPU")
    cal = calibration_for(spec, calibration)
    by_plan: dict = {}
    for rp in plan.rank_plans:
        if rp not in by_plan:
            by_plan[rp] = split_kv.predict(rp, gpu=spec, calibration=cal)
    shards = tuple(by_plan[rp] for rp in plan.rank_plans)
    shard_s = max(p.time_s for p in shards)
    # the kernels behind the shard's: inside the step's CUDA graph, or launched one by one
    graph = plan.collective is None or plan.collective.graph
    kernel_launch_s = graph_kernel_seconds(spec) if graph else cal.launch_s
    if plan.collective is None:
        net, pack, unpack, merge, coll = None, None, None, None, dict(NO_COLLECTIVE)
    else:
        net = get_interconnect(plan.collective.interconnect)
        coll = net.all_gather_terms(plan.collective.bytes_per_rank, plan.num_gpus, graph=plan.collective.graph)
        behind = dataclasses.replace(cal, launch_s=kernel_launch_s)
        pack_launches, unpack_launches = step_copy_launches(plan)
        pack = predict_launches("pack", pack_launches, gpu=spec, calibration=behind)
        unpack = predict_launches("unpack", unpack_launches, gpu=spec, calibration=behind)
        shape = merge_states.MergeStatesShape(plan.num_gpus, plan.batch, plan.num_qo_heads, plan.head_dim,
                                              plan.dtype)
        merge = merge_states.predict(shape, gpu=spec, calibration=behind)
    parts = {"shard_s": shard_s,
             "pack_s": pack.time_s if pack is not None else 0.0,
             "collective_s": coll["time_s"],
             "unpack_s": unpack.time_s if unpack is not None else 0.0,
             "merge_s": merge.time_s if merge is not None else 0.0}
    terms = {**parts, "time_s": sum(parts.values())}
    terms.update({f"collective.{k}": v for k, v in coll.items() if k != "time_s"})
    return ShardedPrediction(plan=plan, gpu=spec, interconnect=net, shards=shards, pack=pack, unpack=unpack,
                             merge=merge, kernel_launch_s=kernel_launch_s, terms=terms)


def _shards_text(lens: tuple[int, ...]) -> str:
    distinct = sorted(set(lens), reverse=True)
    if len(distinct) == 1:
        return f"{len(lens)} x {distinct[0]}"
    return " / ".join(f"{lens.count(n)} x {n}" for n in distinct)


def _splits_text(p: split_kv.SplitKVPlan) -> str:
    return f"{p.num_splits} split{'' if p.num_splits == 1 else 's'} of {p.chunk_size} tokens"


def _kernels_text(p: ShardedPrediction, what: str, count: int) -> str:
    where = "in the graph" if p.plan.collective.graph else "launched eagerly"
    kernels = f"{count} kernel{'' if count == 1 else 's'}"
    return f"{what}, {kernels} {where} ({format_seconds(p.kernel_launch_s)} to start each)"


def _prediction_tables(p: ShardedPrediction) -> tuple[Table]:
    plan, n = p.plan, p.num_gpus
    gpus = f"{n} GPU{'' if n == 1 else 's'}"
    where = "" if p.interconnect is None else (
        f", {p.interconnect.name}, step "
        + ("inside a CUDA graph" if plan.collective.graph else "called eagerly"))
    header = [
        f"sharded: split_kv on {gpus}, {format_seconds(p.time_s)} predicted, {p.bound}-bound "
        f"({p.gpu.name}{where})",
        f"{plan.batch} x {plan.kv_len} tokens, {plan.num_qo_heads} query / {plan.num_kv_heads} KV heads, "
        f"head_dim {plan.head_dim}, {plan.dtype}; shards of {_shards_text(plan.shard_lens)} tokens "
        f"(round-robin blocks of {plan.placement_block})",
    ]
    r = p.slowest_rank
    rows = [("shard_s", format_seconds(p.shard_s),
             f"rank {r}'s split_kv, {plan.shard_lens[r]} tokens, {_splits_text(plan.rank_plans[r])}, "
             f"{p.slowest_shard.bound}-bound")]
    if plan.collective is not None:
        c, net = plan.collective, p.interconnect
        seg = net.segment_for(c.bytes_per_rank)
        steps = n - 1
        what = (f"all-gather of {format_bytes(c.bytes_per_rank)} per rank, {net.algorithm}: "
                f"{format_seconds(net.call_latency_s)} a call + {steps} step{'' if steps == 1 else 's'} x "
                f"({format_seconds(seg.step_latency_s)} + bytes at {format_bytes_per_s(seg.link_bytes_per_s)}, "
                f"{seg.name})")
        if not c.graph:
            what += f" + {format_seconds(net.eager_call_overhead_s)} eager call"
        rows.append(("pack_s", format_seconds(p.pack_s), _kernels_text(p, "out and lse into the send buffer",
                                                                      p.pack.launches)))
        rows.append(("collective_s", format_seconds(p.collective_s), what))
        rows.append(("unpack_s", format_seconds(p.unpack_s), _kernels_text(p, f"the {n} gathered outs and lses",
                                                                          p.unpack.launches)))
        rows.append(("merge_s", format_seconds(p.merge_s), _kernels_text(p, f"merge_states of {n} states",
                                                                        p.merge.launches)))
    rows.append(("time_s", format_seconds(p.time_s),
                 f"their sum, {p.launches} kernels a GPU" if plan.collective is not None else "split_kv alone"))
    total = p.time_s
    table_rows = tuple((k, t, f"{p.terms[k] / total:.0%}" if total else "-", what) for k, t, what in rows)
    footer = ["each rank's split_kv prediction in .shards[r]"
              + (", the copies' in .pack and .unpack, the merge's in .merge, the collective's parts in "
                 ".terms['collective.<part>']" if plan.collective is not None else "")]
    if p.interconnect is not None:
        footer += p.interconnect.caveats(p.gpu.key, n)
    return (Table(tuple(header), ("term", "time", "share", "what"), table_rows, tuple(footer), "lrrl"),)


# ---------------------------------------------------------------------------------------------
# One GPU against N
# ---------------------------------------------------------------------------------------------

def _time_pair(batch, num_qo_heads, num_kv_heads, head_dim, kv_len, num_gpus, dtype, spec, placement_block,
               graph, interconnect, cal) -> tuple[float, float]:
    """(one GPU's split_kv time, num_gpus GPUs' sharded time) in seconds; arguments checked."""
    one = split_kv.predict(split_kv.plan_split_kv(batch, num_qo_heads, num_kv_heads, head_dim, kv_len,
                                                  dtype=dtype, gpu=spec), gpu=spec, calibration=cal)
    plan = plan_sharded(batch, num_qo_heads, num_kv_heads, head_dim, kv_len, num_gpus=num_gpus, dtype=dtype,
                        gpu=spec, placement_block=placement_block, graph=graph, interconnect=interconnect)
    return one.time_s, predict(plan, gpu=spec, calibration=cal).time_s


def _checked(batch, num_qo_heads, num_kv_heads, head_dim, num_gpus, dtype, gpu, placement_block, graph,
             interconnect, calibration):
    shape = _check_shape(batch, num_qo_heads, num_kv_heads, head_dim, dtype)
    num_gpus = check_num_gpus(num_gpus)
    placement_block = check_positive_int(placement_block, "placement_block")
    graph = _check_graph(graph)
    spec = get_gpu(gpu)
    _resolve_interconnect(interconnect, spec, num_gpus)
    cal = calibration_for(spec, calibration)
    return shape, num_gpus, spec, placement_block, graph, cal


def speedup(batch: int, num_qo_heads: int, num_kv_heads: int, head_dim: int, kv_len: int, *,
            num_gpus: int, dtype: str = "float16", gpu: "GPUSpec | str" = "H200",
            placement_block: int = DEFAULT_PLACEMENT_BLOCK, graph: bool = True,
            interconnect: str | None = None, calibration: Calibration | None = None) -> float:
    """Predicted time of split_kv on one GPU over that of the sharded call on `num_gpus`: above 1
    where sharding pays, at most about num_gpus."""
    shape, num_gpus, spec, placement_block, graph, cal = _checked(
        batch, num_qo_heads, num_kv_heads, head_dim, num_gpus, dtype, gpu, placement_block, graph,
        interconnect, calibration)
    kv_len = check_nonnegative_int(kv_len, "kv_len")
    one, many = _time_pair(*shape[:4], kv_len, num_gpus, shape[4], spec, placement_block, graph,
                           interconnect, cal)
    return one / many


def crossover_kv_len(batch: int, num_qo_heads: int, num_kv_heads: int, head_dim: int, *,
                     num_gpus: int, dtype: str = "float16", gpu: "GPUSpec | str" = "H200",
                     placement_block: int = DEFAULT_PLACEMENT_BLOCK, graph: bool = True,
                     interconnect: str | None = None, calibration: Calibration | None = None,
                     max_kv_len: int = MAX_SEARCH_KV_LEN) -> int | None:
    """The context length below which one GPU is predicted faster than `num_gpus` (>= 2): the
    smallest kv_len found where the sharded call takes no longer than one GPU's split_kv, one
    token less being slower. The search doubles kv_len from one placement block per GPU until
    the sharded call wins, then bisects between the last length where it lost and the first where
    it won (the predictions step with the split counts, so this is the first crossing the doubling
    brackets). None when it does not win up to `max_kv_len`; 1 when it wins at once."""
    shape, num_gpus, spec, placement_block, graph, cal = _checked(
        batch, num_qo_heads, num_kv_heads, head_dim, num_gpus, dtype, gpu, placement_block, graph,
        interconnect, calibration)
    if num_gpus < 2:
        raise ValueError(f"num_gpus must be >= 2 for a crossover against one GPU, got {num_gpus}")
    max_kv_len = check_positive_int(max_kv_len, "max_kv_len")

    @functools.lru_cache(maxsize=None)
    def sharded_wins(kv_len: int) -> bool:
        one, many = _time_pair(*shape[:4], kv_len, num_gpus, shape[4], spec, placement_block, graph,
                               interconnect, cal)
        return many <= one

    if sharded_wins(1):
        return 1
    lo, hi = 1, min(placement_block * num_gpus, max_kv_len)
    while not sharded_wins(hi):
        if hi >= max_kv_len:
            return None
        lo, hi = hi, min(2 * hi, max_kv_len)
    while hi - lo > 1:                  # one GPU wins at lo, the sharded call at hi
        mid = (lo + hi) // 2
        if sharded_wins(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _tokens(n: int) -> str:
    """A context length as people say it: 32k, 1M, 4M (binary), else the number."""
    for unit, scale in (("M", 1 << 20), ("k", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n:,}"


@dataclass(frozen=True, repr=False)
class ShardingTable:
    """Predicted time on one GPU and on `num_gpus` at a few context lengths, and the crossover.
    Prints as a short table with units; the numbers (seconds) are in `one_gpu_s`, `sharded_s`."""

    batch: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    num_gpus: int
    gpu: GPUSpec
    kv_lens: tuple[int, ...]
    one_gpu_s: tuple[float, ...]
    sharded_s: tuple[float, ...]
    crossover_kv_len: int | None
    search_max_kv_len: int = MAX_SEARCH_KV_LEN

    @property
    def speedups(self) -> tuple[float, ...]:
        return tuple(a / b for a, b in zip(self.one_gpu_s, self.sharded_s))

    def kv_cache_bytes(self, kv_len: int) -> int:
        """K and V of the whole batch at this context length (all GPUs together)."""
        return 2 * self.batch * kv_len * self.num_kv_heads * self.head_dim * dtype_bytes(self.dtype)

    def _table(self) -> Table:
        n = self.num_gpus
        header = (f"split_kv on 1 GPU against {n} GPUs, KV cache sharded along tokens ({self.gpu.name}): "
                  f"batch {self.batch}, {self.num_qo_heads} query / {self.num_kv_heads} KV heads, "
                  f"head_dim {self.head_dim}, {self.dtype}",)
        rows = tuple((_tokens(L), format_bytes(self.kv_cache_bytes(L)), format_seconds(a), format_seconds(b),
                      f"{a / b:.2f}x")
                     for L, a, b in zip(self.kv_lens, self.one_gpu_s, self.sharded_s))
        c = self.crossover_kv_len
        footer = [f"one GPU is faster below {c:,} tokens of context (predicted crossover)" if c is not None
                  else f"one GPU stays faster up to {self.search_max_kv_len:,} tokens of context (predicted)"]
        too_big = [L for L in self.kv_lens if self.kv_cache_bytes(L) > self.gpu.hbm_capacity_bytes]
        if too_big:
            footer.append(f"from {_tokens(min(too_big))} tokens the KV cache exceeds one GPU's "
                          f"{format_bytes(self.gpu.hbm_capacity_bytes)}: the 1-GPU time there is for a GPU "
                          "that could hold it")
        return Table(header, ("context", "KV cache", "1 GPU", f"{n} GPUs", "speedup"), rows, tuple(footer))

    def __str__(self) -> str:
        return self._table().text()

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return self._table().html()


def sharding_table(batch: int, num_qo_heads: int, num_kv_heads: int, head_dim: int, *, num_gpus: int,
                   kv_lens=TABLE_KV_LENS, dtype: str = "float16", gpu: "GPUSpec | str" = "H200",
                   placement_block: int = DEFAULT_PLACEMENT_BLOCK, graph: bool = True,
                   interconnect: str | None = None, calibration: Calibration | None = None) -> ShardingTable:
    """Predicted time of split_kv on one GPU and sharded over `num_gpus` (>= 2) at each of
    `kv_lens` (default 32k, 128k, 1M and 4M tokens), with the crossover context length."""
    shape, num_gpus, spec, placement_block, graph, cal = _checked(
        batch, num_qo_heads, num_kv_heads, head_dim, num_gpus, dtype, gpu, placement_block, graph,
        interconnect, calibration)
    if num_gpus < 2:
        raise ValueError(f"num_gpus must be >= 2 to compare with one GPU, got {num_gpus}")
    if isinstance(kv_lens, (str, bytes)) or not hasattr(kv_lens, "__iter__"):
        raise TypeError(f"kv_lens must be a sequence of ints, got {type(kv_lens).__name__} {kv_lens!r}")
    lens = tuple(check_positive_int(L, f"kv_lens[{i}]") for i, L in enumerate(kv_lens))
    pairs = [_time_pair(*shape[:4], L, num_gpus, shape[4], spec, placement_block, graph, interconnect, cal)
             for L in lens]
    cross = crossover_kv_len(*shape[:4], num_gpus=num_gpus, dtype=shape[4], gpu=spec,
                             placement_block=placement_block, graph=graph, interconnect=interconnect,
                             calibration=cal)
    return ShardingTable(*shape[:4], shape[4], num_gpus, spec, lens, tuple(a for a, _ in pairs),
                         tuple(b for _, b in pairs), cross)


@dataclass(frozen=True, repr=False)
class CrossoverTable:
    """The predicted crossover context for each GPU count: below it one GPU's split_kv is faster
    than the sharded call. Prints as a short table; the numbers are in `crossover_kv_lens`
    (None: one GPU stays faster up to `search_max_kv_len`) and `speedups_at` (one GPU's time over
    N GPUs' at `at_kv_len` tokens)."""

    batch: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    gpu: GPUSpec
    graph: bool
    num_gpus: tuple[int, ...]
    crossover_kv_lens: tuple[int | None, ...]
    at_kv_len: int
    speedups_at: tuple[float, ...]
    caveats: tuple[str, ...]
    search_max_kv_len: int = MAX_SEARCH_KV_LEN

    def _table(self) -> Table:
        where = "collective inside a CUDA graph" if self.graph else "collective called eagerly"
        header = (f"predicted crossover by GPU count ({self.gpu.name}, {where}): batch {self.batch}, "
                  f"{self.num_qo_heads} query / {self.num_kv_heads} KV heads, head_dim {self.head_dim}, "
                  f"{self.dtype}",)
        rows = tuple(
            (str(n), f"{c:,} tokens" if c is not None else f"> {self.search_max_kv_len:,}",
             f"{s:.2f}x")
            for n, c, s in zip(self.num_gpus, self.crossover_kv_lens, self.speedups_at))
        return Table(header, ("GPUs", "one GPU faster below", f"speedup at {_tokens(self.at_kv_len)}"), rows,
                     self.caveats, "rrr")

    def __str__(self) -> str:
        return self._table().text()

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return self._table().html()


def crossover_table(batch: int, num_qo_heads: int, num_kv_heads: int, head_dim: int, *,
                    num_gpus=range(2, MAX_NUM_GPUS + 1), dtype: str = "float16", gpu: "GPUSpec | str" = "H200",
                    placement_block: int = DEFAULT_PLACEMENT_BLOCK, graph: bool = True,
                    interconnect: str | None = None, calibration: Calibration | None = None,
                    at_kv_len: int = 1 << 20) -> CrossoverTable:
    """`crossover_kv_len` for each GPU count in `num_gpus` (default 2 to MAX_NUM_GPUS), with the
    predicted speedup over one GPU at `at_kv_len` tokens (default 1M) and what of it is not
    measured (the collective's extrapolation beyond the measured rank count)."""
    counts = tuple(check_num_gpus(n) for n in num_gpus)
    if not counts or min(counts) < 2:
        raise ValueError(f"num_gpus must list GPU counts of at least 2, got {list(counts)}")
    at_kv_len = check_positive_int(at_kv_len, "at_kv_len")
    shape, _, spec, placement_block, graph, cal = _checked(
        batch, num_qo_heads, num_kv_heads, head_dim, counts[0], dtype, gpu, placement_block, graph,
        interconnect, calibration)
    common = dict(dtype=shape[4], gpu=spec, placement_block=placement_block, graph=graph,
                  interconnect=interconnect, calibration=cal)
    crossings = tuple(crossover_kv_len(*shape[:4], num_gpus=n, **common) for n in counts)
    speedups = tuple(speedup(*shape[:4], at_kv_len, num_gpus=n, **common) for n in counts)
    net = get_interconnect(interconnect) if interconnect is not None else interconnect_for(spec)
    caveats = list(net.caveats(spec.key, net.measured_ranks))         # the GPU's own, if any
    beyond = [n for n in counts if n > net.measured_ranks]
    if beyond:
        caveats.append(f"collective extrapolated from {net.measured_ranks} ranks by the {net.algorithm} formula "
                       f"for {', '.join(map(str, beyond))} GPUs, not measured there")
    return CrossoverTable(*shape[:4], shape[4], spec, graph, counts, crossings, at_kv_len, speedups,
                          tuple(caveats))
