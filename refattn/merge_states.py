"""Merging partial attention states (out, lse) over disjoint sets of tokens.

A state (o, l) for a token set T is the attention output over T and l = log sum_{t in T} exp(s_t).
The state of a disjoint union is the LSE-weighted mean of the parts:

    lse = log sum_i exp(l_i),   out = sum_i exp(l_i - lse) * o_i

The merge is associative and commutative, and the empty state (o = 0, l = -inf) is its identity,
so any split of a cache into chunks, merged in any order, gives the attention over the whole.

Example:
    >>> import numpy as np
    >>> from refattn import decode, merge_states
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 4, 8))
    >>> k, v = rng.standard_normal((2, 1, 12, 4, 8))
    >>> first = decode(q, k[:, :5], v[:, :5])
    >>> rest = decode(q, k[:, 5:], v[:, 5:])
    >>> out, lse = merge_states(np.stack([first[0], rest[0]]), np.stack([first[1], rest[1]]))
    >>> whole = decode(q, k, v)
    >>> bool(np.allclose(out, whole[0]) and np.allclose(lse, whole[1]))
    True
"""

import numpy as np

from decode_attention import contract

from ._common import nan_unless_finite, upcast


def merge_states(outs, lses):
    """Merge num_states partial states into one, per (sequence, head).

        m   = max_i lses[i]
        lse = m + log sum_i exp(lses[i] - m)
        out = sum_i exp(lses[i] - lse) * outs[i]

    States with lse = -inf are empty and contribute nothing, whatever their out holds; if every
    state is empty (or num_states = 0) the result is out = 0, lse = -inf.

    Non-finite input is never hidden: an lse of NaN or +inf in any state makes that (sequence,
    head)'s out and lse NaN; a NaN or infinity in outs[i, ..., d] of a non-empty state i makes
    the merged out[..., d] NaN.

    outs [num_states, batch, num_heads, head_dim] (any float dtype), lses [num_states, batch,
    num_heads] (float32 or float64). Returns float64 out [batch, num_heads, head_dim] and
    lse [batch, num_heads].
    """
    num_states, batch, num_heads, head_dim = contract.check_merge_states(outs, lses)
    outs, lses = upcast(outs), upcast(lses)  # outs: [N, B, H, D]; lses: [N, B, H]
    if num_states == 0:
        return np.zeros((batch, num_heads, head_dim)), np.full((batch, num_heads), -np.inf)
    poisoned = np.any(np.isnan(lses) | np.isposinf(lses), axis=0)  # [B, H]: made NaN at the end
    nonempty = np.isfinite(lses)  # [N, B, H]
    lses = np.where(nonempty, lses, -np.inf)  # a poisoned state weighs 0 until then
    lse_max = np.max(lses, axis=0)  # [B, H]
    shift = np.where(np.isfinite(lse_max), lse_max, 0.0)  # all-empty: avoid -inf - -inf
    weights = np.exp(lses - shift)  # [N, B, H]; empty states weigh exactly 0
    total = np.sum(weights, axis=0)  # [B, H]; >= 1 unless every state is empty
    # An empty state's out is ignored, not multiplied by 0 (it may hold anything, even NaN); a
    # non-empty one's is multiplied even by a weight that underflowed to 0, so NaN stays NaN.
    with np.errstate(invalid="ignore"):  # 0 * inf in a state's out: NaN is the answer
        weighted = np.where(nonempty[..., None], weights[..., None] * outs, 0.0)  # [N, B, H, D]
    out = np.divide(
        weighted.sum(axis=0), total[..., None],
        out=np.zeros((batch, num_heads, head_dim)), where=total[..., None] > 0,
    )  # [B, H, D]
    out = nan_unless_finite(out)
    with np.errstate(divide="ignore"):
        lse = shift + np.log(total)  # [B, H]; -inf where every state is empty
    out[poisoned] = np.nan
    lse[poisoned] = np.nan
    return out, lse
