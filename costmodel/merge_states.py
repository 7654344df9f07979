"""Merging attention states (out, lse) along their first axis: one block per (sequence, head).

The kernel reads every state's lse (for the running maximum), then every state's out row and its
weight, and writes the merged row and lse: a short, memory-bound launch whose time at decode
sizes is mostly the launch and one or two round trips.
"""

from __future__ import annotations

from dataclasses import dataclass

from .calibration import Calibration
from .gpus import GPUSpec
from .prediction import F32, Launch, Prediction, check_shape_fields, dtype_bytes, predict_launches

__all__ = ["MergeStatesShape", "predict", "merge_states_launch", "MERGE_BLOCKS_PER_SM"]

MERGE_BLOCKS_PER_SM = 16   # 128-thread blocks without shared memory: the thread limit decides


@dataclass(frozen=True)
class MergeStatesShape:
    num_states: int
    batch: int
    num_heads: int
    head_dim: int
    dtype: str = "float32"    # of the states' out and of the merged out; lse is float32

    def __post_init__(self):
        check_shape_fields(self, ("num_states", "batch", "num_heads", "head_dim"))
        dtype_bytes(self.dtype)


def merge_states_launch(shape: MergeStatesShape) -> Launch:
    elem = dtype_bytes(shape.dtype)
    rows = shape.batch * shape.num_heads
    n, d = shape.num_states, shape.head_dim
    block = n * (d * elem + F32) + d * elem + F32
    return Launch(
        name="merge_states",
        bytes_by_tensor={
            "states_out": n * rows * d * elem,
            "states_lse": n * rows * F32,
            "out": rows * d * elem,
            "lse": rows * F32,
        },
        block_runs=((block, 2, rows),),   # lse pass, then the weighted rows
        vector_flops=3 * n * rows * d,
        blocks_per_sm=MERGE_BLOCKS_PER_SM,
    )


def predict(shape: MergeStatesShape, *, gpu: "GPUSpec | str", calibration: Calibration | None = None) -> Prediction:
    if not isinstance(shape, MergeStatesShape):
        raise TypeError(f"shape must be a MergeStatesShape, got {type(shape).__name__}")
    return predict_launches("merge_states", [merge_states_launch(shape)], gpu=gpu, calibration=calibration)
