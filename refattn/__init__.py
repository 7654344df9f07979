"""Exact NumPy references for decode-step attention: the specification the kernels are held to.

Every function takes the same positional arguments as its `gpukernels` counterpart, computes in
float64 and returns float64 `(out, lse)`.
"""

from .builders import (
    SPAN_PATTERNS,
    paged_from_contiguous,
    quest_block_scores,
    span_pattern,
    spans_from_block_scores,
    spans_from_mask,
    spans_from_sinks_window,
    tree_from_paths,
)
from .decode import decode
from .merge_states import merge_states
from .paged_decode import paged_decode
from .shared_prefix import shared_prefix
from .span import span
from .split_kv import DEFAULT_CHUNK_SIZE, split_kv
from .tree import tree

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SPAN_PATTERNS",
    "decode",
    "merge_states",
    "paged_decode",
    "paged_from_contiguous",
    "quest_block_scores",
    "shared_prefix",
    "span",
    "span_pattern",
    "spans_from_block_scores",
    "spans_from_mask",
    "spans_from_sinks_window",
    "split_kv",
    "tree",
    "tree_from_paths",
]
