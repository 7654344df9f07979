"""Pieces every reference is built from: the float64 upcast, softmax with its log-sum-exp, and
attention of query rows to one KV head's tokens, for one sequence or for many sequences at once.

Notation: Hq query heads, Hkv KV heads, G = Hq // Hkv query heads per KV head, D head dim,
L tokens. Query head h reads KV head h // G.

Non-finite input is never hidden (docs/design.md, "Non-finite inputs"). For one query row attending to
its tokens:

- a non-finite score among the attended ones (a NaN or infinity in q or in an attended key always
  gives one) makes that row's out and lse NaN;
- a NaN or infinity in an attended value v[l, d] makes out[..., d] NaN; the lse does not read v;
- tokens that are not attended are never read, whatever they hold;
- a row with nothing to attend to is the empty state, out = 0 and lse = -inf, whatever q holds.
"""

import numpy as np


def upcast(x) -> np.ndarray:
    """Any float array (float16, ml_dtypes bfloat16, float32, float64) as a float64 NumPy array."""
    return np.asarray(x).astype(np.float64)


def nan_unless_finite(x: np.ndarray) -> np.ndarray:
    """x with every infinity made NaN: an output computed from a non-finite value is NaN."""
    return np.where(np.isfinite(x), x, np.nan)


def softmax_with_lse(scores: np.ndarray, attended=None) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over the last axis and its log-sum-exp, computed around the row maximum.

        m = max_l s_l,   lse = m + log(sum_l exp(s_l - m)),   p_l = exp(s_l - lse)

    Only the entries where `attended` (bool, broadcast to scores; default all) is True take part;
    the others get p = 0 whatever they hold, NaN included. A row with nothing attended gets p = 0
    and lse = -inf. A row with a non-finite attended score (NaN, +inf or -inf) gets p = NaN and
    lse = NaN. Shapes: scores [..., L] -> probs [..., L], lse [...].
    """
    if attended is None:
        attended = np.ones(scores.shape, dtype=bool)
    attended = np.broadcast_to(attended, scores.shape)  # [..., L]
    poisoned = np.any(attended & ~np.isfinite(scores), axis=-1, keepdims=True)  # [..., 1]
    valid = attended & np.isfinite(scores)  # [..., L]
    masked = np.where(valid, scores, -np.inf)  # [..., L]: the rest weighs exactly 0 below
    row_max = np.max(masked, axis=-1, keepdims=True, initial=-np.inf)  # [..., 1]
    shift = np.where(np.isfinite(row_max), row_max, 0.0)  # empty rows: any finite shift will do
    weights = np.exp(masked - shift)  # [..., L]
    total = np.sum(weights, axis=-1, keepdims=True)  # [..., 1]; >= 1 unless the row is empty
    probs = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    with np.errstate(divide="ignore"):
        lse = shift + np.log(total)  # log(0) = -inf for empty rows
    probs = np.where(poisoned, np.nan, probs)
    lse = np.where(poisoned, np.nan, lse)
    return probs, lse[..., 0]


def attend_kv_head(q_rows: np.ndarray, k_head: np.ndarray, v_head: np.ndarray, sm_scale: float):
    """Query rows attend to the L tokens of one KV head, as one matrix product:

        S = sm_scale * Q K^T [R, L],   out = softmax(S) V [R, D],   lse = log sum_l exp(S[:, l])

    q_rows [R, D], k_head and v_head [L, D], any float dtype (upcast here, one head at a time, so
    a long cache never exists in float64 all at once) -> float64 out [R, D], lse [R].
    """
    q_rows = upcast(q_rows)  # [R, D]
    k_head, v_head = upcast(k_head), upcast(v_head)  # [L, D]
    with np.errstate(invalid="ignore"):  # inf - inf from non-finite input: NaN is the answer
        scores = (q_rows @ k_head.T) * sm_scale  # [R, L]
        probs, lse = softmax_with_lse(scores)  # [R, L], [R]
        out = nan_unless_finite(probs @ v_head)  # [R, D]
    return out, lse


def attend_shared(q: np.ndarray, k: np.ndarray, v: np.ndarray, sm_scale: float):
    """N sequences attend to one shared block of L tokens, as one matrix product per KV head.

    The queries of all N sequences and of all G heads of a group are rows of one matrix
    Q_j [N*G, D] for KV head j, so the block is read once for all of them:

        S_j = sm_scale * Q_j K_j^T [N*G, L],   O_j = softmax(S_j) V_j [N*G, D]

    q [N, Hq, D], k and v [L, Hkv, D] (any float dtype) -> float64 out [N, Hq, D], lse [N, Hq].
    """
    n, num_qo_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group_size = num_qo_heads // num_kv_heads
    out = np.empty((n, num_qo_heads, head_dim))  # [N, Hq, D]
    lse = np.empty((n, num_qo_heads))  # [N, Hq]
    for j in range(num_kv_heads):
        group = slice(j * group_size, (j + 1) * group_size)  # the query heads reading KV head j
        q_rows = np.asarray(q)[:, group].reshape(n * group_size, head_dim)  # [N*G, D]
        out_rows, lse_rows = attend_kv_head(q_rows, k[:, j], v[:, j], sm_scale)
        out[:, group] = out_rows.reshape(n, group_size, head_dim)
        lse[:, group] = lse_rows.reshape(n, group_size)
    return out, lse


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, sm_scale: float):
    """One sequence's query heads attend to L tokens:

        s[h, l] = sm_scale * <q[h], k[l, h // G]>
        out[h] = sum_l softmax(s[h])_l * v[l, h // G],   lse[h] = log sum_l exp(s[h, l])

    q [Hq, D], k and v [L, Hkv, D] (any float dtype) -> float64 out [Hq, D], lse [Hq]. The
    query heads of a group are rows of one matrix against their KV head (`attend_shared` with
    N = 1), so the KV heads are never repeated.
    """
    out, lse = attend_shared(np.asarray(q)[None], k, v, sm_scale)  # [1, Hq, D], [1, Hq]
    return out[0], lse[0]
