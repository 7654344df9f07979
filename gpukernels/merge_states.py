"""Merge partial attention states (out, lse) with the associative log-sum-exp merge, on the GPU."""

from __future__ import annotations

import functools

from decode_attention.contract import check_merge_states

from . import _runtime as rt

__all__ = ["merge_states"]

_THREADS = 128


# The kernel's arguments: outs, lses, out, lse; num_states (int32), rows (int64), head_dim (int32).
MERGE_SIGNATURE = "ppppiqi"


@functools.lru_cache(maxsize=None)
def _kernel(dtype: str) -> rt.Kernel:
    return rt.Kernel("merge_states", f"decode_attention::merge_states_kernel<{rt.C_TYPES[dtype]}>",
                     MERGE_SIGNATURE)


def merge_states(outs, lses):
    """outs: [num_states, batch, num_heads, head_dim] (float16, bfloat16 or float32); lses:
    [num_states, batch, num_heads] float32, natural log. Returns (out, lse): out in outs' dtype,
    lse float32. Empty states (lse = -inf) are the identity; all empty gives out = 0, lse = -inf.
    """
    oa, la = rt.device_array(outs, "outs"), rt.device_array(lses, "lses")
    num_states, batch, heads, head_dim = check_merge_states(outs, lses, dtypes=rt.KERNEL_DTYPES)
    if la.dtype != "float32":
        raise TypeError(f"lses must be float32 for the GPU kernel, got {la.dtype}")
    rt.require_contiguous(oa, "outs")
    rt.require_contiguous(la, "lses")
    device_id = rt.require_same_device({"outs": oa, "lses": la})
    out = rt.empty(oa.kind, (batch, heads, head_dim), oa.dtype, device_id)
    lse = rt.empty(oa.kind, (batch, heads), "float32", device_id)
    rows = batch * heads
    if rows == 0:
        return out, lse
    args = (oa.ptr, la.ptr, rt.address(out), rt.address(lse), num_states, rows, head_dim)
    _kernel(oa.dtype)((rows,), (_THREADS,), args, stream_ptr=rt.current_stream_ptr(oa.kind, device_id),
                      device_id=device_id)
    return out, lse
