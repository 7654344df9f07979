"""The tree kernel's plan (gpukernels.tree: the work list of `plan_tree_work` and the windows of
`own_windows`), executed in NumPy on the CPU as the kernels execute it: every (segment, chunk,
64-row tile) attends its rows to its chunk and writes one state per row; then either each
sequence's states are merged ("merge" form), or each sequence attends to the rows of its own
windows and merges its shared states into that ("own" form). The result must be refattn.tree's,
and every row of every path must be served exactly once."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from gpukernels.split_kv import WINDOW_LEN_BITS, WINDOW_ROWS
from gpukernels.tree import (QUERY_ROWS, choose_chunk_size, own_windows, paged_segments, path_rows, plan_tree,
                             plan_tree_work)


def _segments(work, q, k_segs, v_segs, sm_scale):
    """tree_segments_kernel in NumPy (float64): the states, every one written exactly once."""
    batch, hq, d = q.shape
    hkv = k_segs.shape[1]
    g = hq // hkv
    part_out = np.full((work.num_states, hq, d), np.nan)
    part_lse = np.full((work.num_states, hq), np.nan)
    served = np.zeros((work.num_states, hq), dtype=int)
    for begin, end, offset, n, first_row, c in work.work:
        for kh in range(hkv):
            for r in range(first_row, min(first_row + QUERY_ROWS, n * g)):
                sharer = offset + r // g
                b, h = work.sharers[sharer], kh * g + r % g
                state = work.first_state[sharer] + c * work.state_stride
                o, l = refattn.decode(q[b:b + 1, h:h + 1], k_segs[None, begin:end, kh:kh + 1],
                                      v_segs[None, begin:end, kh:kh + 1], sm_scale=sm_scale)
                part_out[state, h], part_lse[state, h] = o[0, 0], l[0, 0]
                served[state, h] += 1
    return part_out, part_lse, served


def _execute(work, q, k_segs, v_segs, sm_scale):
    """The "merge" form's two launches: tree_segments_kernel, then merge_parts_kernel."""
    batch, hq, d = q.shape
    part_out, part_lse, served = _segments(work, q, k_segs, v_segs, sm_scale)
    assert np.all(served == 1), "a state row written twice or never"
    out = np.zeros((batch, hq, d))
    lse = np.full((batch, hq), -np.inf)
    for b in range(batch):
        s0, s1 = work.part_indptr[b], work.part_indptr[b + 1]
        if s1 > s0:
            o, l = refattn.merge_states(part_out[s0:s1, None], part_lse[s0:s1, None])
            out[b], lse[b] = o[0], l[0]
    return out, lse


def _execute_own(work, own, q, k_segs, v_segs, sm_scale, rows=None):
    """The "own" form's two launches: tree_segments_kernel over the shared segments (states
    slot-major, the unwritten slots empty), then split-KV over each sequence's windows merging its
    states. `rows`: (k, v) the windows address (default k_segs, v_segs)."""
    batch, hq, d = q.shape
    g = hq // k_segs.shape[1]
    part_out, part_lse, served = _segments(work, q, k_segs, v_segs, sm_scale)
    k_rows, v_rows = rows if rows is not None else (k_segs, v_segs)
    slots = work.num_slots
    assert work.num_states == slots * batch and work.state_stride == batch
    counts = np.diff(work.part_indptr)
    for b in range(batch):   # slots 0 .. counts[b] - 1 written once, the others never
        expected = (np.arange(slots) < counts[b]).astype(int)
        assert np.all(served[b::batch] == expected[:, None]), "a state row written twice, never, or out of place"
        part_out[b::batch][counts[b]:], part_lse[b::batch][counts[b]:] = 0.0, -np.inf
    out = np.zeros((batch, hq, d))
    lse = np.full((batch, hq), -np.inf)
    for b in range(batch):
        entries = own.windows[own.kv_indptr[b]:own.kv_indptr[b + 1]]
        rows = np.concatenate([np.arange(e >> WINDOW_LEN_BITS, (e >> WINDOW_LEN_BITS) + (e & (WINDOW_ROWS - 1)) + 1)
                               for e in entries]) if len(entries) else np.zeros(0, dtype=np.int64)
        k_b = np.repeat(k_rows[rows], g, axis=1).transpose(1, 0, 2)   # [hq, rows, d]
        v_b = np.repeat(v_rows[rows], g, axis=1).transpose(1, 0, 2)
        o, l = refattn.decode(q[b][:, None], k_b[:, :, None], v_b[:, :, None], sm_scale=sm_scale) \
            if len(rows) else (np.zeros((hq, 1, d)), np.full((hq, 1), -np.inf))
        states_o = np.concatenate([o[None, :, 0], part_out[b::batch]]) if slots else o[None, :, 0]
        states_l = np.concatenate([l[None, :, 0], part_lse[b::batch]]) if slots else l[None, :, 0]
        o, l = refattn.merge_states(states_o[:, None], states_l[:, None])
        out[b], lse[b] = o[0], l[0]
    return out, lse


@st.composite
def trees(draw):
    hq, hkv = draw(st.sampled_from([(4, 4), (8, 2), (6, 1), (40, 1)]))
    num_segs = draw(st.integers(1, 5))
    lens = draw(st.lists(st.integers(0, 150), min_size=num_segs, max_size=num_segs))
    batch = draw(st.integers(1, 9))
    paths = [draw(st.lists(st.integers(0, num_segs - 1), unique=True, max_size=num_segs)) for _ in range(batch)]
    chunk = draw(st.sampled_from([32, 64, 128]))
    return hq, hkv, lens, paths, chunk, draw(st.integers(0, 2**31 - 1))


def _case(case, d=8):
    """A drawn tree's float64 inputs and its reference answer."""
    hq, hkv, lens, paths, chunk, seed = case
    rng = np.random.default_rng(seed)
    segs_k = [rng.standard_normal((n, hkv, d)) for n in lens]
    segs_v = [rng.standard_normal((n, hkv, d)) for n in lens]
    k_segs, v_segs, seg_indptr, path_indptr, path_segs = refattn.tree_from_paths(segs_k, segs_v, paths)
    q = rng.standard_normal((len(paths), hq, d))
    return q, k_segs, v_segs, seg_indptr, path_indptr, path_segs, refattn.tree(q, k_segs, v_segs, seg_indptr,
                                                                             path_indptr, path_segs)


@given(trees())
def test_the_work_list_computes_the_tree(case):
    hq, hkv, _, _, chunk, _ = case
    d = 8
    q, k_segs, v_segs, seg_indptr, path_indptr, path_segs, (ref_out, ref_lse) = _case(case, d)
    for form in ("merge", "own"):
        work = plan_tree_work(seg_indptr, path_indptr, path_segs, group_size=hq // hkv, chunk_size=chunk,
                              shared_only=form == "own")
        if form == "merge":
            out, lse = _execute(work, q, k_segs, v_segs, 1 / np.sqrt(d))
        else:
            own = own_windows(seg_indptr, path_indptr, path_segs)
            out, lse = _execute_own(work, own, q, k_segs, v_segs, 1 / np.sqrt(d))
        np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-10, err_msg=form)
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse), err_msg=form)
        finite = np.isfinite(ref_lse)
        np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-10, err_msg=form)


def tree_pages(k_segs, v_segs, seg_indptr, page_size, seed):
    """The segments of a contiguous tree in a paged cache (each segment a "sequence" of
    refattn.paged_from_contiguous, its pages shuffled, junk in the pages no segment owns)."""
    lens = np.diff(seg_indptr)
    width = max(int(lens.max(initial=0)), 1)
    padded = [np.zeros((len(lens), width) + k_segs.shape[1:]) for _ in range(2)]
    for s, n in enumerate(lens):
        padded[0][s, :n] = k_segs[seg_indptr[s]:seg_indptr[s] + n]
        padded[1][s, :n] = v_segs[seg_indptr[s]:seg_indptr[s] + n]
    return refattn.paged_from_contiguous(*padded, lens, page_size=page_size, shuffle=seed, extra_pages=2)


@given(trees(), st.sampled_from([1, 3, 16, 64]))
def test_the_plan_of_segments_in_pages_computes_the_tree(case, page_size):
    """Segments in a paged cache: the work list's rows mapped through the page table (as
    tree_segments_kernel maps them), the windows addressing the cache's rows (never across a page)."""
    hq, hkv, _, _, chunk, seed = case
    d = 8
    q, k_segs, v_segs, seg_indptr, path_indptr, path_segs, (ref_out, ref_lse) = _case(case, d)
    k_cache, v_cache, indptr, indices, last = tree_pages(k_segs, v_segs, seg_indptr, page_size, seed)
    seg_lens = np.where(np.diff(indptr) > 0, (np.diff(indptr) - 1) * page_size + last, 0)
    segments = paged_segments(indptr, indices, seg_lens, page_size)
    # the rows the work list names, gathered from the pages through the table
    virtual = np.arange(len(indices) * page_size)
    physical = indices[virtual // page_size] * page_size + virtual % page_size
    k_rows, v_rows = (c.reshape(-1, hkv, d) for c in (k_cache, v_cache))
    k_virtual, v_virtual = k_rows[physical], v_rows[physical]
    for form in ("merge", "own"):
        work = plan_tree_work(None, path_indptr, path_segs, group_size=hq // hkv, chunk_size=chunk,
                              shared_only=form == "own", segments=segments)
        if form == "merge":
            out, lse = _execute(work, q, k_virtual, v_virtual, 1 / np.sqrt(d))
        else:
            own = own_windows(None, path_indptr, path_segs, segments=segments)
            firsts = own.windows >> 4
            ends = firsts + (own.windows & 15)
            assert np.all(firsts // page_size == ends // page_size), "a window crosses a page"
            out, lse = _execute_own(work, own, q, k_virtual, v_virtual, 1 / np.sqrt(d), rows=(k_rows, v_rows))
        np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-10, err_msg=form)
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse), err_msg=form)
        finite = np.isfinite(ref_lse)
        np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-10, err_msg=form)


@given(trees(), st.sampled_from([0, 1, 5, 16]))
def test_the_paths_form_reads_each_path_as_a_page_table_of_rows(case, page_size):
    """The "paths" form (float32): each sequence's path rows as one-row pages, run by paged decode,
    give the tree's answer; segments contiguous (page_size 0) or in shuffled pages."""
    hq, hkv, _, _, _, seed = case
    d = 8
    q, k_segs, v_segs, seg_indptr, path_indptr, path_segs, (ref_out, ref_lse) = _case(case, d)
    if page_size:
        k_cache, v_cache, indptr, indices, last = tree_pages(k_segs, v_segs, seg_indptr, page_size, seed)
        seg_lens = np.where(np.diff(indptr) > 0, (np.diff(indptr) - 1) * page_size + last, 0)
        rows = path_rows(None, path_indptr, path_segs, segments=paged_segments(indptr, indices, seg_lens, page_size))
        k_rows, v_rows = (c.reshape(-1, 1, hkv, d) for c in (k_cache, v_cache))
    else:
        rows = path_rows(seg_indptr, path_indptr, path_segs)
        k_rows, v_rows = k_segs[:, None], v_segs[:, None]
    out, lse = refattn.paged_decode(q, k_rows, v_rows, *rows)
    np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-10)
    plan = plan_tree(seg_indptr, path_indptr, path_segs, num_qo_heads=hq, num_kv_heads=hkv, head_dim=64,
                     dtype="float32")
    assert plan.form == "paths" and plan.split.page_size == 1


def test_each_segment_is_read_once_per_64_rows_of_its_sharers():
    """BENCHMARKS' tree: a 4096-token root shared by 64 sequences, 8 groups of 8 sharing 2048 more,
    256 own tokens each; MHA 32 heads (group 1). With chunks of 1024 the root is 4 chunks x 1 tile,
    each group segment 2 chunks x 1 tile, each own segment 1 x 1."""
    lens = [4096] + [2048] * 8 + [256] * 64
    paths = [[0, 1 + b // 8, 9 + b] for b in range(64)]
    seg_indptr = np.concatenate([[0], np.cumsum(lens)])
    path_indptr = np.arange(0, 3 * 64 + 1, 3)
    path_segs = np.array(paths).reshape(-1)
    work = plan_tree_work(seg_indptr, path_indptr, path_segs, group_size=1, chunk_size=1024)
    assert len(work.work) == 4 + 8 * 2 + 64
    assert work.num_states == 64 * (4 + 2 + 1)
    tokens_read = sum(int(e - b) for b, e, *_ in work.work)
    assert tokens_read == sum(lens)          # every segment once, for all its sharers
    # The "own" form: the root's 4 chunks and each group's 2 in the segments launch, the own
    # segments as 16 windows of 16 rows per sequence; 6 states per sequence, slot-major.
    shared = plan_tree_work(seg_indptr, path_indptr, path_segs, group_size=1, chunk_size=1024, shared_only=True)
    assert len(shared.work) == 4 + 8 * 2
    assert shared.num_slots == 6 and shared.num_states == 6 * 64 and shared.state_stride == 64
    own = own_windows(seg_indptr, path_indptr, path_segs)
    assert np.all(np.diff(own.kv_indptr) == 16) and np.all(own.rows == 256)
    assert np.all(own.windows >> WINDOW_LEN_BITS == np.repeat(seg_indptr[9:-1], 16) + np.tile(np.arange(16) * 16, 64))
    # the plan the cost model predicts fastest for this tree, and the chunk as it predicts the level shape
    from costmodel import tree as tree_model

    plan = plan_tree(seg_indptr, path_indptr, path_segs, num_qo_heads=32, num_kv_heads=32, head_dim=128)
    for form in ("own", "merge"):
        assert plan.predicted_s <= plan_tree(seg_indptr, path_indptr, path_segs, num_qo_heads=32, num_kv_heads=32,
                                             head_dim=128, form=form).predicted_s
    chosen = choose_chunk_size(seg_indptr, path_indptr, path_segs, group_size=1, num_kv_heads=32, sms=132, tile=64)
    assert chosen == plan.chunk_size
    if plan.form == "own":
        shape = tree_model.TreeShape(64, 32, 32, 128, ((1, 4096), (8, 2048), (64, 256)))
        assert chosen == tree_model.tree_chunk_size(shape, 132)
        times = {c: tree_model.predict(shape, gpu="H100", plan=tree_model.TreePlan(shape, c)).time_s
                 for c in tree_model.chunk_candidates_of_tree(64)}
        assert times[chosen] == min(times.values())
        assert plan.predicted_s == pytest.approx(times[chosen], rel=1e-9)
