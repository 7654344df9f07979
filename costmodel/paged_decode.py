"""Decode over a paged KV cache: the split-KV schedule, rows gathered through the page table.

The plan is a `SplitKVPlan` with `page_size > 0`. Bytes are those of the contiguous schedule plus
the page-table entries read; each page-table lookup is a dependent load before the rows it points
at can be fetched, which the model charges as `page_lookup_bytes` of equivalent traffic (fitted
on paged results; small pages mean many lookups per byte).
"""

from __future__ import annotations

import numpy as np

from decode_attention.contract import as_index_array, check_positive_int

from .calibration import Calibration
from .gpus import GPUSpec
from .prediction import Prediction
from .split_kv import SplitKVPlan, plan_split_kv
from .split_kv import predict as _predict_split_kv

__all__ = ["plan_paged_decode", "predict", "kv_lens_from_pages"]


def plan_paged_decode(
    batch: int,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_kv_len: int,
    *,
    page_size: int,
    dtype: str = "float16",
    num_splits: int | None = None,
    num_sms: int | None = None,
    gpu: "GPUSpec | str | None" = None,
) -> SplitKVPlan:
    """The split-KV plan over pages of `page_size` tokens; `gpu` and `num_sms` as in
    `plan_split_kv` (the plan takes the GPU's SM count)."""
    page_size = check_positive_int(page_size, "page_size")
    return plan_split_kv(batch, num_qo_heads, num_kv_heads, head_dim, max_kv_len, dtype=dtype,
                         num_splits=num_splits, num_sms=num_sms, page_size=page_size, gpu=gpu)


def kv_lens_from_pages(kv_indptr, kv_last_page_len, page_size: int) -> np.ndarray:
    """Tokens per sequence of a page table: full pages plus the filled part of the last one."""
    indptr = as_index_array(kv_indptr, "kv_indptr")
    last = as_index_array(kv_last_page_len, "kv_last_page_len")
    page_size = check_positive_int(page_size, "page_size")
    pages = np.diff(indptr)
    return np.where(pages > 0, (pages - 1) * page_size + last, 0)


def predict(
    plan: SplitKVPlan, *, kv_lens=None, gpu: "GPUSpec | str", calibration: Calibration | None = None
) -> Prediction:
    if not isinstance(plan, SplitKVPlan):
        raise TypeError(f"plan must be a SplitKVPlan, got {type(plan).__name__}")
    if plan.page_size < 1:
        raise ValueError("paged_decode needs a plan with page_size >= 1")
    return _predict_split_kv(plan, kv_lens=kv_lens, gpu=gpu, calibration=calibration,
                             variant="paged_decode")
