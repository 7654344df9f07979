"""Hydragen on the GPU: one prefix shared by every sequence, read once for all of them.

A call runs three launches on the caller's stream:

1. `shared_prefix_kernel` (cuda/shared_prefix.cu): per KV head, the queries of all sequences and
   all query heads of its group as rows of one matrix, 64 rows a block, against chunks of the
   prefix on the tensor cores; a float32 partial state (out, lse) per row and chunk.
2. The suffixes by this project's split-KV kernel (`gpukernels.split_kv`).
3. `merge_prefix_suffix_kernel`: the LSE merge of the prefix chunks' states and the suffix state,
   in float32.

The prefix chunk fills one wave of resident blocks (`costmodel.shared_prefix.prefix_pass_chunk`).
The cost model predicts Hydragen as one fused launch; these three launches are not that launch
yet, and take up to twice its prediction (results/h200/NOTES.md).
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
MERGE_ROWS_PER_BLOCK = 4                  # merge kernels: one warp per (sequence, head) row
MERGE_THREADS = 32 * MERGE_ROWS_PER_BLOCK


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


def blocks_per_sm(head_dim: int) -> int:
    """Resident blocks of the prefix pass per SM (its launch bounds: registers and shared memory)."""
    return 1 if head_dim >= 256 else 2


@functools.lru_cache(maxsize=1024)
def _prefix_chunk_size(batch, num_qo_heads, num_kv_heads, head_dim, prefix_len, suffix_len, dtype,
                       device_id) -> int:
    """The prefix pass's chunk for this shape: one wave of resident blocks
    (`costmodel.shared_prefix.prefix_pass_chunk`)."""
    from costmodel.shared_prefix import prefix_pass_chunk  # noqa: PLC0415

    return prefix_pass_chunk(max(prefix_len, 1), batch * (num_qo_heads // num_kv_heads), num_kv_heads,
                             num_sms(device_id), blocks_per_sm(head_dim), kv_tile(head_dim))


@functools.lru_cache(maxsize=1024)
def _auto_method(batch, num_qo_heads, num_kv_heads, head_dim, prefix_len, suffix_len, dtype, device_id) -> str:
    """The method the cost model predicts faster for this shape on this GPU (Hydragen where the
    model does not know the GPU)."""
    from costmodel.shared_prefix import SharedPrefixShape, predict  # noqa: PLC0415

    gpu = device_gpu(device_id)
    if gpu is None:
        return "hydragen"
    shape = SharedPrefixShape(batch, num_qo_heads, num_kv_heads, head_dim, prefix_len, suffix_len, dtype)
    times = {m: predict(shape, method=m, gpu=gpu).time_s for m in ("hydragen", "bifurcated")}
    return min(times, key=times.get)


def shared_prefix(q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens=None, *, method="hydragen",
                  sm_scale=None, out=None, lse=None, prefix_chunk_size=None):
    """Sequence b attends to [prefix ; first suffix_lens[b] tokens of its suffix] (see
    `refattn.shared_prefix`), by Hydragen's method or by bifurcated attention's.

    q [batch, num_qo_heads, head_dim]; k_prefix, v_prefix [prefix_len, num_kv_heads, head_dim];
    k_suffix, v_suffix [batch, suffix_len, num_kv_heads, head_dim]; suffix_lens [batch] on the host
    (checked there) or the GPU (checked by the suffix kernel, as in `split_kv`). `method`:
    "hydragen" (the kernels above), "bifurcated" (the paper's formulation in library products: the
    prefix logits of all samples in one product, each sample's suffix logits, one softmax over
    their concatenation, two products for the output; in float32) or "auto" (the one the cost
    model predicts faster for this shape, chosen once per shape). Returns (out, lse): out in q's
    dtype and kind, lse float32 (natural log).
    """
    if method not in ("hydragen", "auto", "bifurcated"):
        raise ValueError(f"method must be 'hydragen', 'bifurcated' or 'auto', got {method!r}")
    qa = rt.device_array(q, "q")
    views = [rt.device_array(x, name) for x, name in ((k_prefix, "k_prefix"), (v_prefix, "v_prefix"),
                                                      (k_suffix, "k_suffix"), (v_suffix, "v_suffix"))]
    lens_on_gpu = suffix_lens is not None and rt._kind(suffix_lens) is not None
    problem, _ = check_shared_prefix(q, k_prefix, v_prefix, k_suffix, v_suffix,
                                     None if lens_on_gpu or suffix_lens is None else rt.host_ints(
                                         suffix_lens, "suffix_lens"),
                                     sm_scale=sm_scale, method="hydragen", dtypes=rt.KERNEL_DTYPES)
    if method == "auto":
        method = _auto_method(problem.batch, problem.num_qo_heads, problem.num_kv_heads, problem.head_dim,
                              problem.prefix_len, problem.suffix_len, problem.dtype, qa.device_id)
    if method == "bifurcated":
        return _bifurcated(problem, q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens, out, lse)
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
        (-(-rows // MERGE_ROWS_PER_BLOCK),), (MERGE_THREADS,),
        (rt.address(part_out), rt.address(part_lse), *suffix_ptrs, out_ptr, lse_ptr, num_chunks, rows, D),
        stream_ptr=stream_ptr, device_id=device_id)
    return out, lse


class _Ops:
    """The few array operations the bifurcated formulation needs, for CuPy arrays or PyTorch
    tensors (and NumPy arrays, which the CPU tests use)."""

    def __init__(self, like):
        self.torch = rt._kind(like) == "torch"
        if self.torch:
            import torch  # noqa: PLC0415

            self.t = torch
        else:
            self.xp = rt.cupy() if rt._kind(like) == "cupy" else np

    def f32(self, x):
        return x.float() if self.torch else self.xp.asarray(x).astype(np.float32)

    def einsum(self, spec, a, b):
        return (self.t if self.torch else self.xp).einsum(spec, a, b)

    def cat(self, xs, axis):
        return self.t.cat(xs, dim=axis) if self.torch else self.xp.concatenate(xs, axis=axis)

    def where(self, cond, a, b):
        if self.torch:
            like = a if hasattr(a, "dtype") else b
            a = a if hasattr(a, "dtype") else self.t.full_like(like, a)
            b = b if hasattr(b, "dtype") else self.t.full_like(like, b)
            return self.t.where(cond, a, b)
        return self.xp.where(cond, a, b)

    def isfinite(self, x):
        return (self.t if self.torch else self.xp).isfinite(x)

    def max_last(self, x):
        if x.shape[-1] == 0:   # nothing to attend to: the empty state's -inf
            return (self.t.full(tuple(x.shape[:-1]) + (1,), -np.inf, device=x.device) if self.torch
                    else self.xp.full(x.shape[:-1] + (1,), -np.inf, dtype=np.float32))
        return self.t.amax(x, dim=-1, keepdim=True) if self.torch else x.max(axis=-1, keepdims=True)

    def any_last(self, x):
        return self.t.any(x, dim=-1, keepdim=True) if self.torch else x.any(axis=-1, keepdims=True)

    def sum_last(self, x):
        return x.sum(dim=-1, keepdim=True) if self.torch else x.sum(axis=-1, keepdims=True)

    def exp(self, x):
        return (self.t if self.torch else self.xp).exp(x)

    def log(self, x):
        return (self.t if self.torch else self.xp).log(x)

    def lens_mask(self, lens, suffix_len: int, batch: int, like):
        """[B, S]: token t of sequence b is inside its suffix (lens None: every token)."""
        if self.torch:
            ar = self.t.arange(suffix_len, device=like.device)
            lens_t = (self.t.full((batch,), suffix_len, device=like.device) if lens is None
                      else self.t.as_tensor(lens, device=like.device))
            return ar[None, :] < lens_t[:, None]
        ar = self.xp.arange(suffix_len)
        lens_a = self.xp.full((batch,), suffix_len) if lens is None else self.xp.asarray(lens)
        return ar[None, :] < lens_a[:, None]


def _bifurcated(problem, q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens, out, lse):
    """Bifurcated attention as the paper writes it, in float32 library products (cuBLAS through
    CuPy or PyTorch), with the references' rules for padding and non-finite values."""
    ops = _Ops(q)
    B, Hq, Hkv, D = problem.batch, problem.num_qo_heads, problem.num_kv_heads, problem.head_dim
    G, P, S = Hq // Hkv, problem.prefix_len, problem.suffix_len
    qg = ops.f32(q).reshape(B, Hkv, G, D)                                        # [B, Hkv, G, D]
    kp, vp = ops.f32(k_prefix), ops.f32(v_prefix)                                # [P, Hkv, D]
    ks, vs = ops.f32(k_suffix), ops.f32(v_suffix)                                # [B, S, Hkv, D]
    scale = float(problem.sm_scale)
    logits = ops.cat([ops.einsum("bjgd,pjd->bjgp", qg, kp) * scale,             # all samples at once
                      ops.einsum("bjgd,bsjd->bjgs", qg, ks) * scale], axis=-1)  # [B, Hkv, G, P + S]
    in_suffix = ops.lens_mask(suffix_lens, S, B, logits)                         # [B, S]
    attended = ops.cat([ops.lens_mask(None, P, B, logits), in_suffix], axis=-1)[:, None, None, :]
    finite = ops.isfinite(logits)
    poisoned = ops.any_last(attended & ~finite)                                  # [B, Hkv, G, 1]
    masked = ops.where(attended & finite, logits, -np.inf)
    row_max = ops.max_last(masked)
    shift = ops.where(ops.isfinite(row_max), row_max, 0.0)
    weights = ops.exp(masked - shift)                                            # exactly 0 off the attended
    total = ops.sum_last(weights)
    probs = weights / ops.where(total > 0, total, 1.0)
    vs = ops.where(in_suffix[:, :, None, None], vs, 0.0)                         # padding is never read
    o = ops.einsum("bjgp,pjd->bjgd", probs[..., :P], vp) + ops.einsum("bjgs,bsjd->bjgd", probs[..., P:], vs)
    o = ops.where(ops.isfinite(o) & ~poisoned, o, np.nan)
    lse_rows = ops.where(total > 0, shift + ops.log(ops.where(total > 0, total, 1.0)), -np.inf)
    lse_rows = ops.where(poisoned, np.nan, lse_rows)[..., 0]                      # [B, Hkv, G]
    o = o.reshape(B, Hq, D)
    lse_rows = lse_rows.reshape(B, Hq)
    if rt._kind(q) is None:                                                      # NumPy: the CPU tests
        return o.astype(np.asarray(q).dtype), lse_rows.astype(np.float32)
    device_id = rt.device_array(q, "q").device_id
    out, lse, _, _ = outputs(out, lse, rt._kind(q), (B, Hq, D), problem.dtype, device_id)
    if ops.torch:
        out.copy_(o.to(out.dtype))
        lse.copy_(lse_rows)
    else:
        out[...] = o.astype(out.dtype)
        lse[...] = lse_rows
    return out, lse
