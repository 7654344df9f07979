"""Unsplit decode: the split-KV plan with one split, one block per (sequence, KV head, head group).

Each block streams its sequence's whole K/V for one KV head and writes the output directly, so
there is no partial traffic and no merge, but only batch * num_kv_heads * head_groups blocks: at
small batch most SMs idle, which is what `split_kv` fixes.
"""

from __future__ import annotations

from .calibration import Calibration
from .gpus import GPUSpec
from .prediction import Prediction
from .split_kv import SplitKVPlan, plan_split_kv
from .split_kv import predict as _predict_split_kv

__all__ = ["plan_decode", "predict"]


def plan_decode(
    batch: int,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_kv_len: int,
    *,
    dtype: str = "float16",
    num_sms: int | None = None,
    page_size: int = 0,
    gpu: "GPUSpec | str | None" = None,
) -> SplitKVPlan:
    """The unsplit plan; `gpu` and `num_sms` as in `plan_split_kv` (the plan takes the GPU's SM
    count)."""
    return plan_split_kv(batch, num_qo_heads, num_kv_heads, head_dim, max_kv_len, dtype=dtype,
                         num_splits=1, num_sms=num_sms, page_size=page_size, gpu=gpu)


def predict(
    plan: SplitKVPlan, *, kv_lens=None, gpu: "GPUSpec | str", calibration: Calibration | None = None
) -> Prediction:
    """Prediction for an unsplit plan (`plan.num_splits == 1`)."""
    if not isinstance(plan, SplitKVPlan):
        raise TypeError(f"plan must be a SplitKVPlan, got {type(plan).__name__}")
    if plan.num_splits != 1:
        raise ValueError(f"decode runs unsplit plans; this plan has num_splits = {plan.num_splits}")
    variant = "paged_decode" if plan.page_size else "decode"
    return _predict_split_kv(plan, kv_lens=kv_lens, gpu=gpu, calibration=calibration, variant=variant)
