"""Tree attention: each sequence's context is a path of shared segments (Hydragen's hierarchy).

Segments are blocks of tokens stored once, back to back in k_segs / v_segs; sequence b's context is
the concatenation of segments path_segs[path_indptr[b]:path_indptr[b+1]]. A segment read by many
sequences (a shared system prompt, a shared few-shot block, a shared question) is attended once for
all of them, as one matrix product, and each sequence merges its segments' states by LSE.

Example:
    >>> import numpy as np
    >>> from refattn import decode, tree, tree_from_paths
    >>> rng = np.random.default_rng(0)
    >>> seg_lens = [6, 3, 4, 2]                  # 0: root, 1 and 2: children of 0, 3: child of 1
    >>> ks = [rng.standard_normal((n, 1, 8)) for n in seg_lens]
    >>> vs = [rng.standard_normal((n, 1, 8)) for n in seg_lens]
    >>> paths = [[0, 1, 3], [0, 2], [0, 1]]
    >>> q = rng.standard_normal((3, 2, 8))
    >>> out, lse = tree(q, *tree_from_paths(ks, vs, paths))
    >>> k0 = np.concatenate([ks[s] for s in paths[0]])[None]   # [1, 11, 1, 8]
    >>> v0 = np.concatenate([vs[s] for s in paths[0]])[None]
    >>> bool(np.allclose(out[0], decode(q[:1], k0, v0)[0][0]))
    True
"""

import numpy as np

from decode_attention import contract

from ._common import attend_shared, upcast
from .merge_states import merge_states


def tree(q, k_segs, v_segs, seg_indptr, path_indptr, path_segs, *, sm_scale=None):
    """Attention of sequence b to the concatenation of the segments on its path.

        path_b    = path_segs[path_indptr[b]:path_indptr[b+1]]
        state(b, s) = attention of q[b] to segment s = tokens [seg_indptr[s], seg_indptr[s+1])
        out[b], lse[b] = merge_states([state(b, s) for s in path_b])

    Each segment is attended once, for all sequences whose path holds it, as one matrix product
    (see `refattn.shared_prefix`, method "hydragen"); a sequence's absent segments are empty
    states, the identity of the merge.

    q [batch, num_qo_heads, head_dim]; k_segs, v_segs [total_tokens, num_kv_heads, head_dim];
    seg_indptr int [num_segs+1]; path_indptr int [batch+1]; path_segs int [nnz].
    Returns float64 out [batch, num_qo_heads, head_dim], lse [batch, num_qo_heads]; an empty path
    gives out = 0, lse = -inf.
    """
    problem = contract.check_tree(
        q, k_segs, v_segs, seg_indptr, path_indptr, path_segs, sm_scale=sm_scale
    )
    seg_indptr = contract.as_index_array(seg_indptr, "seg_indptr")  # [num_segs+1]
    path_indptr = contract.as_index_array(path_indptr, "path_indptr")  # [B+1]
    path_segs = contract.as_index_array(path_segs, "path_segs")  # [nnz]
    q, k_segs, v_segs = upcast(q), upcast(k_segs), upcast(v_segs)  # [B, Hq, D], [T, Hkv, D]
    owner = np.repeat(np.arange(problem.batch), np.diff(path_indptr))  # [nnz] sequence of entry
    shape = (problem.num_segs, problem.batch, problem.num_qo_heads)
    outs = np.zeros(shape + (problem.head_dim,))  # [num_segs, B, Hq, D]
    lses = np.full(shape, -np.inf)  # [num_segs, B, Hq]; -inf: segment not on b's path
    for s in range(problem.num_segs):
        readers = owner[path_segs == s]  # sequences whose path holds segment s
        if readers.size == 0:
            continue
        tokens = slice(seg_indptr[s], seg_indptr[s + 1])
        outs[s, readers], lses[s, readers] = attend_shared(
            q[readers], k_segs[tokens], v_segs[tokens], problem.sm_scale
        )
    return merge_states(outs, lses)
