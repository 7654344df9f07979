"""Roofline cost model of decode attention: plans (how a call is cut into blocks) and predictions
(bytes per tensor, FLOPs, blocks and waves, launches, bound, time) for every variant.

One module per variant (`split_kv`, `decode`, `paged_decode`, `merge_states`, `shared_prefix`,
`tree`, `span`), each with a `predict`; `sharded` predicts split_kv over a KV cache sharded along
its tokens over several GPUs (`plan_sharded`; `crossover_kv_len`, the context length below which
one GPU is faster; the collective's constants in `data/collectives.json`); `predict_row` predicts
a benchmark result row of any suite; `explain` ranks the variants for a workload; `papers`
reproduces the published claims; `accuracy` and `calibrate` hold the model to the committed
measurements. Predictions and explanations print as tables with units (`format_prediction`,
`format_explanation`) and render as HTML tables in a notebook. GPUs are named exactly
(`get_gpu`, `gpu_names`: the table in `data/gpus.json`); a plan made for a GPU takes its SM count.
"""

from .calibration import Calibration, load_calibration
from .display import format_explanation, format_prediction
from .explain import Explanation, Workload, explain
from .gpus import GPUSpec, get_gpu, gpu_names
from .prediction import Prediction
from .rows import UnsupportedRow, predict_row
from .sharded import (ShardedPlan, ShardedPrediction, ShardingTable, crossover_kv_len, plan_sharded,
                      sharding_table)
from .split_kv import SplitKVPlan, plan_split_kv

__all__ = [
    "Calibration",
    "Explanation",
    "GPUSpec",
    "Prediction",
    "ShardedPlan",
    "ShardedPrediction",
    "ShardingTable",
    "SplitKVPlan",
    "UnsupportedRow",
    "Workload",
    "crossover_kv_len",
    "explain",
    "format_explanation",
    "format_prediction",
    "get_gpu",
    "gpu_names",
    "load_calibration",
    "plan_sharded",
    "plan_split_kv",
    "predict_row",
    "sharding_table",
]
