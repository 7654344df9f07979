"""The CPU twin of the decode kernels against the float64 references, and its schedule and traffic
against the plan.

The twin runs the kernels' float32 schedule, so its error against the float64 truth (computed from
the same rounded inputs) must stay within the per-dtype bounds the GPU kernels are held to. Where
only the addressing or the grid width differs, the schedule is the same and so are the bits.
"""

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from costmodel.simulate import (
    ROWS_PER_WARP_TILE,
    block_tiles,
    simulate_merge_states,
    simulate_paged_decode,
    simulate_split_kv,
    traffic,
)
from costmodel.split_kv import TILE_TOKENS, plan_split_kv
from refattn import decode, merge_states, paged_decode, paged_from_contiguous
from tolerances import LSE_ATOL, OUT_RTOL, lse_error, rel_error

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
ELEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}

# (num_qo_heads, num_kv_heads): MHA, MQA, GQA with groups of 2, 3 (partial block), 7 (28 q / 4 kv),
# and groups wider than one block (12 -> two head groups of 8, the second one partial; 16 -> two).
HEAD_LAYOUTS = [(1, 1), (4, 4), (4, 1), (6, 2), (28, 4), (12, 1), (32, 2)]
HEAD_DIMS = [8, 16, 40]
NUM_SPLITS = [None, 1, 2, 3, 5]
PAGE_SIZES = [1, 3, 16]


@st.composite
def kv_lengths(draw, batch, kv_len):
    """Ragged lengths in [0, kv_len], favouring the edges: empty, one token, tile and warp edges."""
    edges = [0, 1, 15, 16, 17, 63, 64, 65, kv_len - 1, kv_len]
    one = st.one_of(
        st.sampled_from([n for n in edges if 0 <= n <= kv_len]),
        st.integers(0, kv_len),
    )
    return np.array(draw(st.lists(one, min_size=batch, max_size=batch)), dtype=np.int64)


@st.composite
def schedule_cases(draw, max_kv_len=400):
    """A small decode call and the plan it runs with."""
    dtype = draw(st.sampled_from(list(DTYPES)))
    num_qo_heads, num_kv_heads = draw(st.sampled_from(HEAD_LAYOUTS))
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    batch = draw(st.integers(1, 3))
    kv_len = draw(st.integers(0, max_kv_len))
    kv_lens = draw(kv_lengths(batch, kv_len))
    # The plan may cover exactly the longest sequence or the whole cache.
    plan_len = draw(st.sampled_from([kv_len, int(kv_lens.max())]))
    num_splits = draw(st.sampled_from(NUM_SPLITS))
    num_sms = draw(st.sampled_from([132, 2]))  # few SMs make the plan choose to split
    sm_scale = draw(st.sampled_from([None, 0.05, 0.4]))
    seed = draw(st.integers(0, 2**32 - 1))
    return dict(
        dtype=dtype, batch=batch, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, kv_len=kv_len, kv_lens=kv_lens, plan_len=plan_len,
        num_splits=num_splits, num_sms=num_sms, sm_scale=sm_scale, seed=seed,
    )


def make_inputs(case):
    """q, k, v in the case's dtype; cache rows past each sequence's length hold NaN, so a schedule
    that reads one shows up in the output."""
    rng = np.random.default_rng(case["seed"])
    dtype = DTYPES[case["dtype"]]
    q = (2.0 * rng.standard_normal(  # [B, Hq, D]
        (case["batch"], case["num_qo_heads"], case["head_dim"]))).astype(dtype)
    kv_shape = (case["batch"], case["kv_len"], case["num_kv_heads"], case["head_dim"])
    k = rng.standard_normal(kv_shape)  # [B, S, Hkv, D]
    v = rng.standard_normal(kv_shape)
    past_end = np.arange(case["kv_len"])[None, :] >= case["kv_lens"][:, None]  # [B, S]
    k[past_end] = np.nan
    v[past_end] = np.nan
    return q, k.astype(dtype), v.astype(dtype)


def make_plan(case, **overrides):
    args = dict(dtype=case["dtype"], num_splits=case["num_splits"], num_sms=case["num_sms"])
    args.update(overrides)
    return plan_split_kv(
        case["batch"], case["num_qo_heads"], case["num_kv_heads"], case["head_dim"],
        case["plan_len"], **args,
    )


def assert_close_to_reference(out, lse, ref_out, ref_lse, dtype):
    assert rel_error(out, ref_out) <= OUT_RTOL[dtype]
    assert lse_error(lse, ref_lse) <= LSE_ATOL[dtype]


# ----------------------------------------------------------------------------------------------
# The twin against the references


@given(schedule_cases())
@example(dict(  # 28 q / 4 kv heads, ragged with an empty and a one-token sequence, three splits
    dtype="bfloat16", batch=3, num_qo_heads=28, num_kv_heads=4, head_dim=40, kv_len=339,
    kv_lens=np.array([339, 0, 1]), plan_len=339, num_splits=3, num_sms=132, sm_scale=None, seed=7,
))
def test_split_kv_matches_reference(case):
    q, k, v = make_inputs(case)
    plan = make_plan(case)
    out, lse = simulate_split_kv(plan, q, k, v, case["kv_lens"], sm_scale=case["sm_scale"])
    assert out.dtype == q.dtype and lse.dtype == np.float32
    ref_out, ref_lse = decode(q, k, v, case["kv_lens"], sm_scale=case["sm_scale"])
    assert_close_to_reference(out, lse, ref_out, ref_lse, case["dtype"])

    # A sequence that fits in one chunk runs the same single block whatever the grid width, and
    # merging one partial is exact: the same bits as the unsplit plan.
    whole = make_plan(case, num_splits=1)
    out_1, lse_1 = simulate_split_kv(whole, q, k, v, case["kv_lens"], sm_scale=case["sm_scale"])
    one_chunk = case["kv_lens"] <= plan.chunk_size
    np.testing.assert_array_equal(out[one_chunk].view(np.uint8), out_1[one_chunk].view(np.uint8))
    np.testing.assert_array_equal(lse[one_chunk], lse_1[one_chunk])


@given(schedule_cases(max_kv_len=200), st.sampled_from(PAGE_SIZES))
def test_paged_decode_matches_reference_and_contiguous(case, page_size):
    q, k, v = make_inputs(case)
    paged = paged_from_contiguous(  # pages shuffled among two spares, free slots hold junk
        k, v, case["kv_lens"], page_size=page_size, shuffle=case["seed"], extra_pages=2)
    plan = make_plan(case, page_size=page_size)
    out, lse = simulate_paged_decode(plan, q, *paged, sm_scale=case["sm_scale"])
    assert out.dtype == q.dtype and lse.dtype == np.float32
    ref_out, ref_lse = paged_decode(q, *paged, sm_scale=case["sm_scale"])
    assert_close_to_reference(out, lse, ref_out, ref_lse, case["dtype"])

    # Only the addressing differs from the contiguous cache, so the bits agree.
    flat_out, flat_lse = simulate_split_kv(
        make_plan(case), q, k, v, case["kv_lens"], sm_scale=case["sm_scale"])
    np.testing.assert_array_equal(out.view(np.uint8), flat_out.view(np.uint8))
    np.testing.assert_array_equal(lse, flat_lse)


@st.composite
def partial_states(draw):
    num_states = draw(st.integers(0, 4))
    batch = draw(st.integers(1, 3))
    num_heads = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([1, 8, 16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    outs = rng.standard_normal((num_states, batch, num_heads, head_dim)).astype(np.float32)
    lses = (8.0 * rng.standard_normal((num_states, batch, num_heads))).astype(np.float32)
    empty = rng.random(lses.shape) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    lses[empty] = -np.inf
    outs[empty] = np.nan  # an empty state's out is never read
    return outs, lses


@given(partial_states())
def test_merge_states_matches_reference(states):
    outs, lses = states
    out, lse = simulate_merge_states(outs, lses)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    ref_out, ref_lse = merge_states(outs, lses)
    assert_close_to_reference(out, lse, ref_out, ref_lse, "float32")


def test_merge_states_empty_state_is_identity():
    rng = np.random.default_rng(0)
    outs = rng.standard_normal((3, 2, 4, 8)).astype(np.float32)
    lses = rng.standard_normal((3, 2, 4)).astype(np.float32)
    lses[1] = -np.inf
    outs[1] = np.nan
    out, lse = simulate_merge_states(outs, lses)
    out_without, lse_without = simulate_merge_states(outs[[0, 2]], lses[[0, 2]])
    np.testing.assert_array_equal(out, out_without)
    np.testing.assert_array_equal(lse, lse_without)


# ----------------------------------------------------------------------------------------------
# Non-finite input: NaN exactly where the reference has it (see refattn/_common.py), never a
# plausible 0 or -inf, and never from rows the schedule does not attend.

BAD_VALUES = [np.nan, np.inf, -np.inf]


@given(
    schedule_cases(max_kv_len=200),
    st.lists(st.tuples(st.sampled_from(["q", "k", "v"]), st.integers(0, 10**6),
                       st.sampled_from(BAD_VALUES)), min_size=1, max_size=3),
    st.sampled_from(PAGE_SIZES),
)
@example(dict(  # q NaN in a head of a 3-split sequence, -inf in a key, +inf in a value
    dtype="float16", batch=3, num_qo_heads=6, num_kv_heads=2, head_dim=8, kv_len=150,
    kv_lens=np.array([150, 0, 70]), plan_len=150, num_splits=3, num_sms=132, sm_scale=None,
    seed=3,
), [("q", 4, np.nan), ("k", 2 * 150 * 16 + 5 * 16 + 9, -np.inf), ("v", 3 * 16 + 2, np.inf)], 3)
def test_bad_values_give_nan_where_the_reference_does(case, sites, page_size):
    q, k, v = make_inputs(case)  # rows past each sequence's length already hold NaN
    for name, position, value in sites:
        x = {"q": q, "k": k, "v": v}[name]
        if x.size:
            x.reshape(-1)[position % x.size] = value
    out, lse = simulate_split_kv(make_plan(case), q, k, v, case["kv_lens"],
                                 sm_scale=case["sm_scale"])
    ref_out, ref_lse = decode(q, k, v, case["kv_lens"], sm_scale=case["sm_scale"])
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(ref_lse))
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    np.testing.assert_array_equal(np.isnan(out.astype(np.float32)), np.isnan(ref_out))
    assert not np.any(np.isinf(out.astype(np.float32)))
    read = ~np.isnan(ref_out)  # the rest is as close to the reference as without bad values
    assert_close_to_reference(np.where(read, out, 0), np.where(np.isnan(lse), 0, lse),
                              np.where(read, ref_out, 0), np.where(np.isnan(ref_lse), 0, ref_lse),
                              case["dtype"])

    # The paged schedule differs only in addressing: the same values, NaN included.
    paged = paged_from_contiguous(
        k, v, case["kv_lens"], page_size=page_size, shuffle=case["seed"], extra_pages=2)
    paged_out, paged_lse = simulate_paged_decode(
        make_plan(case, page_size=page_size), q, *paged, sm_scale=case["sm_scale"])
    np.testing.assert_array_equal(paged_out.astype(np.float32), out.astype(np.float32))
    np.testing.assert_array_equal(paged_lse, lse)


def _one_sequence(dtype=np.float32, kv_len=300, num_qo_heads=4, num_kv_heads=2, head_dim=16):
    rng = np.random.default_rng(11)
    q = rng.standard_normal((1, num_qo_heads, head_dim)).astype(dtype)
    k, v = rng.standard_normal((2, 1, kv_len, num_kv_heads, head_dim)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_query_head_gives_nan_not_the_empty_state(num_splits, value):
    # A NaN score never wins fmaxf, so a running max left at -inf made the head look empty.
    q, k, v = _one_sequence()
    q[0, 1] = value  # every element of head 1
    plan = plan_split_kv(1, 4, 2, 16, 300, dtype="float32", num_splits=num_splits)
    out, lse = simulate_split_kv(plan, q, k, v)
    assert np.all(np.isnan(out[0, 1])) and np.isnan(lse[0, 1])
    assert np.all(np.isfinite(out[0, [0, 2, 3]])) and np.all(np.isfinite(lse[0, [0, 2, 3]]))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_key_of_minus_inf_is_not_a_masked_token(num_splits):
    q, k, v = _one_sequence()
    q[...] = np.abs(q)
    k[0, 200, 0] = -np.inf  # q . k = -inf would weigh the token 0, as if it were masked
    plan = plan_split_kv(1, 4, 2, 16, 300, dtype="float32", num_splits=num_splits)
    out, lse = simulate_split_kv(plan, q, k, v)
    assert np.all(np.isnan(out[0, :2])) and np.all(np.isnan(lse[0, :2]))  # KV head 0's heads
    assert np.all(np.isfinite(out[0, 2:])) and np.all(np.isfinite(lse[0, 2:]))


@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_value_element_gives_nan_not_inf(value):
    q, k, v = _one_sequence()
    v[0, 7, 1, 5] = value
    plan = plan_split_kv(1, 4, 2, 16, 300, dtype="float32", num_splits=3)
    out, lse = simulate_split_kv(plan, q, k, v)
    assert np.all(np.isnan(out[0, 2:, 5]))
    assert np.sum(np.isnan(out)) == 2 and np.all(np.isfinite(lse))


def test_empty_sequence_ignores_a_bad_query():
    q, k, v = _one_sequence()
    q[...] = np.nan
    plan = plan_split_kv(1, 4, 2, 16, 300, dtype="float32", num_splits=3)
    out, lse = simulate_split_kv(plan, q, k, v, [0])
    assert np.all(out == 0) and np.all(np.isneginf(lse))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_merge_states_bad_lse_gives_nan(value):
    rng = np.random.default_rng(12)
    outs = rng.standard_normal((3, 2, 4, 8)).astype(np.float32)
    lses = rng.standard_normal((3, 2, 4)).astype(np.float32)
    lses[:, 1, 2] = -np.inf  # (1, 2): empty states ...
    lses[1, 1, 2] = value  # ... and one bad one, which used to pass for the whole
    lses[2, 0, 3] = value
    out, lse = simulate_merge_states(outs, lses)
    ref_out, ref_lse = merge_states(outs, lses)
    for got, want in ((out, ref_out), (lse, ref_lse)):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(lse[1, 2]) and np.isnan(lse[0, 3]) and np.sum(np.isnan(lse)) == 2


@pytest.mark.parametrize("value", BAD_VALUES)
def test_merge_states_bad_out_gives_nan_element(value):
    rng = np.random.default_rng(13)
    outs = rng.standard_normal((3, 1, 2, 8)).astype(np.float32)
    lses = rng.standard_normal((3, 1, 2)).astype(np.float32)
    outs[0, 0, 1, 6] = value
    out, lse = simulate_merge_states(outs, lses)
    assert np.isnan(out[0, 1, 6]) and np.sum(np.isnan(out)) == 1 and np.all(np.isfinite(lse))


# ----------------------------------------------------------------------------------------------
# The schedule and its traffic against the plan


@st.composite
def plans_and_lengths(draw):
    num_qo_heads, num_kv_heads = draw(st.sampled_from(HEAD_LAYOUTS))
    batch = draw(st.integers(1, 4))
    max_kv_len = draw(st.integers(0, 5000))
    kv_lens = draw(kv_lengths(batch, max_kv_len))
    plan = plan_split_kv(
        batch, num_qo_heads, num_kv_heads, draw(st.sampled_from([64, 128])), max_kv_len,
        dtype=draw(st.sampled_from(list(DTYPES))),
        num_splits=draw(st.sampled_from([None, 1, 2, 3, 7, 40])),
        num_sms=draw(st.sampled_from([132, 8])),
        page_size=draw(st.sampled_from([0, 1, 16, 32])),
    )
    return plan, kv_lens


@given(plans_and_lengths())
def test_block_tiles_are_the_plans(plan_and_lens):
    plan, kv_lens = plan_and_lens
    table = block_tiles(plan, kv_lens)  # rows: split, seq, kv_head, head_group, first, step, end
    for b, kv_len in enumerate(kv_lens):
        for kh in range(plan.num_kv_heads):
            for hg in range(plan.head_groups):
                mine = table[(table[:, 1] == b) & (table[:, 2] == kh) & (table[:, 3] == hg)]
                assert mine[:, 0].tolist() == list(range(plan.splits_for(int(kv_len))))
                assert [range(r[4], r[6], r[5]) for r in mine.tolist()] == plan.split_rows(int(kv_len))
    assert len(table) <= plan.num_blocks


@given(plans_and_lengths())
def test_split_tokens_count_the_split_rows(plan_and_lens):
    plan, kv_lens = plan_and_lens
    for kv_len in map(int, kv_lens):
        tokens = plan.split_tokens(kv_len)
        assert tokens == [sum(min(TILE_TOKENS, kv_len - t) for t in rows) for rows in plan.split_rows(kv_len)]
        assert sum(tokens) == kv_len


@given(plans_and_lengths())
def test_traffic_matches_closed_form(plan_and_lens):
    plan, kv_lens = plan_and_lens
    eb = ELEM_BYTES[plan.dtype]
    d = plan.head_dim
    blocks_per_split = plan.num_kv_heads * plan.head_groups  # blocks per (split, sequence)
    splits = np.array([plan.splits_for(int(n)) for n in kv_lens])  # [B] chunks per sequence
    tiles = sum(-(-int(n) // ROWS_PER_WARP_TILE) for n in kv_lens) * blocks_per_split
    got = traffic(plan, kv_lens)

    kv_bytes = int(kv_lens.sum()) * plan.num_kv_heads * d * eb * plan.head_groups
    assert got["k"] == got["v"] == kv_bytes
    assert got["q"] == int(splits.sum()) * plan.num_qo_heads * d * eb
    assert got["out"] == plan.batch * plan.num_qo_heads * d * eb
    assert got["lse"] == plan.batch * plan.num_qo_heads * 4
    assert got["blocks"] == int(splits.sum()) * blocks_per_split
    assert got["tiles"] == tiles
    if plan.num_splits == 1:
        for key in ("partial_out_write", "partial_lse_write", "partial_out_read",
                    "partial_lse_read", "counters"):
            assert got[key] == 0
    else:
        # A sequence with one split writes its output directly; the others write a partial per
        # (block, served head), and each block bumps its counter, which the merging block resets.
        merged = splits[splits > 1]
        partials = int(merged.sum()) * plan.num_qo_heads
        assert got["partial_out_write"] == got["partial_out_read"] == partials * d * 4
        assert got["partial_lse_write"] == got["partial_lse_read"] == partials * 4
        assert got["counters"] == (int(merged.sum()) + merged.size) * blocks_per_split * 4
    # Page sizes 16 and 32 hold whole warp tiles; page size 1 makes every row its own page.
    want_lookups = {0: 0, 1: int(kv_lens.sum()) * blocks_per_split}.get(plan.page_size, tiles)
    assert got["page_table"] == want_lookups * 4
    assert traffic(plan, kv_lens, elem_bytes=1)["k"] * eb == got["k"]


def test_traffic_of_full_sequences_fills_the_plans_workspace():
    plan = plan_split_kv(2, 28, 4, 128, 4096, dtype="float16", num_splits=6)
    got = traffic(plan)  # every sequence at max_kv_len uses every split
    assert got["partial_out_write"] == plan.partial_out_elems * 4
    assert got["partial_lse_write"] == plan.partial_lse_elems * 4
    assert got["blocks"] == plan.num_blocks
    # GQA packing: the cache is read once per KV head, 2 * batch * Hkv * kv_len * D * elem_bytes.
    assert got["k"] + got["v"] == 2 * 2 * 4 * 4096 * 128 * 2


# ----------------------------------------------------------------------------------------------
# Bad input


def _contiguous_call(**changes):
    rng = np.random.default_rng(0)
    args = dict(
        plan=plan_split_kv(2, 8, 2, 16, 100, dtype="float16", num_splits=2),
        q=rng.standard_normal((2, 8, 16)).astype(np.float16),
        k=rng.standard_normal((2, 100, 2, 16)).astype(np.float16),
        v=rng.standard_normal((2, 100, 2, 16)).astype(np.float16),
        kv_lens=np.array([100, 3]),
    )
    args.update(changes)
    return lambda: simulate_split_kv(
        args["plan"], args["q"], args["k"], args["v"], args["kv_lens"])


@pytest.mark.parametrize("changes, error, match", [
    (dict(q=np.zeros((2, 8, 16))), TypeError, "q must have dtype"),
    (dict(q=np.zeros((2, 8, 16), np.float32), k=np.zeros((2, 100, 2, 16), np.float32),
          v=np.zeros((2, 100, 2, 16), np.float32)), TypeError, "plan's dtype float16"),
    (dict(q=np.zeros((2, 8, 16)).tolist()), TypeError, "q must be an array"),
    (dict(q=np.zeros((3, 8, 16), np.float16)), ValueError, "k must be"),
    (dict(q=np.zeros((2, 4, 16), np.float16)), ValueError, r"q must be .* \(the plan's\)"),
    (dict(k=np.zeros((2, 100, 2, 16), np.float32)), TypeError, "k must have the same dtype"),
    (dict(kv_lens=np.array([101, 3])), ValueError, "kv_lens"),
    (dict(plan=plan_split_kv(2, 8, 2, 16, 100, page_size=16)), ValueError, "page_size=0"),
    (dict(plan="plan"), TypeError, "plan must be a SplitKVPlan"),
])
def test_contiguous_rejects_bad_input(changes, error, match):
    with pytest.raises(error, match=match):
        _contiguous_call(**changes)()


def test_paged_rejects_a_plan_for_another_page_size():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 8)).astype(np.float32)
    cache = rng.standard_normal((3, 4, 1, 8)).astype(np.float32)
    table = (np.array([0, 2]), np.array([2, 0]), np.array([3]))
    for page_size in (0, 16):
        plan = plan_split_kv(1, 2, 1, 8, 8, dtype="float32", page_size=page_size)
        with pytest.raises(ValueError, match="page_size"):
            simulate_paged_decode(plan, q, cache, cache, *table)
    plan = plan_split_kv(1, 2, 1, 8, 8, dtype="float32", page_size=4)
    with pytest.raises(ValueError, match="kv_indices"):
        simulate_paged_decode(plan, q, cache, cache, table[0], np.array([2, 3]), table[2])


def test_merge_and_traffic_reject_bad_input():
    outs = np.zeros((2, 1, 3, 8), np.float32)
    with pytest.raises(TypeError, match="lses must have dtype float32"):
        simulate_merge_states(outs, np.zeros((2, 1, 3)))
    with pytest.raises(ValueError, match="lses must be"):
        simulate_merge_states(outs, np.zeros((2, 1, 4), np.float32))
    plan = plan_split_kv(2, 8, 2, 16, 100)
    with pytest.raises(ValueError, match="kv_lens"):
        traffic(plan, [100, -1])
    with pytest.raises(ValueError, match=r"kv_lens must be \[batch\]"):
        traffic(plan, [100])
    with pytest.raises(TypeError, match="elem_bytes"):
        traffic(plan, elem_bytes=2.0)


def test_default_scale_is_inverse_sqrt_head_dim():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 16)).astype(np.float32)
    k = rng.standard_normal((1, 70, 1, 16)).astype(np.float32)
    plan = plan_split_kv(1, 2, 1, 16, 70, dtype="float32")
    out, lse = simulate_split_kv(plan, q, k, k)
    out_s, lse_s = simulate_split_kv(plan, q, k, k, sm_scale=1 / math.sqrt(16))
    np.testing.assert_array_equal(out, out_s)
    np.testing.assert_array_equal(lse, lse_s)


@pytest.mark.parametrize("paged", [False, True])
def test_sequences_longer_than_the_plan_keep_its_splits(paged):
    """As the kernel: a plan made for 50 tokens runs 300-token sequences with its own split count
    (each split takes more tiles) and gives the reference's answer."""
    import refattn

    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 8, 16)).astype(np.float16)
    k = rng.standard_normal((2, 300, 2, 16)).astype(np.float16)
    v = rng.standard_normal((2, 300, 2, 16)).astype(np.float16)
    plan = plan_split_kv(2, 8, 2, 16, 130, dtype="float16", num_splits=2, page_size=8 if paged else 0)
    assert plan.num_splits == 2 and plan.num_splits * plan.chunk_size < 300
    assert plan.splits_for(300) == 2
    lens = np.array([300, 77])
    ref_out, ref_lse = refattn.decode(q, k, v, lens)
    if paged:
        from refattn.builders import paged_from_contiguous

        kc, vc, indptr, indices, last = paged_from_contiguous(k, v, lens, page_size=8)
        out, lse = simulate_paged_decode(plan, q, kc, vc, indptr, indices, last)
    else:
        out, lse = simulate_split_kv(plan, q, k, v, lens)
    assert np.max(np.abs(out.astype(np.float64) - ref_out)) < 2e-2
    assert np.max(np.abs(lse - ref_lse)) < 1e-2
    assert traffic(plan, lens)["k"] > traffic(plan)["k"]
