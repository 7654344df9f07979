"""Hydragen on the GPU: one prefix shared by every sequence, read once for all of them.

Not yet measured or tested on a GPU: the module is not exported from `gpukernels`, and its GPU
tests (tests/test_shared_prefix_gpu.py) have not run. It compiles for sm_90 (the compile check
builds every instantiation without spills).

A call runs three launches on the caller's stream:

1. `shared_prefix_kernel` (cuda/shared_prefix.cu): per KV head, the queries of all sequences and
   all query heads of its group as rows of one matrix, 64 rows a block, against chunks of the
   prefix on the tensor cores; a float32 partial state (out, lse) per row and chunk.
2. The suffixes by this project's split-KV kernel (`gpukernels.split_kv`).
3. `merge_prefix_suffix_kernel`: the LSE merge of the prefix chunks' states and the suffix state,
   in float32.

The prefix chunk size comes from the cost model's Hydragen plan (`costmodel.shared_prefix`).
float16 and bfloat16; head_dim 64, 128 and 256.
"""

from __future__ import annotations

import functools

import numpy as np

from decode_attention.contract import check_shared_prefix

from . import _runtime as rt
from .split_kv import device_gpu, num_sms, outputs, split_kv

__all__ = ["shared_prefix", "PREFIX_DTYPES"]

_LOG2E = 1.4426950408889634
PREFIX_DTYPES = ("float16", "bfloat16")   # the prefix pass runs on the tensor cores
QUERY_ROWS = 64                           # query rows per block (shared_prefix.cu: QUERY_ROWS)
THREADS = 128
MERGE_THREADS = 128


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


def prefix_name_expression(dtype: str, head_dim: int) -> str:
    return (f"decode_attention::shared_prefix_kernel<{rt.C_TYPES[dtype]}, {head_dim}, "
            f"{pipeline_stages(head_dim)}>")


def merge_name_expression(dtype: str) -> str:
    return f"decode_attention::merge_prefix_suffix_kernel<{rt.C_TYPES[dtype]}>"


def all_name_expressions() -> list[str]:
    """Every instantiation the launcher can ask for (also compiled by the CI compile check)."""
    return ([prefix_name_expression(dt, d) for dt in PREFIX_DTYPES for d in rt.HEAD_DIMS]
            + [merge_name_expression(dt) for dt in PREFIX_DTYPES])


# q, k_prefix, v_prefix, part_out, part_lse; batch, prefix_len, num_qo_heads, num_kv_heads,
# chunk_size; scale_log2.
PREFIX_SIGNATURE = "ppppp" + "iiiii" + "f"
# part_out, part_lse, suffix_out, suffix_lse, out, lse; num_chunks, rows, head_dim.
MERGE_SIGNATURE = "pppppp" + "iqi"


@functools.lru_cache(maxsize=None)
def _prefix_kernel(dtype: str, head_dim: int) -> rt.Kernel:
    return rt.Kernel("shared_prefix", prefix_name_expression(dtype, head_dim), PREFIX_SIGNATURE,
                     shared_mem=pipeline_stages(head_dim) * stage_bytes(head_dim))


@functools.lru_cache(maxsize=None)
def _merge_kernel(dtype: str) -> rt.Kernel:
    return rt.Kernel("shared_prefix", merge_name_expression(dtype), MERGE_SIGNATURE)


@functools.lru_cache(maxsize=1024)
def _prefix_chunk_size(batch, num_qo_heads, num_kv_heads, head_dim, prefix_len, suffix_len, dtype,
                       device_id) -> int:
    """The cost model's prefix chunk for this shape, rounded up to whole pipeline tiles."""
    from costmodel.shared_prefix import SharedPrefixShape, plan_hydragen  # noqa: PLC0415

    shape = SharedPrefixShape(batch, num_qo_heads, num_kv_heads, head_dim, prefix_len, suffix_len,
                              dtype)
    gpu = device_gpu(device_id)
    plan = plan_hydragen(shape, gpu=gpu) if gpu is not None else plan_hydragen(
        shape, num_sms=num_sms(device_id))
    tile = kv_tile(head_dim)
    return max(tile, -(-plan.prefix_chunk_size // tile) * tile)


def shared_prefix(q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens=None, *, method="hydragen",
                  sm_scale=None, out=None, lse=None, prefix_chunk_size=None):
    """Sequence b attends to [prefix ; first suffix_lens[b] tokens of its suffix] (see
    `refattn.shared_prefix`), by Hydragen's method.

    q [batch, num_qo_heads, head_dim]; k_prefix, v_prefix [prefix_len, num_kv_heads, head_dim];
    k_suffix, v_suffix [batch, suffix_len, num_kv_heads, head_dim]; suffix_lens [batch] on the host
    (checked there) or the GPU (checked by the suffix kernel, as in `split_kv`). `method`:
    "hydragen" (or "auto", which is Hydragen: the only method with a kernel so far). Returns (out,
    lse): out in q's dtype and kind, lse float32 (natural log).
    """
    if method not in ("hydragen", "auto"):
        raise ValueError(f"method must be 'hydragen' or 'auto' on the GPU (bifurcated attention runs "
                         f"in refattn and the cost model only so far), got {method!r}")
    qa = rt.device_array(q, "q")
    views = [rt.device_array(x, name) for x, name in ((k_prefix, "k_prefix"), (v_prefix, "v_prefix"),
                                                      (k_suffix, "k_suffix"), (v_suffix, "v_suffix"))]
    lens_on_gpu = suffix_lens is not None and rt._kind(suffix_lens) is not None
    problem, _ = check_shared_prefix(q, k_prefix, v_prefix, k_suffix, v_suffix,
                                     None if lens_on_gpu or suffix_lens is None else rt.host_ints(
                                         suffix_lens, "suffix_lens"),
                                     sm_scale=sm_scale, method="hydragen", dtypes=rt.KERNEL_DTYPES)
    if problem.dtype not in PREFIX_DTYPES:
        raise TypeError(f"q must be float16 or bfloat16 for the shared-prefix kernel, got {problem.dtype}")
    if problem.head_dim not in rt.HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {rt.HEAD_DIMS} for the GPU kernels, got {problem.head_dim}")
    for name, a in [("q", qa)] + list(zip(("k_prefix", "v_prefix", "k_suffix", "v_suffix"), views)):
        rt.require_contiguous(a, name)
    device_id = rt.require_same_device({"q": qa, **dict(zip(("k_prefix", "v_prefix", "k_suffix",
                                                             "v_suffix"), views))})
    kind = qa.kind
    B, Hq, Hkv, D = problem.batch, problem.num_qo_heads, problem.num_kv_heads, problem.head_dim
    out, lse, out_ptr, lse_ptr = outputs(out, lse, kind, (B, Hq, D), problem.dtype, device_id)
    if B == 0:
        return out, lse
    stream_ptr = rt.current_stream_ptr(kind, device_id)

    # 1. The prefix, once for every sequence.
    P = problem.prefix_len
    if prefix_chunk_size is None:
        chunk = _prefix_chunk_size(B, Hq, Hkv, D, P, problem.suffix_len, problem.dtype, device_id) if P else 1
    else:
        if not isinstance(prefix_chunk_size, (int, np.integer)) or isinstance(prefix_chunk_size, bool):
            raise TypeError(f"prefix_chunk_size must be an int, got {type(prefix_chunk_size).__name__}")
        tile = kv_tile(D)
        if prefix_chunk_size < tile or prefix_chunk_size % tile:
            raise ValueError(f"prefix_chunk_size must be a positive multiple of {tile}, got {prefix_chunk_size}")
        chunk = int(prefix_chunk_size)
    num_chunks = -(-P // chunk) if P else 0
    part_out = rt.empty(kind, (max(num_chunks, 1), B, Hq, D), "float32", device_id)
    part_lse = rt.empty(kind, (max(num_chunks, 1), B, Hq), "float32", device_id)
    scale_log2 = problem.sm_scale * _LOG2E
    if num_chunks:
        group = Hq // Hkv
        grid = (num_chunks, -(-(B * group) // QUERY_ROWS), Hkv)
        _prefix_kernel(problem.dtype, D)(
            grid, (THREADS,),
            (qa.ptr, views[0].ptr, views[1].ptr, rt.address(part_out), rt.address(part_lse),
             B, P, Hq, Hkv, chunk, scale_log2),
            stream_ptr=stream_ptr, device_id=device_id)

    # 2. Each sequence's own tokens, by split-KV decode.
    if problem.suffix_len:
        suffix_out, suffix_lse = split_kv(q, k_suffix, v_suffix, suffix_lens, sm_scale=problem.sm_scale)
        suffix_ptrs = (rt.address(suffix_out), rt.address(suffix_lse))
    else:
        suffix_out = suffix_lse = None
        suffix_ptrs = (0, 0)

    # 3. The merge, in float32.
    rows = B * Hq
    _merge_kernel(problem.dtype)(
        (rows,), (MERGE_THREADS,),
        (rt.address(part_out), rt.address(part_lse), *suffix_ptrs, out_ptr, lse_ptr, num_chunks, rows, D),
        stream_ptr=stream_ptr, device_id=device_id)
    return out, lse
