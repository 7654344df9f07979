"""A CPU twin of the decode kernels: runs a `SplitKVPlan` exactly as the GPU does.

The twin walks the same blocks, splits and warp tiles as `gpukernels`' decode kernels and does the
same float32 arithmetic on the same upcast inputs, so tests on a machine with no GPU check the
schedule the GPU runs, and `traffic` counts the bytes of that schedule rather than of an idealized
one.

Schedule of one call (names from `costmodel.split_kv`):

* One block per (split s, sequence b, KV head kh, head group hg). It serves the query heads
  `h = kh * group_size + hg * heads_per_block + i` for the `i < heads_per_block` that stay inside
  the group, and reads each K/V row of its split once for all of them. With
  `S = plan.splits_for(kv_len)` splits, split s takes the tiles of TILE_TOKENS rows numbered
  s, s + S, s + 2S, ... (`plan.split_rows(kv_len)[s]`). Blocks with `s >= S` exit at once.
* Warp w of the block takes warp tiles i = 0, 1, ...: rows
  `[(s + i * S) * TILE_TOKENS + w * 16, +16)` clipped to kv_len, and keeps one online-softmax
  state per served head, in base 2 (log2(e) folded into the scale)::

      score_j = dot(q_h, k_j) * scale_log2           scale_log2 = float32(sm_scale * log2(e))
      m_new   = max(m, max_j score_j)
      alpha   = exp2(m - m_new)                      (0 while the state is empty, m = -inf)
      l       = l * alpha + sum_j exp2(score_j - m_new)
      o       = o * alpha + sum_j exp2(score_j - m_new) * v_j

* The NUM_WARPS warp states are merged in warp order; an empty state is the identity.
* One split: `out = o / l` cast to q's dtype, `lse = (m + log2(l)) * ln(2)` in float32.
  More splits: every block writes a float32 partial `(o / l, lse)`; the last block merges the
  partials of splits `0 .. splits_for(kv_len) - 1` in split order, MERGE_BATCH at a time, with a
  running max of their natural-log LSEs and weights `exp2((lse - max) * log2(e))`.
  An empty sequence gives `out = 0`, `lse = -inf`.

Non-finite input is never hidden (docs/design.md, "Non-finite inputs"), so the twin does what the kernels must, and what
CUDA's `fmaxf` would not (it returns the other operand when one is NaN, so a NaN score would drop
out of the running max and a -inf score would pass for a masked token):

* a score that is not finite (a NaN or infinity in q or in an attended K row always gives one) is
  made NaN, and every running max propagates NaN (`_max_or_nan`), so the state of that head, and
  its `out` and `lse`, become NaN;
* a NaN or infinity in an attended V row reaches `o` unchanged; an output element that is not
  finite is written as NaN (`out[d]`, in the block's normalization and after the split merge);
* a partial `lse` that is NaN poisons the merge the same way; in `simulate_merge_states` an lse of
  NaN or +inf makes that head's `out` and `lse` NaN, an lse of -inf is the empty state (identity);
* rows past a sequence's length are never read, and an empty sequence gives `out = 0`,
  `lse = -inf` whatever q holds.

Every value is float32, as on the GPU; the inputs are upcast from float16, bfloat16 or float32
before entering numba, which has no bfloat16.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from costmodel.split_kv import MERGE_BATCH, NUM_WARPS, TILE_TOKENS, SplitKVPlan
from decode_attention import contract

__all__ = [
    "ROWS_PER_WARP_TILE",
    "simulate_split_kv",
    "simulate_paged_decode",
    "simulate_merge_states",
    "block_tiles",
    "traffic",
]

ROWS_PER_WARP_TILE = TILE_TOKENS // NUM_WARPS  # K/V rows one warp scores per step

LOG2E = 1.4426950408889634
_LN2 = np.float32(math.log(2.0))
_NEG_INF = np.float32(-np.inf)
_POS_INF = np.float32(np.inf)
_NAN = np.float32(np.nan)
_ZERO = np.float32(0.0)

# The kernels' input dtypes (a plan names its dtype) and their sizes; float64 is not one of them.
ELEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
KERNEL_DTYPES = tuple(ELEM_BYTES)


# ---------------------------------------------------------------------------------------------
# The schedule: which rows a block and a warp touch. Shared by the simulator and `traffic`.
# ---------------------------------------------------------------------------------------------

@njit(cache=True)
def _splits_for(kv_len, chunk_size, num_splits):
    """Splits that hold tokens of a sequence (at least one, even when empty; at most the grid's,
    so a sequence longer than the plan's max_kv_len gets longer chunks); as the plan's."""
    return min(num_splits, max(1, (kv_len + chunk_size - 1) // chunk_size))


@njit(cache=True)
def _warp_tile(s, splits, kv_len, w, i):
    """[start, end) rows of warp w's i-th tile in split s of `splits`; empty once past kv_len."""
    start = (s + i * splits) * TILE_TOKENS + w * ROWS_PER_WARP_TILE
    return start, min(start + ROWS_PER_WARP_TILE, kv_len)


@njit(cache=True)
def _heads_served(hg, heads_per_block, group_size):
    """Query heads of its group that head group hg serves (the last group may be partial)."""
    return min(heads_per_block, group_size - hg * heads_per_block)


@njit(cache=True)
def _kv_row(b, t, seq_stride, page_size, kv_indptr, kv_indices):
    """Row of the flattened K/V store holding token t of sequence b."""
    if page_size == 0:
        return b * seq_stride + t
    return kv_indices[kv_indptr[b] + t // page_size] * page_size + t % page_size


# ---------------------------------------------------------------------------------------------
# float32 arithmetic of one block.
# ---------------------------------------------------------------------------------------------

@njit(cache=True)
def _max_or_nan(a, b):
    """max(a, b), NaN if either is NaN: a NaN must poison the running max, not drop out of it
    (CUDA's fmaxf, and Python's max with the NaN second, would return the other operand)."""
    if math.isnan(a) or math.isnan(b):
        return _NAN
    return a if a >= b else b


@njit(cache=True)
def _nan_unless_finite(x):
    """An output element computed from a non-finite value is written as NaN, never as +-inf."""
    return x if math.isfinite(x) else _NAN


@njit(cache=True)
def _merge_base2(m1, l1, o1, m2, l2, o2):
    """Fold state 2 into state 1 (base-2 running max m, sum l, unnormalized o); returns (m, l)."""
    if m2 == _NEG_INF:
        return m1, l1
    if m1 == _NEG_INF:
        o1[:] = o2
        return m2, l2
    m = _max_or_nan(m1, m2)  # a poisoned (NaN) warp state poisons the merge
    a1 = np.exp2(m1 - m)
    a2 = np.exp2(m2 - m)
    for d in range(o1.shape[0]):
        o1[d] = o1[d] * a1 + o2[d] * a2
    return m, l1 * a1 + l2 * a2


@njit(cache=True)
def _merge_lse(o1, lse1, o2, lse2):
    """Fold the normalized state (o2, lse2) into (o1, lse1), natural log; returns the new lse.
    An lse2 of -inf is the empty state; NaN or +inf (in either) gives out = NaN, lse = NaN."""
    if lse2 == _NEG_INF:
        return lse1
    if math.isnan(lse1) or math.isnan(lse2) or lse2 == _POS_INF:
        o1[:] = _NAN
        return _NAN
    if lse1 == _NEG_INF:
        o1[:] = o2
        return lse2
    mx = max(lse1, lse2)
    lse = mx + np.log(np.exp(lse1 - mx) + np.exp(lse2 - mx))
    w1 = np.exp(lse1 - lse)
    w2 = np.exp(lse2 - lse)
    for d in range(o1.shape[0]):
        o1[d] = o1[d] * w1 + o2[d] * w2
    return lse


_LOG2E32 = np.float32(LOG2E)


@njit(cache=True)
def _merge_splits(outs, lses, b, h, num_states, out):
    """The merging block's merge of (b, h): splits in order, MERGE_BATCH at a time, a running max
    over the natural-log lse and float32 weights exp2((lse - max) * log2(e)); returns the lse."""
    acc = np.zeros(out.shape[0], dtype=np.float32)
    m_run = _NEG_INF
    w_sum = _ZERO
    for s0 in range(0, num_states, MERGE_BATCH):
        top = min(s0 + MERGE_BATCH, num_states)
        m_new = m_run
        for s in range(s0, top):
            m_new = _max_or_nan(m_new, lses[s, b, h])  # a NaN partial poisons the merge
        if m_new == _NEG_INF:
            continue
        a = _ZERO if m_run == _NEG_INF else np.exp2((m_run - m_new) * _LOG2E32)
        w_sum *= a
        acc *= a
        for s in range(s0, top):
            ls = lses[s, b, h]
            w = _ZERO if ls == _NEG_INF else np.exp2((ls - m_new) * _LOG2E32)
            w_sum += w
            for d in range(acc.shape[0]):
                acc[d] += w * outs[s, b, h, d]
        m_run = m_new
    if m_run == _NEG_INF:  # every split empty
        out[:] = _ZERO
        return _NEG_INF
    inv = np.float32(1.0) / w_sum  # w_sum >= 1 (the max split weighs 1), or NaN if poisoned
    for d in range(out.shape[0]):
        out[d] = _nan_unless_finite(acc[d] * inv)
    return m_run + np.log2(w_sum) * _LN2


@njit(cache=True)
def _run_block(q, k, v, b, h0, served, kh, s, splits, kv_len, scale_log2,
               seq_stride, page_size, kv_indptr, kv_indices, m, l, o):
    """One block: heads h0 .. h0+served-1 of sequence b over split s of `splits` -> merged (m, l, o)."""
    head_dim = q.shape[2]
    warp_m = np.full((NUM_WARPS, served), _NEG_INF, dtype=np.float32)
    warp_l = np.zeros((NUM_WARPS, served), dtype=np.float32)
    warp_o = np.zeros((NUM_WARPS, served, head_dim), dtype=np.float32)
    scores = np.empty(ROWS_PER_WARP_TILE, dtype=np.float32)
    pv = np.empty(head_dim, dtype=np.float32)
    for w in range(NUM_WARPS):
        i = 0
        while True:
            r0, r1 = _warp_tile(s, splits, kv_len, w, i)
            if r0 >= r1:
                break
            for j in range(served):
                h = h0 + j
                tile_max = _NEG_INF
                for t in range(r0, r1):
                    row = _kv_row(b, t, seq_stride, page_size, kv_indptr, kv_indices)
                    dot = _ZERO
                    for d in range(head_dim):
                        dot += q[b, h, d] * k[row, kh, d]
                    # A NaN or infinity in q or k: the score, and from it the state, is NaN.
                    scores[t - r0] = _nan_unless_finite(dot * scale_log2)
                    tile_max = _max_or_nan(tile_max, scores[t - r0])
                m_old = warp_m[w, j]
                m_new = _max_or_nan(m_old, tile_max)
                alpha = _ZERO if m_old == _NEG_INF else np.exp2(m_old - m_new)
                p_sum = _ZERO
                pv[:] = _ZERO
                for t in range(r0, r1):
                    row = _kv_row(b, t, seq_stride, page_size, kv_indptr, kv_indices)
                    p = np.exp2(scores[t - r0] - m_new)
                    p_sum += p
                    for d in range(head_dim):
                        pv[d] += p * v[row, kh, d]
                warp_m[w, j] = m_new
                warp_l[w, j] = warp_l[w, j] * alpha + p_sum
                for d in range(head_dim):
                    warp_o[w, j, d] = warp_o[w, j, d] * alpha + pv[d]
            i += 1
    for j in range(served):
        m[j] = warp_m[0, j]
        l[j] = warp_l[0, j]
        o[j, :] = warp_o[0, j]
        for w in range(1, NUM_WARPS):
            m[j], l[j] = _merge_base2(m[j], l[j], o[j], warp_m[w, j], warp_l[w, j], warp_o[w, j])


@njit(cache=True)
def _normalize(m, l, o, out):
    """Block state -> (out = o / l, natural-log lse); the empty state gives (0, -inf), a poisoned
    one (m = NaN) gives NaN, and an element of o made non-finite by V gives out[d] = NaN."""
    if m == _NEG_INF:
        out[:] = _ZERO
        return _NEG_INF
    for d in range(out.shape[0]):
        out[d] = _nan_unless_finite(o[d] / l)
    return (m + np.log2(l)) * _LN2


@njit(cache=True)
def _simulate(q, k, v, kv_lens, scale_log2, chunk_size, num_splits, heads_per_block,
              head_groups, seq_stride, page_size, kv_indptr, kv_indices, out, lse):
    """Every block of the grid, then (with splits) the merge of each head's partials."""
    batch, num_qo_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group_size = num_qo_heads // num_kv_heads
    # float32 workspace for the partials; unused (empty) without splits
    num_partials = num_splits if num_splits > 1 else 0
    part_out = np.zeros((num_partials, batch, num_qo_heads, head_dim), dtype=np.float32)
    part_lse = np.full((num_partials, batch, num_qo_heads), _NEG_INF, dtype=np.float32)
    m = np.empty(heads_per_block, dtype=np.float32)
    l = np.empty(heads_per_block, dtype=np.float32)
    o = np.empty((heads_per_block, head_dim), dtype=np.float32)
    for s in range(num_splits):
        for b in range(batch):
            kv_len = kv_lens[b]
            splits = _splits_for(kv_len, chunk_size, num_splits)
            if s >= splits:
                continue  # no split s for this sequence: the block exits at once
            for kh in range(num_kv_heads):
                for hg in range(head_groups):
                    served = _heads_served(hg, heads_per_block, group_size)
                    h0 = kh * group_size + hg * heads_per_block
                    _run_block(q, k, v, b, h0, served, kh, s, splits, kv_len, scale_log2,
                               seq_stride, page_size, kv_indptr, kv_indices, m, l, o)
                    for j in range(served):
                        if num_splits == 1:
                            lse[b, h0 + j] = _normalize(m[j], l[j], o[j], out[b, h0 + j])
                        else:
                            part_lse[s, b, h0 + j] = _normalize(
                                m[j], l[j], o[j], part_out[s, b, h0 + j])
    if num_splits > 1:
        for b in range(batch):
            splits = _splits_for(kv_lens[b], chunk_size, num_splits)
            for h in range(num_qo_heads):
                lse[b, h] = _merge_splits(part_out, part_lse, b, h, splits, out[b, h])


@njit(cache=True)
def _merge_partials(outs, lses, b, h, num_states, out):
    """Merge states 0 .. num_states-1 of (b, h) in order into out (float32); returns the lse."""
    out[:] = _ZERO
    lse = _NEG_INF
    for s in range(num_states):
        lse = _merge_lse(out, lse, outs[s, b, h], lses[s, b, h])
    for d in range(out.shape[0]):
        out[d] = _nan_unless_finite(out[d])  # a non-finite partial out stays visible, as NaN
    return lse


@njit(cache=True)
def _merge_states(outs, lses, out, lse):
    for b in range(outs.shape[1]):
        for h in range(outs.shape[2]):
            lse[b, h] = _merge_partials(outs, lses, b, h, outs.shape[0], out[b, h])


# ---------------------------------------------------------------------------------------------
# Traffic: walk the same blocks and tiles, count what each one moves.
# ---------------------------------------------------------------------------------------------

@njit(cache=True)
def _walk(kv_lens, num_kv_heads, group_size, chunk_size, num_splits, heads_per_block,
          head_groups, page_size):
    """Counts over the schedule: (blocks, tiles, kv_rows, q_heads, page_lookups, counter_ops,
    partial states written, each read back once)."""
    blocks = tiles = kv_rows = q_heads = page_lookups = counter_ops = partials = 0
    for s in range(num_splits):
        for b in range(kv_lens.shape[0]):
            kv_len = kv_lens[b]
            splits = _splits_for(kv_len, chunk_size, num_splits)
            if s >= splits:
                continue
            for kh in range(num_kv_heads):
                for hg in range(head_groups):
                    served = _heads_served(hg, heads_per_block, group_size)
                    blocks += 1
                    q_heads += served
                    for w in range(NUM_WARPS):
                        i = 0
                        while True:
                            r0, r1 = _warp_tile(s, splits, kv_len, w, i)
                            if r0 >= r1:
                                break
                            tiles += 1
                            kv_rows += r1 - r0
                            if page_size > 0:
                                page_lookups += (r1 - 1) // page_size - r0 // page_size + 1
                            i += 1
                    if splits > 1:
                        # every block writes a partial and arrives; the last block to arrive
                        # merges (which one it is does not change the counts) and resets the counter
                        partials += served
                        counter_ops += 1
                        if s == splits - 1:
                            counter_ops += 1
    return blocks, tiles, kv_rows, q_heads, page_lookups, counter_ops, partials


def traffic(plan: SplitKVPlan, kv_lens=None, *, elem_bytes: int | None = None) -> dict[str, int]:
    """Bytes the plan's schedule moves per tensor, counted block by block and tile by tile.

    `kv_lens` (int [batch], default every sequence at `plan.max_kv_len`) are the valid lengths.
    `elem_bytes` defaults to the size of `plan.dtype`. Keys:

    * `k`, `v`: each valid row once per block that reads it, i.e. once per head group;
    * `q`: the served query heads of every block that has work;
    * `out`, `lse`: the final outputs (out in the input dtype, lse float32), each written once;
    * `partial_out_write`, `partial_lse_write`, `partial_out_read`, `partial_lse_read`: the float32
      workspace of sequences with more than one split (every block writes its partial; the merging
      block reads the `splits_for(kv_len)` partials of its heads); 0 for a sequence with one split,
      which writes its output directly;
    * `counters`: int32 arrival counters of those sequences, one atomic per block plus one reset
      per merge;
    * `page_table`: int32 `kv_indices` entries looked up, one per page a warp tile touches (paged
      plans only, 0 otherwise);
    * `blocks`, `tiles`: blocks that have work (the others exit at once) and warp tiles they run.
    """
    if not isinstance(plan, SplitKVPlan):
        raise TypeError(f"plan must be a SplitKVPlan, got {type(plan).__name__}")
    if elem_bytes is None:
        elem_bytes = _plan_elem_bytes(plan)
    else:
        elem_bytes = contract.check_positive_int(elem_bytes, "elem_bytes")
    kv_lens = _host_kv_lens(plan, kv_lens)
    blocks, tiles, kv_rows, q_heads, page_lookups, counter_ops, partials = _walk(
        kv_lens, plan.num_kv_heads, plan.group_size, plan.chunk_size, plan.num_splits,
        plan.heads_per_block, plan.head_groups, plan.page_size,
    )
    outputs = plan.batch * plan.num_qo_heads
    f32 = 4
    return {
        "k": kv_rows * plan.head_dim * elem_bytes,
        "v": kv_rows * plan.head_dim * elem_bytes,
        "q": q_heads * plan.head_dim * elem_bytes,
        "out": outputs * plan.head_dim * elem_bytes,
        "lse": outputs * f32,
        "partial_out_write": partials * plan.head_dim * f32,
        "partial_lse_write": partials * f32,
        "partial_out_read": partials * plan.head_dim * f32,
        "partial_lse_read": partials * f32,
        "counters": counter_ops * f32,
        "page_table": page_lookups * 4,
        "blocks": blocks,
        "tiles": tiles,
    }


def block_tiles(plan: SplitKVPlan, kv_lens=None) -> np.ndarray:
    """The blocks that have work, in launch order: int64 rows (split, seq, kv_head, head_group,
    first, step, end), the block reading the tiles of TILE_TOKENS rows that start at
    `range(first, end, step)`; computed by the same schedule functions the simulator runs."""
    if not isinstance(plan, SplitKVPlan):
        raise TypeError(f"plan must be a SplitKVPlan, got {type(plan).__name__}")
    kv_lens = _host_kv_lens(plan, kv_lens)
    return _block_tiles(kv_lens, plan.num_kv_heads, plan.chunk_size, plan.num_splits,
                        plan.head_groups)


@njit(cache=True)
def _block_tiles(kv_lens, num_kv_heads, chunk_size, num_splits, head_groups):
    rows = []
    for s in range(num_splits):
        for b in range(kv_lens.shape[0]):
            splits = _splits_for(kv_lens[b], chunk_size, num_splits)
            if s >= splits:
                continue
            first, _ = _warp_tile(s, splits, kv_lens[b], 0, 0)
            step = splits * TILE_TOKENS
            for kh in range(num_kv_heads):
                for hg in range(head_groups):
                    rows.append((s, b, kh, hg, first, step, kv_lens[b]))
    table = np.empty((len(rows), 7), dtype=np.int64)
    for r in range(len(rows)):
        for c in range(7):
            table[r, c] = rows[r][c]
    return table


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------

def simulate_split_kv(plan: SplitKVPlan, q, k, v, kv_lens=None, *, sm_scale=None):
    """Run `plan` on a contiguous cache as the decode / split-KV kernel does.

    q: [batch, num_qo_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads, head_dim];
    kv_lens: int [batch] or None (all kv_len). Returns (out in q's dtype, lse float32).
    A plan with `num_splits == 1` is the plain decode kernel.

    >>> import numpy as np
    >>> from costmodel.split_kv import plan_split_kv
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 8, 64)).astype(np.float16)
    >>> k = rng.standard_normal((2, 300, 2, 64)).astype(np.float16)
    >>> plan = plan_split_kv(2, 8, 2, 64, 300, dtype="float16", num_splits=3)
    >>> out, lse = simulate_split_kv(plan, q, k, k, [300, 7])
    >>> out.dtype, lse.dtype, out.shape
    (dtype('float16'), dtype('float32'), (2, 8, 64))
    """
    _check_plan(plan, page_size=0)
    problem, kv_lens = contract.check_decode(q, k, v, kv_lens, sm_scale=sm_scale,
                                             dtypes=KERNEL_DTYPES)
    _check_host_arrays(q=q, k=k, v=v)
    _check_matches_plan(plan, problem, kv_lens)
    k_rows = _as_f32(k).reshape(-1, problem.num_kv_heads, problem.head_dim)  # [batch * kv_len, Hkv, D]
    v_rows = _as_f32(v).reshape(-1, problem.num_kv_heads, problem.head_dim)
    no_pages = np.zeros(1, dtype=np.int64)
    return _run(plan, q, k_rows, v_rows, kv_lens, problem.sm_scale, problem.kv_len,
                no_pages, no_pages)


def simulate_paged_decode(plan: SplitKVPlan, q, k_cache, v_cache, kv_indptr, kv_indices,
                          kv_last_page_len, *, sm_scale=None):
    """Run `plan` on a paged cache as the paged decode kernel does.

    k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim] with `page_size ==
    plan.page_size`; token t of sequence b is row `t % page_size` of page
    `kv_indices[kv_indptr[b] + t // page_size]`; sequence b holds
    `(n_b - 1) * page_size + kv_last_page_len[b]` tokens on its `n_b >= 1` pages, none on 0 pages.
    Returns (out in q's dtype, lse float32).
    """
    _check_plan(plan, page_size=_page_size_of(k_cache))
    problem, kv_lens = contract.check_paged(q, k_cache, v_cache, kv_indptr, kv_indices,
                                            kv_last_page_len, sm_scale=sm_scale,
                                            dtypes=KERNEL_DTYPES)
    _check_host_arrays(q=q, k_cache=k_cache, v_cache=v_cache)
    _check_matches_plan(plan, problem, kv_lens)
    # [num_pages * page_size, Hkv, D]: page p's row r is row p * page_size + r
    k_rows = _as_f32(k_cache).reshape(-1, problem.num_kv_heads, problem.head_dim)
    v_rows = _as_f32(v_cache).reshape(-1, problem.num_kv_heads, problem.head_dim)
    kv_indptr = contract.as_index_array(kv_indptr, "kv_indptr")
    kv_indices = contract.as_index_array(kv_indices, "kv_indices")
    if kv_indices.size == 0:
        kv_indices = np.zeros(1, dtype=np.int64)  # never read: every sequence is empty
    return _run(plan, q, k_rows, v_rows, kv_lens, problem.sm_scale, 0, kv_indptr, kv_indices)


def simulate_merge_states(outs, lses):
    """Merge partial states in state order with the kernel's float32 natural-log LSE merge.

    outs: [num_states, batch, num_heads, head_dim] (float32 partials; float16 / bfloat16 are
    upcast), lses: [num_states, batch, num_heads] float32. Empty states (lse = -inf) are the
    identity; no states at all give the empty state. An lse of NaN or +inf makes that head's out
    and lse NaN; a NaN or infinity in a non-empty state's out[d] makes the merged out[d] NaN.
    Returns (out in outs' dtype, lse float32).
    """
    contract.check_merge_states(outs, lses, dtypes=KERNEL_DTYPES)
    _check_host_arrays(outs=outs, lses=lses)
    if lses.dtype != np.float32:
        raise TypeError(f"lses must have dtype float32 (the kernel's partial LSE), got {lses.dtype}")
    out = np.zeros(outs.shape[1:], dtype=np.float32)
    lse = np.full(outs.shape[1:3], -np.inf, dtype=np.float32)
    _merge_states(_as_f32(outs), _as_f32(lses), out, lse)
    return out.astype(outs.dtype), lse


def _run(plan, q, k_rows, v_rows, kv_lens, sm_scale, seq_stride, kv_indptr, kv_indices):
    scale_log2 = np.float32(sm_scale * LOG2E)
    out = np.zeros(q.shape, dtype=np.float32)
    lse = np.full(q.shape[:2], -np.inf, dtype=np.float32)
    _simulate(_as_f32(q), k_rows, v_rows, kv_lens, scale_log2, plan.chunk_size, plan.num_splits,
              plan.heads_per_block, plan.head_groups, seq_stride, plan.page_size,
              kv_indptr, kv_indices, out, lse)
    return out.astype(q.dtype), lse


def _as_f32(x):
    return np.ascontiguousarray(x, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Input checks: the API contract's, then agreement with the plan.
# ---------------------------------------------------------------------------------------------

def _plan_elem_bytes(plan):
    if plan.dtype not in ELEM_BYTES:
        raise TypeError(f"plan.dtype must be one of {list(KERNEL_DTYPES)}, got {plan.dtype!r}")
    return ELEM_BYTES[plan.dtype]


def _page_size_of(k_cache):
    shape = getattr(k_cache, "shape", ())
    return int(shape[1]) if len(shape) == 4 else None


def _check_plan(plan, *, page_size):
    """A SplitKVPlan of a kernel dtype, made for this cache layout (page_size 0: contiguous)."""
    if not isinstance(plan, SplitKVPlan):
        raise TypeError(f"plan must be a SplitKVPlan, got {type(plan).__name__}")
    _plan_elem_bytes(plan)
    if page_size == 0 and plan.page_size != 0:
        raise ValueError(
            f"plan must be made with page_size=0 for a contiguous cache, got {plan.page_size}")
    if page_size is not None and page_size > 0 and plan.page_size != page_size:
        raise ValueError(
            f"plan must be made with page_size={page_size} (k_cache.shape[1]), "
            f"got {plan.page_size}")


def _check_host_arrays(**arrays):
    for name, x in arrays.items():
        if not isinstance(x, np.ndarray):
            raise TypeError(
                f"{name} must be a NumPy array (the simulator runs on the host), "
                f"got {type(x).__name__}")


def _check_matches_plan(plan, problem, kv_lens):
    """The call must be the one the plan was made for: same sizes, dtype, and lengths it covers."""
    if problem.dtype != plan.dtype:
        raise TypeError(f"q must have the plan's dtype {plan.dtype}, got {problem.dtype}")
    want = [plan.batch, plan.num_qo_heads, plan.head_dim]
    got = [problem.batch, problem.num_qo_heads, problem.head_dim]
    if got != want:
        raise ValueError(
            f"q must be [batch, num_qo_heads, head_dim] = {want} (the plan's), got {tuple(got)}")
    if problem.num_kv_heads != plan.num_kv_heads:
        raise ValueError(
            f"num_kv_heads must be the plan's {plan.num_kv_heads}, got {problem.num_kv_heads}")
    # Sequences longer than plan.max_kv_len are fine: they keep the grid's splits (as the kernel).


def _host_kv_lens(plan, kv_lens):
    """traffic's kv_lens: int [batch], non-negative (longer than plan.max_kv_len is fine, as in the
    kernel), default all max_kv_len."""
    if kv_lens is None:
        return np.full(plan.batch, plan.max_kv_len, dtype=np.int64)
    kv_lens = contract.as_index_array(kv_lens, "kv_lens")
    if kv_lens.shape != (plan.batch,):
        raise ValueError(f"kv_lens must be [batch] = [{plan.batch}], got {kv_lens.shape}")
    bad = np.flatnonzero(kv_lens < 0)
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"kv_lens must be >= 0, got kv_lens[{b}] = {int(kv_lens[b])}")
    return kv_lens
