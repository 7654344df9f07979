"""CuPy CUDA kernels for decode attention; imports without a GPU, compiles on first use."""

from .decode import decode
from .merge_states import merge_states
from .paged_decode import paged_decode
from .sharded import (CupyNcclCollective, InProcessCollective, ShardedDecode, ShardPlacement,
                      TorchCollective, sharded_paged_decode, sharded_span, sharded_split_kv)
from .shared_prefix import SharedPrefix, SharedPrefixPlan, plan_shared_prefix, shared_prefix
from .span import Span, SpanPlan, plan_span, span
from .split_kv import SplitKV, SplitKVPlan, plan_split_kv, split_kv
from .tree import tree
from ._runtime import gpu_available

__all__ = [
    "decode", "split_kv", "merge_states", "paged_decode", "SplitKV", "SplitKVPlan", "plan_split_kv",
    "gpu_available", "ShardPlacement", "sharded_split_kv", "sharded_paged_decode", "sharded_span", "ShardedDecode",
    "TorchCollective", "CupyNcclCollective", "InProcessCollective", "shared_prefix", "SharedPrefix",
    "SharedPrefixPlan", "plan_shared_prefix", "tree", "span",
    "Span", "SpanPlan", "plan_span",
]
