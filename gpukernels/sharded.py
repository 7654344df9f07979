"""Decode over a KV cache sharded along its tokens across GPUs: each rank attends to its shard, one
all-gather of the partial states, a local LSE merge.

Every rank holds a shard of every sequence (`ShardPlacement` says which tokens: blocks of
`block_tokens` go round-robin to the ranks, so no rank becomes the tail as sequences grow). A step
on every rank:

1. attends to its shard with this library's kernels (`split_kv` / `paged_decode`, or `span` for
   `sharded_span`: a span list in global token positions, cut into the rank's own slots by
   `ShardPlacement.local_spans`), giving a partial state (out [batch, num_qo_heads, head_dim],
   lse [batch, num_qo_heads]); a rank holding no (attended) token of a sequence gives the empty
   state (out = 0, lse = -inf) for it;
2. packs it into one array [batch, num_qo_heads, head_dim + 1] (out, then lse in the last column),
   float32 (float64 when q is float64, as with the references in the tests);
3. all-gathers the packed states ([world, batch, num_qo_heads, head_dim + 1]): the only collective,
   batch x heads x (head_dim + 1) values per rank whatever the context length;
4. merges the world states by log-sum-exp (`merge_states`), so every rank ends with the attention
   over the whole cache. The merge is exact: an empty shard is its identity, an lse of NaN or +inf
   makes the row NaN, a non-finite out element of a non-empty state makes that element NaN.

The collective is NCCL, through a torch.distributed process group (`TorchCollective`) or CuPy's
communicator (`CupyNcclCollective`); `InProcessCollective` simulates ranks in one process for the
tests. Any object with `world_size`, `rank`, `all_gather(packed, out=None)` (-> [world,
*packed.shape], on the caller's current stream) and `all_gather_host(values)` (a small host int
vector from every rank, synchronising) can stand in.

Checking across ranks. A malformed sharding (ranks that disagree on batch, heads, head_dim, dtype
or sm_scale) would make NCCL hang or mix garbage, so it must fail on every rank, never on some:

* `sharded_split_kv` / `sharded_paged_decode` / `sharded_span` (one-shot): each rank checks its own
  input, then all ranks all-gather a small int32 vector [magic, status, batch, num_qo_heads,
  num_kv_heads, head_dim, dtype, state dtype, sm_scale (2 words), variant, a digest of the span
  list, kv_len and placement (span only)] and compare it on the host; if any rank's
  input failed or any two disagree, every rank raises (the failing rank its own error, the others
  a ValueError naming it), before any payload moves. That exchange synchronises once per call.
* `ShardedDecode` (planned): the same exchange once, when it is built; its `run` then never
  synchronises and allocates nothing (buffers per stream), so the step, all-gather included, can
  be captured in a CUDA graph. A rank whose `run` input fails its checks still takes part in the
  all-gather, contributing a NaN state, and then raises: the other ranks never hang, and their
  outputs are NaN, never a plausible wrong number.

Tested on the CPU (tests/test_sharded.py: the algorithm with `InProcessCollective` and the
references as attention) and on two H200s with the kernels through both NCCL collectives, eager
and under CUDA-graph replay (tests/sharded_gpu_worker.py via `bash scripts/sharded-check.sh`).

Example (2 GPUs, one process each, under torchrun)::

    import torch, torch.distributed as dist
    from gpukernels import ShardPlacement, TorchCollective, sharded_split_kv
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    placement = ShardPlacement(dist.get_world_size(), block_tokens=32)
    # k_shard, v_shard: [batch, shard_capacity, num_kv_heads, head_dim], this rank's tokens;
    # shard_lens: int32 [batch] on the GPU, placement.shard_lens(kv_lens)[rank]
    out, lse = sharded_split_kv(q, k_shard, v_shard, shard_lens, collective=TorchCollective())
"""

from __future__ import annotations

import math
import numbers
import threading
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from decode_attention import contract

from . import _runtime as rt
from .merge_states import _THREADS as _MERGE_THREADS
from .merge_states import _kernel as _merge_kernel
from .split_kv import SplitKV, SplitKVPlan, check_kernel_dtype_and_head_dim

__all__ = [
    "ShardPlacement", "sharded_split_kv", "sharded_paged_decode", "sharded_span", "ShardedDecode",
    "TorchCollective", "CupyNcclCollective", "InProcessCollective",
]


# ---------------------------------------------------------------------------------------------
# Where the tokens live
# ---------------------------------------------------------------------------------------------

def _token_positions(x, name: str):
    """A token position or count: a non-negative int (returned as int) or an int array (int64)."""
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        if x < 0:
            raise ValueError(f"{name} must be >= 0, got {x}")
        return int(x)
    arr = contract.as_index_array(x, name)
    if arr.size and arr.min() < 0:
        i = int(np.flatnonzero(arr < 0)[0])
        raise ValueError(f"{name} must be >= 0, got {name}[{i}] = {int(arr.ravel()[i])}")
    return arr


@dataclass(frozen=True)
class ShardPlacement:
    """Where each token of a sequence lives when its KV cache is sharded over `num_ranks` ranks:
    tokens are cut into blocks of `block_tokens`, block i goes to rank i % num_ranks, and a rank
    keeps its blocks back to back in order.

        rank_of(t)     = (t // block_tokens) % num_ranks
        local_index(t) = (t // block_tokens // num_ranks) * block_tokens + t % block_tokens

    So a growing sequence fills the ranks in turn, and no rank holds more than `block_tokens`
    tokens more than another. A decode step appends one token per sequence: `rank_of(kv_lens)`
    and `local_index(kv_lens)` say, per sequence, which rank writes it and where.

    >>> p = ShardPlacement(2, block_tokens=4)
    >>> p.shard_lens(10).tolist()          # tokens 0-3, 8-9 on rank 0; 4-7 on rank 1
    [6, 4]
    >>> p.rank_of(9), p.local_index(9), p.token_of(0, 5)
    (0, 5, 9)
    >>> p.append(10, 5)                    # tokens 10-14: rank 0 slots 6-7, rank 1 slots 4-6
    ((6, 8), (4, 7))
    """

    num_ranks: int
    block_tokens: int = 32

    def __post_init__(self):
        object.__setattr__(self, "num_ranks", contract.check_positive_int(self.num_ranks, "num_ranks"))
        object.__setattr__(self, "block_tokens",
                           contract.check_positive_int(self.block_tokens, "block_tokens"))

    def _check_rank(self, rank) -> int:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise TypeError(f"rank must be an int, got {type(rank).__name__} {rank!r}")
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank must lie in [0, num_ranks) = [0, {self.num_ranks}), got {rank}")
        return int(rank)

    def rank_of(self, t):
        """The rank holding token t (an int, or an int array: elementwise)."""
        t = _token_positions(t, "t")
        return (t // self.block_tokens) % self.num_ranks

    def local_index(self, t):
        """The slot of token t in its rank's shard (an int, or an int array: elementwise)."""
        t = _token_positions(t, "t")
        return (t // self.block_tokens // self.num_ranks) * self.block_tokens + t % self.block_tokens

    def token_of(self, rank, local):
        """The inverse map: the token held in slot `local` of `rank`'s shard."""
        rank = self._check_rank(rank)
        local = _token_positions(local, "local")
        block = (local // self.block_tokens) * self.num_ranks + rank
        return block * self.block_tokens + local % self.block_tokens

    def shard_lens(self, kv_len) -> np.ndarray:
        """Tokens each rank holds of a sequence of kv_len tokens: int64 [num_ranks]; kv_len an int
        array [batch] (per-sequence lengths) gives [num_ranks, batch]."""
        kv_len = np.asarray(_token_positions(kv_len, "kv_len"), dtype=np.int64)
        full_blocks, rest = kv_len // self.block_tokens, kv_len % self.block_tokens
        ranks = np.arange(self.num_ranks).reshape((self.num_ranks,) + (1,) * kv_len.ndim)
        blocks = full_blocks // self.num_ranks + (ranks < full_blocks % self.num_ranks)
        # the partial block, if any, is block `full_blocks`, on rank full_blocks % num_ranks
        return blocks * self.block_tokens + np.where(ranks == full_blocks % self.num_ranks, rest, 0)

    def tokens_on(self, rank, kv_len) -> np.ndarray:
        """The tokens `rank` holds of a sequence of kv_len tokens, in slot order (int64): slot j of
        its shard holds token tokens_on(rank, kv_len)[j]."""
        rank = self._check_rank(rank)
        kv_len = _token_positions(kv_len, "kv_len")
        if not isinstance(kv_len, int):
            raise TypeError("kv_len must be an int here (one sequence)")
        return np.asarray(self.token_of(rank, np.arange(int(self.shard_lens(kv_len)[rank]))),
                          dtype=np.int64)

    def append(self, kv_len, n) -> tuple:
        """Where the next n tokens of a sequence now kv_len long go: per rank, the (start, stop)
        slots of its shard they fill, in token order (start == stop: none on that rank)."""
        kv_len = _token_positions(kv_len, "kv_len")
        n = _token_positions(n, "n")
        if not (isinstance(kv_len, int) and isinstance(n, int)):
            raise TypeError("kv_len and n must be ints here (one sequence)")
        before, after = self.shard_lens(kv_len), self.shard_lens(kv_len + n)
        return tuple((int(b), int(a)) for b, a in zip(before, after))

    def local_spans(self, rank, span_indptr, spans) -> tuple[np.ndarray, np.ndarray]:
        """A span list in global token positions (span_indptr [batch + 1], spans [num_spans, 2],
        host ints, as `refattn.span` takes them) cut to `rank`'s shard: the same form, in slots
        of that rank's shard, int64.

        A rank's tokens fill its slots in token order, so the tokens of a global span [s, e) that
        it holds are the slots [shard_lens(s)[rank], shard_lens(e)[rank]): one local span, or none
        when the rank holds no token of it (then it is dropped). Local spans stay sorted and
        non-overlapping.

        >>> p = ShardPlacement(2, block_tokens=4)
        >>> indptr, spans = p.local_spans(1, [0, 2], [[2, 9], [12, 13]])
        >>> indptr.tolist(), spans.tolist()     # tokens 4-7 are its slots 0-3, token 12 slot 4
        ([0, 2], [[0, 4], [4, 5]])
        >>> p.local_spans(0, [0, 2], [[2, 9], [12, 13]])[1].tolist()   # tokens 2, 3, 8: slots 2-4
        [[2, 5]]
        """
        rank = self._check_rank(rank)
        spans = contract.as_index_array(spans, "spans")
        span_indptr = contract.as_index_array(span_indptr, "span_indptr")
        if spans.ndim != 2 or spans.shape[1] != 2:
            raise ValueError(f"spans must be [num_spans, 2], got {spans.shape}")
        if (span_indptr.ndim != 1 or span_indptr.size == 0 or span_indptr[0] != 0
                or span_indptr[-1] != len(spans) or np.any(np.diff(span_indptr) < 0)):
            raise ValueError(f"span_indptr must be [batch + 1], non-decreasing from 0 to num_spans = "
                             f"{len(spans)}, got {span_indptr.tolist()}")
        if spans.size and spans.min() < 0:
            raise ValueError("spans must hold token positions >= 0")
        local = self.shard_lens(spans.reshape(-1)).reshape(self.num_ranks, -1, 2)[rank]   # [num_spans, 2]
        keep = local[:, 1] > local[:, 0]
        seq = np.repeat(np.arange(len(span_indptr) - 1), np.diff(span_indptr))              # [num_spans]
        counts = np.bincount(seq[keep], minlength=len(span_indptr) - 1)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), local[keep].astype(np.int64)

    def split(self, x, kv_lens=None, *, capacity=None, fill=0):
        """Cut a whole cache into shards (host NumPy): x [batch, kv_len, ...] with valid lengths
        kv_lens [batch] (default: all kv_len) -> (shards, shard_lens): per rank an array
        [batch, capacity_r, ...] whose first shard_lens[r, b] slots hold sequence b's tokens and
        the rest `fill`, and shard_lens int64 [num_ranks, batch]. capacity_r is the rank's longest
        shard unless `capacity` (one int for all ranks) is given."""
        x = np.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"x must be [batch, kv_len, ...], got shape {x.shape}")
        batch, kv_len = x.shape[:2]
        if kv_lens is None:
            kv_lens = np.full(batch, kv_len, dtype=np.int64)
        kv_lens = contract.as_index_array(kv_lens, "kv_lens")
        if kv_lens.shape != (batch,):
            raise ValueError(f"kv_lens must be [batch] = [{batch}], got {kv_lens.shape}")
        if kv_lens.size and (kv_lens.min() < 0 or kv_lens.max() > kv_len):
            raise ValueError(f"kv_lens must lie in [0, kv_len] = [0, {kv_len}], got {kv_lens.tolist()}")
        lens = self.shard_lens(kv_lens).reshape(self.num_ranks, batch)  # [R, B]
        if capacity is not None:
            capacity = contract.check_nonnegative_int(capacity, "capacity")
            if lens.size and capacity < lens.max():
                raise ValueError(f"capacity must be >= the longest shard ({int(lens.max())}), "
                                 f"got {capacity}")
        shards = []
        for r in range(self.num_ranks):
            cap = int(lens[r].max(initial=0)) if capacity is None else capacity
            shard = np.full((batch, cap) + x.shape[2:], fill, dtype=x.dtype)
            for b in range(batch):
                shard[b, : lens[r, b]] = x[b, self.tokens_on(r, int(kv_lens[b]))]
            shards.append(shard)
        return shards, lens

    def assemble(self, shards, shard_lens):
        """The inverse of `split`: per-rank shards [batch, capacity_r, ...] holding shard_lens
        [num_ranks, batch] tokens -> (x [batch, max kv_len, ...], kv_lens [batch]), the slots past
        each sequence's length zero. ValueError unless shard_lens is this placement's for some
        kv_lens."""
        if len(shards) != self.num_ranks:
            raise ValueError(f"shards must hold num_ranks = {self.num_ranks} arrays, got {len(shards)}")
        shards = [np.asarray(s) for s in shards]
        batch = shards[0].shape[0]
        lens = contract.as_index_array(shard_lens, "shard_lens")
        if lens.shape != (self.num_ranks, batch):
            raise ValueError(f"shard_lens must be [num_ranks, batch] = ({self.num_ranks}, {batch}), "
                             f"got {lens.shape}")
        kv_lens = lens.sum(axis=0)
        if not np.array_equal(self.shard_lens(kv_lens).reshape(lens.shape), lens):
            raise ValueError("shard_lens is not how this placement shards any lengths")
        x = np.zeros((batch, int(kv_lens.max(initial=0))) + shards[0].shape[2:], dtype=shards[0].dtype)
        for r, shard in enumerate(shards):
            for b in range(batch):
                x[b, self.tokens_on(r, int(kv_lens[b]))] = shard[b, : lens[r, b]]
        return x, kv_lens


# ---------------------------------------------------------------------------------------------
# The few array operations the step needs, for NumPy, CuPy and PyTorch alike
# ---------------------------------------------------------------------------------------------

class _Arrays(NamedTuple):
    kind: str          # "numpy", "cupy" or "torch"
    device_id: int     # -1 for NumPy

    @staticmethod
    def of(x, name: str) -> "_Arrays":
        if rt._kind(x) is None:
            if isinstance(x, np.ndarray):
                return _Arrays("numpy", -1)
            raise TypeError(f"{name} must be a NumPy array, a CuPy array or a PyTorch CUDA tensor, "
                            f"got {type(x).__module__}.{type(x).__name__}")
        a = rt.device_array(x, name)
        return _Arrays(a.kind, a.device_id)

    def empty(self, shape: tuple, dtype: str):
        if self.kind == "numpy":
            return np.empty(shape, dtype=rt._np_dtype(dtype))
        return rt.empty(self.kind, shape, dtype, self.device_id)

    def copy(self, dst, src) -> None:
        """dst <- src (cast to dst's dtype), on the current stream."""
        if self.kind == "torch":
            dst.copy_(src)
        else:
            dst[...] = src

    def full(self, shape: tuple, dtype: str, value: float):
        if self.kind == "numpy":
            return np.full(shape, value, dtype=rt._np_dtype(dtype))
        x = rt.empty(self.kind, shape, dtype, self.device_id)
        if self.kind == "torch":
            x.fill_(value)
        else:
            x.fill(value)
        return x

    def fill_nan(self, x) -> None:
        if self.kind == "torch":
            x.fill_(float("nan"))
        else:
            x.fill(np.nan)

    def stream(self) -> int:
        return 0 if self.kind == "numpy" else rt.current_stream_ptr(self.kind, self.device_id)


def _shape(x) -> tuple:
    return tuple(int(s) for s in x.shape)


def _check_output(arrays: _Arrays, x, name: str, template: str, shape: tuple, dtype: str) -> None:
    """A caller's output array: the inputs' kind and device, `shape`, `dtype`, contiguous."""
    got = _Arrays.of(x, name)
    if got.kind != arrays.kind:
        raise TypeError(f"{name} must be a {arrays.kind} array like q, got a {got.kind} array")
    if _shape(x) != shape:
        raise ValueError(f"{name} must be {template} = {list(shape)}, got {_shape(x)}")
    if contract.dtype_name(x) != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {contract.dtype_name(x)}")
    if arrays.kind != "numpy":
        a = rt.device_array(x, name)
        rt.require_contiguous(a, name)
        if a.device_id != arrays.device_id:
            raise ValueError(f"{name} must be on GPU {arrays.device_id} like q, got GPU {a.device_id}")


def state_dtype(dtype: str) -> str:
    """The dtype of the packed partial states for inputs of `dtype`: float32, float64 for float64."""
    return "float64" if dtype == "float64" else "float32"


# ---------------------------------------------------------------------------------------------
# Agreement across ranks
# ---------------------------------------------------------------------------------------------

class _Problem(NamedTuple):
    """What every rank must agree on (the shard lengths and cache layout may differ)."""

    batch: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    state_dtype: str
    sm_scale: float
    variant: str = "whole"       # "whole": every token of the shard; "span": listed spans only
    layout: int = 0              # span: a digest of the global span list and the placement


_MAGIC = 0x53484432                    # "SHD2": a sharded-decode metadata vector
_OK, _REJECTED = 0, 1
_DTYPE_CODES = {"float16": 1, "bfloat16": 2, "float32": 3, "float64": 4}
_VARIANT_CODES = {"whole": 1, "span": 2}
# field -> its words in the metadata vector (after magic and status)
_WORDS = {"batch": slice(2, 3), "num_qo_heads": slice(3, 4), "num_kv_heads": slice(4, 5),
          "head_dim": slice(5, 6), "dtype": slice(6, 7), "state dtype": slice(7, 8),
          "sm_scale": slice(8, 10), "variant": slice(10, 11), "spans and placement": slice(11, 12)}
META_LEN = 12


def _metadata(problem: "_Problem | None") -> np.ndarray:
    """int32 [META_LEN]: magic, status, then the problem (sm_scale as the two words of its
    float64, the layout digest as the bits of a uint32)."""
    meta = np.full(META_LEN, -1, dtype=np.int32)
    meta[0] = _MAGIC
    if problem is None:
        meta[1] = _REJECTED
        return meta
    meta[1] = _OK
    meta[2:6] = (problem.batch, problem.num_qo_heads, problem.num_kv_heads, problem.head_dim)
    meta[6] = _DTYPE_CODES.get(problem.dtype, 0)
    meta[7] = _DTYPE_CODES.get(problem.state_dtype, 0)
    meta[8:10] = np.array([problem.sm_scale], dtype=np.float64).view(np.int32)
    meta[10] = _VARIANT_CODES[problem.variant]
    meta[11] = np.array([problem.layout], dtype=np.uint32).view(np.int32)[0]
    return meta


def _shown(field: str, row: np.ndarray):
    words = row[_WORDS[field]]
    if field == "sm_scale":
        return float(words.copy().view(np.float64)[0])
    value = int(words[0])
    if field in ("dtype", "state dtype"):
        return {code: name for name, code in _DTYPE_CODES.items()}.get(value, f"code {value}")
    if field == "variant":
        return {code: name for name, code in _VARIANT_CODES.items()}.get(value, f"code {value}")
    if field == "spans and placement":
        return f"digest {value & 0xFFFFFFFF:08x}"
    return value


def _agree(collective, problem: "_Problem | None", error: "BaseException | None") -> None:
    """All-gather every rank's metadata and raise on every rank unless all checked their input and
    agree. `error`: this rank's own failure, re-raised here (after the exchange, so that the other
    ranks learn of it instead of waiting in a collective)."""
    table = np.asarray(collective.all_gather_host(_metadata(None if error else problem)))
    table = table.reshape(-1, META_LEN)
    if error is not None:
        raise error
    strangers = [r for r in range(table.shape[0]) if table[r, 0] != _MAGIC]
    if strangers:
        raise RuntimeError(f"rank(s) {strangers} sent no sharded-decode metadata: the ranks' "
                           f"collectives are out of step")
    rejected = [r for r in range(table.shape[0]) if table[r, 1] != _OK]
    if rejected:
        raise ValueError(f"rank(s) {rejected} rejected their input to the sharded decode step (each "
                         f"raised the reason there); no rank ran it")
    differing = []
    for field, words in _WORDS.items():
        cols = table[:, words]
        if not np.all(cols == cols[0]):
            values = ", ".join(f"rank {r} has {_shown(field, table[r])}" for r in range(table.shape[0]))
            differing.append(f"{field}: {values}")
    if differing:
        raise ValueError("the ranks disagree on the sharded problem (every rank raises this): "
                         + "; ".join(differing))


def _check_collective(collective) -> None:
    missing = [a for a in ("world_size", "rank", "all_gather", "all_gather_host")
               if not hasattr(collective, a)]
    if missing:
        raise TypeError(f"collective must have world_size, rank, all_gather and all_gather_host "
                        f"(TorchCollective, CupyNcclCollective, ...), got {type(collective).__name__} "
                        f"without {', '.join(missing)}")


def _check_kind(collective, arrays: _Arrays) -> None:
    kinds = getattr(collective, "array_kinds", None)
    if kinds is not None and arrays.kind not in kinds:
        raise TypeError(f"{type(collective).__name__} gathers {' or '.join(kinds)} arrays, "
                        f"got {arrays.kind} arrays")


def _check_step_kinds(arrays: _Arrays, collective, *, kernels: bool, merge) -> None:
    _check_kind(collective, arrays)
    if arrays.kind == "numpy" and (kernels or merge is None):
        raise TypeError("NumPy arrays need both attend= and merge= (e.g. refattn.split_kv and "
                        "refattn.merge_states); the GPU kernels take CuPy arrays or PyTorch CUDA "
                        "tensors")


# ---------------------------------------------------------------------------------------------
# The step, written once for every kind of array
# ---------------------------------------------------------------------------------------------

class _Buffers:
    """The arrays one step writes: its partial state (kernels only), the packed state, the gathered
    states and their unpacked halves, plus views into them made once."""

    def __init__(self, arrays: _Arrays, world: int, problem: _Problem, *, local: bool):
        B, H, D, dtype, sdtype = (problem.batch, problem.num_qo_heads, problem.head_dim,
                                  problem.dtype, problem.state_dtype)
        self.local_out = arrays.empty((B, H, D), dtype) if local else None
        self.local_lse = arrays.empty((B, H), "float32") if local else None
        self.send = arrays.empty((B, H, D + 1), sdtype)               # [B, H, D+1]: out | lse
        self.gathered = arrays.empty((world, B, H, D + 1), sdtype)    # [W, B, H, D+1]
        self.outs = arrays.empty((world, B, H, D), dtype)             # [W, B, H, D], q's dtype
        self.lses = arrays.empty((world, B, H), sdtype)               # [W, B, H]
        self.send_out, self.send_lse = self.send[..., :D], self.send[..., D]
        self.gathered_out, self.gathered_lse = self.gathered[..., :D], self.gathered[..., D]


def _merge_into(arrays: _Arrays, outs, lses, out, lse) -> None:
    """The GPU merge kernel (`merge_states`) writing into the caller's out and lse."""
    num_states, batch, heads, head_dim = _shape(outs)
    rows = batch * heads
    args = (rt.address(outs), rt.address(lses), rt.address(out), rt.address(lse), num_states, rows,
            head_dim)
    _merge_kernel(rt._dtype_name(outs.dtype))((rows,), (_MERGE_THREADS,), args,
                                              stream_ptr=arrays.stream(), device_id=arrays.device_id)


def _check_state(x, name: str, shape: tuple) -> None:
    if _shape(x) != shape:
        raise ValueError(f"attend must return {name} of shape {list(shape)}, got {_shape(x)}")


def _step(arrays: _Arrays, collective, problem: _Problem, bufs: _Buffers, attend_local, merge,
          out, lse):
    """attend -> pack -> all-gather -> unpack -> merge into out, lse. A failure before the
    all-gather still sends a NaN state (the other ranks are waiting in the collective), then raises."""
    B, H, D = problem.batch, problem.num_qo_heads, problem.head_dim
    try:
        local_out, local_lse = attend_local()
        _check_state(local_out, "out", (B, H, D))
        _check_state(local_lse, "lse", (B, H))
        arrays.copy(bufs.send_out, local_out)
        arrays.copy(bufs.send_lse, local_lse)
    except Exception:
        arrays.fill_nan(bufs.send)
        collective.all_gather(bufs.send, out=bufs.gathered)
        raise
    gathered = collective.all_gather(bufs.send, out=bufs.gathered)
    if gathered is bufs.gathered:
        arrays.copy(bufs.outs, bufs.gathered_out)
        arrays.copy(bufs.lses, bufs.gathered_lse)
    else:
        arrays.copy(bufs.outs, gathered[..., :D])
        arrays.copy(bufs.lses, gathered[..., D])
    if merge is None:
        _merge_into(arrays, bufs.outs, bufs.lses, out, lse)
    else:
        merged_out, merged_lse = merge(bufs.outs, bufs.lses)
        _check_state(merged_out, "merged out", (B, H, D))
        arrays.copy(out, merged_out)
        arrays.copy(lse, merged_lse)
    return out, lse


def _problem_of(checked, sm_scale: float, dtype: str) -> _Problem:
    return _Problem(checked.batch, checked.num_qo_heads, checked.num_kv_heads, checked.head_dim,
                    dtype, state_dtype(dtype), sm_scale)


def _prepare(q, checked, collective, *, kernels: bool, merge, out, lse):
    """Checks shared by the one-shot forms: -> (arrays, problem)."""
    if kernels:
        check_kernel_dtype_and_head_dim(checked.dtype, checked.head_dim)
    arrays = _Arrays.of(q, "q")
    _check_step_kinds(arrays, collective, kernels=kernels, merge=merge)
    problem = _problem_of(checked, checked.sm_scale, checked.dtype)
    B, H, D = problem.batch, problem.num_qo_heads, problem.head_dim
    if out is not None:
        _check_output(arrays, out, "out", "[batch, num_qo_heads, head_dim]", (B, H, D), problem.dtype)
    if lse is not None:
        _check_output(arrays, lse, "lse", "[batch, num_qo_heads]", (B, H), problem.state_dtype)
    return arrays, problem


def _one_shot(collective, check, attend_local, merge, out, lse):
    """Check this rank, agree with the others (every rank raises, or none), then run the step."""
    _check_collective(collective)
    arrays = problem = error = None
    try:
        arrays, problem = check()
    except Exception as exc:  # noqa: BLE001 - re-raised by _agree after the exchange
        error = exc
    _agree(collective, problem, error)
    B, H, D = problem.batch, problem.num_qo_heads, problem.head_dim
    if out is None:
        out = arrays.empty((B, H, D), problem.dtype)
    if lse is None:
        lse = arrays.empty((B, H), problem.state_dtype)
    bufs = _Buffers(arrays, collective.world_size, problem, local=False)
    return _step(arrays, collective, problem, bufs, lambda: attend_local(problem), merge, out, lse)


def sharded_split_kv(q, k_shard, v_shard, shard_lens=None, *, collective, attend=None, merge=None,
                     sm_scale=None, out=None, lse=None):
    """Attention of one query per sequence over a KV cache sharded along its tokens across ranks;
    every rank calls it with its own shard and gets the attention over the whole cache.

    q: [batch, num_qo_heads, head_dim], the same on every rank; k_shard, v_shard: [batch,
    shard_capacity, num_kv_heads, head_dim], this rank's tokens of each sequence (in the order of
    `ShardPlacement.tokens_on`; the order does not change the result); shard_lens: optional int
    [batch], how many of them are valid (0 for a sequence with no token here), on the host or the
    GPU. collective: see the module docstring.

    attend: the local attention, called as attend(q, k_shard, v_shard, shard_lens,
    sm_scale=...) -> (out, lse); default `gpukernels.split_kv`. merge: merge(outs [world, batch,
    heads, head_dim], lses [world, batch, heads]) -> (out, lse); default the GPU merge kernel
    (`merge_states`) writing straight into out and lse. NumPy arrays need both (for instance
    refattn.split_kv and refattn.merge_states).

    Returns (out, lse): out [batch, num_qo_heads, head_dim] in q's dtype and kind, lse
    [batch, num_qo_heads] float32 (float64 for float64 q); the same on every rank. Checks this
    rank's input, then exchanges a small metadata vector with every rank (one synchronisation):
    bad input on any rank, or ranks that disagree, raise on every rank before the payload moves.
    Use `ShardedDecode` for a step without synchronisation (and in CUDA graphs).
    """
    kernels = attend is None

    def check():
        on_device = shard_lens is not None and rt._kind(shard_lens) is not None
        checked, _ = contract.check_decode(q, k_shard, v_shard, None if on_device else shard_lens,
                                           sm_scale=sm_scale)
        if on_device:
            a = rt.device_array(shard_lens, "shard_lens")
            if not a.dtype.startswith(("int", "uint")):
                raise TypeError(f"shard_lens must hold integers, got {a.dtype}")
            if a.shape != (checked.batch,):
                raise ValueError(f"shard_lens must be [batch] = [{checked.batch}], got {a.shape}")
        return _prepare(q, checked, collective, kernels=kernels, merge=merge, out=out, lse=lse)

    if attend is None:
        from .split_kv import split_kv as attend  # noqa: PLC0415 - the default local attention

    def attend_local(problem):
        return attend(q, k_shard, v_shard, shard_lens, sm_scale=problem.sm_scale)

    return _one_shot(collective, check, attend_local, merge, out, lse)


def sharded_paged_decode(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, *, collective,
                         attend=None, merge=None, sm_scale=None, out=None, lse=None):
    """The paged form of `sharded_split_kv`: each rank's shard is its own paged cache (k_cache,
    v_cache [num_pages, page_size, num_kv_heads, head_dim] and its page table, as in
    `paged_decode`); a sequence with no token on this rank has no pages (kv_last_page_len 0).
    Page sizes and page counts may differ across ranks. attend defaults to `gpukernels.paged_decode`
    (called as attend(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, sm_scale=...)).
    Page tables on the host are checked before the exchange; on the GPU the kernel checks them
    (a bad sequence comes out NaN on every rank).
    """
    kernels = attend is None
    tables = (kv_indptr, kv_indices, kv_last_page_len)

    def check():
        if any(rt._kind(t) is not None for t in tables):
            checked = contract.check_paged_layout(q, k_cache, v_cache, sm_scale=sm_scale)
        else:
            checked, _ = contract.check_paged(q, k_cache, v_cache, *tables, sm_scale=sm_scale)
        return _prepare(q, checked, collective, kernels=kernels, merge=merge, out=out, lse=lse)

    if attend is None:
        from .paged_decode import paged_decode as attend  # noqa: PLC0415

    def attend_local(problem):
        return attend(q, k_cache, v_cache, *tables, sm_scale=problem.sm_scale)

    return _one_shot(collective, check, attend_local, merge, out, lse)


def _check_placement(placement, collective) -> None:
    if not isinstance(placement, ShardPlacement):
        raise TypeError(f"placement must be a ShardPlacement, got {type(placement).__name__}")
    if placement.num_ranks != collective.world_size:
        raise ValueError(f"placement must place tokens on the collective's {collective.world_size} ranks, "
                         f"got ShardPlacement(num_ranks={placement.num_ranks})")


def _span_digest(placement: ShardPlacement, kv_len: int, span_indptr: np.ndarray, spans: np.ndarray,
                 sinks: bool) -> int:
    """A 32-bit digest of what every rank's span call must share: the global span list, kv_len,
    the placement and whether sink logits join."""
    head = np.array([kv_len, placement.num_ranks, placement.block_tokens, int(sinks)], dtype=np.int64)
    crc = zlib.crc32(head.tobytes())
    crc = zlib.crc32(np.ascontiguousarray(span_indptr, dtype=np.int64).tobytes(), crc)
    return zlib.crc32(np.ascontiguousarray(spans, dtype=np.int64).tobytes(), crc)


def sharded_span(q, k_shard, v_shard, span_indptr, spans, *, placement, kv_len, collective, attend=None,
                 merge=None, sm_scale=None, sinks=None, out=None, lse=None):
    """Span attention (see `refattn.span`) over a KV cache sharded along its tokens: sequence b
    attends to the tokens inside spans[span_indptr[b]:span_indptr[b+1]], given in global token
    positions of a cache of kv_len tokens, wherever they live. Every rank calls it with the same
    span list and its own shard, and gets the attention over the whole list.

    q: [batch, num_qo_heads, head_dim]; k_shard, v_shard: [batch, shard_capacity, num_kv_heads,
    head_dim], this rank's tokens as `placement` (a ShardPlacement over the collective's ranks;
    this rank is collective.rank) puts them: slot j holds token placement.token_of(rank, j).
    span_indptr [batch + 1], spans [num_spans, 2]: host ints (NumPy, lists) or device arrays
    (copied to the host), the same on every rank. Each rank cuts the list into the spans of its
    own slots (`ShardPlacement.local_spans`) and attends to those alone; a rank holding no
    attended token of a sequence gives the empty state for it, the identity of the merge.

    sinks: optional per-head sink logits [num_qo_heads] (see `refattn.span`), given on every rank;
    joined once, to rank 0's partial state (a sink joined on every rank would count world times).
    attend: the local attention, attend(q, k_shard, v_shard, local_indptr, local_spans,
    sm_scale=..., [sinks=...]) -> (out, lse); default `gpukernels.span`. merge, out, lse and the
    checks across ranks as in `sharded_split_kv`; the ranks also agree on the span list, kv_len,
    the placement and whether sinks are given (a digest of them), so a rank with another list
    makes every rank raise.
    """
    kernels = attend is None
    local: dict = {}

    def check():
        _check_placement(placement, collective)
        total = contract.check_nonnegative_int(kv_len, "kv_len")
        checked, _ = contract.check_decode(q, k_shard, v_shard, None, sm_scale=sm_scale)
        indptr_h, spans_h = contract.check_spans(rt.host_ints(span_indptr, "span_indptr"),
                                                 rt.host_ints(spans, "spans"), checked.batch, total)
        local_indptr, local_spans = placement.local_spans(collective.rank, indptr_h, spans_h)
        if local_spans.size and local_spans[:, 1].max() > checked.kv_len:
            raise ValueError(
                f"k_shard must hold the {int(local_spans[:, 1].max())} slots of rank {collective.rank} that the "
                f"spans reach (placement.shard_lens of the last span end), got shard_capacity {checked.kv_len}")
        contract.check_sinks(sinks, checked.num_qo_heads)
        arrays, problem = _prepare(q, checked, collective, kernels=kernels, merge=merge, out=out, lse=lse)
        local["spans"], local["arrays"] = (local_indptr, local_spans), arrays
        digest = _span_digest(placement, total, indptr_h, spans_h, sinks is not None)
        return arrays, problem._replace(variant="span", layout=digest)

    if attend is None:
        from .span import span as attend  # noqa: PLC0415 - the default local attention

    def attend_local(problem):
        options = {"sinks": sinks} if sinks is not None and collective.rank == 0 else {}
        if not len(local["spans"][1]) and not options:
            # nothing attended here: the empty state, without a launch (the shard may have no slots)
            arrays = local["arrays"]
            B, H, D = problem.batch, problem.num_qo_heads, problem.head_dim
            return arrays.full((B, H, D), problem.dtype, 0.0), arrays.full((B, H), problem.state_dtype, -np.inf)
        return attend(q, k_shard, v_shard, *local["spans"], sm_scale=problem.sm_scale, **options)

    return _one_shot(collective, check, attend_local, merge, out, lse)


class ShardedDecode:
    """The sharded step planned once and run many times: no synchronisation, no allocation (given
    out and lse), capturable in a CUDA graph together with its all-gather.

    plan: this rank's `SplitKVPlan` for its shard (`plan_split_kv(batch, num_qo_heads,
    num_kv_heads, head_dim, max_shard_len, dtype=..., page_size=...)`), which fixes the problem
    every rank must agree on. Building it exchanges the metadata with every rank (every rank must
    build its ShardedDecode at the same point; all raise if they disagree). `attend`/`merge` as in
    `sharded_split_kv` (given, the plan only fixes the sizes; for tests on the CPU).

    Each stream it runs on gets its own buffers, made on the first run there: run once on the
    capture stream before capturing. A run whose input fails its checks sends a NaN state to the
    all-gather (the other ranks' outputs become NaN) and raises on this rank.

    >>> dec = ShardedDecode(plan, TorchCollective())                           # doctest: +SKIP
    >>> dec.run(q, k_shard, v_shard, shard_lens, out=out, lse=lse)            # doctest: +SKIP
    """

    def __init__(self, plan, collective, *, sm_scale=None, attend=None, merge=None):
        if not isinstance(plan, SplitKVPlan):
            raise TypeError(f"plan must be a SplitKVPlan (gpukernels.plan_split_kv), "
                            f"got {type(plan).__name__}")
        _check_collective(collective)
        self.plan = plan
        self.collective = collective
        self._attend = attend
        self._merge = merge
        self._split = None
        # (kind, device, stream) -> _Buffers, kept while this lives: graphs hold their addresses
        self._buffers: dict = {}
        problem = error = None
        try:
            if attend is None:
                check_kernel_dtype_and_head_dim(plan.dtype, plan.head_dim)
                self._split = SplitKV(plan)
            scale = contract.check_sm_scale(sm_scale, plan.head_dim)
            problem = _Problem(plan.batch, plan.num_qo_heads, plan.num_kv_heads, plan.head_dim,
                               plan.dtype, state_dtype(plan.dtype), scale)
        except Exception as exc:  # noqa: BLE001 - re-raised by _agree after the exchange
            error = exc
        _agree(collective, problem, error)
        self.problem = problem
        self.sm_scale = problem.sm_scale

    def run(self, q, k_shard, v_shard, shard_lens=None, *, out=None, lse=None):
        """Contiguous shard: k_shard, v_shard [batch, shard_capacity, num_kv_heads, head_dim];
        shard_lens None or (kernels) an int32 device array [batch]. Returns (out, lse)."""
        if self._split is not None:
            def attend_local(bufs):
                return self._split.run(q, k_shard, v_shard, shard_lens, sm_scale=self.sm_scale,
                                       out=bufs.local_out, lse=bufs.local_lse)
        else:
            def attend_local(bufs):
                return self._attend(q, k_shard, v_shard, shard_lens, sm_scale=self.sm_scale)
        return self._run(q, attend_local, out, lse)

    def run_paged(self, q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, *, out=None,
                  lse=None):
        """Paged shard (the plan's page_size); with the kernels the page tables are int32 device
        arrays. Returns (out, lse)."""
        tables = (kv_indptr, kv_indices, kv_last_page_len)
        if self._split is not None:
            def attend_local(bufs):
                return self._split.run_paged(q, k_cache, v_cache, *tables, sm_scale=self.sm_scale,
                                             out=bufs.local_out, lse=bufs.local_lse)
        else:
            def attend_local(bufs):
                return self._attend(q, k_cache, v_cache, *tables, sm_scale=self.sm_scale)
        return self._run(q, attend_local, out, lse)

    def _buffers_for(self, arrays: _Arrays) -> _Buffers:
        key = (arrays.kind, arrays.device_id, arrays.stream())
        bufs = self._buffers.get(key)
        if bufs is None:
            bufs = self._buffers[key] = _Buffers(arrays, self.collective.world_size, self.problem,
                                                 local=self._split is not None)
        return bufs

    def _run(self, q, attend_local, out, lse):
        p = self.problem
        B, H, D = p.batch, p.num_qo_heads, p.head_dim
        try:
            arrays = _Arrays.of(q, "q")
            _check_step_kinds(arrays, self.collective, kernels=self._split is not None,
                              merge=self._merge)
            _check_output(arrays, q, "q", "[batch, num_qo_heads, head_dim] as planned", (B, H, D),
                          p.dtype)
            bufs = self._buffers_for(arrays)
            if out is None:
                out = arrays.empty((B, H, D), p.dtype)
            else:
                _check_output(arrays, out, "out", "[batch, num_qo_heads, head_dim]", (B, H, D), p.dtype)
            if lse is None:
                lse = arrays.empty((B, H), p.state_dtype)
            else:
                _check_output(arrays, lse, "lse", "[batch, num_qo_heads]", (B, H), p.state_dtype)
        except Exception:
            self._send_nan()
            raise
        return _step(arrays, self.collective, p, bufs, lambda: attend_local(bufs), self._merge, out,
                     lse)

    def _send_nan(self) -> None:
        """This rank's share of the all-gather when its input was refused: a NaN state."""
        p = self.problem
        if self._buffers:
            key, bufs = next(reversed(self._buffers.items()))
            arrays = _Arrays(key[0], key[1])
        else:
            arrays = _Arrays(getattr(self.collective, "kind", "numpy"),
                             getattr(self.collective, "device_id", -1))
            bufs = _Buffers(arrays, self.collective.world_size, p, local=False)
        arrays.fill_nan(bufs.send)
        self.collective.all_gather(bufs.send, out=bufs.gathered)


# ---------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------

def _numel(shape) -> int:
    return int(math.prod(shape))


def _check_gather_out(arrays: _Arrays, out, world: int, packed) -> None:
    shape = (world,) + _shape(packed)
    _check_output(arrays, out, "out", "[world_size, *packed.shape]", shape, contract.dtype_name(packed))


class TorchCollective:
    """The all-gather through a torch.distributed process group (NCCL): all_gather_into_tensor
    into a preallocated buffer, on PyTorch's current stream (capturable in a CUDA graph once the
    group has run a collective eagerly). group: the process group (default: the world);
    device: where the metadata exchange runs (default: the current CUDA device)."""

    array_kinds = ("torch",)
    kind = "torch"

    def __init__(self, group=None, *, device=None):
        import torch  # noqa: PLC0415
        import torch.distributed as dist  # noqa: PLC0415

        if not dist.is_initialized():
            raise ValueError("TorchCollective needs torch.distributed initialised "
                             "(dist.init_process_group('nccl', ...))")
        self._torch, self._dist = torch, dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = torch.device(device)
        self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()

    def all_gather(self, packed, out=None):
        arrays = _Arrays.of(packed, "packed")
        _check_kind(self, arrays)
        rt.require_contiguous(rt.device_array(packed, "packed"), "packed")
        if out is None:
            out = arrays.empty((self.world_size,) + _shape(packed), contract.dtype_name(packed))
        else:
            _check_gather_out(arrays, out, self.world_size, packed)
        self._dist.all_gather_into_tensor(out.view(-1), packed.view(-1), group=self.group)
        return out

    def all_gather_host(self, values) -> np.ndarray:
        values = np.ascontiguousarray(values, dtype=np.int32)
        send = self._torch.as_tensor(values, device=self.device)
        recv = self._torch.empty((self.world_size,) + values.shape, dtype=send.dtype, device=self.device)
        self._dist.all_gather_into_tensor(recv.view(-1), send.view(-1), group=self.group)
        return recv.cpu().numpy()


class CupyNcclCollective:
    """The all-gather through CuPy's NCCL communicator (`cupy.cuda.nccl.NcclCommunicator`, one per
    process and GPU): ncclAllGather on the current stream of the arrays' library (CuPy's for CuPy
    arrays, PyTorch's for tensors), capturable in a CUDA graph."""

    array_kinds = ("cupy", "torch")
    kind = "cupy"

    def __init__(self, comm):
        for attr in ("allGather", "rank_id", "size", "device_id"):
            if not hasattr(comm, attr):
                raise TypeError(f"comm must be a cupy.cuda.nccl.NcclCommunicator, "
                                f"got {type(comm).__name__}")
        self.comm = comm
        self.rank = int(comm.rank_id())
        self.world_size = int(comm.size())
        self.device_id = int(comm.device_id())

    @staticmethod
    def _nccl_type(dtype: str) -> int:
        from cupy.cuda import nccl  # noqa: PLC0415

        types = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64, "int32": nccl.NCCL_INT32,
                 "float16": nccl.NCCL_FLOAT16}
        if dtype not in types:
            raise TypeError(f"packed must be float16, float32, float64 or int32, got {dtype}")
        return types[dtype]

    def all_gather(self, packed, out=None):
        arrays = _Arrays.of(packed, "packed")
        _check_kind(self, arrays)
        a = rt.device_array(packed, "packed")
        rt.require_contiguous(a, "packed")
        if a.device_id != self.device_id:
            raise ValueError(f"packed must be on the communicator's GPU {self.device_id}, "
                             f"got GPU {a.device_id}")
        if out is None:
            out = arrays.empty((self.world_size,) + a.shape, a.dtype)
        else:
            _check_gather_out(arrays, out, self.world_size, packed)
        with rt.cupy().cuda.Device(self.device_id):
            self.comm.allGather(a.ptr, rt.address(out), _numel(a.shape), self._nccl_type(a.dtype),
                                arrays.stream())
        return out

    def all_gather_host(self, values) -> np.ndarray:
        cp = rt.cupy()
        values = np.ascontiguousarray(values, dtype=np.int32)
        with cp.cuda.Device(self.device_id):
            send = cp.asarray(values)
            recv = cp.empty((self.world_size,) + values.shape, dtype=np.int32)
            stream = cp.cuda.get_current_stream()
            self.comm.allGather(send.data.ptr, recv.data.ptr, values.size, self._nccl_type("int32"),
                                stream.ptr)
            return recv.get(stream=stream)


class _Rendezvous:
    """Where the threads of `InProcessCollective` meet: one slot per rank and a barrier."""

    def __init__(self, world_size: int, timeout_s: float):
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.barrier = threading.Barrier(world_size)
        self.slots = [None] * world_size

    def wait(self) -> None:
        try:
            self.barrier.wait(self.timeout_s)
        except threading.BrokenBarrierError:
            raise RuntimeError(f"a rank did not reach the collective within {self.timeout_s} s "
                               f"(with NCCL this would hang)") from None


class InProcessCollective:
    """For tests only: `world_size` ranks simulated by threads of one process, so that the sharded
    step runs on a machine with no GPU. Each rank's call contributes its array; the call returns
    when every rank has made it, like NCCL's. Ranks that call different collectives, or gather
    arrays of different shapes or dtypes, get a RuntimeError on every rank (NCCL would hang or
    mix garbage); a rank that never arrives makes the others' calls fail after `timeout_s`.
    `calls` lists the collectives this rank made, in order.

    >>> def step(collective):
    ...     return collective.all_gather(np.full(2, collective.rank)).tolist()
    >>> InProcessCollective.run(2, step)
    [[[0, 0], [1, 1]], [[0, 0], [1, 1]]]
    """

    array_kinds = ("numpy", "cupy", "torch")
    kind = "numpy"
    device_id = -1

    def __init__(self, rendezvous: _Rendezvous, rank: int):
        self._rv = rendezvous
        self.rank = rank
        self.world_size = rendezvous.world_size
        self.calls: list = []

    @classmethod
    def run(cls, world_size: int, fn, *, timeout_s: float = 30.0) -> list:
        """Run fn(collective) on `world_size` ranks, one thread each; per rank, what fn returned or
        the exception it raised."""
        world_size = contract.check_positive_int(world_size, "world_size")
        rv = _Rendezvous(world_size, timeout_s)
        results: list = [None] * world_size

        def body(rank):
            try:
                results[rank] = fn(cls(rv, rank))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                results[rank] = exc

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(4 * timeout_s)
        if any(t.is_alive() for t in threads):
            raise RuntimeError(f"in-process ranks still running after {4 * timeout_s} s")
        return results

    def _exchange(self, op: str, x):
        """Deposit (op, shape, dtype, x); every rank reads every deposit; -> (items, error)."""
        self.calls.append(op)
        self._rv.slots[self.rank] = (op, _shape(x), contract.dtype_name(x), x)
        self._rv.wait()
        items = list(self._rv.slots)
        error = None
        if len({(op_, shape, dtype) for op_, shape, dtype, _ in items}) > 1:
            shown = "; ".join(f"rank {r}: {op_} {shape} {dtype}"
                              for r, (op_, shape, dtype, _) in enumerate(items))
            error = RuntimeError(f"the ranks called different collectives ({shown}); NCCL would hang")
        return items, error

    def all_gather(self, packed, out=None):
        arrays = _Arrays.of(packed, "packed")
        items, error = self._exchange("all_gather", packed)
        if error is None:
            if out is None:
                out = arrays.empty((self.world_size,) + _shape(packed), contract.dtype_name(packed))
            else:
                _check_gather_out(arrays, out, self.world_size, packed)
            for r, item in enumerate(items):
                arrays.copy(out[r], item[3])
        self._rv.wait()   # every rank has read: the senders may reuse their arrays
        if error is not None:
            raise error
        return out

    def all_gather_host(self, values) -> np.ndarray:
        values = np.array(values, dtype=np.int32)
        items, error = self._exchange("all_gather_host", values)
        table = None if error else np.stack([item[3] for item in items])
        self._rv.wait()
        if error is not None:
            raise error
        return table
