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
from dataclasses import dataclass

import numpy as np

from decode_attention.contract import check_positive_int, check_shared_prefix

from . import _runtime as rt
from .split_kv import (SplitKV, SplitKVPlan, _expect_index, _expect_shape, _index_on_device, checked_once, device_gpu,
                       num_sms, outputs, plan_split_kv)

__all__ = ["shared_prefix", "SharedPrefixPlan", "plan_shared_prefix", "SharedPrefix", "PREFIX_DTYPES"]

_LOG2E = 1.4426950408889634
PREFIX_DTYPES = ("float16", "bfloat16")   # the prefix pass runs on the tensor cores
QUERY_ROWS = 64                           # query rows per block (shared_prefix.cu: QUERY_ROWS)
THREADS = 128
MERGE_THREADS = 128                       # merge kernels: one block per (sequence, head) row


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
    lens_host = None if lens_on_gpu or suffix_lens is None else rt.host_ints(suffix_lens, "suffix_lens")
    problem = _checked_problem(q, k_prefix, v_prefix, k_suffix, v_suffix, qa, views, lens_host, sm_scale)
    if method == "auto":
        method = _auto_method(problem.batch, problem.num_qo_heads, problem.num_kv_heads, problem.head_dim,
                              problem.prefix_len, problem.suffix_len, problem.dtype, qa.device_id)
    if method == "bifurcated":
        return _bifurcated(problem, q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens, out, lse)
    if problem.dtype not in PREFIX_DTYPES:
        raise TypeError(f"q must be float16 or bfloat16 for the shared-prefix kernel, got {problem.dtype}")
    if problem.head_dim not in rt.HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {rt.HEAD_DIMS} for the GPU kernels, got {problem.head_dim}")
    device_id = qa.device_id   # contiguity and devices: checked by SharedPrefix.run before any launch
    chunk = None if prefix_chunk_size is None else _checked_chunk(prefix_chunk_size, kv_tile(problem.head_dim))
    if problem.batch == 0:
        out, lse, _, _ = outputs(out, lse, qa.kind, (0, problem.num_qo_heads, problem.head_dim), problem.dtype,
                                 device_id)
        return out, lse
    runner = _cached_runner(problem.batch, problem.num_qo_heads, problem.num_kv_heads, problem.head_dim,
                            problem.prefix_len, problem.suffix_len, problem.dtype, chunk, device_id)
    if lens_host is not None:
        suffix_lens = rt.device_int32(lens_host, qa.kind, device_id, "suffix_lens")
    elif lens_on_gpu:
        suffix_lens = _index_on_device(suffix_lens, "suffix_lens", problem.batch, qa.kind, device_id)
    return runner.run(q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens, sm_scale=problem.sm_scale,
                      out=out, lse=lse)


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
def _cached_runner(batch, num_qo_heads, num_kv_heads, head_dim, prefix_len, suffix_len, dtype, chunk,
                   device_id) -> "SharedPrefix":
    """The one-shot calls' plan and buffers for one shape (and chunk) on one device."""
    return SharedPrefix(plan_shared_prefix(batch, num_qo_heads, num_kv_heads, head_dim, prefix_len, suffix_len,
                                           dtype=dtype, prefix_chunk_size=chunk, num_sms=num_sms(device_id),
                                           gpu=device_gpu(device_id)))


@dataclass(frozen=True)
class SharedPrefixPlan:
    """Hydragen's three launches for one shape: the prefix in `num_chunks` chunks of
    `prefix_chunk_size` tokens, the suffixes by `suffix` (a split-KV plan), the merge."""

    batch: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    prefix_len: int
    suffix_len: int
    dtype: str
    prefix_chunk_size: int
    suffix: SplitKVPlan

    @property
    def num_chunks(self) -> int:
        return -(-self.prefix_len // self.prefix_chunk_size) if self.prefix_len else 0


def plan_shared_prefix(batch: int, num_qo_heads: int, num_kv_heads: int, head_dim: int, prefix_len: int,
                       suffix_len: int, *, dtype: str = "float16", prefix_chunk_size: int | None = None,
                       num_sms: int | None = None, gpu=None) -> SharedPrefixPlan:
    """The plan of a Hydragen call (made on the host, no GPU needed): the prefix chunk that fills
    one wave of resident blocks, the suffixes' split plan from the cost model. `num_sms` and `gpu`
    as for `plan_split_kv` (the H100's 132 SMs when neither is given)."""
    from costmodel.gpus import plan_gpu  # noqa: PLC0415
    from costmodel.shared_prefix import prefix_pass_chunk  # noqa: PLC0415
    from costmodel.split_kv import DEFAULT_NUM_SMS  # noqa: PLC0415

    for name, value in (("batch", batch), ("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
        check_positive_int(value, name)
    for name, value in (("prefix_len", prefix_len), ("suffix_len", suffix_len)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if dtype not in PREFIX_DTYPES:
        raise TypeError(f"dtype must be float16 or bfloat16 for the shared-prefix kernel, got {dtype!r}")
    if head_dim not in rt.HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {rt.HEAD_DIMS} for the GPU kernels, got {head_dim}")
    _, sms = plan_gpu(gpu, num_sms, default_num_sms=DEFAULT_NUM_SMS)
    tile = kv_tile(head_dim)
    if prefix_chunk_size is None:
        chunk = prefix_pass_chunk(max(int(prefix_len), 1), batch * (num_qo_heads // num_kv_heads), num_kv_heads,
                                  sms, blocks_per_sm(head_dim), tile)
    else:
        chunk = _checked_chunk(prefix_chunk_size, tile)
    suffix = plan_split_kv(batch, num_qo_heads, num_kv_heads, head_dim, max(int(suffix_len), 1), dtype=dtype,
                           num_sms=sms, gpu=gpu)
    return SharedPrefixPlan(batch, num_qo_heads, num_kv_heads, head_dim, int(prefix_len), int(suffix_len), dtype,
                            chunk, suffix)


def _checked_chunk(prefix_chunk_size, tile: int) -> int:
    if not isinstance(prefix_chunk_size, (int, np.integer)) or isinstance(prefix_chunk_size, bool):
        raise TypeError(f"prefix_chunk_size must be an int, got {type(prefix_chunk_size).__name__}")
    if prefix_chunk_size < tile or prefix_chunk_size % tile:
        raise ValueError(f"prefix_chunk_size must be a positive multiple of {tile}, got {prefix_chunk_size}")
    return int(prefix_chunk_size)


class SharedPrefix:
    """A Hydragen plan bound to its buffers (partial states, the suffixes' state), one set per
    stream it runs on; `run` many times without host synchronisation, allocating nothing when
    `out` and `lse` are given (CUDA-graph capturable).

    >>> plan = plan_shared_prefix(64, 32, 8, 128, 16384, 256, gpu="H200")   # doctest: +SKIP
    >>> hy = SharedPrefix(plan)                                             # doctest: +SKIP
    >>> out, lse = hy.run(q, k_prefix, v_prefix, k_suffix, v_suffix)       # doctest: +SKIP
    """

    def __init__(self, plan: SharedPrefixPlan):
        if not isinstance(plan, SharedPrefixPlan):
            raise TypeError(f"plan must be a SharedPrefixPlan, got {type(plan).__name__}")
        self.plan = plan
        self._suffix = SplitKV(plan.suffix)
        self._buffers: dict = {}   # (kind, device, stream) -> (part_out, part_lse, suffix_out, suffix_lse)

    def _buffers_for(self, kind: str, device_id: int, stream_ptr: int):
        key = (kind, device_id, stream_ptr)
        bufs = self._buffers.get(key)
        if bufs is None:
            p = self.plan
            n = max(p.num_chunks, 1)
            bufs = self._buffers[key] = (
                rt.empty(kind, (n, p.batch, p.num_qo_heads, p.head_dim), "float32", device_id),
                rt.empty(kind, (n, p.batch, p.num_qo_heads), "float32", device_id),
                rt.empty(kind, (p.batch, p.num_qo_heads, p.head_dim), p.dtype, device_id),
                rt.empty(kind, (p.batch, p.num_qo_heads), "float32", device_id),
            )
        return bufs

    def run(self, q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens=None, *, sm_scale=None, out=None,
            lse=None):
        """Shapes as planned (checked by their metadata); `suffix_lens` None or an int32 device
        array [batch] (values checked by the suffix kernel: a length outside [0, suffix_len] gives
        that sequence NaN). Returns (out, lse) like `shared_prefix`."""
        p = self.plan
        B, Hq, Hkv, D = p.batch, p.num_qo_heads, p.num_kv_heads, p.head_dim
        qa = rt.device_array(q, "q")
        views = [rt.device_array(x, name) for x, name in ((k_prefix, "k_prefix"), (v_prefix, "v_prefix"),
                                                          (k_suffix, "k_suffix"), (v_suffix, "v_suffix"))]
        _expect_shape(qa, "q", "[batch, num_qo_heads, head_dim]", (B, Hq, D))
        for a, name in zip(views[:2], ("k_prefix", "v_prefix")):
            _expect_shape(a, name, "[prefix_len, num_kv_heads, head_dim]", (p.prefix_len, Hkv, D))
        for a, name in zip(views[2:], ("k_suffix", "v_suffix")):
            _expect_shape(a, name, "[batch, suffix_len, num_kv_heads, head_dim]", (B, p.suffix_len, Hkv, D))
        device_id = qa.device_id
        for a, name in zip([qa] + views, ("q", "k_prefix", "v_prefix", "k_suffix", "v_suffix")):
            if a.dtype != p.dtype:
                raise TypeError(f"{name} must be {p.dtype} as planned, got {a.dtype}")
            rt.require_contiguous(a, name)
            if a.device_id != device_id:
                raise ValueError(f"{name} must be on GPU {device_id} like q, got GPU {a.device_id}")
        _expect_index(suffix_lens, "suffix_lens", B, device_id)
        if sm_scale is None:
            sm_scale = 1.0 / float(np.sqrt(D))
        if not (isinstance(sm_scale, (int, float, np.floating, np.integer)) and np.isfinite(sm_scale)):
            raise ValueError(f"sm_scale must be a finite real number, got {sm_scale!r}")
        sm_scale = float(sm_scale)
        kind = qa.kind
        out, lse, out_ptr, lse_ptr = outputs(out, lse, kind, (B, Hq, D), p.dtype, device_id)
        stream_ptr = rt.current_stream_ptr(kind, device_id)
        part_out, part_lse, suffix_out, suffix_lse = self._buffers_for(kind, device_id, stream_ptr)
        # 1. The prefix, once for every sequence. 2. Each sequence's own tokens, by split-KV. 3. The merge.
        n = p.num_chunks
        if n:
            grid = (n, -(-(B * (Hq // Hkv)) // QUERY_ROWS), Hkv)
            _prefix_kernel(p.dtype, D)(
                grid, (THREADS,),
                (qa.ptr, views[0].ptr, views[1].ptr, rt.address(part_out), rt.address(part_lse),
                 B, p.prefix_len, Hq, Hkv, p.prefix_chunk_size, sm_scale * _LOG2E),
                stream_ptr=stream_ptr, device_id=device_id)
        suffix_ptrs = (0, 0)
        if p.suffix_len:
            self._suffix.run(q, k_suffix, v_suffix, suffix_lens, sm_scale=sm_scale, out=suffix_out, lse=suffix_lse)
            suffix_ptrs = (rt.address(suffix_out), rt.address(suffix_lse))
        _merge_kernel(p.dtype)(
            (B * Hq,), (MERGE_THREADS,),
            (rt.address(part_out), rt.address(part_lse), *suffix_ptrs, out_ptr, lse_ptr, n, B * Hq, D),
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
