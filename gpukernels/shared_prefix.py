"""One prefix shared by every sequence, read once for all of them: Hydragen and bifurcated
attention on the GPU.

Hydragen (`method="hydragen"`) runs two launches on the caller's stream:

1. `shared_prefix_kernel` (cuda/shared_prefix.cu): per KV head, the queries of all sequences and
   all query heads of its group as rows of one matrix, 64 rows a block, against chunks of the
   prefix on the tensor cores (wgmma on Hopper up to head_dim 128, the next tile's scores computed
   while the warps take this tile's softmax; mma.sync at head_dim 256 and on other GPUs); a
   float32 partial state (out, lse) per row and chunk. On Hopper at head_dim 64 and 128 with more
   than 64 rows a KV head (the plan's `prefix_block_rows`), `shared_prefix_specialized_kernel`
   instead: 128 rows a block in two warpgroups that take turns on the tensor cores, one block an
   SM, KV tiles of 128 rows copied once for both by a third warpgroup through the TMA (tensor maps
   over the prefix made here on the host, `prefix_tensor_map`).
2. The suffixes by this project's split-KV kernel (`gpukernels.split_kv`), contiguous or paged;
   the block that writes a row's output merges the prefix chunks' states into it by LSE, in
   float32 (`SplitKV.run`'s `states`). With no suffix tokens at all, `merge_prefix_chunks_kernel`
   merges the chunks instead.

Where the plan says so (`SharedPrefixPlan.merge_launch`), three launches instead: the suffixes'
launch merges no states, so its blocks start on the SMs the prefix pass leaves free without
waiting for it (a pass of fewer blocks than SMs runs beside them), writing their own state into
out and lse; then `merge_prefix_chunks_kernel` merges the chunks' states and that one in place, in
float32 (the suffixes' out read back in q's dtype).

With `plan_shared_prefix(..., fused=True)` (contiguous suffixes, the two-warpgroup pass) the
suffixes are attended inside the prefix pass instead (`shared_prefix_fused_kernel`): each consumer
warpgroup also takes the suffix tokens of its own sequences, 64 a half tile, spread over the
prefix chunks and interleaved with the prefix tiles so that their reads run beside the prefix's
arithmetic; a merge launch follows. It is correct everywhere it runs and slower than the launches
above on the grid's rows (results/h200/NOTES.md), so no plan takes it unasked.

Hydragen's prefix chunk, and whether a merge launch follows, are those of the chunk that fills one
wave of resident blocks, its half and doublings, in two launches or three, whose whole call the
cost model predicts fastest (`costmodel.shared_prefix.hydragen_schedule`); the bifurcated
method's chunk fills one wave (`costmodel.shared_prefix.prefix_pass_chunk`).
The cost model predicts these launches (`costmodel.shared_prefix.predict`), and, with
`fused=True`, the single launch they are not yet (results/h200/NOTES.md).
float16 and bfloat16; head_dim 64, 128 and 256.

Bifurcated attention (`method="bifurcated"`): the paper's one softmax over the prefix and suffix
logits together, the logits in a float32 workspace between five launches (`gpukernels.bifurcated`,
cuda/bifurcated.cu). float16, bfloat16 and float32; head_dim 64, 128 and 256.

Suffixes come contiguous (`k_suffix`, `v_suffix` [batch, suffix_len, num_kv_heads, head_dim] with
optional `suffix_lens`) or in a paged cache (`k_suffix`, `v_suffix` are then `k_cache`, `v_cache`
[num_pages, page_size, num_kv_heads, head_dim], addressed by `kv_indptr`, `kv_indices`,
`kv_last_page_len` as `gpukernels.paged_decode` takes them).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from decode_attention.contract import check_paged, check_paged_layout, check_positive_int, check_shared_prefix

from . import _runtime as rt
from . import bifurcated
from .split_kv import _launch as split_launch
from .split_kv import (SplitKV, SplitKVPlan, StatePointers, _expect_index, _expect_shape, _index_on_device,
                       _length_bucket, _numel, _on_device, checked_once, device_gpu, num_sms, outputs,
                       plan_split_kv, planning_gpu)

__all__ = ["shared_prefix", "SharedPrefixPlan", "plan_shared_prefix", "SharedPrefix", "PREFIX_DTYPES", "METHODS"]

METHODS = ("hydragen", "bifurcated")

_LOG2E = 1.4426950408889634
PREFIX_DTYPES = ("float16", "bfloat16")   # the prefix pass runs on the tensor cores
QUERY_ROWS = 64                           # query rows per block (shared_prefix.cu: QUERY_ROWS)
THREADS = 128
PINGPONG_ROWS = 128                       # two warpgroups' rows (shared_prefix.cu: PP_QUERY_ROWS)
SPECIALIZED_THREADS = 384                 # and a producer warpgroup (shared_prefix.cu: WS_THREADS)
PINGPONG_KV_TILE = 128                    # shared_prefix.cu: PP_KV_TILE
PINGPONG_HEAD_DIMS = (64, 128)
MERGE_THREADS = 128                       # merge kernels: a thread per 4 dims of a (sequence, head) row


def kv_tile(head_dim: int) -> int:
    """Prefix rows per pipeline stage (shared_prefix.cu: PrefixTile::KV_TILE)."""
    return 32 if head_dim >= 256 else 64


def pipeline_stages(head_dim: int) -> int:
    """Stages of the prefix pass: about 100 KB of shared memory (two blocks per SM) below head_dim
    256, 4 stages there (one block per SM: its registers)."""
    return 4 if head_dim >= 256 else 3


def stage_bytes(head_dim: int) -> int:
    """K and V tiles of one stage, rows padded by 16 bytes (shared_prefix.cu: PrefixTile)."""
    return 2 * kv_tile(head_dim) * (head_dim * 2 + 16)


def pingpong_stages(head_dim: int) -> int:
    """Stages of the prefix pass in blocks of two warpgroups: three of 64 KB at head_dim 128 (with
    the query tiles, 225 KB of the SM's 227), four of 32 KB at 64."""
    return 3 if head_dim == 128 else 4


def pingpong_shared_bytes(head_dim: int) -> int:
    """Dynamic shared memory of the pass in blocks of two warpgroups: its K and V stages, both
    warpgroups' query tiles and 1024 bytes for the alignment of the swizzled tiles
    (shared_prefix.cu: PingPongTile)."""
    stages = pingpong_stages(head_dim) * 2 * PINGPONG_KV_TILE * head_dim * 2
    return stages + PINGPONG_ROWS * head_dim * 2 + 1024


def specialized_name_expression(dtype: str, head_dim: int) -> str:
    return (f"decode_attention::shared_prefix_specialized_kernel<{rt.C_TYPES[dtype]}, {head_dim}, "
            f"{pingpong_stages(head_dim)}>")


def fused_name_expression(dtype: str, head_dim: int) -> str:
    return (f"decode_attention::shared_prefix_fused_kernel<{rt.C_TYPES[dtype]}, {head_dim}, "
            f"{pingpong_stages(head_dim)}>")


def prefix_name_expression(dtype: str, head_dim: int) -> str:
    return (f"decode_attention::shared_prefix_kernel<{rt.C_TYPES[dtype]}, {head_dim}, "
            f"{pipeline_stages(head_dim)}>")


def merge_name_expression(dtype: str, suffix: bool = False) -> str:
    """The merge of the prefix chunks' states; `suffix`: with the suffixes' state in out and lse."""
    return f"decode_attention::merge_prefix_chunks_kernel<{rt.C_TYPES[dtype]}, {'true' if suffix else 'false'}>"


def instantiations() -> list[tuple[str, str]]:
    """(source in cuda/, name expression) of every kernel either method can ask for."""
    hydragen = ([prefix_name_expression(dt, d) for dt in PREFIX_DTYPES for d in rt.HEAD_DIMS]
                + [specialized_name_expression(dt, d) for dt in PREFIX_DTYPES for d in PINGPONG_HEAD_DIMS]
                + [fused_name_expression(dt, d) for dt in PREFIX_DTYPES for d in PINGPONG_HEAD_DIMS]
                + [merge_name_expression(dt, suffix) for dt in PREFIX_DTYPES for suffix in (False, True)])
    return [("shared_prefix", e) for e in hydragen] + [("bifurcated", e) for e in bifurcated.all_name_expressions()]


def all_name_expressions() -> list[str]:
    """Every instantiation the launchers can ask for (also compiled by the CI compile check)."""
    return [e for _, e in instantiations()]


# q, k_prefix, v_prefix, part_out, part_lse; batch, prefix_len, num_qo_heads, num_kv_heads,
# chunk_size; scale_log2.
PREFIX_SIGNATURE = "ppppp" + "iiiii" + "f"
# part_out, part_lse, out, lse; num_chunks, rows, head_dim.
MERGE_SIGNATURE = "pppp" + "iqi"


@functools.lru_cache(maxsize=None)
def _prefix_kernel(dtype: str, head_dim: int) -> rt.Kernel:
    return rt.Kernel("shared_prefix", prefix_name_expression(dtype, head_dim), PREFIX_SIGNATURE,
                     shared_mem=pipeline_stages(head_dim) * stage_bytes(head_dim))


# k_map, v_map (tensor maps over k_prefix and v_prefix); q, part_out, part_lse; batch, prefix_len,
# num_qo_heads, num_kv_heads, chunk_size; scale_log2.
SPECIALIZED_SIGNATURE = "mm" + "ppp" + "iiiii" + "f"


@functools.lru_cache(maxsize=None)
def _specialized_kernel(dtype: str, head_dim: int) -> rt.Kernel:
    return rt.Kernel("shared_prefix", specialized_name_expression(dtype, head_dim), SPECIALIZED_SIGNATURE,
                     shared_mem=pingpong_shared_bytes(head_dim))


# k_map, v_map, ks_map, vs_map (tensor maps over the prefix and the suffixes); q, part_out, part_lse,
# suffix_lens; batch, prefix_len, suffix_len, num_qo_heads, num_kv_heads, chunk_size; scale_log2.
FUSED_SIGNATURE = "mmmm" + "pppp" + "iiiiii" + "f"
SUFFIX_ROWS = 64   # suffix tokens a consumer's half of a tile of the fused pass (shared_prefix.cu)


@functools.lru_cache(maxsize=None)
def _fused_kernel(dtype: str, head_dim: int) -> rt.Kernel:
    return rt.Kernel("shared_prefix", fused_name_expression(dtype, head_dim), FUSED_SIGNATURE,
                     shared_mem=pingpong_shared_bytes(head_dim))


def suffix_tensor_map(ptr: int, dtype: str, batch: int, suffix_len: int, num_kv_heads: int, head_dim: int) -> bytes:
    """The tensor map the fused pass reads k_suffix (or v_suffix) through: [batch, suffix_len,
    num_kv_heads, head_dim] in boxes of 64 dims x 1 head x SUFFIX_ROWS rows x 1 sequence (rows past
    suffix_len arrive as zeros)."""
    return rt.tensor_map(ptr, dtype, (head_dim, num_kv_heads, suffix_len, batch), (64, 1, SUFFIX_ROWS, 1))


def fused_tiles(plan) -> int:
    """The most tiles a block of the fused pass runs (its prefix chunk's and its share of the
    suffix slots): the kernel's schedule keeps tiles x suffix tiles below 2**31."""
    group = plan.num_qo_heads // plan.num_kv_heads
    seqs = -(-QUERY_ROWS // group) + 1   # sequences a consumer's 64 rows touch, at most
    slots = seqs * -(-plan.suffix_len // SUFFIX_ROWS)
    return -(-plan.prefix_chunk_size // PINGPONG_KV_TILE) + -(-slots // max(plan.num_chunks, 1))


def prefix_tensor_map(ptr: int, dtype: str, prefix_len: int, num_kv_heads: int, head_dim: int) -> bytes:
    """The tensor map the specialised pass reads k_prefix (or v_prefix) through: [prefix_len,
    num_kv_heads, head_dim] in boxes of 64 dims x 1 head x 128 rows (shared_prefix.cu)."""
    return rt.tensor_map(ptr, dtype, (head_dim, num_kv_heads, prefix_len), (64, 1, PINGPONG_KV_TILE))


@functools.lru_cache(maxsize=None)
def _runs_sm90a(device_id: int) -> bool:
    """Whether this source is built for sm_90a on the device (`rt.arch_options`: Hopper), so that
    its wgmma kernels run there."""
    return bool(rt.arch_options("shared_prefix", str(rt.cupy().cuda.Device(device_id).compute_capability)))


@functools.lru_cache(maxsize=None)
def _merge_kernel(dtype: str, suffix: bool = False) -> rt.Kernel:
    return rt.Kernel("shared_prefix", merge_name_expression(dtype, suffix), MERGE_SIGNATURE)


def merge_blocks(rows: int, head_dim: int) -> int:
    """Blocks of a merge kernel over `rows` (sequence, head) rows: a thread per 4 dims."""
    return -(-rows * (head_dim // 4) // MERGE_THREADS)


def blocks_per_sm(head_dim: int) -> int:
    """Resident blocks of the prefix pass per SM (its launch bounds: registers and shared memory)."""
    return 1 if head_dim >= 256 else 2


@functools.lru_cache(maxsize=1024)
def _auto_method(batch, num_qo_heads, num_kv_heads, head_dim, prefix_len, suffix_len, dtype, device_id) -> str:
    """The method the cost model predicts faster for this shape on this GPU (Hydragen where the
    model does not know the GPU; bifurcated attention for float32, which Hydragen does not take)."""
    from costmodel.shared_prefix import SharedPrefixShape, predict  # noqa: PLC0415

    if dtype not in PREFIX_DTYPES:
        return "bifurcated"
    gpu = device_gpu(device_id)
    if gpu is None:
        return "hydragen"
    shape = SharedPrefixShape(batch, num_qo_heads, num_kv_heads, head_dim, prefix_len, suffix_len, dtype)
    times = {m: predict(shape, method=m, gpu=gpu).time_s for m in METHODS}
    return min(times, key=times.get)


def _check_method(method, *, allow_auto: bool) -> str:
    allowed = METHODS + (("auto",) if allow_auto else ())
    if not isinstance(method, str) or method not in allowed:
        raise ValueError(f"method must be one of {', '.join(map(repr, allowed))}, got {method!r}")
    return method


def _check_kernel_support(method: str, dtype: str, head_dim: int) -> None:
    """TypeError / ValueError for a dtype or head_dim the method's kernels are not built for."""
    if method == "hydragen" and dtype not in PREFIX_DTYPES:
        raise TypeError(f"q must be float16 or bfloat16 for Hydragen's kernels (method='bifurcated' takes "
                        f"float32 too), got {dtype}")
    if dtype not in rt.KERNEL_DTYPES:
        raise TypeError(f"q must be one of {', '.join(rt.KERNEL_DTYPES)} for the GPU kernels, got {dtype}")
    if head_dim not in rt.HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {rt.HEAD_DIMS} for the GPU kernels, got {head_dim}")


def _chunk_tile(method: str, dtype: str, head_dim: int) -> int:
    """The prefix chunk of `method`'s prefix pass is a multiple of this many tokens."""
    return kv_tile(head_dim) if method == "hydragen" else bifurcated.chunk_tile(dtype, head_dim)


def shared_prefix(q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens=None, *, method="hydragen",
                  sm_scale=None, out=None, lse=None, prefix_chunk_size=None, kv_indptr=None, kv_indices=None,
                  kv_last_page_len=None):
    """Sequence b attends to [prefix ; its suffix] (see `refattn.shared_prefix`), by Hydragen's
    method or by bifurcated attention's.

    q [batch, num_qo_heads, head_dim]; k_prefix, v_prefix [prefix_len, num_kv_heads, head_dim].
    Contiguous suffixes: k_suffix, v_suffix [batch, suffix_len, num_kv_heads, head_dim] and
    suffix_lens [batch] (None: every suffix suffix_len long). Paged suffixes: give kv_indptr
    [batch + 1], kv_indices and kv_last_page_len [batch] (as `paged_decode` takes them, suffix_lens
    None); k_suffix, v_suffix are then the caches [num_pages, page_size, num_kv_heads, head_dim].
    Lengths and page tables on the host are checked there (ValueError); on the GPU they are not
    copied to the host, and a sequence whose length or pages cannot be read gets out and lse NaN.

    `method`: "hydragen" (float16, bfloat16), "bifurcated" (float16, bfloat16, float32; with
    page tables on the GPU its logits workspace holds suffixes up to len(kv_indices) pages) or
    "auto" (the one the cost model predicts faster for this shape, chosen once per shape).
    `prefix_chunk_size`: tokens of the prefix per block of the prefix pass (Hydragen) or of the
    values pass (bifurcated); None lets the plan choose. Returns (out, lse): out in q's dtype and
    kind, lse float32 (natural log).
    """
    _check_method(method, allow_auto=True)
    tables = (kv_indptr, kv_indices, kv_last_page_len)
    if any(t is not None for t in tables):
        return _paged_shared_prefix(q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens, tables, method,
                                    sm_scale, out, lse, prefix_chunk_size)
    qa = rt.device_array(q, "q")
    views = [rt.device_array(x, name) for x, name in ((k_prefix, "k_prefix"), (v_prefix, "v_prefix"),
                                                      (k_suffix, "k_suffix"), (v_suffix, "v_suffix"))]
    lens_on_gpu = suffix_lens is not None and rt._kind(suffix_lens) is not None
    lens_host = None if lens_on_gpu or suffix_lens is None else rt.host_ints(suffix_lens, "suffix_lens")
    problem = _checked_problem(q, k_prefix, v_prefix, k_suffix, v_suffix, qa, views, lens_host, sm_scale)
    device_id = qa.device_id   # contiguity and devices: checked by SharedPrefix.run before any launch
    if method == "auto":
        method = _auto_method(problem.batch, problem.num_qo_heads, problem.num_kv_heads, problem.head_dim,
                              problem.prefix_len, problem.suffix_len, problem.dtype, device_id)
    _check_kernel_support(method, problem.dtype, problem.head_dim)
    chunk = _one_shot_chunk(prefix_chunk_size, method, problem.dtype, problem.head_dim)
    if problem.batch == 0:
        out, lse, _, _ = outputs(out, lse, qa.kind, (0, problem.num_qo_heads, problem.head_dim), problem.dtype,
                                 device_id)
        return out, lse
    runner = _cached_runner(method, problem.batch, problem.num_qo_heads, problem.num_kv_heads, problem.head_dim,
                            problem.prefix_len, problem.suffix_len, problem.dtype, chunk, 0, device_id)
    if lens_host is not None:
        suffix_lens = rt.device_int32(lens_host, qa.kind, device_id, "suffix_lens")
    elif lens_on_gpu:
        suffix_lens = _index_on_device(suffix_lens, "suffix_lens", problem.batch, qa.kind, device_id)
    return runner.run(q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens, sm_scale=problem.sm_scale,
                      out=out, lse=lse)


def _one_shot_chunk(prefix_chunk_size, method: str, dtype: str, head_dim: int):
    if prefix_chunk_size is None:
        return None
    return _checked_chunk(prefix_chunk_size, _chunk_tile(method, dtype, head_dim))


_TABLE_NAMES = ("kv_indptr", "kv_indices", "kv_last_page_len")


def _paged_shared_prefix(q, k_prefix, v_prefix, k_cache, v_cache, suffix_lens, tables, method, sm_scale, out,
                         lse, prefix_chunk_size):
    """The one-shot call with the suffixes in a paged cache (its arguments checked as
    `paged_decode` checks them, and the prefix against them)."""
    missing = [name for name, t in zip(_TABLE_NAMES, tables) if t is None]
    if missing:
        raise ValueError(f"paged suffixes take kv_indptr, kv_indices and kv_last_page_len together; "
                         f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    if suffix_lens is not None:
        raise ValueError("suffix_lens must be None for paged suffixes: their lengths come from kv_indptr and "
                         "kv_last_page_len")
    qa = rt.device_array(q, "q")
    prefix = [rt.device_array(x, name) for x, name in ((k_prefix, "k_prefix"), (v_prefix, "v_prefix"))]
    rt.device_array(k_cache, "k_suffix (k_cache)")
    rt.device_array(v_cache, "v_suffix (v_cache)")
    kind, device_id = qa.kind, qa.device_id
    if all(_on_device(t) for t in tables):
        problem = check_paged_layout(q, k_cache, v_cache, sm_scale=sm_scale, dtypes=rt.KERNEL_DTYPES)
        B = problem.batch
        paged = tuple(_index_on_device(t, name, n, kind, device_id)
                      for t, name, n in zip(tables, _TABLE_NAMES, (B + 1, None, B)))
        nnz = _numel(rt.device_array(paged[1], "kv_indices"))
        longest = None   # unknown on the host
    else:
        host = [rt.host_ints(t, name) for t, name in zip(tables, _TABLE_NAMES)]
        problem, lens_host = check_paged(q, k_cache, v_cache, *host, sm_scale=sm_scale, dtypes=rt.KERNEL_DTYPES)
        B, indices = problem.batch, host[1]
        paged = (rt.device_int32(host[0], kind, device_id, "kv_indptr"),
                 rt.device_int32(indices if len(indices) else np.zeros(1, np.int64), kind, device_id,
                                 "kv_indices")[: len(indices)],
                 rt.device_int32(host[2], kind, device_id, "kv_last_page_len"))
        nnz, longest = len(indices), int(lens_host.max(initial=0))
    prefix_len = _checked_prefix(prefix, problem)
    if method == "auto":
        typical = longest if longest is not None else -(-nnz // max(B, 1)) * problem.page_size
        method = _auto_method(B, problem.num_qo_heads, problem.num_kv_heads, problem.head_dim, prefix_len,
                              typical, problem.dtype, device_id)
    _check_kernel_support(method, problem.dtype, problem.head_dim)
    chunk = _one_shot_chunk(prefix_chunk_size, method, problem.dtype, problem.head_dim)
    if B == 0:
        out, lse, _, _ = outputs(out, lse, kind, (0, problem.num_qo_heads, problem.head_dim), problem.dtype,
                                 device_id)
        return out, lse
    if longest is not None:
        suffix_len = _length_bucket(longest) if longest else 0
    elif method == "bifurcated":
        suffix_len = nnz * problem.page_size   # the longest suffix the tables can hold
    else:
        suffix_len = -(-nnz // B) * problem.page_size   # the split count, for the average sequence
    runner = _cached_runner(method, B, problem.num_qo_heads, problem.num_kv_heads, problem.head_dim, prefix_len,
                            suffix_len, problem.dtype, chunk, problem.page_size, device_id)
    return runner.run_paged(q, k_prefix, v_prefix, k_cache, v_cache, *paged, sm_scale=problem.sm_scale, out=out,
                            lse=lse)


def _checked_prefix(prefix: list, problem) -> int:
    """prefix_len, after checking k_prefix and v_prefix ([prefix_len, num_kv_heads, head_dim] of
    q's dtype) against a paged problem."""
    ka, va = prefix
    _expect_shape(ka, "k_prefix", "[prefix_len, num_kv_heads, head_dim]",
                  (None, problem.num_kv_heads, problem.head_dim))
    _expect_shape(va, "v_prefix", "[prefix_len, num_kv_heads, head_dim] like k_prefix", ka.shape)
    for a, name in ((ka, "k_prefix"), (va, "v_prefix")):
        if a.dtype != problem.dtype:
            raise TypeError(f"{name} must be {problem.dtype} like q, got {a.dtype}")
    return ka.shape[0]


def _checked_problem(q, k_prefix, v_prefix, k_suffix, v_suffix, qa, views, lens_host, sm_scale):
    """The call's checks, skipped for metadata that passed them before (host lengths: every call)."""
    def check():
        problem, _ = check_shared_prefix(q, k_prefix, v_prefix, k_suffix, v_suffix, lens_host, sm_scale=sm_scale,
                                         method="hydragen", dtypes=rt.KERNEL_DTYPES)
        return problem

    cacheable = lens_host is None and (sm_scale is None or type(sm_scale) in (float, int))
    key = ("shared_prefix", qa.shape, qa.dtype, *((a.shape, a.dtype) for a in views), sm_scale) if cacheable else None
    return checked_once(key, check)


@functools.lru_cache(maxsize=256)
def _cached_runner(method, batch, num_qo_heads, num_kv_heads, head_dim, prefix_len, suffix_len, dtype, chunk,
                   page_size, device_id) -> "SharedPrefix":
    """The one-shot calls' plan and buffers for one shape (and chunk) on one device."""
    return SharedPrefix(plan_shared_prefix(batch, num_qo_heads, num_kv_heads, head_dim, prefix_len, suffix_len,
                                           method=method, dtype=dtype, prefix_chunk_size=chunk,
                                           page_size=page_size, num_sms=num_sms(device_id),
                                           gpu=device_gpu(device_id)))


@dataclass(frozen=True)
class SharedPrefixPlan:
    """One shared-prefix call's launches for one shape. Hydragen: the prefix in `num_chunks`
    chunks of `prefix_chunk_size` tokens, the suffixes by `suffix` (a split-KV plan), the merge.
    `merge_launch`: the suffixes merge no states and a merge launch follows (see the module).
    Bifurcated: the prefix logits by blocks of `logits_row_tiles` tiles of 64 query rows, the
    values pass in chunks of `prefix_chunk_size` tokens, a logits workspace of `logits_stride`
    floats per query row (`suffix` None). `page_size` 0: contiguous suffixes; otherwise paged,
    `suffix_len` then the longest suffix planned for (bifurcated: the longest it can hold; a
    longer one comes out NaN)."""

    batch: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    prefix_len: int
    suffix_len: int
    dtype: str
    prefix_chunk_size: int
    suffix: "SplitKVPlan | None"
    method: str = "hydragen"
    page_size: int = 0
    logits_row_tiles: int = 1
    prefix_block_rows: int = QUERY_ROWS   # Hydragen: query rows per prefix-pass block (64, or 128 on Hopper)
    merge_launch: bool = False            # Hydragen: a merge launch after the suffixes (three launches)
    suffix_persistent: bool = False       # Hydragen in three launches: the suffixes by the persistent
                                          # kernel where it runs (`costmodel.shared_prefix.plan_hydragen`)
    fused: bool = False                   # Hydragen: the suffixes inside the prefix pass, then the merge

    @property
    def num_chunks(self) -> int:
        return -(-self.prefix_len // self.prefix_chunk_size) if self.prefix_len else 0

    @property
    def logits_stride(self) -> int:
        """Floats per query row of the bifurcated logits workspace."""
        return bifurcated.logits_stride(self.prefix_len, self.suffix_len)


def plan_shared_prefix(batch: int, num_qo_heads: int, num_kv_heads: int, head_dim: int, prefix_len: int,
                       suffix_len: int, *, method: str = "hydragen", dtype: str = "float16",
                       prefix_chunk_size: int | None = None, page_size: int = 0, num_sms: int | None = None,
                       gpu=None, fused: bool = False) -> SharedPrefixPlan:
    """The plan of a shared-prefix call (made on the host, no GPU needed): the prefix chunk (for
    Hydragen the one the cost model predicts fastest, with a merge launch or not, at a given
    `prefix_chunk_size` too; for the bifurcated method the one that fills one wave of resident
    blocks); for Hydragen the suffixes' split plan from the cost model.
    `page_size` > 0 plans for suffixes in pages of that size (`SharedPrefix.run_paged`). `num_sms`
    and `gpu` as for `plan_split_kv` (neither: the GPU this process runs on, `planning_gpu`). `fused=True`
    (Hydragen, contiguous suffixes, blocks of 128 query rows: `fused_ineligible` says why not
    elsewhere): the suffixes attended inside the prefix pass, then the merge; the chunk, where none
    is given, the one that gives every SM one block. Not the default: on the grid's GQA rows it
    measured 1.05-1.25x the planned launches (results/h200/NOTES.md)."""
    from costmodel.gpus import plan_gpu  # noqa: PLC0415
    from costmodel.segments import prefix_block_rows  # noqa: PLC0415
    from costmodel.shared_prefix import SharedPrefixShape, plan_hydragen, prefix_pass_chunk  # noqa: PLC0415
    from costmodel.split_kv import DEFAULT_NUM_SMS  # noqa: PLC0415

    _check_method(method, allow_auto=False)
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be True or False, got {fused!r}")
    if fused and method != "hydragen":
        raise ValueError(f"fused=True: only Hydragen attends the suffixes in its prefix pass, not method={method!r}")
    for name, value in (("batch", batch), ("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
        check_positive_int(value, name)
    for name, value in (("prefix_len", prefix_len), ("suffix_len", suffix_len), ("page_size", page_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a dtype name, got {type(dtype).__name__}")
    _check_kernel_support(method, dtype, head_dim)
    if prefix_len + suffix_len >= 2**31:
        raise ValueError(f"prefix_len + suffix_len must stay below 2**31, got {prefix_len + suffix_len}")
    gpu = planning_gpu(gpu, num_sms)
    spec, sms = plan_gpu(gpu, num_sms, default_num_sms=DEFAULT_NUM_SMS)
    tile = _chunk_tile(method, dtype, head_dim)
    rows = batch * (num_qo_heads // num_kv_heads)   # query rows per KV head
    common = (batch, num_qo_heads, num_kv_heads, head_dim, int(prefix_len), int(suffix_len), dtype)
    merge_launch = persistent = False
    if method == "hydragen":   # the chunk (or the given one), the launches and the suffixes' kernel the
        # cost model predicts fastest (`costmodel.shared_prefix.hydragen_schedule`, `plan_hydragen`)
        given = None if prefix_chunk_size is None else _checked_chunk(prefix_chunk_size, tile)
        model_plan = plan_hydragen(SharedPrefixShape(batch, num_qo_heads, num_kv_heads, head_dim, int(prefix_len),
                                                     int(suffix_len), dtype=dtype),
                                   gpu=spec, num_sms=sms, prefix_chunk_size=given)
        chunk, merge_launch = model_plan.prefix_chunk_size, model_plan.merge_launch
        persistent = model_plan.suffix_persistent and not page_size
    elif prefix_chunk_size is not None:
        chunk = _checked_chunk(prefix_chunk_size, tile)
    elif method == "bifurcated" and dtype not in bifurcated.TENSOR_CORE_DTYPES:
        # The CUDA-core values pass serves tiles of SIMT_ROWS rows: counted as row tiles of 64.
        chunk = prefix_pass_chunk(max(int(prefix_len), 1), rows * (QUERY_ROWS // bifurcated.SIMT_ROWS),
                                  num_kv_heads, sms, 2, tile)
    else:
        chunk = prefix_pass_chunk(max(int(prefix_len), 1), rows, num_kv_heads, sms, blocks_per_sm(head_dim), tile)
    if method == "bifurcated":
        return SharedPrefixPlan(*common, chunk, None, "bifurcated", int(page_size),
                                _logits_row_tiles(int(prefix_len), rows, num_kv_heads, sms, dtype))
    suffix = plan_split_kv(batch, num_qo_heads, num_kv_heads, head_dim, max(int(suffix_len), 1), dtype=dtype,
                           num_sms=sms, page_size=int(page_size), gpu=gpu)
    block_rows = prefix_block_rows(spec, head_dim, dtype, rows)
    plan = SharedPrefixPlan(*common, chunk, suffix, "hydragen", int(page_size), prefix_block_rows=block_rows,
                            merge_launch=merge_launch, suffix_persistent=persistent)
    if not fused:
        return plan
    why_not = fused_ineligible(plan)
    if why_not:
        raise ValueError(f"fused=True: {why_not}")
    chunk = given or fused_pass_chunk(int(prefix_len), rows, num_kv_heads, sms, tile)
    plan = dataclasses.replace(plan, prefix_chunk_size=chunk, fused=True, merge_launch=False, suffix_persistent=False)
    if fused_tiles(plan) ** 2 >= 2**31:
        raise ValueError(f"fused=True: {fused_tiles(plan)} tiles a block is beyond the fused pass's schedule "
                         f"(a shorter prefix_chunk_size)")
    return plan


def fused_ineligible(plan: SharedPrefixPlan) -> str:
    """Why the plan's suffixes cannot be attended inside the prefix pass ('' where they can)."""
    if plan.method != "hydragen":
        return "only Hydragen attends the suffixes in its prefix pass"
    if plan.page_size:
        return "the fused pass reads contiguous suffixes (paged ones run as their own launch)"
    if plan.prefix_block_rows != PINGPONG_ROWS or plan.head_dim not in PINGPONG_HEAD_DIMS:
        return ("the fused pass is the prefix pass in blocks of 128 query rows (Hopper, head_dim 64 or 128, more "
                "than 64 query rows a KV head)")
    if not plan.prefix_len or not plan.suffix_len:
        return "the fused pass needs prefix and suffix tokens"
    return ""


def fused_pass_chunk(prefix_len: int, rows: int, num_kv_heads: int, sms: int, tile: int) -> int:
    """The fused pass's prefix chunk where none is given: the one that gives every SM one block."""
    from costmodel.shared_prefix import prefix_pass_chunk  # noqa: PLC0415

    return prefix_pass_chunk(max(prefix_len, 1), rows, num_kv_heads, sms, 1, tile, block_rows=PINGPONG_ROWS)


def _logits_row_tiles(prefix_len: int, rows: int, num_kv_heads: int, sms: int, dtype: str) -> int:
    """Row tiles of 64 query rows per block of the bifurcated prefix-logits pass: all of them (the
    block's prefix keys read once for every row), unless that leaves fewer than two blocks per SM;
    then as many as still give two."""
    row_tiles = -(-rows // QUERY_ROWS)
    tokens = bifurcated.LOGIT_TILE if dtype in bifurcated.TENSOR_CORE_DTYPES else bifurcated.SIMT_TOKENS
    key_tiles = -(-max(prefix_len, 1) // tokens)
    return max(1, min(row_tiles, key_tiles * num_kv_heads * row_tiles // (2 * sms)))


def _checked_chunk(prefix_chunk_size, tile: int) -> int:
    if not isinstance(prefix_chunk_size, (int, np.integer)) or isinstance(prefix_chunk_size, bool):
        raise TypeError(f"prefix_chunk_size must be an int, got {type(prefix_chunk_size).__name__}")
    if prefix_chunk_size < tile or prefix_chunk_size % tile:
        raise ValueError(f"prefix_chunk_size must be a positive multiple of {tile}, got {prefix_chunk_size}")
    return int(prefix_chunk_size)


class SharedPrefix:
    """A shared-prefix plan bound to its buffers (Hydragen: the partial states and the suffixes'
    state; bifurcated: the logits workspace and the partials), one set per stream it runs on;
    `run` / `run_paged` many times without host synchronisation, allocating nothing when `out`
    and `lse` are given (CUDA-graph capturable).

    >>> plan = plan_shared_prefix(64, 32, 8, 128, 16384, 256, gpu="H200")   # doctest: +SKIP
    >>> hy = SharedPrefix(plan)                                             # doctest: +SKIP
    >>> out, lse = hy.run(q, k_prefix, v_prefix, k_suffix, v_suffix)       # doctest: +SKIP
    """

    def __init__(self, plan: SharedPrefixPlan):
        if not isinstance(plan, SharedPrefixPlan):
            raise TypeError(f"plan must be a SharedPrefixPlan, got {type(plan).__name__}")
        self.plan = plan
        self._suffix = SplitKV(plan.suffix) if plan.method == "hydragen" else None
        self._buffers: dict = {}   # (kind, device, stream) -> this method's buffers

    def _buffers_for(self, kind: str, device_id: int, stream_ptr: int):
        key = (kind, device_id, stream_ptr)
        bufs = self._buffers.get(key)
        if bufs is None:
            p = self.plan
            if p.method == "bifurcated":
                bufs = {name: rt.empty(kind, shape, "float32", device_id)
                        for name, shape in bifurcated.workspace_shapes(p).items()}
            else:
                n = max(p.num_chunks, 1)
                part_out = rt.empty(kind, (n, p.batch, p.num_qo_heads, p.head_dim), "float32", device_id)
                part_lse = rt.empty(kind, (n, p.batch, p.num_qo_heads), "float32", device_id)
                # The suffix launch's view of the chunks' states (none without prefix tokens).
                states = (StatePointers(rt.address(part_out), rt.address(part_lse), p.num_chunks)
                          if p.num_chunks else None)
                bufs = (part_out, part_lse, states)
            self._buffers[key] = bufs
        return bufs

    def run(self, q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens=None, *, sm_scale=None, out=None,
            lse=None):
        """Contiguous suffixes. Shapes as planned (checked by their metadata); `suffix_lens` None or
        an int32 device array [batch] (values checked by the kernels: a length outside
        [0, suffix_len] gives that sequence NaN). Returns (out, lse) like `shared_prefix`."""
        p = self.plan
        if p.page_size:
            raise ValueError(f"the plan is for suffixes in pages of {p.page_size}: call run_paged")
        qa, prefix, device_id = self._checked_query_and_prefix(q, k_prefix, v_prefix)
        suffix = [rt.device_array(x, name) for x, name in ((k_suffix, "k_suffix"), (v_suffix, "v_suffix"))]
        for a, name in zip(suffix, ("k_suffix", "v_suffix")):
            _expect_shape(a, name, "[batch, suffix_len, num_kv_heads, head_dim]",
                          (p.batch, p.suffix_len, p.num_kv_heads, p.head_dim))
            self._check_kv(a, name, device_id)
        _expect_index(suffix_lens, "suffix_lens", p.batch, device_id)
        tables = (rt.address(suffix_lens), 0, 0, 0, 0, 0)
        return self._launch(qa, prefix, suffix, tables, (q, k_suffix, v_suffix, suffix_lens), None, sm_scale,
                            out, lse)

    def run_paged(self, q, k_prefix, v_prefix, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, *,
                  sm_scale=None, out=None, lse=None):
        """Paged suffixes: k_cache, v_cache [num_pages, page_size, num_kv_heads, head_dim] with the
        plan's page_size; the three tables int32 device arrays (values checked by the kernels: a
        sequence whose pages cannot be read, or, for bifurcated attention, longer than the plan's
        suffix_len, gets NaN). Returns (out, lse) like `shared_prefix`."""
        p = self.plan
        if not p.page_size:
            raise ValueError("the plan is for contiguous suffixes: plan with page_size > 0 to run paged ones")
        qa, prefix, device_id = self._checked_query_and_prefix(q, k_prefix, v_prefix)
        caches = [rt.device_array(x, name) for x, name in ((k_cache, "k_cache"), (v_cache, "v_cache"))]
        _expect_shape(caches[0], "k_cache", "[num_pages, page_size, num_kv_heads, head_dim]",
                      (None, p.page_size, p.num_kv_heads, p.head_dim))
        _expect_shape(caches[1], "v_cache", "the shape of k_cache", caches[0].shape)
        for a, name in zip(caches, ("k_cache", "v_cache")):
            self._check_kv(a, name, device_id)
        indptr = _expect_index(kv_indptr, "kv_indptr", p.batch + 1, device_id)
        indices = _expect_index(kv_indices, "kv_indices", None, device_id)
        last = _expect_index(kv_last_page_len, "kv_last_page_len", p.batch, device_id)
        tables = (0, rt.address(indptr), rt.address(indices), rt.address(last), _numel(rt.device_array(
            indices, "kv_indices")), caches[0].shape[0])
        return self._launch(qa, prefix, caches, tables, (q, k_cache, v_cache), (indptr, indices, last), sm_scale,
                            out, lse)

    def _checked_query_and_prefix(self, q, k_prefix, v_prefix):
        p = self.plan
        qa = rt.device_array(q, "q")
        _expect_shape(qa, "q", "[batch, num_qo_heads, head_dim]", (p.batch, p.num_qo_heads, p.head_dim))
        if qa.dtype != p.dtype:
            raise TypeError(f"q must be {p.dtype} as planned, got {qa.dtype}")
        rt.require_rows(qa, "q")
        prefix = [rt.device_array(x, name) for x, name in ((k_prefix, "k_prefix"), (v_prefix, "v_prefix"))]
        for a, name in zip(prefix, ("k_prefix", "v_prefix")):
            _expect_shape(a, name, "[prefix_len, num_kv_heads, head_dim]", (p.prefix_len, p.num_kv_heads, p.head_dim))
            self._check_kv(a, name, qa.device_id)
        return qa, prefix, qa.device_id

    def _check_kv(self, a: rt.Device, name: str, device_id: int) -> None:
        if a.dtype != self.plan.dtype:
            raise TypeError(f"{name} must be {self.plan.dtype} as planned, got {a.dtype}")
        rt.require_rows(a, name)
        if a.device_id != device_id:
            raise ValueError(f"{name} must be on GPU {device_id} like q, got GPU {a.device_id}")

    def _launch(self, qa, prefix, suffix, tables, suffix_args, paged, sm_scale, out, lse):
        """Both methods' launches, after the checks; `suffix_args` (q, k, v[, suffix_lens]) and
        `paged` (the page tables, or None) as the split-KV runner takes them."""
        p = self.plan
        B, Hq, Hkv, D = p.batch, p.num_qo_heads, p.num_kv_heads, p.head_dim
        if sm_scale is None:
            sm_scale = 1.0 / float(np.sqrt(D))
        if not (isinstance(sm_scale, (int, float, np.floating, np.integer)) and np.isfinite(sm_scale)):
            raise ValueError(f"sm_scale must be a finite real number, got {sm_scale!r}")
        sm_scale = float(sm_scale)
        kind, device_id = qa.kind, qa.device_id
        out, lse, out_ptr, lse_ptr = outputs(out, lse, kind, (B, Hq, D), p.dtype, device_id)
        stream_ptr = rt.current_stream_ptr(kind, device_id)
        bufs = self._buffers_for(kind, device_id, stream_ptr)
        if p.method == "bifurcated":
            bifurcated.run(p, bufs, qa.ptr, prefix[0].ptr, prefix[1].ptr, suffix[0].ptr, suffix[1].ptr, tables,
                           out_ptr, lse_ptr, sm_scale, stream_ptr=stream_ptr, device_id=device_id)
            return out, lse
        part_out, part_lse, states = bufs
        # 1. The prefix, once for every sequence. 2. Each sequence's own tokens, by split-KV, whose
        # blocks that write a row's output merge the prefix chunks' states into it; its first wave
        # starts on the SMs the prefix pass frees and waits for that pass only before the merge.
        # With a merge launch, 2. merges nothing and 3. merges both.
        n = p.num_chunks

        def merge_chunks(*, with_suffixes=False, programmatic=False):
            """The merge of each row's chunk states (with the suffixes' state already in out, lse)."""
            _merge_kernel(p.dtype, with_suffixes)(
                (merge_blocks(B * Hq, D),), (MERGE_THREADS,),
                (rt.address(part_out), rt.address(part_lse), out_ptr, lse_ptr, n, B * Hq, D),
                stream_ptr=stream_ptr, device_id=device_id, programmatic=programmatic)

        if p.fused and paged is None and _runs_sm90a(device_id):
            # The suffixes inside the prefix pass, then the merge of each row's chunk states.
            maps = tuple(prefix_tensor_map(x.ptr, p.dtype, p.prefix_len, Hkv, D) for x in prefix)
            maps += tuple(suffix_tensor_map(x.ptr, p.dtype, B, p.suffix_len, Hkv, D) for x in suffix)
            _fused_kernel(p.dtype, D)(
                (n, -(-B * (Hq // Hkv) // PINGPONG_ROWS), Hkv), (SPECIALIZED_THREADS,),
                maps + (qa.ptr, rt.address(part_out), rt.address(part_lse), tables[0], B, p.prefix_len, p.suffix_len,
                        Hq, Hkv, p.prefix_chunk_size, sm_scale * _LOG2E),
                stream_ptr=stream_ptr, device_id=device_id)
            merge_chunks(programmatic=True)
            return out, lse
        if n:
            # Blocks of 128 rows, their warps specialised, where the plan says so and the GPU runs
            # sm_90a code (a plan made for Hopper run elsewhere falls back to blocks of 64 rows).
            grid_rows = B * (Hq // Hkv)
            tail = (rt.address(part_out), rt.address(part_lse), B, p.prefix_len, Hq, Hkv, p.prefix_chunk_size,
                    sm_scale * _LOG2E)
            if p.prefix_block_rows == PINGPONG_ROWS and _runs_sm90a(device_id):
                maps = tuple(prefix_tensor_map(x.ptr, p.dtype, p.prefix_len, Hkv, D) for x in prefix)
                _specialized_kernel(p.dtype, D)(
                    (n, -(-grid_rows // PINGPONG_ROWS), Hkv), (SPECIALIZED_THREADS,), maps + (qa.ptr,) + tail,
                    stream_ptr=stream_ptr, device_id=device_id)
            else:
                _prefix_kernel(p.dtype, D)(
                    (n, -(-grid_rows // QUERY_ROWS), Hkv), (THREADS,), (qa.ptr, prefix[0].ptr, prefix[1].ptr) + tail,
                    stream_ptr=stream_ptr, device_id=device_id)
        has_suffix = paged is not None or p.suffix_len
        if n and has_suffix and p.merge_launch:
            # The suffixes into out and lse, their blocks starting on the SMs the prefix pass frees
            # without waiting for it (but the last); then the merge of both passes' states, in place.
            q_, k_, v_, *lens = suffix_args
            split_launch(self._suffix.plan, q_, k_, v_, kv_lens=lens[0] if lens else None, paged=paged,
                         sm_scale=sm_scale, out=out, lse=lse, workspace=self._suffix._workspace_for, beside=True,
                         persistent=p.suffix_persistent)
            merge_chunks(with_suffixes=True, programmatic=True)
        elif has_suffix:
            q_, k_, v_, *lens = suffix_args
            split_launch(self._suffix.plan, q_, k_, v_, kv_lens=lens[0] if lens else None, paged=paged,
                         sm_scale=sm_scale, out=out, lse=lse, workspace=self._suffix._workspace_for,
                         states=states, states_overlap=True)
        else:   # no suffix tokens: the merge of the prefix chunks alone
            merge_chunks()
        return out, lse
