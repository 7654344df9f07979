"""Bifurcated attention on the GPU (Athiwaratkun et al., 2024): the paper's formulation as kernels.

The logits of every query row against the shared prefix are one matrix product per KV head (all
sequences and all query heads of the group against the prefix keys, read once for the batch);
each sequence's logits against its own suffix come from a decode-style kernel; ONE softmax runs
over each row's [prefix logits ; suffix logits]; the output is P_prefix V_prefix (again all rows
of a group against the prefix values, read once) plus P_suffix V_suffix. No merge of states: the
logits are written to a float32 workspace between the launches, which is the method's cost
against Hydragen's. Five launches on the caller's stream (cuda/bifurcated.cu):

1. prefix logits: tensor cores (float16, bfloat16) or CUDA cores (float32);
2. suffix logits (contiguous or paged suffixes);
3. the softmax's max and sum per row, and the row's lse;
4. P V over the prefix in chunks (tensor cores, or CUDA cores for float32): float32 partials;
5. per row, the partials in chunk order plus P V over the suffix, over the row's sum.

Deterministic (no atomics). `SharedPrefix` (gpukernels.shared_prefix) owns the workspace and
calls `run` with a plan whose method is "bifurcated".
"""

from __future__ import annotations

import functools

from . import _runtime as rt

__all__ = ["all_name_expressions", "run", "workspace_shapes", "TENSOR_CORE_DTYPES"]

TENSOR_CORE_DTYPES = ("float16", "bfloat16")   # float32 runs its products on the CUDA cores
THREADS = 128
QUERY_ROWS = 64          # rows of a tensor-core row tile (bifurcated.cu: BF_QUERY_ROWS)
LOGIT_TILE = 64          # prefix tokens per tensor-core logits block (BF_LOGIT_TILE)
SIMT_TOKENS = 32         # tokens per CUDA-core tile (BF_SIMT_TOKENS)
SIMT_ROWS = 16           # query rows per CUDA-core values block (BF_SIMT_ROWS)
STRIDE_ALIGN = 4         # logits rows start on 16 bytes (the kernels load pairs of floats)
_LOG2E = 1.4426950408889634


def value_tile(head_dim: int) -> int:
    """Prefix rows per pipeline stage of the tensor-core values kernel (bifurcated.cu: ValueTile)."""
    return 32 if head_dim >= 256 else 64


def value_stages(head_dim: int) -> int:
    """Pipeline stages of the tensor-core values kernel: 3 (two blocks per SM) below head_dim
    256, 4 there (one block per SM: its registers)."""
    return 4 if head_dim >= 256 else 3


def value_smem_bytes(head_dim: int) -> int:
    return value_stages(head_dim) * value_tile(head_dim) * (head_dim * 2 + 16)


def chunk_tile(dtype: str, head_dim: int) -> int:
    """The prefix chunk of the values pass is a multiple of this many tokens."""
    return value_tile(head_dim) if dtype in TENSOR_CORE_DTYPES else SIMT_TOKENS


def logits_stride(prefix_len: int, suffix_capacity: int) -> int:
    """Floats per row of the logits workspace: the prefix, then the longest suffix, rounded up."""
    n = prefix_len + suffix_capacity
    return max(STRIDE_ALIGN, -(-n // STRIDE_ALIGN) * STRIDE_ALIGN)


def _expr(kernel: str, dtype: str, *params) -> str:
    args = ", ".join([rt.C_TYPES[dtype], *map(str, params)])
    return f"decode_attention::{kernel}<{args}>"


def prefix_logits_expression(dtype: str, head_dim: int) -> str:
    if dtype in TENSOR_CORE_DTYPES:
        return _expr("bifurcated_prefix_logits_kernel", dtype, head_dim)
    return _expr("bifurcated_prefix_logits_simt_kernel", dtype, head_dim)


def prefix_values_expression(dtype: str, head_dim: int) -> str:
    if dtype in TENSOR_CORE_DTYPES:
        return _expr("bifurcated_prefix_values_kernel", dtype, head_dim, value_stages(head_dim))
    return _expr("bifurcated_prefix_values_simt_kernel", dtype, head_dim)


def all_name_expressions() -> list[str]:
    """Every instantiation `run` can ask for (also compiled by the CI compile check)."""
    exprs = []
    for dtype in rt.KERNEL_DTYPES:
        for d in rt.HEAD_DIMS:
            exprs += [prefix_logits_expression(dtype, d), _expr("bifurcated_suffix_logits_kernel", dtype, d),
                      prefix_values_expression(dtype, d)]
        exprs += [_expr("bifurcated_softmax_kernel", dtype), _expr("bifurcated_finish_kernel", dtype)]
    return exprs


# q, k_prefix, logits; batch, prefix_len, num_qo_heads, num_kv_heads, row_tiles (tensor cores) or
# rows per block (CUDA cores); logits_stride; scale_log2.
PREFIX_LOGITS_SIGNATURE = "ppp" + "iiiii" + "q" + "f"
# q, k_suffix, suffix_lens, kv_indptr, kv_indices, kv_last_page_len, logits; prefix_len, capacity,
# num_indices, num_pages, page_size, num_qo_heads, num_kv_heads; logits_stride; scale_log2.
SUFFIX_LOGITS_SIGNATURE = "ppppppp" + "iiiiiii" + "q" + "f"
# logits, suffix_lens, kv_indptr, kv_last_page_len, stats, lse; prefix_len, capacity, num_indices,
# page_size, num_qo_heads; logits_stride.
SOFTMAX_SIGNATURE = "pppppp" + "iiiii" + "q"
# logits, stats, v_prefix, part_out; batch, prefix_len, num_qo_heads, num_kv_heads, chunk_size;
# logits_stride.
VALUES_SIGNATURE = "pppp" + "iiiii" + "q"
# logits, stats, part_out, v_suffix, suffix_lens, kv_indptr, kv_indices, kv_last_page_len, out;
# num_chunks, prefix_len, capacity, num_indices, num_pages, page_size, num_qo_heads,
# num_kv_heads, head_dim; logits_stride.
FINISH_SIGNATURE = "ppppppppp" + "iiiiiiiii" + "q"


@functools.lru_cache(maxsize=None)
def _kernel(expression: str, signature: str, shared_mem: int = 0) -> rt.Kernel:
    return rt.Kernel("bifurcated", expression, signature, shared_mem=shared_mem)


def workspace_shapes(plan) -> dict:
    """The float32 buffers one run needs: logits [rows, logits_stride], the softmax's (max, sum)
    per row, and the values pass's partials [num_chunks, rows, head_dim] (rows = batch x heads)."""
    rows = plan.batch * plan.num_qo_heads
    return {"logits": (rows, plan.logits_stride), "stats": (rows, 2),
            "part_out": (max(plan.num_chunks, 1), rows, plan.head_dim)}


def run(plan, workspace: dict, q_ptr: int, k_prefix_ptr: int, v_prefix_ptr: int, k_suffix_ptr: int,
        v_suffix_ptr: int, tables: tuple, out_ptr: int, lse_ptr: int, sm_scale: float, *, stream_ptr: int,
        device_id: int) -> None:
    """Launch the five kernels of `plan` (checked by the caller). `tables`: (suffix_lens,
    kv_indptr, kv_indices, kv_last_page_len) device addresses (0 where absent), then num_indices
    and num_pages (0 for contiguous suffixes)."""
    p = plan
    B, Hq, Hkv, D, P = p.batch, p.num_qo_heads, p.num_kv_heads, p.head_dim, p.prefix_len
    G = Hq // Hkv
    rows = B * G                       # query rows per KV head
    lens_ptr, indptr_ptr, indices_ptr, last_ptr, num_indices, num_pages = tables
    page_size = max(p.page_size, 1)
    capacity, stride, scale_log2 = p.suffix_len, p.logits_stride, sm_scale * _LOG2E
    logits, stats, part_out = (rt.address(workspace[name]) for name in ("logits", "stats", "part_out"))
    tensor_cores = p.dtype in TENSOR_CORE_DTYPES
    launch = dict(stream_ptr=stream_ptr, device_id=device_id)
    row_tiles = -(-rows // QUERY_ROWS)

    if P:
        if tensor_cores:
            grid = (-(-P // LOGIT_TILE), -(-row_tiles // p.logits_row_tiles), Hkv)
            per_block = p.logits_row_tiles
        else:
            per_block = p.logits_row_tiles * QUERY_ROWS
            grid = (-(-P // SIMT_TOKENS), -(-rows // per_block), Hkv)
        _kernel(prefix_logits_expression(p.dtype, D), PREFIX_LOGITS_SIGNATURE)(
            grid, (THREADS,),
            (q_ptr, k_prefix_ptr, logits, B, P, Hq, Hkv, per_block, stride, scale_log2), **launch)
    if capacity:
        _kernel(_expr("bifurcated_suffix_logits_kernel", p.dtype, D), SUFFIX_LOGITS_SIGNATURE)(
            (-(-capacity // SIMT_TOKENS), B, Hkv), (THREADS,),
            (q_ptr, k_suffix_ptr, lens_ptr, indptr_ptr, indices_ptr, last_ptr, logits, P, capacity, num_indices,
             num_pages, page_size, Hq, Hkv, stride, scale_log2), **launch)
    _kernel(_expr("bifurcated_softmax_kernel", p.dtype), SOFTMAX_SIGNATURE)(
        (B * Hq,), (THREADS,),
        (logits, lens_ptr, indptr_ptr, last_ptr, stats, lse_ptr, P, capacity, num_indices, page_size, Hq, stride),
        **launch)
    n = p.num_chunks
    if n:
        args = (logits, stats, v_prefix_ptr, part_out, B, P, Hq, Hkv, p.prefix_chunk_size, stride)
        if tensor_cores:
            _kernel(prefix_values_expression(p.dtype, D), VALUES_SIGNATURE, value_smem_bytes(D))(
                (n, row_tiles, Hkv), (THREADS,), args, **launch)
        else:
            _kernel(prefix_values_expression(p.dtype, D), VALUES_SIGNATURE)(
                (n, -(-rows // SIMT_ROWS), Hkv), (D,), args, **launch)
    _kernel(_expr("bifurcated_finish_kernel", p.dtype), FINISH_SIGNATURE)(
        (B * Hq,), (THREADS,),
        (logits, stats, part_out, v_suffix_ptr, lens_ptr, indptr_ptr, indices_ptr, last_ptr, out_ptr, n, P,
         capacity, num_indices, num_pages, page_size, Hq, Hkv, D, stride), **launch)
