"""Attention with one prefix shared by every sequence and a suffix of each sequence's own.

Sequence b attends to the concatenation [prefix ; suffix_b[:suffix_lens[b]]]. The prefix's keys
and values are stored once. Two published ways to compute it, equal in exact arithmetic:

- "hydragen" (Juravsky et al., 2024): the prefix attention of all queries of all sequences is one
  matrix product per KV head; the suffix attention is decode per sequence; the two states are
  merged by LSE.
- "bifurcated" (Athiwaratkun et al., 2024): the prefix logits and the suffix logits are two
  einsums, ONE softmax runs over their concatenation, and two einsums form the output; no merge.

Example:
    >>> import numpy as np
    >>> from refattn import decode, shared_prefix
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((3, 4, 8))
    >>> k_prefix, v_prefix = rng.standard_normal((2, 20, 2, 8))
    >>> k_suffix, v_suffix = rng.standard_normal((2, 3, 5, 2, 8))
    >>> suffix_lens = np.array([5, 2, 0])
    >>> hyd = shared_prefix(q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens)
    >>> bif = shared_prefix(q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens,
    ...                     method="bifurcated")
    >>> k = np.concatenate([np.broadcast_to(k_prefix, (3, 20, 2, 8)), k_suffix], axis=1)
    >>> v = np.concatenate([np.broadcast_to(v_prefix, (3, 20, 2, 8)), v_suffix], axis=1)
    >>> whole = decode(q, k, v, 20 + suffix_lens)
    >>> bool(np.allclose(hyd[0], whole[0]) and np.allclose(bif[0], whole[0]))
    True
"""

import numpy as np

from decode_attention import contract

from ._common import attend_shared, nan_unless_finite, softmax_with_lse, upcast
from .decode import decode
from .merge_states import merge_states


def shared_prefix(q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens=None, *,
                  method="hydragen", sm_scale=None):
    """Attention of sequence b to [prefix ; first suffix_lens[b] tokens of its suffix]:

        s_pre[b, h, p] = sm_scale * <q[b, h], k_prefix[p, h // G]>
        s_suf[b, h, t] = sm_scale * <q[b, h], k_suffix[b, t, h // G]>          t < suffix_lens[b]
        out[b, h] = softmax([s_pre ; s_suf]) . [v_prefix ; v_suffix[b]]
        lse[b, h] = log (sum_p exp(s_pre) + sum_t exp(s_suf))

    method "hydragen" computes it as merge_states(prefix state, suffix state); "bifurcated" as one
    softmax over the concatenated logits (see the module docstring).

    q [batch, num_qo_heads, head_dim]; k_prefix, v_prefix [prefix_len, num_kv_heads, head_dim];
    k_suffix, v_suffix [batch, suffix_len, num_kv_heads, head_dim]; suffix_lens int [batch]
    (default: suffix_len). Returns float64 out [batch, num_qo_heads, head_dim] and
    lse [batch, num_qo_heads]; nothing to attend to gives out = 0, lse = -inf. Non-finite input
    as in `refattn.decode`, with both methods; suffix padding is never read.
    """
    problem, suffix_lens = contract.check_shared_prefix(
        q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens, sm_scale=sm_scale, method=method
    )
    if problem.method == "hydragen":
        return _hydragen(problem, q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens)
    return _bifurcated(problem, q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens)


def _hydragen(problem, q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens):
    # Prefix: every query row of every sequence against the prefix, one matrix product per KV head.
    prefix_out, prefix_lse = attend_shared(
        np.asarray(q), np.asarray(k_prefix), np.asarray(v_prefix), problem.sm_scale
    )  # [B, Hq, D], [B, Hq]
    # Suffix: each sequence against its own tokens.
    suffix_out, suffix_lse = decode(
        q, k_suffix, v_suffix, suffix_lens, sm_scale=problem.sm_scale
    )  # [B, Hq, D], [B, Hq]
    return merge_states(np.stack([prefix_out, suffix_out]), np.stack([prefix_lse, suffix_lse]))


def _bifurcated(problem, q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens):
    batch, hkv, g, d = problem.batch, problem.num_kv_heads, problem.group_size, problem.head_dim
    prefix_len = problem.prefix_len
    q_groups = upcast(q).reshape(batch, hkv, g, d)  # [B, Hkv, G, D]: head h = j * G + i
    k_prefix, v_prefix = upcast(k_prefix), upcast(v_prefix)  # [P, Hkv, D]
    k_suffix, v_suffix = upcast(k_suffix), upcast(v_suffix)  # [B, S, Hkv, D]
    logits_prefix = np.einsum("bjid,pjd->bjip", q_groups, k_prefix) * problem.sm_scale
    # logits_prefix: [B, Hkv, G, P]
    logits_suffix = np.einsum("bjid,btjd->bjit", q_groups, k_suffix) * problem.sm_scale
    # logits_suffix: [B, Hkv, G, S]
    attended = np.concatenate([
        np.ones((batch, prefix_len), dtype=bool),
        np.arange(problem.suffix_len)[None, :] < suffix_lens[:, None],
    ], axis=1)  # [B, P + S]: the prefix, then each sequence's own suffix tokens
    probs, lse = softmax_with_lse(
        np.concatenate([logits_prefix, logits_suffix], axis=-1), attended[:, None, None, :]
    )  # probs: [B, Hkv, G, P + S], exactly 0 on padding; lse: [B, Hkv, G]
    # Padding is never read: its values are replaced, not multiplied by 0 (they may be NaN).
    v_suffix = np.where(attended[:, prefix_len:, None, None], v_suffix, 0.0)  # [B, S, Hkv, D]
    with np.errstate(invalid="ignore"):  # inf - inf from non-finite input: NaN is the answer
        out = nan_unless_finite(
            np.einsum("bjip,pjd->bjid", probs[..., :prefix_len], v_prefix)
            + np.einsum("bjit,btjd->bjid", probs[..., prefix_len:], v_suffix)
        )  # [B, Hkv, G, D]
    return out.reshape(batch, problem.num_qo_heads, d), lse.reshape(batch, problem.num_qo_heads)
