"""Pieces every reference is built from: the float64 upcast, softmax with its log-sum-exp, and
attention of one sequence's query heads (or of many sequences' query heads at once) to a block of
keys and values.

Notation: Hq query heads, Hkv KV heads, G = Hq // Hkv query heads per KV head, D head dim,
L tokens. Query head h reads KV head h // G.
"""

import numpy as np


def upcast(x) -> np.ndarray:
    """Any float array (float16, ml_dtypes bfloat16, float32, float64) as a float64 NumPy array."""
    return np.asarray(x).astype(np.float64)


def softmax_with_lse(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over the last axis and its log-sum-exp, computed around the row maximum.

        m = max_l s_l,   lse = m + log(sum_l exp(s_l - m)),   p_l = exp(s_l - lse)

    Entries of -inf are masked out. A row with no finite entry (or no entry at all) gets p = 0
    and lse = -inf. Shapes: scores [..., L] -> probs [..., L], lse [...].
    """
    if scores.shape[-1] == 0:
        row_max = np.full(scores.shape[:-1] + (1,), -np.inf)
    else:
        row_max = np.max(scores, axis=-1, keepdims=True)  # [..., 1]
    shift = np.where(np.isfinite(row_max), row_max, 0.0)  # empty rows: any finite shift will do
    weights = np.exp(scores - shift)  # [..., L]; masked entries give exactly 0
    total = np.sum(weights, axis=-1, keepdims=True)  # [..., 1]; >= 1 unless the row is empty
    probs = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    with np.errstate(divide="ignore"):
        lse = shift + np.log(total)  # log(0) = -inf for empty rows
    return probs, lse[..., 0]


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, sm_scale: float):
    """One sequence's query heads attend to L tokens.

        s[h, l] = sm_scale * <q[h], k[l, h // G]>
        out[h] = sum_l softmax(s[h])_l * v[l, h // G],   lse[h] = log sum_l exp(s[h, l])

    q [Hq, D], k and v [L, Hkv, D] (float64) -> out [Hq, D], lse [Hq].
    """
    group_size = q.shape[0] // k.shape[1]
    k_per_head = np.repeat(k, group_size, axis=1)  # [L, Hq, D]: head h holds KV head h // G
    v_per_head = np.repeat(v, group_size, axis=1)  # [L, Hq, D]
    scores = np.einsum("hd,lhd->hl", q, k_per_head) * sm_scale  # [Hq, L]
    probs, lse = softmax_with_lse(scores)  # [Hq, L], [Hq]
    out = np.einsum("hl,lhd->hd", probs, v_per_head)  # [Hq, D]
    return out, lse


def attend_shared(q: np.ndarray, k: np.ndarray, v: np.ndarray, sm_scale: float):
    """N sequences attend to one shared block of L tokens, as one matrix product per KV head.

    The queries of all N sequences and of all G heads of a group are rows of one matrix
    Q_j [N*G, D] for KV head j, so the block is read once for all of them:

        S_j = sm_scale * Q_j K_j^T [N*G, L],   O_j = softmax(S_j) V_j [N*G, D]

    q [N, Hq, D], k and v [L, Hkv, D] (float64) -> out [N, Hq, D], lse [N, Hq].
    """
    n, num_qo_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group_size = num_qo_heads // num_kv_heads
    q_rows = (
        q.reshape(n, num_kv_heads, group_size, head_dim)  # [N, Hkv, G, D]
        .transpose(1, 0, 2, 3)  # [Hkv, N, G, D]
        .reshape(num_kv_heads, n * group_size, head_dim)  # [Hkv, N*G, D]
    )
    k_heads = k.transpose(1, 0, 2)  # [Hkv, L, D]
    v_heads = v.transpose(1, 0, 2)  # [Hkv, L, D]
    scores = (q_rows @ k_heads.transpose(0, 2, 1)) * sm_scale  # [Hkv, N*G, L]
    probs, lse = softmax_with_lse(scores)  # [Hkv, N*G, L], [Hkv, N*G]
    out_rows = probs @ v_heads  # [Hkv, N*G, D]
    out = (
        out_rows.reshape(num_kv_heads, n, group_size, head_dim)
        .transpose(1, 0, 2, 3)
        .reshape(n, num_qo_heads, head_dim)
    )  # [N, Hq, D]
    lse = lse.reshape(num_kv_heads, n, group_size).transpose(1, 0, 2).reshape(n, num_qo_heads)
    return out, lse
