"""Flash-Decoding on the GPU: split the KV cache along its length, attend to the chunks in
parallel, merge the partial states in the same launch.

Two ways to call it:

* `split_kv(q, k, v, kv_lens)`: the simple way. The plan is made by the cost model once per shape
  (and length bucket) and cached, so repeated calls cost a dictionary lookup, not a plan.
* `SplitKV(plan).run(q, k, v, kv_lens)` runs a plan made once with `plan_split_kv(...)`, reusable
  across layers and steps. Given `out` and `lse` it allocates nothing, so it can be captured in a
  CUDA graph.

Which checks run where:

* On the host, before any launch, always: types, dtypes, shapes, contiguity, devices, sm_scale
  (TypeError / ValueError naming the argument).
* Index arrays given on the host (NumPy, lists): their values too, on the host (ValueError).
* Index arrays given on the GPU: never copied to the host, so no call synchronises. The kernel
  checks each sequence: a length outside [0, kv_len], pages outside kv_indices, a page index
  outside the cache or a kv_last_page_len outside [1, page_size] make that sequence's out and lse
  NaN, and nothing outside the arrays is read. `check_values=True` (one-shot calls) copies them
  to the host and raises instead.

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
from typing import NamedTuple

import numpy as np

from costmodel.split_kv import (HEADS_PER_BLOCK_CHOICES, NUM_WARPS, ROWS_PER_WARP_TILE, SplitKVPlan,
                                 pipeline_stage_bytes, pipeline_stages, uses_tensor_cores)
from costmodel.split_kv import plan_split_kv as _model_plan_split_kv
from decode_attention.contract import check_decode, check_kv_lens, check_paged, check_paged_layout

from . import _runtime as rt

__all__ = ["SplitKV", "split_kv", "plan_split_kv", "SplitKVPlan"]

_LOG2E = 1.4426950408889634


# float16/bfloat16 at TENSOR_CORE_HEAD_DIMS run on the tensor cores, the rest on the CUDA cores.
# Tiles each warp keeps in flight through shared memory there (pipeline_stages(head_dim, paged),
# with the other constants the plan and the kernels share in costmodel.split_kv). Head_dim 128,
# contiguous caches: 3 stages,
# two blocks per SM (96 KB each), with the plan choosing about one block per SM at batch 1.
# Measured on H100 with whole-row copies (us, stages/splits): 1 x 8 x 128k 4/8 193.2, 4/16 190.8,
# 3/16 186.9, 2/16 187.2; 1 x 32 x 32k 4/4 189.7, 3/4 187.7, 2/4 186.9; 8 x 8 x 32k 4/1 368.9,
# 3/2 357.7, 2/2 354.0; 64 x 8 x 16k 4/1 1400.9, 3/2 1390.6, 2/1 1397.5; 16 x 32 x 8k 4/1 704.9,
# 3/2 703.9, 2/1 725.1 (3 stages: never more than 1% from the best). Paged caches at head_dim
# 128 run 2 stages (see costmodel.split_kv.PIPELINE_STAGES_BY_HEAD_DIM for 2 against 3 since the
# page indices arrive through a ring of registers; before it, with each lane waiting on a
# page-table read one tile ahead, 3 stages measured 1083 against 981 us at 64 x 8 x 16k on H200).
# Two blocks per SM: at head_dim 128 the registers (188 per thread) hold two; forcing three (168
# registers) measured 1310 against 988 us at 64 x 8 x 16k on H200.


def dynamic_smem_bytes(dtype: str, head_dim: int, paged: bool = False, stages: int | None = None) -> int:
    """Shared memory of the tensor-core path: [stages][warps][16-byte slots per lane][32 lanes]."""
    if not uses_tensor_cores(dtype, head_dim):
        return 0
    return (stages or pipeline_stages(head_dim, paged)) * pipeline_stage_bytes(head_dim)


def name_expression(dtype: str, head_dim: int, heads_per_block: int, paged: bool,
                    stages: int | None = None, states: bool = False, windows: bool = False) -> str:
    """The kernel template instantiation for one key (also compiled by the CI compile check);
    `stages` overrides the tensor-core pipeline depth (for experiments); `states`: the tensor-core
    kernel that merges extra states into its outputs (`SplitKV.run`'s `states`); `windows`: the
    tensor-core kernel whose page table holds windows (`SplitKV.run_windows`), compiled apart so
    that its loop carries no page-table code (and the paged kernel's none of the windows')."""
    paged_arg = "true" if paged else "false"
    if windows and not paged:
        raise ValueError("windows are read through the paged kernel's table")
    if uses_tensor_cores(dtype, head_dim):
        flags = ", true, true" if windows and states else ", false, true" if windows else ", true" if states else ""
        return (
            f"decode_attention::split_kv_mma_kernel<{rt.C_TYPES[dtype]}, {head_dim}, {heads_per_block}, "
            f"{paged_arg}, {stages or pipeline_stages(head_dim, paged)}{flags}>"
        )
    if states or windows:
        raise ValueError("states and windows are read by the tensor-core kernels only (float16, bfloat16)")
    return (
        f"decode_attention::split_kv_kernel<{rt.C_TYPES[dtype]}, {head_dim}, {heads_per_block}, "
        f"{paged_arg}>"
    )


# Pipeline stages of the persistent kernel by head_dim (one block per item: pipeline_stages). Its
# copies run on through the items, so it needs no deeper pipeline to hide a block's start: on
# H200 (scripts/explore/persistent_items.py, logs/explore-persistent-items-stages-5-7.log) 5 stages
# against 6: 73.1 against 74.3 us at 64 x 16/16 heads x 64, 1000 tokens (bfloat16), 75.4 against
# 75.7 at 512 x 8/1 x 64, 2000 tokens, 147.1 against 147.4 at 96 x 40/8 x 64, 3000 tokens; 7
# stages (two blocks an SM, the L1 left to the copies 28 KB) 84.2, 81.6 and 167.5.
PERSISTENT_STAGES = {64: 5, 128: 2}


def persistent_name_expression(dtype: str, head_dim: int, heads_per_block: int, stages: int | None = None,
                               take: bool = False) -> str:
    """The persistent tensor-core kernel's instantiation (contiguous caches, one split); `stages`
    overrides the pipeline depth (for experiments); `take`: its blocks take their items from a
    counter (the launch beside a kernel)."""
    return (f"decode_attention::split_kv_mma_persistent_kernel<{rt.C_TYPES[dtype]}, {head_dim}, "
            f"{heads_per_block}, {stages or PERSISTENT_STAGES[head_dim]}{', true' if take else ''}>")


def all_name_expressions() -> list[str]:
    """Every instantiation the launchers can ask for."""
    return [
        name_expression(dtype, head_dim, g, paged)
        for dtype in rt.KERNEL_DTYPES
        for head_dim in rt.HEAD_DIMS
        for g in HEADS_PER_BLOCK_CHOICES
        for paged in (False, True)
    ] + [   # the tensor-core kernels' other forms: (paged, states, windows)
        name_expression(dtype, head_dim, g, paged, states=states, windows=windows)
        for dtype in rt.KERNEL_DTYPES
        for head_dim in rt.HEAD_DIMS
        for g in HEADS_PER_BLOCK_CHOICES
        for paged, states, windows in ((False, True, False), (True, True, False), (True, False, True), (True, True, True))
        if uses_tensor_cores(dtype, head_dim)
    ] + [
        persistent_name_expression(dtype, head_dim, g, take=take)
        for dtype in rt.KERNEL_DTYPES
        for head_dim in PERSISTENT_HEAD_DIMS
        for g in HEADS_PER_BLOCK_CHOICES
        for take in (False, True)
        if uses_tensor_cores(dtype, head_dim)
    ]


def _kernel(plan: SplitKVPlan, paged: bool, states: bool = False, windows: bool = False):
    return _kernel_for(plan.dtype, plan.head_dim, plan.heads_per_block, paged, states, windows)


# The kernels' arguments: q, k, v, kv_lens, kv_indptr, kv_indices, kv_last_page_len, out, lse,
# partial_out, partial_lse, counters; batch, kv_len, num_pages, page_size, num_qo_heads,
# num_kv_heads, head_groups, chunk_size; scale_log2; windows (kv_indices holds windows, see run_windows);
# extra_out, extra_lse, extra_count (states merged into each row's output, see `SplitKV.run`);
# late_states_blocks (with states, the first blocks, which wait for the states' kernel only at
# their end; without, the blocks that never wait for the kernel before: see `_launch`).
KERNEL_SIGNATURE = "p" * 12 + "i" * 8 + "f" + "i" + "ppi" + "i"
WINDOW_ROWS = ROWS_PER_WARP_TILE   # rows of a window at most (a warp tile of the tensor-core kernel)
WINDOW_LEN_BITS = 4  # an entry is (first row << WINDOW_LEN_BITS) | (rows - 1)


@functools.lru_cache(maxsize=None)
def _kernel_for(dtype: str, head_dim: int, heads_per_block: int, paged: bool, states: bool = False,
                windows: bool = False) -> rt.Kernel:
    """The compiled kernel of one key (its shared-memory limit is raised once per device)."""
    return rt.Kernel("split_kv", name_expression(dtype, head_dim, heads_per_block, paged, states=states,
                                                 windows=windows),
                     KERNEL_SIGNATURE, shared_mem=dynamic_smem_bytes(dtype, head_dim, paged))


# The persistent kernel (split_kv_mma_persistent_kernel) runs a plan of one split over a contiguous
# cache whose sequences all hold kv_len tokens (no lengths given) when its items (sequence, KV
# head, head group) outnumber the blocks the GPU holds at once: a grid of the resident blocks, each
# taking every G-th item (beside Hydragen's prefix pass: its next item from a counter, so that a
# block that starts late takes fewer) with its copies running on into the next item. With lengths given,
# the hardware's scheduling of one block per item balances ragged sequences instead. At head_dim 64: measured on H200 against one block per
# item (scripts/explore/persistent_items.py), 1.039x as fast at 64 x 16/16 heads x 1000 tokens,
# 1.007-1.009x on two other shapes; at head_dim 128, 0.981-1.004x on six shapes of 256 tokens and
# more at 3-5 stages, so there only for sequences of at most 128 tokens, at 2 stages (three blocks
# an SM; costmodel.split_kv.PERSISTENT_*, which the model uses and these must match). PERSISTENT:
# False runs every call one block per item (for comparisons).
PERSISTENT = True
PERSISTENT_HEAD_DIMS = (64, 128)
# The longest sequences the persistent kernel runs at a head_dim (none: any).
PERSISTENT_MAX_KV_LEN = {128: 128}
# Launches that merge states written by the kernel just before them (Hydragen's suffixes, the
# tree's own tokens) start their first wave while that kernel runs (`_launch`'s states_overlap).
# False: they wait for it at their start (for comparisons). Only launches of at most OVERLAP_WAVES
# waves: with more, the first wave, done with its tokens, holds its SMs waiting for the states while
# the later waves wait for those SMs, and the late loads of its states cost more than the overlap
# gains. Measured on H200 (Hydragen, 32 query heads, head_dim 128, call us overlapping / waiting;
# logs/explore-shared-prefix-parts-overlap.log): suffix launches of 128-1024 blocks (two blocks an
# SM: up to four waves) 1.9-4.4 us faster, or level; 2048 blocks level; 8192 blocks (32/32 heads x
# 256 sequences) 14.7 us slower.
STATES_OVERLAP = True
OVERLAP_WAVES = 4


@functools.lru_cache(maxsize=None)
def _persistent_kernel_for(dtype: str, head_dim: int, heads_per_block: int, take: bool = False) -> rt.Kernel:
    return rt.Kernel("split_kv", persistent_name_expression(dtype, head_dim, heads_per_block, take=take),
                     KERNEL_SIGNATURE,
                     shared_mem=dynamic_smem_bytes(dtype, head_dim, False, stages=PERSISTENT_STAGES[head_dim]))


def persistent_grid(plan: SplitKVPlan, device_id: int) -> "tuple[int, int, int] | None":
    """The persistent kernel's grid for `plan` on a contiguous cache without lengths, or None when
    the plan runs one block per item (split plans, other head dims or dtypes, or no more items than
    the GPU holds at once)."""
    return _persistent_grid(plan, device_id) if PERSISTENT else None


@functools.lru_cache(maxsize=1024)
def _persistent_grid(plan: SplitKVPlan, device_id: int) -> "tuple[int, int, int] | None":
    """persistent_grid's answer, once per plan and device (it sits on every launch's path)."""
    if not (plan.num_splits == 1 and plan.head_dim in PERSISTENT_HEAD_DIMS
            and plan.max_kv_len <= PERSISTENT_MAX_KV_LEN.get(plan.head_dim, plan.max_kv_len)
            and uses_tensor_cores(plan.dtype, plan.head_dim)):
        return None
    per_sm = _persistent_kernel_for(plan.dtype, plan.head_dim, plan.heads_per_block).resident_blocks(
        device_id, NUM_WARPS * 32)
    # As many blocks an SM as one block per item holds, or the persistent grid streams less at once.
    if per_sm < 1 or per_sm < _kernel(plan, False).resident_blocks(device_id, NUM_WARPS * 32):
        return None
    resident = per_sm * num_sms(device_id)
    return (1, resident, 1) if plan.seq_heads > resident else None


@functools.lru_cache(maxsize=None)
def num_sms(device_id: int) -> int:
    cp = rt.cupy()
    return int(cp.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)
def device_gpu(device_id: int):
    """The cost model's spec of this GPU (by name), or None when the model does not know it (asked
    of the driver once per device: the one-shot calls ask it)."""
    from costmodel.gpus import get_gpu  # noqa: PLC0415

    name = rt.cupy().cuda.runtime.getDeviceProperties(device_id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    try:
        return get_gpu(name)
    except (KeyError, ValueError):
        return None


def planning_gpu(gpu, num_sms):
    """The GPU a plan made without `gpu` or `num_sms` is for: the one this process runs on (its
    current device) where the cost model knows it, else None (the model's default, the H100: the
    H200 has as many SMs but not its memory, and a plan for one is slower on the other). Given
    either, `gpu` as given."""
    if gpu is not None or num_sms is not None or not rt.gpu_available():
        return gpu
    return device_gpu(rt.cupy().cuda.runtime.getDevice())


def plan_split_kv(batch: int, num_qo_heads: int, num_kv_heads: int, head_dim: int, max_kv_len: int, *,
                  num_sms: int | None = None, gpu=None, **options) -> SplitKVPlan:
    """`costmodel.split_kv.plan_split_kv` (the same arguments; made on the host), for the GPU this
    process runs on when neither `gpu` nor `num_sms` is given (`planning_gpu`)."""
    return _model_plan_split_kv(batch, num_qo_heads, num_kv_heads, head_dim, max_kv_len, num_sms=num_sms,
                                gpu=planning_gpu(gpu, num_sms), **options)


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
        # The persistent kernel's item counter (zero between launches, like the arrival counters).
        self.items = rt.empty(kind, (1,), "int32", device_id, zero=True)
        self.items_ptr = rt.address(self.items)
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

    def __init__(self, plan: SplitKVPlan, *, programmatic: bool = False):
        """`programmatic`: each launch may start while the kernel before it in the stream still
        runs (programmatic dependent launch, sm_90; its blocks read nothing until that kernel has
        finished), hiding the launch behind it. Off by default: behind PyTorch's kernels in a
        decode step it measured slower, not faster (docs/end-to-end.md)."""
        if not isinstance(plan, SplitKVPlan):
            raise TypeError(f"plan must be a SplitKVPlan, got {type(plan).__name__}")
        check_kernel_dtype_and_head_dim(plan.dtype, plan.head_dim)
        self.plan = plan
        self.programmatic = bool(programmatic)
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

    def run(self, q, k, v, kv_lens=None, *, sm_scale=None, out=None, lse=None, states=None):
        """Contiguous cache; `kv_lens` None or an int32 device array [batch] (values not checked here).

        `states`: None, or (states_out, states_lse), float32 device arrays [n, batch, num_qo_heads,
        head_dim] and [n, batch, num_qo_heads] (lse in natural log): n more attention states of
        every row, computed before this call in the same stream over other tokens, merged into its
        output by LSE in the same launch (out and lse are then the attention over this cache's
        tokens and the states' together). float16 and bfloat16 (the tensor-core kernels). Hydragen's
        suffix pass merges the prefix chunks so."""
        return _launch(self.plan, q, k, v, kv_lens=kv_lens, paged=None, sm_scale=sm_scale, out=out,
                       lse=lse, workspace=self._workspace_for, programmatic=self.programmatic, states=states)

    def run_paged(self, q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, *,
                  sm_scale=None, out=None, lse=None, states=None):
        """Paged cache; the three index arrays as int32 device arrays (values not checked here);
        `states` as for `run`."""
        return _launch(self.plan, q, k_cache, v_cache, kv_lens=None,
                       paged=(kv_indptr, kv_indices, kv_last_page_len), sm_scale=sm_scale, out=out,
                       lse=lse, workspace=self._workspace_for, programmatic=self.programmatic, states=states)

    def run_windows(self, q, k_rows, v_rows, kv_indptr, windows, kv_last_page_len, *, sm_scale=None,
                    out=None, lse=None, states=None):
        """A cache seen as rows, k_rows and v_rows [rows, num_kv_heads, head_dim], read by windows:
        sequence b's tokens are the windows windows[kv_indptr[b]:kv_indptr[b + 1]], each an int32
        (first row << WINDOW_LEN_BITS) | (row count - 1) of 1 to WINDOW_ROWS consecutive rows;
        kv_last_page_len is WINDOW_ROWS for a sequence with windows. The plan must be for pages of
        WINDOW_ROWS (a window is read as a page whose row count it carries) on the tensor-core path.
        Index arrays as int32 device arrays (values not checked here: a window outside the rows
        gives its sequence NaN); `states` as for `run`."""
        return _launch(self.plan, q, k_rows, v_rows, kv_lens=None,
                       paged=(kv_indptr, windows, kv_last_page_len), sm_scale=sm_scale, out=out,
                       lse=lse, workspace=self._workspace_for, windows=True, programmatic=self.programmatic,
                       states=states)


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
    a = x if isinstance(x, rt.Device) else rt.device_array(x, name)
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


def outputs(out, lse, kind: str, shape: tuple, dtype: str, device_id: int):
    """(out, lse, their addresses): the caller's arrays, checked, or new ones of the caller's kind;
    shape is (batch, num_qo_heads, head_dim)."""
    if out is None:
        out = rt.empty(kind, shape, dtype, device_id)
        out_ptr = rt.address(out)
    else:
        out_ptr = _expect_output(out, "out", "[batch, num_qo_heads, head_dim]", shape, dtype, device_id)
    if lse is None:
        lse = rt.empty(kind, shape[:2], "float32", device_id)
        lse_ptr = rt.address(lse)
    else:
        lse_ptr = _expect_output(lse, "lse", "[batch, num_qo_heads]", shape[:2], "float32", device_id)
    return out, lse, out_ptr, lse_ptr


def _launch(plan, q, k, v, *, kv_lens, paged, sm_scale, out, lse, workspace, views=None, windows=False,
            programmatic=False, states=None, states_overlap=False, beside=False, persistent=True):
    """Check shapes against the plan (metadata only: no synchronisation) and launch. `views`: the
    device views of q, k, v when the caller already made them; `programmatic`, `states`: see
    `SplitKV.run`. `states_overlap` (with `states`, for a launch right after the kernel that writes
    them, which lets it start early: Hydragen's prefix pass, the tree's segments): launched
    dependent on that kernel, the blocks of the first wave attend to their tokens while it runs and
    wait for it only before they merge its states; q, the cache and the tables must not be its
    outputs. `beside` (without `states`, for a launch right after a kernel whose outputs it does not
    read, which lets it start early: Hydragen's prefix pass before a merge launch): launched
    dependent on that kernel, every block but the last starts on the SMs it leaves free without
    waiting for it, the last waits for it (the persistent kernel's blocks: each at its end), so that
    the launch ends after it and the launch after this one sees its outputs. `persistent` False: one
    block per item even where the persistent kernel runs (`persistent_grid`)."""
    if views is None:
        qa, ka, va = rt.device_array(q, "q"), rt.device_array(k, "k"), rt.device_array(v, "v")
    else:
        qa, ka, va = views
    B, Hq, Hkv, D = plan.batch, plan.num_qo_heads, plan.num_kv_heads, plan.head_dim
    _expect_shape(qa, "q", "[batch, num_qo_heads, head_dim]", (B, Hq, D))
    if paged is None:
        _expect_shape(ka, "k", "[batch, kv_len, num_kv_heads, head_dim]", (B, None, Hkv, D))
    elif windows:
        if plan.page_size != WINDOW_ROWS or not uses_tensor_cores(plan.dtype, D):
            raise ValueError(f"windows need a plan for pages of {WINDOW_ROWS} on the tensor-core path "
                             f"(float16, bfloat16), got pages of {plan.page_size}, {plan.dtype}")
        _expect_shape(ka, "k_rows", "[rows, num_kv_heads, head_dim]", (None, Hkv, D))
    else:
        _expect_shape(ka, "k_cache", "[num_pages, page_size, num_kv_heads, head_dim]",
                      (None, plan.page_size, Hkv, D))
    _expect_shape(va, "v" if paged is None else "v_cache", "the shape of k", ka.shape)
    cache = "" if paged is None else "_rows" if windows else "_cache"
    for name, a in (("q", qa), (f"k{cache}", ka), (f"v{cache}", va)):
        if a.dtype != plan.dtype:
            raise TypeError(f"{name} must be {plan.dtype} as planned, got {a.dtype}")
        rt.require_rows(a, name)
    device_id = qa.device_id
    if not device_id == ka.device_id == va.device_id:
        rt.require_same_device({"q": qa, "k": ka, "v": va})
    kind = qa.kind
    if paged is None:
        kv_len = ka.shape[1]
        kv_lens = _expect_index(kv_lens, "kv_lens", B, device_id)
        indptr = indices = last = None
        num_pages, page_size = 0, 1
    else:
        indptr = _expect_index(paged[0], "kv_indptr", B + 1, device_id)
        indices = _expect_index(paged[1], "kv_indices", None, device_id)
        kv_len = _numel(indices)   # the kernel keeps every sequence's pages inside kv_indices
        last = _expect_index(paged[2], "kv_last_page_len", B, device_id)
        num_pages, page_size = ka.shape[0], plan.page_size   # windows: the rows of the cache
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    if not (isinstance(sm_scale, (int, float, np.floating, np.integer)) and math.isfinite(sm_scale)):
        raise ValueError(f"sm_scale must be a finite real number, got {sm_scale!r}")

    extra = _extra_states(states, plan, device_id)
    out, lse, out_ptr, lse_ptr = outputs(out, lse, kind, (B, Hq, D), plan.dtype, device_id)
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
        sm_scale * _LOG2E, int(windows), *extra, 0,
    )
    grid = (persistent_grid(plan, device_id) if persistent and paged is None and kv_lens is None and not extra[2]
            else None)
    if grid is not None:
        # Beside the kernel before, none of its blocks waits for it at its start (each at its end)
        # and they take their items from a counter of the workspace (blocks that start late take
        # fewer: the kernel's TAKE form); otherwise every grid-th item.
        items_ptr = (ws or workspace(kind, device_id, stream_ptr)).items_ptr if beside else 0
        args = args[:11] + (items_ptr,) + args[12:-1] + (1 if beside else 0,)
        _persistent_kernel_for(plan.dtype, D, plan.heads_per_block, beside)(
            grid, (NUM_WARPS * 32,), args, stream_ptr=stream_ptr, device_id=device_id,
            programmatic=programmatic or beside)
        return out, lse
    kernel = _kernel(plan, paged is not None, bool(extra[2]), windows)
    if beside and not extra[2]:
        args = args[:-1] + (math.prod(plan.grid) - 1,)   # all but the last block never wait
        programmatic = True
    elif states_overlap and extra[2] and STATES_OVERLAP:
        # The first wave: the blocks the SMs hold at once, in launch order.
        wave = kernel.resident_blocks(device_id, NUM_WARPS * 32) * num_sms(device_id)
        if math.prod(plan.grid) <= OVERLAP_WAVES * wave:
            args = args[:-1] + (wave,)
            programmatic = True
    kernel(plan.grid, (NUM_WARPS * 32,), args, stream_ptr=stream_ptr, device_id=device_id, programmatic=programmatic)
    return out, lse


class StatePointers(NamedTuple):
    """States for `SplitKV.run` given as the addresses of float32 arrays of the run's device
    ([count, batch, num_qo_heads, head_dim] and [count, batch, num_qo_heads]), unchecked: for
    callers that allocated them for the plan themselves (Hydragen's runner)."""

    out: int
    lse: int
    count: int


def _extra_states(states, plan: SplitKVPlan, device_id: int) -> tuple:
    """The kernels' (extra_out, extra_lse, extra_count) for `states` (see `SplitKV.run`), checked
    by their metadata."""
    if states is None:
        return (0, 0, 0)
    if not uses_tensor_cores(plan.dtype, plan.head_dim):
        raise TypeError(f"states are merged by the tensor-core kernels only (float16, bfloat16), got {plan.dtype}")
    if isinstance(states, StatePointers):
        return tuple(states)
    if not (isinstance(states, tuple) and len(states) == 2):
        raise TypeError(f"states must be a tuple (states_out, states_lse), got {type(states).__name__}")
    so, sl = (rt.device_array(x, name) for x, name in zip(states, ("states_out", "states_lse")))
    B, Hq, D = plan.batch, plan.num_qo_heads, plan.head_dim
    _expect_shape(so, "states_out", "[n, batch, num_qo_heads, head_dim]", (None, B, Hq, D))
    _expect_shape(sl, "states_lse", "[n, batch, num_qo_heads] like states_out", (so.shape[0], B, Hq))
    for a, name, require in ((so, "states_out", rt.require_rows),              # read as float4
                             (sl, "states_lse", rt.require_contiguous)):
        if a.dtype != "float32":
            raise TypeError(f"{name} must be float32, got {a.dtype}")
        require(a, name)
        if a.device_id != device_id:
            raise ValueError(f"{name} must be on GPU {device_id} like q, got GPU {a.device_id}")
    if so.shape[0] >= 2**31:
        raise ValueError(f"states must hold fewer than 2**31 states per row, got {so.shape[0]}")
    return (so.ptr, sl.ptr, so.shape[0])


def _length_bucket(n: int) -> int:
    """`n` rounded up to one of 8 lengths per octave (at least TILE_TOKENS apart): one-shot calls
    whose longest sequence grows by a token per step reuse one plan for a while."""
    if n <= 256:
        return max(n, 1)
    step = max(64, 1 << (n.bit_length() - 4))
    return -(-n // step) * step


@functools.lru_cache(maxsize=4096)
def _cached_plan(batch, num_qo_heads, num_kv_heads, head_dim, dtype, max_len, num_splits,
                 page_size, device_id) -> SplitKVPlan:
    """The cost model's plan for one key, made once (planning costs about a millisecond)."""
    return plan_split_kv(batch, num_qo_heads, num_kv_heads, head_dim, max_len, dtype=dtype,
                         num_splits=num_splits, num_sms=num_sms(device_id), page_size=page_size,
                         gpu=device_gpu(device_id))


def _one_shot_plan(problem, max_len: int, device_id: int, plan, num_splits, page_size: int) -> SplitKVPlan:
    """The caller's plan, or the cached one for this problem and length (lengths read on the host
    come rounded to their bucket). A plan works for any lengths (longer sequences get longer
    chunks); its max_kv_len only sets the split count."""
    if plan is None:
        return _cached_plan(problem.batch, problem.num_qo_heads, problem.num_kv_heads,
                            problem.head_dim, problem.dtype, max_len, num_splits, page_size, device_id)
    if num_splits is not None:
        raise ValueError("give either plan or num_splits, not both")
    if not isinstance(plan, SplitKVPlan):
        raise TypeError(f"plan must be a SplitKVPlan, got {type(plan).__name__}")
    if plan.page_size != page_size:
        raise ValueError(f"the plan is for page_size {plan.page_size}, the cache has {page_size}")
    return plan


def _stream_workspace(plan: SplitKVPlan):
    """The workspace argument of `_launch` for one-off calls: shared per stream, grown to the plan."""
    return lambda kind, device_id, stream_ptr: _shared_workspace(kind, device_id, stream_ptr).ensure(plan)


def _on_device(x) -> bool:
    return rt._kind(x) is not None


def _index_on_device(x, name: str, length, kind: str, device_id: int):
    """A caller's device index array as int32, checked by its metadata only (no copy to the host):
    integer dtype, [length], on the inputs' GPU. Converted on the device when not int32."""
    a = rt.device_array(x, name)
    if a.kind != kind:
        raise TypeError(f"{name} must be a {kind} array like q, got a {a.kind} array")
    if a.dtype not in ("int32", "int64", "int16", "int8", "uint8", "uint16", "uint32", "uint64"):
        raise TypeError(f"{name} must hold integers, got {a.dtype}")
    if length is not None and a.shape != (length,):
        raise ValueError(f"{name} must be [{'batch' if name != 'kv_indptr' else 'batch + 1'}] = "
                         f"({length},), got {a.shape}")
    if len(a.shape) != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if a.device_id != device_id:
        raise ValueError(f"{name} must be on GPU {device_id} like q, got GPU {a.device_id}")
    if a.dtype == "int32" and a.contiguous:
        return x
    return rt.to_int32_on_device(x, kind, device_id)


# Problems whose metadata was checked, by everything the checks read (shapes, dtypes, sm_scale) and
# the variant: repeated one-shot calls skip the checks they already passed.
_CHECKED: dict = {}


def checked_once(key, check):
    """`check()`'s result, computed once per `key` (a tuple of what the check reads, or None when it
    cannot be cached, e.g. an sm_scale of an unhashable or array type)."""
    if key is None:
        return check()
    problem = _CHECKED.get(key)
    if problem is None:
        problem = check()
        if len(_CHECKED) > 4096:
            _CHECKED.clear()
        _CHECKED[key] = problem
    return problem


def _checked_decode(qa, ka, va, q, k, v, sm_scale):
    def check():
        problem, _ = check_decode(q, k, v, None, sm_scale=sm_scale, dtypes=rt.KERNEL_DTYPES)
        check_kernel_dtype_and_head_dim(problem.dtype, problem.head_dim)
        return problem

    cacheable = sm_scale is None or type(sm_scale) in (float, int)
    key = ("decode", qa.shape, ka.shape, va.shape, qa.dtype, ka.dtype, va.dtype, sm_scale) if cacheable else None
    return checked_once(key, check)


def split_kv(q, k, v, kv_lens=None, *, num_splits=None, plan=None, sm_scale=None, out=None, lse=None,
             check_values=False):
    """Attention of one query per sequence over a contiguous cache, the cache split along its length.

    q: [batch, num_qo_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads, head_dim]; kv_lens:
    optional [batch] valid lengths. `num_splits` None lets the cost model choose (the plan is made
    once per shape and cached), 1 disables splitting. Returns (out, lse): out in q's dtype and kind,
    lse float32 (natural log).

    Checks: shapes, dtypes, devices and contiguity on the host before launch, always. kv_lens
    given on the host (NumPy, a list) is checked there too (ValueError for a length outside
    [0, kv_len]). kv_lens given on the GPU is not copied to the host (no synchronisation): the
    kernel checks it, and a sequence whose length lies outside [0, kv_len] gets out and lse NaN;
    `check_values=True` copies it to the host and raises instead. The split count is planned for
    the longest host length, or for kv_len when the lengths are on the GPU.
    """
    qa, ka, va = rt.device_array(q, "q"), rt.device_array(k, "k"), rt.device_array(v, "v")
    problem = _checked_decode(qa, ka, va, q, k, v, sm_scale)
    kind, device_id = qa.kind, qa.device_id
    if kv_lens is None:
        lens_dev, max_len = None, problem.kv_len
    elif _on_device(kv_lens) and not check_values:
        lens_dev = _index_on_device(kv_lens, "kv_lens", problem.batch, kind, device_id)
        max_len = problem.kv_len
    else:
        # the shapes were checked above: only the values are left
        lens_host = check_kv_lens(rt.host_ints(kv_lens, "kv_lens"), problem.batch, problem.kv_len)
        max_len = _length_bucket(int(lens_host.max(initial=0)))
        lens_dev = rt.device_int32(lens_host, kind, device_id, "kv_lens")
    plan = _one_shot_plan(problem, max_len, device_id, plan, num_splits, 0)
    return _launch(plan, q, k, v, kv_lens=lens_dev, paged=None, sm_scale=problem.sm_scale, out=out,
                   lse=lse, workspace=_stream_workspace(plan), views=(qa, ka, va))


def paged_split_kv(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, *, num_splits=None,
                   plan=None, sm_scale=None, out=None, lse=None, check_values=False):
    """The paged form of `split_kv`; see `gpukernels.paged_decode`.

    Index arrays on the host are checked there (ValueError before launch). Index arrays on the
    GPU are checked by the kernel without a copy to the host: a sequence whose pages lie outside
    kv_indices, whose page index is outside the cache, or whose kv_last_page_len is outside
    [1, page_size] gets out and lse NaN (`check_values=True` copies them to the host and raises
    instead). With the tables on the GPU the split count is planned for the average sequence
    (len(kv_indices) / batch pages).
    """
    qa = rt.device_array(q, "q")
    rt.device_array(k_cache, "k_cache")
    rt.device_array(v_cache, "v_cache")
    kind, dev = qa.kind, qa.device_id
    tables = (kv_indptr, kv_indices, kv_last_page_len)
    if all(_on_device(x) for x in tables) and not check_values:
        problem = check_paged_layout(q, k_cache, v_cache, sm_scale=sm_scale, dtypes=rt.KERNEL_DTYPES)
        check_kernel_dtype_and_head_dim(problem.dtype, problem.head_dim)
        B = problem.batch
        paged = (
            _index_on_device(kv_indptr, "kv_indptr", B + 1, kind, dev),
            _index_on_device(kv_indices, "kv_indices", None, kind, dev),
            _index_on_device(kv_last_page_len, "kv_last_page_len", B, kind, dev),
        )
        nnz = _numel(rt.device_array(paged[1], "kv_indices"))
        max_len = -(-nnz // max(B, 1)) * problem.page_size
    else:
        indptr_h = rt.host_ints(kv_indptr, "kv_indptr")
        indices_h = rt.host_ints(kv_indices, "kv_indices")
        last_h = rt.host_ints(kv_last_page_len, "kv_last_page_len")
        problem, lens_host = check_paged(q, k_cache, v_cache, indptr_h, indices_h, last_h,
                                         sm_scale=sm_scale, dtypes=rt.KERNEL_DTYPES)
        check_kernel_dtype_and_head_dim(problem.dtype, problem.head_dim)
        max_len = _length_bucket(int(lens_host.max(initial=0)))
        paged = (
            rt.device_int32(indptr_h, kind, dev, "kv_indptr"),
            rt.device_int32(indices_h if len(indices_h) else np.zeros(1, np.int64), kind, dev,
                            "kv_indices")[: len(indices_h)],
            rt.device_int32(last_h, kind, dev, "kv_last_page_len"),
        )
    plan = _one_shot_plan(problem, max_len, dev, plan, num_splits, problem.page_size)
    return _launch(plan, q, k_cache, v_cache, kv_lens=None, paged=paged, sm_scale=problem.sm_scale,
                   out=out, lse=lse, workspace=_stream_workspace(plan))
