"""Error bounds per input dtype, in one place.

Every comparison against the float64 reference uses `rel_error` (Frobenius norm of the difference
over the norm of the reference) and the bound for the inputs' dtype. The low-precision bounds cover
rounding the inputs' own products and the output cast; float32 accumulation keeps the rest small.
"""

import numpy as np

# dtype name -> bound on ||out - ref|| / ||ref|| for the output, and absolute bound on lse.
OUT_RTOL = {
    "float64": 1e-12,
    "float32": 2e-5,
    "float16": 2e-3,
    "bfloat16": 1.6e-2,
}
LSE_ATOL = {
    "float64": 1e-10,
    "float32": 1e-4,
    "float16": 2e-3,
    "bfloat16": 1.6e-2,
}


def rel_error(out, ref) -> float:
    """||out - ref|| / ||ref|| over finite reference entries; NaN anywhere in `out` gives inf."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: {out.shape} vs {ref.shape}")
    if not np.all(np.isfinite(out)):
        return float("inf")
    denom = np.linalg.norm(ref)
    diff = np.linalg.norm(out - ref)
    if denom == 0.0:
        return float(diff)
    return float(diff / denom)


def lse_error(lse, ref) -> float:
    """Max |lse - ref| where the reference is finite; -inf must match -inf exactly."""
    lse = np.asarray(lse, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    empty = np.isneginf(ref)
    if not np.array_equal(np.isneginf(lse), empty):
        return float("inf")
    if np.any(np.isnan(lse)):
        return float("inf")
    if np.all(empty):
        return 0.0
    return float(np.max(np.abs(lse[~empty] - ref[~empty])))
