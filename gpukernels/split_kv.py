"""Flash-Decoding on the GPU: split the KV cache along its length, attend to the chunks in
parallel, merge the partial states in the same launch.

Two ways to call it:

* `split_kv(q, k, v, kv_lens)` checks everything (index values included, which copies them to the
  host), plans and runs: the simple way.
* `SplitKV(plan).run(q, k, v, kv_lens)` runs a plan made once with `plan_split_kv(...)`, reusable
  across layers and steps. It does no host synchronisation and, given `out` and `lse`, no
  allocation, so it can be captured in a CUDA graph. Index values are not read on the host there;
  a length or page index outside the cache turns that sequence's output into NaN instead of being
  read out of bounds.

Example (on a GPU)::

    import cupy as cp
    from gpukernels import split_kv
    q = cp.random.standard_normal((1, 32, 128)).astype(cp.float16)
    k = cp.random.standard_normal((1, 32768, 8, 128)).astype(cp.float16)
    v = cp.random.standard_normal((1, 32768, 8, 128)).astype(cp.float16)
    out, lse = split_kv(q, k, v)          # out: [1, 32, 128] float16, lse: [1, 32] float32
"""

from __future__ import annotations

import functools
import math

import numpy as np

from costmodel.split_kv import (HEADS_PER_BLOCK_CHOICES, NUM_WARPS, PIPELINE_STAGES,
                                 PIPELINE_STAGES_PAGED, SplitKVPlan, pipeline_stage_bytes,
                                 plan_split_kv, uses_tensor_cores)
from decode_attention.contract import check_decode, check_paged

from . import _runtime as rt

__all__ = ["SplitKV", "split_kv", "plan_split_kv", "SplitKVPlan"]

_LOG2E = 1.4426950408889634


# float16/bfloat16 at TENSOR_CORE_HEAD_DIMS run on the tensor cores, the rest on the CUDA cores.
# Tiles each warp keeps in flight through shared memory there (PIPELINE_STAGES, with the other
# constants the plan and the kernels share in costmodel.split_kv). Contiguous caches: 3 stages,
# two blocks per SM (96 KB each), with the plan choosing about one block per SM at batch 1.
# Measured on H100 with whole-row copies (us, stages/splits): 1 x 8 x 128k 4/8 193.2, 4/16 190.8,
# 3/16 186.9, 2/16 187.2; 1 x 32 x 32k 4/4 189.7, 3/4 187.7, 2/4 186.9; 8 x 8 x 32k 4/1 368.9,
# 3/2 357.7, 2/2 354.0; 64 x 8 x 16k 4/1 1400.9, 3/2 1390.6, 2/1 1397.5; 16 x 32 x 8k 4/1 704.9,
# 3/2 703.9, 2/1 725.1 (3 stages: never more than 1% from the best). Paged caches, where
# each lane also waits on page-table reads, run 2 stages (measured with pages of 16, 2 against 3
# stages: H100 1429 vs 1454 us at 64 x 8 x 16k and 190.7 vs 200.8 at 1 x 8 x 128k; H200 981 vs
# 1083 and 148 vs 158; 4 stages, one block per SM, 30-50% slower). Their shared memory would
# leave room for three blocks per SM, but at head_dim 128 the registers (174 per thread) hold two;
# forcing three (168 registers) measured 1310 against 988 us at 64 x 8 x 16k on H200.


def stages_for(paged: bool) -> int:
    return PIPELINE_STAGES_PAGED if paged else PIPELINE_STAGES


def dynamic_smem_bytes(dtype: str, head_dim: int, paged: bool = False) -> int:
    """Shared memory of the tensor-core path: [stages][warps][16-byte slots per lane][32 lanes]."""
    if not uses_tensor_cores(dtype, head_dim):
        return 0
    return stages_for(paged) * pipeline_stage_bytes(head_dim)


def name_expression(dtype: str, head_dim: int, heads_per_block: int, paged: bool) -> str:
    """The kernel template instantiation for one key (also compiled by the CI compile check)."""
    paged_arg = "true" if paged else "false"
    if uses_tensor_cores(dtype, head_dim):
        return (
            f"decode_attention::split_kv_mma_kernel<{rt.C_TYPES[dtype]}, {head_dim}, {heads_per_block}, "
            f"{paged_arg}, {stages_for(paged)}>"
        )
    return (
        f"decode_attention::split_kv_kernel<{rt.C_TYPES[dtype]}, {head_dim}, {heads_per_block}, "
        f"{paged_arg}>"
    )


def all_name_expressions() -> list[str]:
    """Every instantiation the launchers can ask for."""
    return [
        name_expression(dtype, head_dim, g, paged)
        for dtype in rt.KERNEL_DTYPES
        for head_dim in rt.HEAD_DIMS
        for g in HEADS_PER_BLOCK_CHOICES
        for paged in (False, True)
    ]


def _kernel(plan: SplitKVPlan, paged: bool):
    return _kernel_for(plan.dtype, plan.head_dim, plan.heads_per_block, paged)


# The kernels' arguments: q, k, v, kv_lens, kv_indptr, kv_indices, kv_last_page_len, out, lse,
# partial_out, partial_lse, counters; batch, kv_len, num_pages, page_size, num_qo_heads,
# num_kv_heads, head_groups, chunk_size; scale_log2.
KERNEL_SIGNATURE = "p" * 12 + "i" * 8 + "f"


@functools.lru_cache(maxsize=None)
def _kernel_for(dtype: str, head_dim: int, heads_per_block: int, paged: bool) -> rt.Kernel:
    """The compiled kernel of one key (its shared-memory limit is raised once per device)."""
    return rt.Kernel("split_kv", name_expression(dtype, head_dim, heads_per_block, paged),
                     KERNEL_SIGNATURE, shared_mem=dynamic_smem_bytes(dtype, head_dim, paged))


@functools.lru_cache(maxsize=None)
def num_sms(device_id: int) -> int:
    cp = rt.cupy()
    return int(cp.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


@functools.lru_cache(maxsize=None)
def device_gpu(device_id: int):
    """The cost model's spec of this GPU (by name), or None when the model does not know it."""
    from costmodel.gpus import get_gpu  # noqa: PLC0415

    name = rt.cupy().cuda.runtime.getDeviceProperties(device_id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    try:
        return get_gpu(name)
    except (KeyError, ValueError):
        return None


def check_kernel_dtype_and_head_dim(dtype: str, head_dim: int) -> None:
    if dtype not in rt.KERNEL_DTYPES:
        raise TypeError(f"q must be one of {', '.join(rt.KERNEL_DTYPES)} for the GPU kernels, got {dtype}")
    if head_dim not in rt.HEAD_DIMS:
        raise ValueError(
            f"head_dim must be one of {', '.join(map(str, rt.HEAD_DIMS))} for the GPU kernels, got {head_dim}"
        )


class _Workspace:
    """Partial results and arrival counters of split plans, grown on demand, one per stream.

    The counters start at zero and every call leaves them at zero (the merging block resets its
    counter), so the buffers can be reused call after call on the same stream.
    """

    def __init__(self, kind: str, device_id: int):
        self.kind = kind
        self.device_id = device_id
        self.floats = None
        self.counters = None
        self._pointers = (None, None)   # (partial_out_elems, kernel arguments) of the last plan

    def ensure(self, plan: SplitKVPlan):
        n_float = plan.partial_out_elems + plan.partial_lse_elems
        if self.floats is None or _numel(self.floats) < n_float:
            self.floats = rt.empty(self.kind, (max(n_float, 1),), "float32", self.device_id)
            self._pointers = (None, None)
        if self.counters is None or _numel(self.counters) < plan.counter_elems:
            self.counters = rt.empty(self.kind, (max(plan.counter_elems, 1),), "int32", self.device_id,
                                     zero=True)
            self._pointers = (None, None)
        return self

    def pointers(self, plan: SplitKVPlan):
        """(partial_out, partial_lse, counters) kernel arguments; remembered until a buffer grows."""
        n_out = plan.partial_out_elems
        if self._pointers[0] != n_out:
            base = rt.address(self.floats)
            self._pointers = (n_out, (base, base + 4 * n_out, rt.address(self.counters)))
        return self._pointers[1]


def _numel(x) -> int:
    return int(math.prod(x.shape))


_WORKSPACES: dict = {}


def _shared_workspace(kind: str, device_id: int, stream_ptr: int) -> _Workspace:
    key = (kind, device_id, stream_ptr)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = _Workspace(kind, device_id)
    return _WORKSPACES[key]


class SplitKV:
    """A split-KV plan bound to its own workspace (one per stream it runs on); `run` many times
    without host synchronisation.

    >>> plan = plan_split_kv(8, 32, 8, 128, 32768, dtype="float16")   # doctest: +SKIP
    >>> dec = SplitKV(plan)                                           # doctest: +SKIP
    >>> out, lse = dec.run(q, k, v, kv_lens_on_gpu)                   # doctest: +SKIP
    """

    def __init__(self, plan: SplitKVPlan):
        if not isinstance(plan, SplitKVPlan):
            raise TypeError(f"plan must be a SplitKVPlan, got {type(plan).__name__}")
        check_kernel_dtype_and_head_dim(plan.dtype, plan.head_dim)
        self.plan = plan
        self._workspaces: dict = {}   # (kind, device, stream) -> _Workspace

    def _workspace_for(self, kind: str, device_id: int, stream_ptr: int) -> _Workspace:
        # Its own workspace per stream, sized once for its one plan: two streams running the plan
        # at once must not share partials and arrival counters. Each is kept while the SplitKV
        # lives, since a CUDA graph captured on that stream holds its addresses.
        key = (kind, device_id, stream_ptr)
        ws = self._workspaces.get(key)
        if ws is None:
            ws = self._workspaces[key] = _Workspace(kind, device_id).ensure(self.plan)
        return ws

    def run(self, q, k, v, kv_lens=None, *, sm_scale=None, out=None, lse=None):
        """Contiguous cache; `kv_lens` None or an int32 device array [batch] (values not checked here)."""
        return _launch(self.plan, q, k, v, kv_lens=kv_lens, paged=None, sm_scale=sm_scale, out=out,
                       lse=lse, workspace=self._workspace_for)

    def run_paged(self, q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, *,
                  sm_scale=None, out=None, lse=None):
        """Paged cache; the three index arrays as int32 device arrays (values not checked here)."""
        return _launch(self.plan, q, k_cache, v_cache, kv_lens=None,
                       paged=(kv_indptr, kv_indices, kv_last_page_len), sm_scale=sm_scale, out=out,
                       lse=lse, workspace=self._workspace_for)


def _expect_shape(a: rt.Device, name: str, template: str, expected: tuple) -> None:
    if a.shape == expected:
        return
    ok = len(a.shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, a.shape))
    if not ok:
        shown = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} must be {template} = [{shown}], got {a.shape}")


def _expect_index(x, name: str, length: int, device_id: int):
    if x is None:
        return None
    a = rt.device_array(x, name)
    if a.dtype != "int32":
        raise TypeError(f"{name} must be an int32 device array for SplitKV.run, got {a.dtype}")
    _expect_shape(a, name, "[n]", (length,) if length is not None else (None,))
    rt.require_contiguous(a, name)
    if a.device_id != device_id:
        raise ValueError(f"{name} must be on GPU {device_id}, got GPU {a.device_id}")
    return x


def _expect_output(x, name: str, template: str, shape: tuple, dtype: str, device_id: int) -> int:
    """The address of a caller's output array, checked: shape, dtype, contiguous, on the inputs' GPU."""
    a = rt.device_array(x, name)
    _expect_shape(a, name, template, shape)
    if a.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {a.dtype}")
    rt.require_contiguous(a, name)
    if a.device_id != device_id:
        raise ValueError(f"{name} must be on GPU {device_id}, got GPU {a.device_id}")
    return a.ptr


def _launch(plan, q, k, v, *, kv_lens, paged, sm_scale, out, lse, workspace):
    """Check shapes against the plan (metadata only: no synchronisation) and launch."""
    qa, ka, va = rt.device_array(q, "q"), rt.device_array(k, "k"), rt.device_array(v, "v")
    B, Hq, Hkv, D = plan.batch, plan.num_qo_heads, plan.num_kv_heads, plan.head_dim
    _expect_shape(qa, "q", "[batch, num_qo_heads, head_dim]", (B, Hq, D))
    if paged is None:
        _expect_shape(ka, "k", "[batch, kv_len, num_kv_heads, head_dim]", (B, None, Hkv, D))
    else:
        _expect_shape(ka, "k_cache", "[num_pages, page_size, num_kv_heads, head_dim]",
                      (None, plan.page_size, Hkv, D))
    _expect_shape(va, "v" if paged is None else "v_cache", "the shape of k", ka.shape)
    for name, a in (("q", qa), ("k", ka), ("v", va)):
        if a.dtype != plan.dtype:
            raise TypeError(f"{name} must be {plan.dtype} as planned, got {a.dtype}")
        rt.require_contiguous(a, name)
    device_id = qa.device_id
    if not device_id == ka.device_id == va.device_id:
        rt.require_same_device({"q": qa, "k": ka, "v": va})
    kind = qa.kind
    if paged is None:
        kv_len = ka.shape[1]
        if kv_lens is None and kv_len > plan.num_splits * plan.chunk_size:
            raise ValueError(
                f"k holds kv_len = {kv_len} tokens but the plan covers {plan.num_splits * plan.chunk_size}"
            )
        kv_lens = _expect_index(kv_lens, "kv_lens", B, device_id)
        indptr = indices = last = None
        num_pages, page_size = 0, 1
    else:
        kv_len = 0
        indptr = _expect_index(paged[0], "kv_indptr", B + 1, device_id)
        indices = _expect_index(paged[1], "kv_indices", None, device_id)
        last = _expect_index(paged[2], "kv_last_page_len", B, device_id)
        num_pages, page_size = ka.shape[0], plan.page_size
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    if not (isinstance(sm_scale, (int, float, np.floating, np.integer)) and math.isfinite(sm_scale)):
        raise ValueError(f"sm_scale must be a finite real number, got {sm_scale!r}")

    if out is None:
        out = rt.empty(kind, (B, Hq, D), plan.dtype, device_id)
        out_ptr = rt.address(out)
    else:
        out_ptr = _expect_output(out, "out", "[batch, num_qo_heads, head_dim]", (B, Hq, D), plan.dtype,
                                 device_id)
    if lse is None:
        lse = rt.empty(kind, (B, Hq), "float32", device_id)
        lse_ptr = rt.address(lse)
    else:
        lse_ptr = _expect_output(lse, "lse", "[batch, num_qo_heads]", (B, Hq), "float32", device_id)
    if B == 0:
        return out, lse

    stream_ptr = rt.current_stream_ptr(kind, device_id)
    ws = workspace(kind, device_id, stream_ptr) if plan.num_splits > 1 else None
    p_out, p_lse, counters = ws.pointers(plan) if ws is not None else (0, 0, 0)
    address = rt.address
    args = (
        qa.ptr, ka.ptr, va.ptr, address(kv_lens), address(indptr), address(indices), address(last),
        out_ptr, lse_ptr, p_out, p_lse, counters,
        B, kv_len, num_pages, page_size, Hq, Hkv, plan.head_groups, plan.chunk_size,
        sm_scale * _LOG2E,
    )
    _kernel(plan, paged is not None)(plan.grid, (NUM_WARPS * 32,), args, stream_ptr=stream_ptr,
                                     device_id=device_id)
    return out, lse


def _checked_plan(problem, lens_host, device_id: int, plan, num_splits, page_size: int) -> SplitKVPlan:
    """The caller's plan, or one made for this problem; either way it must cover every sequence."""
    if plan is None:
        max_len = int(lens_host.max()) if lens_host.size else 0
        plan = plan_split_kv(problem.batch, problem.num_qo_heads, problem.num_kv_heads,
                             problem.head_dim, max_len, dtype=problem.dtype, num_splits=num_splits,
                             num_sms=num_sms(device_id), page_size=page_size, gpu=device_gpu(device_id))
    elif num_splits is not None:
        raise ValueError("give either plan or num_splits, not both")
    if plan.page_size != page_size:
        raise ValueError(f"the plan is for page_size {plan.page_size}, the cache has {page_size}")
    covered = plan.num_splits * plan.chunk_size
    if int(lens_host.max(initial=0)) > covered:
        raise ValueError(f"sequences reach {int(lens_host.max())} tokens but the plan covers {covered}")
    return plan


def _stream_workspace(plan: SplitKVPlan):
    """The workspace argument of `_launch` for one-off calls: shared per stream, grown to the plan."""
    return lambda kind, device_id, stream_ptr: _shared_workspace(kind, device_id, stream_ptr).ensure(plan)


def split_kv(q, k, v, kv_lens=None, *, num_splits=None, plan=None, sm_scale=None, out=None, lse=None):
    """Attention of one query per sequence over a contiguous cache, the cache split along its length.

    q: [batch, num_qo_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads, head_dim]; kv_lens:
    optional [batch] valid lengths (host or device; read on the host to check them). `num_splits`
    None lets the plan choose from the cost model, 1 disables splitting. Returns (out, lse): out in
    q's dtype and kind, lse float32 (natural log).
    """
    qa = rt.device_array(q, "q")
    rt.device_array(k, "k")
    rt.device_array(v, "v")
    lens_host = rt.host_ints(kv_lens, "kv_lens")
    problem, lens_host = check_decode(q, k, v, lens_host, sm_scale=sm_scale, dtypes=rt.KERNEL_DTYPES)
    check_kernel_dtype_and_head_dim(problem.dtype, problem.head_dim)
    plan = _checked_plan(problem, lens_host, qa.device_id, plan, num_splits, 0)
    lens_dev = None if kv_lens is None else rt.device_int32(kv_lens, qa.kind, qa.device_id, "kv_lens")
    return _launch(plan, q, k, v, kv_lens=lens_dev, paged=None, sm_scale=problem.sm_scale, out=out,
                   lse=lse, workspace=_stream_workspace(plan))


def paged_split_kv(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, *, num_splits=None,
                   plan=None, sm_scale=None, out=None, lse=None):
    """The paged form of `split_kv`; see `gpukernels.paged_decode`."""
    qa = rt.device_array(q, "q")
    rt.device_array(k_cache, "k_cache")
    rt.device_array(v_cache, "v_cache")
    indptr_h = rt.host_ints(kv_indptr, "kv_indptr")
    indices_h = rt.host_ints(kv_indices, "kv_indices")
    last_h = rt.host_ints(kv_last_page_len, "kv_last_page_len")
    problem, lens_host = check_paged(q, k_cache, v_cache, indptr_h, indices_h, last_h,
                                     sm_scale=sm_scale, dtypes=rt.KERNEL_DTYPES)
    check_kernel_dtype_and_head_dim(problem.dtype, problem.head_dim)
    plan = _checked_plan(problem, lens_host, qa.device_id, plan, num_splits, problem.page_size)
    kind, dev = qa.kind, qa.device_id
    paged = (
        rt.device_int32(kv_indptr, kind, dev, "kv_indptr"),
        rt.device_int32(kv_indices if len(indices_h) else np.zeros(1, np.int64), kind, dev, "kv_indices"),
        rt.device_int32(kv_last_page_len, kind, dev, "kv_last_page_len"),
    )
    return _launch(plan, q, k_cache, v_cache, kv_lens=None, paged=paged, sm_scale=problem.sm_scale,
                   out=out, lse=lse, workspace=_stream_workspace(plan))
