"""Roofline cost model of decode attention: plans (how a call is cut into blocks) and predictions
(bytes per tensor, FLOPs, blocks and waves, launches, bound, time) for every variant.

One module per variant (`split_kv`, `decode`, `paged_decode`, `merge_states`, `shared_prefix`,
`tree`, `span`), each with a `predict`; `predict_row` predicts a benchmark result row of any
suite; `explain` ranks the variants for a workload; `papers` reproduces the published claims;
`accuracy` and `calibrate` hold the model to the committed measurements.
"""

from .calibration import Calibration, load_calibration
from .explain import Workload, explain
from .gpus import GPUSpec, get_gpu
from .prediction import Prediction
from .rows import UnsupportedRow, predict_row
from .split_kv import SplitKVPlan, plan_split_kv

__all__ = [
    "Calibration",
    "GPUSpec",
    "Prediction",
    "SplitKVPlan",
    "UnsupportedRow",
    "Workload",
    "explain",
    "get_gpu",
    "load_calibration",
    "plan_split_kv",
    "predict_row",
]
