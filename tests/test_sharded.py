"""Decode over a KV cache sharded across ranks (gpukernels.sharded), on the CPU.

The ranks are threads of this process (InProcessCollective), each attending to its shard with the
float64 references; the merged result must equal refattn.decode over the whole cache. The same
step code runs on the GPU with the kernels and NCCL (tests/test_sharded_gpu.py).
"""

import doctest
import importlib
from re import search as re_search

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import refattn
from gpukernels import (InProcessCollective, ShardedDecode, ShardPlacement, plan_split_kv,
                        sharded_paged_decode, sharded_split_kv)
from gpukernels.sharded import sharded_span
from strategies import (assert_same_state, float_arrays, head_layouts, lengths, merged_out_rtol,
                        sm_scales)
from tolerances import LSE_ATOL, OUT_RTOL, lse_error, rel_error

sharded_module = importlib.import_module("gpukernels.sharded")

TIMEOUT_S = 20.0   # a rank left waiting in a collective fails after this, instead of hanging


def test_doctests():
    assert doctest.testmod(sharded_module).failed == 0


# ---------------------------------------------------------------------------------------------
# ShardPlacement


placements = st.builds(ShardPlacement, st.integers(1, 8), st.integers(1, 64))


@given(placements, st.integers(0, 3000))
@example(ShardPlacement(3, 4), 0)
@example(ShardPlacement(3, 4), 13)
@example(ShardPlacement(1, 1), 5)
def test_shard_lens_sum_and_balance(p, kv_len):
    lens = p.shard_lens(kv_len)
    assert lens.shape == (p.num_ranks,)
    assert lens.sum() == kv_len
    assert lens.max() - lens.min() <= p.block_tokens
    # earlier ranks never hold fewer tokens: the blocks go round in rank order
    assert np.all(np.diff(lens) <= 0) or kv_len == 0


@given(placements, st.integers(0, 400))
def test_every_token_has_one_slot_and_back(p, kv_len):
    t = np.arange(kv_len)
    ranks, local = p.rank_of(t), p.local_index(t)
    lens = p.shard_lens(kv_len)
    assert np.all(local < lens[ranks])
    for r in range(p.num_ranks):
        mine = p.tokens_on(r, kv_len)
        assert len(mine) == lens[r]
        assert np.array_equal(mine, t[ranks == r])                       # in token order
        assert np.array_equal(local[ranks == r], np.arange(lens[r]))     # slots filled densely
        assert np.array_equal(p.token_of(r, np.arange(lens[r])), mine)  # the inverse map
    assert sorted(np.concatenate([p.tokens_on(r, kv_len) for r in range(p.num_ranks)])) == list(t)
    for s in t[:: max(1, kv_len // 17)]:   # the scalar forms agree with the array forms
        assert (p.rank_of(int(s)), p.local_index(int(s))) == (ranks[s], local[s])
        assert p.token_of(int(ranks[s]), int(local[s])) == s


@given(placements, st.integers(0, 500), st.integers(0, 200))
def test_append_fills_the_slots_shard_lens_predicts(p, kv_len, n):
    slots = p.append(kv_len, n)
    before, after = p.shard_lens(kv_len), p.shard_lens(kv_len + n)
    assert slots == tuple((int(b), int(a)) for b, a in zip(before, after))
    new = np.arange(kv_len, kv_len + n)
    for r, (start, stop) in enumerate(slots):
        assert np.array_equal(p.local_index(new[p.rank_of(new) == r]), np.arange(start, stop))


@given(placements, st.lists(st.integers(0, 300), min_size=1, max_size=5))
def test_shard_lens_of_many_sequences(p, kv_lens):
    lens = p.shard_lens(np.array(kv_lens))
    assert lens.shape == (p.num_ranks, len(kv_lens))
    for b, n in enumerate(kv_lens):
        assert np.array_equal(lens[:, b], p.shard_lens(n))


@given(placements, st.integers(1, 3), lengths(), st.data())
def test_split_and_assemble_are_inverse(p, batch, kv_len, data):
    kv_lens = np.array(data.draw(st.lists(st.integers(0, kv_len), min_size=batch, max_size=batch)))
    x = np.random.default_rng(kv_len).standard_normal((batch, kv_len, 2))
    shards, lens = p.split(x, kv_lens, fill=np.nan)
    assert np.array_equal(lens, p.shard_lens(kv_lens).reshape(p.num_ranks, batch))
    for r, shard in enumerate(shards):
        for b in range(batch):
            assert np.array_equal(shard[b, : lens[r, b]], x[b, p.tokens_on(r, kv_lens[b])])
            assert np.all(np.isnan(shard[b, lens[r, b]:]))
    whole, got_lens = p.assemble(shards, lens)
    assert np.array_equal(got_lens, kv_lens)
    for b in range(batch):
        assert np.array_equal(whole[b, : kv_lens[b]], x[b, : kv_lens[b]])


@given(placements, st.integers(0, 3000))
def test_shard_lens_agree_with_the_cost_model(p, kv_len):
    # the cost model predicts the step that runs: its shard lengths are these
    model = pytest.importorskip("costmodel.sharded")
    if not hasattr(model, "shard_lens"):
        pytest.skip("costmodel.sharded has no shard_lens")
    assert model.shard_lens(kv_len, p.num_ranks, p.block_tokens) == tuple(p.shard_lens(kv_len))


def test_placement_validation():
    for bad in (2.0, True, "2", None):
        with pytest.raises(TypeError, match="num_ranks"):
            ShardPlacement(bad)
    with pytest.raises(ValueError, match="num_ranks"):
        ShardPlacement(0)
    with pytest.raises(ValueError, match="block_tokens"):
        ShardPlacement(2, 0)
    with pytest.raises(TypeError, match="block_tokens"):
        ShardPlacement(2, 1.5)
    p = ShardPlacement(2, 4)
    with pytest.raises(ValueError, match="t must be >= 0"):
        p.rank_of(-1)
    with pytest.raises(ValueError, match="t must be >= 0"):
        p.local_index(np.array([3, -2]))
    with pytest.raises(TypeError, match="t must"):
        p.rank_of(1.5)
    with pytest.raises(ValueError, match="rank must lie in"):
        p.token_of(2, 0)
    with pytest.raises(TypeError, match="rank must be an int"):
        p.tokens_on(0.0, 3)
    with pytest.raises(ValueError, match="kv_len"):
        p.append(-1, 1)
    with pytest.raises(ValueError, match="n must be >= 0"):
        p.append(3, -1)
    with pytest.raises(TypeError, match="kv_len"):
        p.shard_lens([1.0])
    with pytest.raises(ValueError, match="capacity"):
        p.split(np.zeros((1, 9, 1)), capacity=2)
    shards, lens = p.split(np.zeros((1, 9, 1)))
    with pytest.raises(ValueError, match="shard_lens is not"):
        p.assemble(shards, lens[::-1])


# ---------------------------------------------------------------------------------------------
# The sharded step against decode over the whole cache


class Sharded:
    """One drawn problem: the whole cache, and its shards as `placement` cuts them."""

    def __init__(self, q, k, v, kv_lens, sm_scale, placement, extra):
        self.q, self.k, self.v, self.kv_lens, self.sm_scale = q, k, v, kv_lens, sm_scale
        self.placement = placement
        # Shards padded past their longest sequence with NaN: a slot past shard_lens is never read.
        # extra None: each rank's shard as long as its longest sequence there (maybe 0).
        cap = None if extra is None else int(placement.shard_lens(kv_lens).max(initial=0)) + extra
        self.k_shards, self.lens = placement.split(k, kv_lens, capacity=cap, fill=np.nan)
        self.v_shards, _ = placement.split(v, kv_lens, capacity=cap, fill=np.nan)

    @property
    def world(self):
        return self.placement.num_ranks

    def whole(self, v=None):
        return refattn.decode(self.q, self.k, self.v if v is None else v, self.kv_lens,
                              sm_scale=self.sm_scale)


@st.composite
def sharded_cases(draw, world=None, dtype="float64"):
    world = draw(st.integers(1, 8)) if world is None else world
    placement = ShardPlacement(world, draw(st.sampled_from([1, 2, 3, 5, 8, 16])))
    batch = draw(st.integers(1, 4))
    num_qo_heads, num_kv_heads = draw(head_layouts())
    head_dim = draw(st.integers(1, 16))
    kv_len = draw(lengths())
    kv_lens = np.array(draw(st.lists(st.one_of(st.just(kv_len), st.integers(0, kv_len)),
                                     min_size=batch, max_size=batch)))
    q = draw(float_arrays((batch, num_qo_heads, head_dim), dtype))
    k = draw(float_arrays((batch, kv_len, num_kv_heads, head_dim), dtype))
    v = draw(float_arrays((batch, kv_len, num_kv_heads, head_dim), dtype))
    return Sharded(q, k, v, kv_lens, draw(sm_scales), placement,
                   draw(st.one_of(st.none(), st.integers(0, 2))))


def _run_contiguous(case, attend=refattn.split_kv, k_shards=None, v_shards=None):
    k_shards = case.k_shards if k_shards is None else k_shards
    v_shards = case.v_shards if v_shards is None else v_shards

    def rank_step(collective):
        r = collective.rank
        return sharded_split_kv(case.q, k_shards[r], v_shards[r], case.lens[r], collective=collective,
                                attend=attend, merge=refattn.merge_states, sm_scale=case.sm_scale)

    return _results(InProcessCollective.run(case.world, rank_step, timeout_s=TIMEOUT_S))


def _results(outcomes):
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    first_out, first_lse = outcomes[0]
    for out, lse in outcomes[1:]:   # every rank ends with the same numbers
        assert np.array_equal(out, first_out, equal_nan=True)
        assert np.array_equal(lse, first_lse, equal_nan=True)
    return outcomes[0]


def _assert_matches_whole(got, case):
    want = case.whole()
    magnitude = case.whole(v=np.abs(case.v))[0]
    assert got[0].dtype == np.float64 and got[1].dtype == np.float64
    assert_same_state(got, want, out_rtol=merged_out_rtol(want[1]), magnitude=magnitude)


@given(sharded_cases(), st.sampled_from(["split_kv", "decode"]))
@example(Sharded(*(np.ones((1, 1, 1)), np.ones((1, 5, 1, 1)), np.ones((1, 5, 1, 1))), np.array([5]),
                 None, ShardPlacement(8, 1), 0), "decode")
def test_sharded_equals_decode_on_the_whole_cache(case, attend):
    got = _run_contiguous(case, attend=getattr(refattn, attend))
    _assert_matches_whole(got, case)


@given(sharded_cases(), st.integers(1, 5))
def test_sharded_paged_equals_decode_on_the_whole_cache(case, page_size):
    paged = [
        refattn.paged_from_contiguous(case.k_shards[r], case.v_shards[r], case.lens[r],
                                      page_size=page_size, shuffle=r, extra_pages=r % 2)
        for r in range(case.world)
    ]

    def rank_step(collective):
        return sharded_paged_decode(case.q, *paged[collective.rank], collective=collective,
                                    attend=refattn.paged_decode, merge=refattn.merge_states,
                                    sm_scale=case.sm_scale)

    got = _results(InProcessCollective.run(case.world, rank_step, timeout_s=TIMEOUT_S))
    _assert_matches_whole(got, case)


@given(sharded_cases(world=3))
def test_whole_cache_reassembled_from_the_shards(case):
    # The other direction: whatever the shards hold, the result is decode over the cache that
    # ShardPlacement's inverse map makes of them.
    rng = np.random.default_rng(0)
    k_shards = [np.where(np.isnan(s), s, rng.standard_normal(s.shape)) for s in case.k_shards]
    whole_k, kv_lens = case.placement.assemble(k_shards, case.lens)
    whole_v, _ = case.placement.assemble(case.v_shards, case.lens)
    got = _run_contiguous(case, k_shards=k_shards)
    want = refattn.decode(case.q, whole_k, whole_v, kv_lens, sm_scale=case.sm_scale)
    assert_same_state(got, want, out_rtol=merged_out_rtol(want[1]),
                      magnitude=refattn.decode(case.q, whole_k, np.abs(whole_v), kv_lens,
                                               sm_scale=case.sm_scale)[0])


def test_every_shard_empty_gives_the_empty_state():
    p = ShardPlacement(4, 2)
    q = np.ones((2, 4, 8))
    k = np.zeros((2, 0, 2, 8))

    def rank_step(collective):
        return sharded_split_kv(q, k, k, [0, 0], collective=collective, attend=refattn.split_kv,
                                merge=refattn.merge_states)

    out, lse = _results(InProcessCollective.run(p.num_ranks, rank_step, timeout_s=TIMEOUT_S))
    assert np.all(out == 0) and np.all(lse == -np.inf)


def test_one_rank_holds_everything():
    # 3 tokens, blocks of 32, 4 ranks: ranks 1-3 hold nothing of any sequence (capacity 0).
    rng = np.random.default_rng(1)
    case = Sharded(rng.standard_normal((2, 4, 8)), *rng.standard_normal((2, 2, 3, 2, 8)),
                   np.array([3, 2]), None, ShardPlacement(4, 32), None)
    assert [s.shape[1] for s in case.k_shards] == [3, 0, 0, 0]
    _assert_matches_whole(_run_contiguous(case), case)


def test_one_payload_collective_per_step():
    case = Sharded(np.ones((1, 2, 4)), np.ones((1, 9, 1, 4)), np.ones((1, 9, 1, 4)), np.array([9]),
                   None, ShardPlacement(3, 2), 0)

    def rank_step(collective):
        sharded_split_kv(case.q, case.k_shards[collective.rank], case.v_shards[collective.rank],
                         case.lens[collective.rank], collective=collective, attend=refattn.split_kv,
                         merge=refattn.merge_states)
        return collective.calls

    for calls in InProcessCollective.run(3, rank_step, timeout_s=TIMEOUT_S):
        assert calls == ["all_gather_host", "all_gather"]   # the metadata, then the states


# ---------------------------------------------------------------------------------------------
# Non-finite input is never hidden


@given(sharded_cases(world=4), st.sampled_from(["k", "v", "q"]), st.data())
def test_nan_in_one_shard_is_nan_where_decode_has_it(case, where, data):
    attended = [(b, t) for b in range(len(case.kv_lens)) for t in range(case.kv_lens[b])]
    if where == "q" or not attended:
        b = data.draw(st.integers(0, case.q.shape[0] - 1), label="b")
        h = data.draw(st.integers(0, case.q.shape[1] - 1), label="h")
        case.q = case.q.copy()
        case.q[b, h, data.draw(st.integers(0, case.q.shape[2] - 1), label="d")] = np.nan
    else:
        b, t = data.draw(st.sampled_from(attended), label="token")
        j = data.draw(st.integers(0, case.k.shape[2] - 1), label="kv head")
        d = data.draw(st.integers(0, case.k.shape[3] - 1), label="d")
        whole = getattr(case, where).copy()
        whole[b, t, j, d] = np.nan
        setattr(case, where, whole)
        # the same token in the shard that holds it
        shards = getattr(case, f"{where}_shards")
        r, slot = case.placement.rank_of(t), case.placement.local_index(t)
        shards[r] = shards[r].copy()
        shards[r][b, slot, j, d] = np.nan
    got_out, got_lse = _run_contiguous(case)
    want_out, want_lse = case.whole()
    assert np.array_equal(np.isnan(got_out), np.isnan(want_out))
    assert np.array_equal(np.isnan(got_lse), np.isnan(want_lse))
    finite = ~np.isnan(want_out)
    assert rel_error(got_out[finite], want_out[finite]) <= 1e-10
    assert lse_error(got_lse[~np.isnan(want_lse)], want_lse[~np.isnan(want_lse)]) <= LSE_ATOL["float64"]


def test_an_lse_of_nan_or_inf_from_a_rank_gives_nan():
    # A rank whose local attention returns lse NaN or +inf poisons the row on every rank, and an
    # empty rank (lse -inf, out anything) changes nothing.
    q = np.ones((1, 3, 2))
    k = np.ones((1, 4, 1, 2))

    def attend(q, k, v, lens, *, sm_scale):
        out, lse = refattn.decode(q, k, v, lens, sm_scale=sm_scale)
        rank = int(k[0, 0, 0, 0])
        if rank == 1:
            lse[0, 0], lse[0, 1] = np.nan, np.inf
        if rank == 2:
            out[:], lse[:] = np.nan, -np.inf
        return out, lse

    def rank_step(collective):
        kr = k * collective.rank
        return sharded_split_kv(q, kr, kr, collective=collective, attend=attend,
                                merge=refattn.merge_states)

    out, lse = _results(InProcessCollective.run(3, rank_step, timeout_s=TIMEOUT_S))
    assert np.all(np.isnan(out[0, :2])) and np.all(np.isnan(lse[0, :2]))
    whole = np.concatenate([k * 0, k], axis=1)   # rank 2's tokens count for nothing
    want = refattn.decode(q, whole, whole)
    assert np.allclose(out[0, 2], want[0][0, 2]) and np.isclose(lse[0, 2], want[1][0, 2])


# ---------------------------------------------------------------------------------------------
# Malformed sharding raises on every rank and never hangs


def _base_inputs(batch=2, hq=4, hkv=2, head_dim=8, kv_len=5, dtype=np.float64):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, hq, head_dim)).astype(dtype),
            rng.standard_normal((batch, kv_len, hkv, head_dim)).astype(dtype),
            rng.standard_normal((batch, kv_len, hkv, head_dim)).astype(dtype))


DISAGREEMENTS = {
    "batch": dict(batch=3),
    "num_qo_heads": dict(hq=8),
    "num_kv_heads": dict(hkv=1),
    "head_dim": dict(head_dim=4),
    "dtype": dict(dtype=np.float32),
}


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("field", [*DISAGREEMENTS, "sm_scale"])
def test_ranks_that_disagree_all_raise(world, field):
    odd_rank = world - 1

    def rank_step(collective):
        odd = collective.rank == odd_rank
        q, k, v = _base_inputs(**(DISAGREEMENTS.get(field, {}) if odd else {}))
        sm_scale = 0.5 if odd and field == "sm_scale" else None
        return sharded_split_kv(q, k, v, collective=collective, attend=refattn.split_kv,
                                merge=refattn.merge_states, sm_scale=sm_scale)

    outcomes = InProcessCollective.run(world, rank_step, timeout_s=TIMEOUT_S)
    for outcome in outcomes:
        assert isinstance(outcome, ValueError), outcome
        assert "disagree" in str(outcome) and field in str(outcome)


@pytest.mark.parametrize("fault", ["k dtype", "v shape", "shard_lens", "q type", "out shape"])
def test_a_rank_with_bad_input_makes_every_rank_raise(fault):
    world, bad_rank = 3, 1
    expected = {"k dtype": TypeError, "v shape": ValueError, "shard_lens": ValueError,
                "q type": TypeError, "out shape": ValueError}[fault]

    def rank_step(collective):
        q, k, v = _base_inputs()
        lens, out = None, None
        if collective.rank == bad_rank:
            if fault == "k dtype":
                k = k.astype(np.float32)
            elif fault == "v shape":
                v = v[:, :, :, :4]
            elif fault == "shard_lens":
                lens = [2, 6]          # past the shard's 5 slots
            elif fault == "q type":
                q = q.tolist()
            else:
                out = np.empty((2, 4, 7))
        return sharded_split_kv(q, k, v, lens, collective=collective, attend=refattn.split_kv,
                                merge=refattn.merge_states, out=out)

    outcomes = InProcessCollective.run(world, rank_step, timeout_s=TIMEOUT_S)
    assert isinstance(outcomes[bad_rank], expected), outcomes[bad_rank]
    for r, outcome in enumerate(outcomes):
        if r != bad_rank:
            assert isinstance(outcome, ValueError) and f"rank(s) [{bad_rank}] rejected" in str(outcome)


def test_numpy_arrays_need_attend_and_merge():
    def rank_step(collective):
        q, k, v = _base_inputs()
        return sharded_split_kv(q, k, v, collective=collective)

    for outcome in InProcessCollective.run(2, rank_step, timeout_s=TIMEOUT_S):
        assert isinstance(outcome, TypeError), outcome


def test_a_failure_after_the_exchange_still_joins_the_all_gather():
    # The local attention fails on rank 2 only: it raises, the others get NaN (never a hang,
    # never a plausible number).
    def rank_step(collective):
        q, k, v = _base_inputs()

        def attend(*args, **kwargs):
            if collective.rank == 2:
                raise RuntimeError("attention failed here")
            return refattn.split_kv(*args, **kwargs)

        return sharded_split_kv(q, k, v, collective=collective, attend=attend,
                                merge=refattn.merge_states)

    outcomes = InProcessCollective.run(3, rank_step, timeout_s=TIMEOUT_S)
    assert isinstance(outcomes[2], RuntimeError) and "failed here" in str(outcomes[2])
    for out, lse in outcomes[:2]:
        assert np.all(np.isnan(out)) and np.all(np.isnan(lse))


def test_a_collective_without_the_protocol_is_a_type_error():
    q, k, v = _base_inputs()
    with pytest.raises(TypeError, match="collective must have"):
        sharded_split_kv(q, k, v, collective=object(), attend=refattn.split_kv,
                         merge=refattn.merge_states)


def test_outputs_written_in_place():
    q, k, v = _base_inputs()

    def rank_step(collective):
        out, lse = np.full((2, 4, 8), np.nan), np.full((2, 4), np.nan)
        got = sharded_split_kv(q, k, v, collective=collective, attend=refattn.split_kv,
                               merge=refattn.merge_states, out=out, lse=lse)
        assert got[0] is out and got[1] is lse
        return got

    # two ranks holding the same tokens: the whole cache is them twice
    out, lse = _results(InProcessCollective.run(2, rank_step, timeout_s=TIMEOUT_S))
    want = refattn.decode(q, np.concatenate([k, k], 1), np.concatenate([v, v], 1))
    assert_same_state((out, lse), want)


# ---------------------------------------------------------------------------------------------
# The planned form


def _plan(case, dtype="float32"):
    batch, hq, head_dim = case.q.shape
    return plan_split_kv(batch, hq, case.k.shape[2], head_dim, case.k_shards[0].shape[1], dtype=dtype)


def _planned_case(seed, world=3):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((3, 4, 16)).astype(np.float32)
    k, v = rng.standard_normal((2, 3, 40, 2, 16)).astype(np.float32)
    return Sharded(q, k, v, np.array([40, 7, 0]), None, ShardPlacement(world, 4), 1)


def test_planned_runs_match_and_reuse_their_buffers():
    cases = [_planned_case(seed) for seed in range(3)]
    plan = _plan(cases[0])

    def rank_step(collective):
        dec = ShardedDecode(plan, collective, attend=refattn.split_kv, merge=refattn.merge_states)
        out, lse = np.empty((3, 4, 16), np.float32), np.empty((3, 4), np.float32)
        results = []
        for case in cases:
            r = collective.rank
            got = dec.run(case.q, case.k_shards[r], case.v_shards[r], case.lens[r], out=out, lse=lse)
            assert got[0] is out and got[1] is lse
            results.append((out.copy(), lse.copy()))
        assert len(dec._buffers) == 1
        return results, collective.calls

    outcomes = InProcessCollective.run(3, rank_step, timeout_s=TIMEOUT_S)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        results, calls = outcome
        assert calls == ["all_gather_host"] + ["all_gather"] * len(cases)   # the exchange once
        for (out, lse), case in zip(results, cases):
            want_out, want_lse = case.whole()
            assert rel_error(out, want_out) <= OUT_RTOL["float32"]
            assert lse_error(lse, want_lse) <= LSE_ATOL["float32"]


def test_planned_ranks_that_disagree_all_raise():
    case = _planned_case(0)

    def rank_step(collective):
        plan = _plan(case, dtype="float16" if collective.rank == 1 else "float32")
        return ShardedDecode(plan, collective, attend=refattn.split_kv, merge=refattn.merge_states)

    for outcome in InProcessCollective.run(3, rank_step, timeout_s=TIMEOUT_S):
        assert isinstance(outcome, ValueError) and "dtype" in str(outcome), outcome


def test_planned_bad_input_on_one_rank_gives_nan_elsewhere_and_no_hang():
    case = _planned_case(1)
    plan = _plan(case)

    def rank_step(collective):
        r = collective.rank
        dec = ShardedDecode(plan, collective, attend=refattn.split_kv, merge=refattn.merge_states)
        q = case.q[:2] if r == 0 else case.q            # rank 0's batch is not the plan's
        try:
            first = dec.run(q, case.k_shards[r], case.v_shards[r], case.lens[r])
        except ValueError as exc:
            first = exc
        second = dec.run(case.q, case.k_shards[r], case.v_shards[r], case.lens[r])  # still in step
        return first, second

    outcomes = InProcessCollective.run(3, rank_step, timeout_s=TIMEOUT_S)
    for r, outcome in enumerate(outcomes):
        assert not isinstance(outcome, BaseException), outcome
        first, second = outcome
        if r == 0:
            assert isinstance(first, ValueError) and "q must be" in str(first)
        else:
            assert np.all(np.isnan(first[0])) and np.all(np.isnan(first[1]))
        assert rel_error(second[0], case.whole()[0]) <= OUT_RTOL["float32"]


def test_planned_needs_a_plan():
    with pytest.raises(TypeError, match="plan must be a SplitKVPlan"):
        ShardedDecode(None, object())


# ---------------------------------------------------------------------------------------------
# Every world size of one host


@pytest.mark.parametrize("world", range(1, 9))
def test_every_world_size_from_one_to_eight(world):
    # blocks of 3 tokens over 40 and 7 tokens: at world 8 rank 7 holds a partial block of the
    # first sequence only, and ranks 3-7 nothing of the second
    rng = np.random.default_rng(world)
    q = rng.standard_normal((2, 6, 8))
    k, v = rng.standard_normal((2, 2, 40, 3, 8))
    case = Sharded(q, k, v, np.array([40, 7]), 0.3, ShardPlacement(world, 3), 1)
    _assert_matches_whole(_run_contiguous(case), case)
    spans = np.array([[0, 1], [5, 17], [30, 40], [2, 7]])
    got = _run_span(case, [0, 3, 4], spans)
    want = refattn.span(q, k, v, [0, 3, 4], spans, sm_scale=0.3)
    assert_same_state(got, want)


# ---------------------------------------------------------------------------------------------
# Spans over a sharded cache


@given(placements, st.integers(1, 3), st.integers(0, 200), st.data())
def test_local_spans_hold_exactly_the_rank_s_tokens_of_the_spans(p, batch, kv_len, data):
    mask = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).random((batch, kv_len)) < \
        data.draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    span_indptr, spans = refattn.spans_from_mask(mask)
    seq = np.repeat(np.arange(batch), np.diff(span_indptr))
    held = np.zeros((batch, kv_len), dtype=int)        # how many ranks' local spans cover each token
    for r in range(p.num_ranks):
        indptr, local = p.local_spans(r, span_indptr, spans)
        assert indptr.shape == (batch + 1,) and local.shape[1:] == (2,)
        # a valid span list of the rank's shard: non-empty, sorted, inside its slots
        refattn.span(np.zeros((batch, 1, 1)), *np.zeros((2, batch, int(p.shard_lens(kv_len)[r]), 1, 1)),
                     indptr, local)
        for b in range(batch):
            for start, end in local[indptr[b]:indptr[b + 1]]:
                held[b, p.token_of(r, np.arange(start, end))] += 1
    assert np.array_equal(held, mask.astype(int))       # every attended token once, nothing else
    assert len(seq) == len(spans)


@st.composite
def sharded_span_cases(draw, world=None):
    """A sharded case, a span list inside each sequence's valid tokens, maybe per-head sinks."""
    case = draw(sharded_cases(world=world))
    batch, kv_len = case.k.shape[:2]
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    mask = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random((batch, kv_len)) < density
    mask &= np.arange(kv_len) < case.kv_lens[:, None]
    sinks = draw(st.one_of(st.none(), float_arrays((case.q.shape[1],))))
    return case, *refattn.spans_from_mask(mask), sinks


def _run_span(case, span_indptr, spans, *, sinks=None, k_shards=None, v_shards=None):
    k_shards = case.k_shards if k_shards is None else k_shards
    v_shards = case.v_shards if v_shards is None else v_shards

    def rank_step(collective):
        r = collective.rank
        return sharded_span(case.q, k_shards[r], v_shards[r], span_indptr, spans,
                            placement=case.placement, kv_len=case.k.shape[1], collective=collective,
                            attend=refattn.span, merge=refattn.merge_states, sm_scale=case.sm_scale,
                            sinks=sinks)

    return _results(InProcessCollective.run(case.world, rank_step, timeout_s=TIMEOUT_S))


@given(sharded_span_cases())
@example((Sharded(np.ones((1, 2, 1)), np.ones((1, 9, 1, 1)), np.ones((1, 9, 1, 1)), np.array([9]), None,
                  ShardPlacement(8, 1), 0), np.array([0, 2]), np.array([[0, 1], [8, 9]]), None))
def test_sharded_span_equals_span_on_the_whole_cache(args):
    case, span_indptr, spans, sinks = args
    # Tokens outside the spans are NaN in the shards: a read of any of them would show.
    attended = np.zeros(case.k.shape[:2], dtype=bool)                  # [batch, kv_len]
    for b in range(len(case.kv_lens)):
        for start, end in spans[span_indptr[b]:span_indptr[b + 1]]:
            attended[b, start:end] = True
    k_shards, v_shards = [], []
    for r, (k, v) in enumerate(zip(case.k_shards, case.v_shards)):
        keep = np.zeros(k.shape[:2], dtype=bool)                       # [batch, capacity]
        for b in range(len(case.kv_lens)):
            n = case.lens[r, b]
            keep[b, :n] = attended[b, case.placement.token_of(r, np.arange(n))]
        k_shards.append(np.where(keep[:, :, None, None], k, np.nan))
        v_shards.append(np.where(keep[:, :, None, None], v, np.nan))
    got = _run_span(case, span_indptr, spans, sinks=sinks, k_shards=k_shards, v_shards=v_shards)
    want = refattn.span(case.q, case.k, case.v, span_indptr, spans, sm_scale=case.sm_scale, sinks=sinks)
    magnitude = refattn.span(case.q, case.k, np.abs(case.v), span_indptr, spans, sm_scale=case.sm_scale,
                             sinks=sinks)[0]
    assert got[0].dtype == np.float64 and got[1].dtype == np.float64
    assert_same_state(got, want, out_rtol=merged_out_rtol(want[1]), magnitude=magnitude)


def test_sharded_span_ranks_without_attended_tokens_give_the_empty_state():
    # One span inside the first block: every other rank attends to nothing, and with no span at
    # all every rank does (out 0, lse -inf; with sinks lse = the sink).
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 8))
    k, v = rng.standard_normal((2, 2, 64, 2, 8))
    case = Sharded(q, k, v, np.array([64, 64]), None, ShardPlacement(4, 16), None)
    got = _run_span(case, [0, 1, 1], [[3, 9]])
    assert_same_state(got, refattn.span(q, k, v, [0, 1, 1], [[3, 9]]))
    assert np.all(got[0][1] == 0) and np.all(got[1][1] == -np.inf)
    sinks = np.array([0.5, -np.inf, 2.0, 0.0])
    out, lse = _run_span(case, [0, 0, 0], np.zeros((0, 2), dtype=np.int64), sinks=sinks)
    assert np.all(out == 0) and np.array_equal(lse, np.broadcast_to(sinks, (2, 4)))


def test_sharded_span_joins_the_sinks_once():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 2, 4))
    k, v = rng.standard_normal((2, 1, 30, 1, 4))
    case = Sharded(q, k, v, np.array([30]), None, ShardPlacement(5, 2), None)
    sinks = np.array([1.0, 3.0])
    got = _run_span(case, [0, 1], [[0, 30]], sinks=sinks)
    want = refattn.span(q, k, v, [0, 1], [[0, 30]], sinks=sinks)
    assert_same_state(got, want)                           # joined five times it would differ
    assert np.all(got[1] > refattn.span(q, k, v, [0, 1], [[0, 30]])[1])


def _span_rank_step(change=None, odd_rank=1):
    """A rank step of a 3-token-block span call on fixed data; `change` edits the odd rank's
    arguments (a dict of sharded_span's)."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 4, 8))
    k, v = rng.standard_normal((2, 2, 20, 2, 8))
    placement = ShardPlacement(3, 3)

    def rank_step(collective):
        kw = dict(span_indptr=[0, 1, 2], spans=[[0, 20], [4, 9]], placement=placement, kv_len=20,
                  sinks=None, sm_scale=None)
        if collective.rank == odd_rank and change:
            kw.update(change)
        ks, _ = placement.split(k)
        vs, _ = placement.split(v)
        r = collective.rank
        return sharded_span(q, ks[r], vs[r], kw.pop("span_indptr"), kw.pop("spans"), collective=collective,
                            attend=refattn.span, merge=refattn.merge_states, **kw)

    return rank_step


@pytest.mark.parametrize("change, what", [
    ({"spans": [[0, 20], [4, 8]]}, "spans and placement"),
    ({"span_indptr": [0, 2, 2], "spans": [[0, 4], [4, 9]]}, "spans and placement"),
    ({"kv_len": 21}, "spans and placement"),
    ({"sinks": np.zeros(4)}, "spans and placement"),
    ({"sm_scale": 0.5}, "sm_scale"),
])
def test_sharded_span_ranks_that_disagree_all_raise(change, what):
    outcomes = InProcessCollective.run(3, _span_rank_step(change), timeout_s=TIMEOUT_S)
    for outcome in outcomes:
        assert isinstance(outcome, ValueError), outcome
        assert "disagree" in str(outcome) and what in str(outcome)


def test_ranks_on_different_variants_all_raise():
    # rank 1 attends to its whole shard while the others attend to spans: a wrong result, so refused
    span_step = _span_rank_step()
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 4, 8))

    def rank_step(collective):
        if collective.rank == 1:
            k = np.zeros((2, 6, 2, 8))
            return sharded_split_kv(q, k, k, collective=collective, attend=refattn.split_kv,
                                    merge=refattn.merge_states)
        return span_step(collective)

    for outcome in InProcessCollective.run(3, rank_step, timeout_s=TIMEOUT_S):
        assert isinstance(outcome, ValueError) and "variant" in str(outcome), outcome


@pytest.mark.parametrize("change, error, match", [
    ({"spans": [[0, 21], [4, 9]]}, ValueError, r"inside \[0, kv_len\)"),
    ({"spans": [[5, 5], [4, 9]]}, ValueError, "empty"),
    ({"span_indptr": [0, 1]}, ValueError, "span_indptr"),
    ({"spans": [[0.0, 20.0], [4, 9]]}, TypeError, "spans"),
    ({"placement": ShardPlacement(2, 3)}, ValueError, "placement must place tokens on"),
    ({"placement": None}, TypeError, "placement must be a ShardPlacement"),
    ({"kv_len": -1}, ValueError, "kv_len"),
    ({"sinks": np.zeros(3)}, ValueError, "sinks"),
])
def test_sharded_span_bad_input_on_one_rank_makes_every_rank_raise(change, error, match):
    outcomes = InProcessCollective.run(3, _span_rank_step(change), timeout_s=TIMEOUT_S)
    assert isinstance(outcomes[1], error) and re_search(match, str(outcomes[1])), outcomes[1]
    for r in (0, 2):
        assert isinstance(outcomes[r], ValueError) and "rank(s) [1] rejected" in str(outcomes[r]), outcomes[r]


def test_sharded_span_shard_too_short_for_its_spans():
    rng = np.random.default_rng(6)
    q = rng.standard_normal((1, 2, 4))
    k = rng.standard_normal((1, 12, 1, 4))
    placement = ShardPlacement(2, 2)
    ks, _ = placement.split(k)

    def rank_step(collective):
        r = collective.rank
        shard = ks[r][:, :3] if r == 0 else ks[r]            # rank 0 holds 6 slots, keeps 3
        return sharded_span(q, shard, shard, [0, 1], [[0, 12]], placement=placement, kv_len=12,
                            collective=collective, attend=refattn.span, merge=refattn.merge_states)

    outcomes = InProcessCollective.run(2, rank_step, timeout_s=TIMEOUT_S)
    assert isinstance(outcomes[0], ValueError) and "must hold the 6 slots of rank 0" in str(outcomes[0])
    assert isinstance(outcomes[1], ValueError) and "rank(s) [0] rejected" in str(outcomes[1])


def test_local_spans_validation():
    p = ShardPlacement(2, 4)
    with pytest.raises(ValueError, match="spans must be"):
        p.local_spans(0, [0, 1], [1, 2])
    with pytest.raises(ValueError, match="span_indptr must be"):
        p.local_spans(0, [0, 2], [[1, 2]])
    with pytest.raises(ValueError, match=">= 0"):
        p.local_spans(0, [0, 1], [[-1, 2]])
    with pytest.raises(ValueError, match="rank must lie in"):
        p.local_spans(2, [0, 1], [[1, 2]])
    with pytest.raises(TypeError, match="spans"):
        p.local_spans(0, [0, 1], [[1.0, 2.0]])


# ---------------------------------------------------------------------------------------------
# The test collective itself


def test_in_process_collective_reports_mismatched_calls():
    def rank_step(collective):
        if collective.rank == 0:
            return collective.all_gather(np.zeros(3))
        return collective.all_gather(np.zeros(4))

    for outcome in InProcessCollective.run(2, rank_step, timeout_s=TIMEOUT_S):
        assert isinstance(outcome, RuntimeError) and "different collectives" in str(outcome)


def test_in_process_collective_times_out_instead_of_hanging():
    def rank_step(collective):
        if collective.rank == 0:
            return collective.all_gather(np.zeros(3))
        return None

    outcomes = InProcessCollective.run(2, rank_step, timeout_s=0.2)
    assert isinstance(outcomes[0], RuntimeError) and "would hang" in str(outcomes[0])
