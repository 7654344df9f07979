"""The per-dtype error bounds, kept in the package (the GPU verification command uses them too)."""

from decode_attention.tolerances import LSE_ATOL, OUT_RTOL, lse_error, rel_error

__all__ = ["OUT_RTOL", "LSE_ATOL", "rel_error", "lse_error"]
