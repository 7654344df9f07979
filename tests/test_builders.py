"""refattn.builders: page tables, trees and span lists built from plain descriptions."""

import doctest
import importlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from decode_attention import contract
from strategies import NP_DTYPE, assert_same_state, decode_cases, oracle


@st.composite
def paging(draw):
    case = draw(decode_cases())
    page_size = draw(st.integers(1, case.k.shape[1] + 2))
    shuffle = draw(st.one_of(st.none(), st.integers(0, 2**32 - 1)))
    extra_pages = draw(st.integers(0, 3))
    return case, page_size, shuffle, extra_pages


@given(paging())
def test_paged_cache_holds_the_same_tokens(args):
    case, page_size, shuffle, extra_pages = args
    k_cache, v_cache, kv_indptr, kv_indices, last = refattn.paged_from_contiguous(
        case.k, case.v, case.kv_lens, page_size=page_size, shuffle=shuffle, extra_pages=extra_pages
    )
    for arr in (kv_indptr, kv_indices, last):
        assert arr.dtype == np.int32
    assert k_cache.dtype == case.k.dtype and v_cache.dtype == case.v.dtype
    lens = case.lens
    pages = -(-lens // page_size)
    np.testing.assert_array_equal(np.diff(kv_indptr), pages)
    assert k_cache.shape == (pages.sum() + extra_pages, page_size, *case.k.shape[2:])
    assert len(set(kv_indices.tolist())) == len(kv_indices)  # no page used twice
    for b, n in enumerate(lens):
        own = kv_indices[kv_indptr[b]:kv_indptr[b + 1]]
        if n == 0:
            assert last[b] == 0 and own.size == 0
            continue
        assert 1 <= last[b] <= page_size and (len(own) - 1) * page_size + last[b] == n
        np.testing.assert_array_equal(k_cache[own].reshape(-1, *case.k.shape[2:])[:n], case.k[b, :n])
        np.testing.assert_array_equal(v_cache[own].reshape(-1, *case.v.shape[2:])[:n], case.v[b, :n])


def test_pages_in_order_without_shuffle():
    k = np.ones((2, 7, 1, 2))
    _, _, kv_indptr, kv_indices, last = refattn.paged_from_contiguous(
        k, k, [7, 2], page_size=3, extra_pages=2
    )
    assert kv_indptr.tolist() == [0, 3, 4]
    assert kv_indices.tolist() == [0, 1, 2, 3]
    assert last.tolist() == [1, 2]


def test_shuffle_is_reproducible_and_accepts_a_generator():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, 40, 2, 4))
    a = refattn.paged_from_contiguous(k, k, page_size=4, shuffle=7, extra_pages=4)
    b = refattn.paged_from_contiguous(k, k, page_size=4, shuffle=7, extra_pages=4)
    c = refattn.paged_from_contiguous(k, k, page_size=4, shuffle=np.random.default_rng(7))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert sorted(c[3].tolist()) == list(range(30)) and c[3].tolist() != list(range(30))


def test_unused_slots_hold_junk():
    k = np.zeros((1, 5, 1, 2), dtype=np.float32)
    k_cache, _, _, kv_indices, _ = refattn.paged_from_contiguous(
        k, k, page_size=4, shuffle=1, extra_pages=2
    )
    unused = sorted(set(range(k_cache.shape[0])) - set(kv_indices.tolist()))
    assert len(unused) == 2 and np.all(k_cache[unused] != 0)
    assert np.all(k_cache[kv_indices[-1], 1:] != 0)  # the tail of the last page


@given(st.integers(1, 6), st.integers(1, 4), st.data())
def test_tree_from_paths_lays_segments_back_to_back(num_segs, batch, data):
    seg_lens = data.draw(st.lists(st.integers(0, 5), min_size=num_segs, max_size=num_segs))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    segments_k = [rng.standard_normal((n, 2, 3)) for n in seg_lens]
    segments_v = [rng.standard_normal((n, 2, 3)) for n in seg_lens]
    paths = [
        data.draw(st.lists(st.integers(0, num_segs - 1), unique=True, max_size=num_segs))
        for _ in range(batch)
    ]
    k_segs, v_segs, seg_indptr, path_indptr, path_segs = refattn.tree_from_paths(
        segments_k, segments_v, paths
    )
    for arr in (seg_indptr, path_indptr, path_segs):
        assert arr.dtype == np.int32
    assert seg_indptr.tolist() == [0, *np.cumsum(seg_lens).tolist()]
    for s in range(num_segs):
        np.testing.assert_array_equal(k_segs[seg_indptr[s]:seg_indptr[s + 1]], segments_k[s])
        np.testing.assert_array_equal(v_segs[seg_indptr[s]:seg_indptr[s + 1]], segments_v[s])
    for b, path in enumerate(paths):
        assert path_segs[path_indptr[b]:path_indptr[b + 1]].tolist() == path


@pytest.mark.parametrize(
    "kv_lens, num_sinks, window, want_indptr, want_spans",
    [
        ([30], 4, 8, [0, 2], [[0, 4], [22, 30]]),
        ([12], 4, 8, [0, 1], [[0, 12]]),           # sinks [0, 4) and window [4, 12) touch
        ([10], 4, 8, [0, 1], [[0, 10]]),           # they overlap
        ([3], 4, 8, [0, 1], [[0, 3]]),
        ([0], 4, 8, [0, 0], []),
        ([30], 0, 8, [0, 1], [[22, 30]]),
        ([30], 4, 0, [0, 1], [[0, 4]]),
        ([30], 0, 0, [0, 0], []),
        ([30, 5, 0, 13], 2, 3, [0, 2, 3, 3, 5], [[0, 2], [27, 30], [0, 5], [0, 2], [10, 13]]),
    ],
)
def test_spans_from_sinks_window(kv_lens, num_sinks, window, want_indptr, want_spans):
    span_indptr, spans = refattn.spans_from_sinks_window(kv_lens, num_sinks=num_sinks, window=window)
    assert span_indptr.dtype == np.int32 and spans.dtype == np.int32
    assert span_indptr.tolist() == want_indptr
    assert spans.shape == (len(want_spans), 2) and spans.tolist() == want_spans


def _mask_of(span_indptr, spans, shape):
    mask = np.zeros(shape, dtype=bool)
    for b in range(shape[0]):
        for start, end in spans[span_indptr[b]:span_indptr[b + 1]]:
            mask[b, start:end] = True
    return mask


@given(st.integers(1, 4), st.integers(0, 40), st.integers(0, 2**32 - 1), st.floats(0, 1))
def test_spans_from_mask_are_the_maximal_runs(batch, kv_len, seed, density):
    mask = np.random.default_rng(seed).random((batch, kv_len)) < density
    span_indptr, spans = refattn.spans_from_mask(mask)
    assert span_indptr.dtype == np.int32 and spans.dtype == np.int32
    np.testing.assert_array_equal(_mask_of(span_indptr, spans, mask.shape), mask)
    for b in range(batch):
        own = spans[span_indptr[b]:span_indptr[b + 1]]
        assert np.all(own[:, 0] < own[:, 1])
        assert np.all(own[1:, 0] > own[:-1, 1])  # maximal: runs never touch


@given(st.lists(st.integers(0, 40), min_size=1, max_size=4), st.integers(0, 8), st.integers(0, 50))
def test_sinks_window_spans_cover_exactly_sinks_and_window(kv_lens, num_sinks, window):
    span_indptr, spans = refattn.spans_from_sinks_window(kv_lens, num_sinks=num_sinks, window=window)
    kv_len = max(kv_lens)
    want = np.zeros((len(kv_lens), kv_len), dtype=bool)
    for b, n in enumerate(kv_lens):
        want[b, : min(num_sinks, n)] = True
        want[b, max(0, n - window) : n] = True
    np.testing.assert_array_equal(_mask_of(span_indptr, spans, want.shape), want)
    # A valid span list for the contract: checked by the span reference's own validation.
    q = np.zeros((len(kv_lens), 1, 1))
    k = np.zeros((len(kv_lens), kv_len, 1, 1))
    refattn.span(q, k, k, span_indptr, spans)


# ----------------------------------------------------------------------------------------------
# Quest-style block selection


def _chosen_blocks(scores_row, n, block_size, top_k):
    """The top_k of the first ceil(n / block_size) blocks, NaN ranking as +inf, ties to the
    lower index: the specification, written as a sort of (rank, index) pairs."""
    valid = -(-n // block_size)
    key = [(-np.inf if np.isnan(s) else -s, i) for i, s in enumerate(scores_row[:valid])]
    return sorted(i for _, i in sorted(key)[:top_k])


@given(st.integers(1, 4), st.integers(0, 12), st.integers(1, 6), st.integers(0, 14), st.data())
def test_block_selection_is_the_top_k_blocks_of_each_sequence(batch, num_blocks, block_size,
                                                              top_k, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    scores = rng.integers(-2, 3, size=(batch, num_blocks)).astype(np.float64)  # ties are likely
    scores[rng.random(scores.shape) < 0.1] = np.nan
    scores[rng.random(scores.shape) < 0.05] = -np.inf
    capacity = num_blocks * block_size
    kv_lens = data.draw(st.one_of(
        st.none(), st.lists(st.integers(0, capacity), min_size=batch, max_size=batch)
    ))
    dtype = data.draw(st.sampled_from(["float16", "float32", "float64"]))
    span_indptr, spans = refattn.spans_from_block_scores(
        scores.astype(NP_DTYPE[dtype]), block_size=block_size, top_k=top_k, kv_lens=kv_lens
    )
    assert span_indptr.dtype == np.int32 and spans.dtype == np.int32
    lens = [capacity] * batch if kv_lens is None else kv_lens
    want = np.zeros((batch, capacity), dtype=bool)
    for b, n in enumerate(lens):
        for i in _chosen_blocks(scores[b], n, block_size, top_k):
            want[b, i * block_size : min((i + 1) * block_size, n)] = True
    np.testing.assert_array_equal(_mask_of(span_indptr, spans, want.shape), want)
    contract.check_spans(span_indptr, spans, batch, capacity)  # sorted, inside, non-overlapping
    for b in range(batch):
        own = spans[span_indptr[b]:span_indptr[b + 1]]
        assert np.all(own[1:, 0] > own[:-1, 1])  # adjacent blocks merged: spans never touch


def test_block_selection_breaks_ties_by_lower_index_and_clips_the_last_block():
    scores = np.array([[1.0, 5.0, 5.0, 5.0, 0.0]])
    span_indptr, spans = refattn.spans_from_block_scores(scores, block_size=3, top_k=2)
    assert spans.tolist() == [[3, 9]]
    # kv_len 13: blocks 0..4, the last holding one token; blocks past the length never chosen.
    scores = np.array([[0.0, 1.0, 2.0, 3.0, 4.0, 99.0]])
    _, spans = refattn.spans_from_block_scores(scores, block_size=3, top_k=2, kv_lens=[13])
    assert spans.tolist() == [[9, 13]]
    _, spans = refattn.spans_from_block_scores(scores, block_size=3, top_k=50, kv_lens=[13])
    assert spans.tolist() == [[0, 13]]
    _, spans = refattn.spans_from_block_scores(scores, block_size=3, top_k=0)
    assert spans.shape == (0, 2)


def test_nan_scores_rank_first():
    scores = np.array([[9.0, np.nan, 3.0, np.inf, 8.0]])
    _, spans = refattn.spans_from_block_scores(scores, block_size=2, top_k=3)
    assert spans.tolist() == [[0, 4], [6, 8]]  # NaN and +inf (tied, lower index first), then 9


def _quest_oracle(q, k, lens, block_size):
    """Quest's bound by loops over sequences, blocks and heads, reduced by a max over heads."""
    q, k = q.astype(np.float64), k.astype(np.float64)
    num_qo_heads, num_kv_heads = q.shape[1], k.shape[2]
    group = num_qo_heads // num_kv_heads
    num_blocks = -(-k.shape[1] // block_size)
    scores = np.full((q.shape[0], num_blocks), -np.inf)
    for b, n in enumerate(lens):
        for i in range(-(-n // block_size)):
            block = k[b, i * block_size : min((i + 1) * block_size, n)]  # [<= bs, Hkv, D]
            bounds = []
            for h in range(num_qo_heads):
                kmin, kmax = block[:, h // group].min(axis=0), block[:, h // group].max(axis=0)
                bounds.append(sum(max(qd * lo, qd * hi) for qd, lo, hi in zip(q[b, h], kmin, kmax)))
            scores[b, i] = max(bounds)
    return scores


@given(decode_cases(), st.integers(1, 9))
def test_quest_scores_match_a_loop_and_bound_every_score_in_their_block(case, block_size):
    got = refattn.quest_block_scores(case.q, case.k, case.kv_lens, block_size=block_size)
    want = _quest_oracle(case.q, case.k, case.lens, block_size)
    assert got.shape == want.shape == (case.q.shape[0], -(-case.k.shape[1] // block_size))
    assert np.array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-12, atol=1e-12)
    q, k = case.q.astype(np.float64), case.k.astype(np.float64)
    group = q.shape[1] // k.shape[2]
    dots = np.einsum("bhd,bshd->bhs", q, np.repeat(k, group, axis=2))  # [B, Hq, S]
    for b, n in enumerate(case.lens):
        for l in range(n):
            bound = got[b, l // block_size]
            assert np.max(dots[b, :, l]) <= bound + 1e-9 * max(1.0, abs(bound))


@given(decode_cases())
def test_quest_scores_of_single_token_blocks_are_the_best_head_score(case):
    got = refattn.quest_block_scores(case.q, case.k, case.kv_lens, block_size=1)
    q, k = case.q.astype(np.float64), case.k.astype(np.float64)
    group = q.shape[1] // k.shape[2]
    best = np.einsum("bhd,bshd->bhs", q, np.repeat(k, group, axis=2)).max(axis=1)  # [B, S]
    for b, n in enumerate(case.lens):
        np.testing.assert_allclose(got[b, :n], best[b, :n], rtol=1e-12, atol=1e-12)
        assert np.all(np.isneginf(got[b, n:]))


def test_quest_scores_show_non_finite_keys_and_queries():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 3))
    k = rng.standard_normal((2, 12, 2, 3))
    k[0, 5, 1, 2] = -np.inf  # block 1 of sequence 0 (block_size 4), KV head 1
    k[0, 11, 0, 0] = np.nan  # past kv_lens[0] = 10: never read
    q[1, 3, 0] = np.inf
    scores = refattn.quest_block_scores(q, k, [10, 12], block_size=4)
    assert np.isnan(scores[0, 1]) and np.all(np.isfinite(scores[0, [0, 2]]))
    assert np.all(np.isnan(scores[1]))
    _, spans = refattn.spans_from_block_scores(scores, block_size=4, top_k=1, kv_lens=[10, 12])
    assert spans.tolist() == [[4, 8], [0, 4]]


@given(decode_cases(dtype="float64"), st.integers(1, 9), st.integers(0, 6))
def test_quest_selection_attends_to_exactly_the_chosen_blocks(case, block_size, top_k):
    scores = refattn.quest_block_scores(case.q, case.k, case.kv_lens, block_size=block_size)
    span_indptr, spans = refattn.spans_from_block_scores(
        scores, block_size=block_size, top_k=top_k, kv_lens=case.lens
    )
    got = refattn.span(case.q, case.k, case.v, span_indptr, spans, sm_scale=case.sm_scale)
    contexts = []
    for b, n in enumerate(case.lens):
        tokens = [
            t for i in _chosen_blocks(scores[b], n, block_size, top_k)
            for t in range(i * block_size, min((i + 1) * block_size, n))
        ]
        contexts.append((case.k[b, tokens], case.v[b, tokens]))
    assert_same_state(got, oracle(case.q, contexts, case.scale))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: refattn.spans_from_block_scores(np.zeros((2, 3), dtype=np.int64), block_size=4,
                                                 top_k=1), TypeError, "block_scores must have a float"),
        (lambda: refattn.spans_from_block_scores(np.zeros(3), block_size=4, top_k=1),
         ValueError, r"block_scores must be \[batch, num_blocks\]"),
        (lambda: refattn.spans_from_block_scores(np.zeros((0, 3)), block_size=4, top_k=1),
         ValueError, "block_scores must be .* batch >= 1"),
        (lambda: refattn.spans_from_block_scores(np.zeros((1, 3)), block_size=0, top_k=1),
         ValueError, "block_size must be >= 1"),
        (lambda: refattn.spans_from_block_scores(np.zeros((1, 3)), block_size=2.0, top_k=1),
         TypeError, "block_size must be a positive int"),
        (lambda: refattn.spans_from_block_scores(np.zeros((1, 3)), block_size=2, top_k=-1),
         ValueError, "top_k must be >= 0"),
        (lambda: refattn.spans_from_block_scores(np.zeros((1, 3)), block_size=2, top_k=None),
         TypeError, "top_k must be an int"),
        (lambda: refattn.spans_from_block_scores(np.zeros((1, 3)), block_size=2, top_k=1,
                                                 kv_lens=[7]),
         ValueError, r"kv_lens must satisfy .* = 6, got kv_lens\[0\] = 7"),
        (lambda: refattn.spans_from_block_scores(np.zeros((1, 3)), block_size=2, top_k=1,
                                                 kv_lens=[1, 2]),
         ValueError, r"kv_lens must be \[batch\] = \[1\]"),
        (lambda: refattn.spans_from_block_scores(np.zeros((1, 3)), block_size=2, top_k=1,
                                                 kv_lens=[1.0]),
         TypeError, "kv_lens must have an integer dtype"),
        (lambda: refattn.quest_block_scores(np.zeros((1, 4, 2)), np.zeros((1, 5, 3, 2)),
                                            block_size=2),
         ValueError, "num_qo_heads .* must be a multiple of num_kv_heads"),
        (lambda: refattn.quest_block_scores(np.zeros((1, 4, 2)), np.zeros((1, 5, 2, 3)),
                                            block_size=2),
         ValueError, "k must be"),
        (lambda: refattn.quest_block_scores(np.zeros((1, 4, 2)), np.zeros((1, 5, 2, 2)),
                                            block_size=0),
         ValueError, "block_size must be >= 1"),
        (lambda: refattn.quest_block_scores(np.zeros((1, 4, 2)), np.zeros((1, 5, 2, 2)), [6],
                                            block_size=2),
         ValueError, "kv_lens must satisfy"),
    ],
)
def test_bad_block_selection_arguments_are_rejected(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ----------------------------------------------------------------------------------------------
# Synthetic span patterns


@given(
    st.sampled_from(refattn.SPAN_PATTERNS), st.integers(1, 4),
    st.one_of(st.sampled_from([0, 1, 2, 3, 7, 100]), st.integers(0, 3000)),
    st.one_of(st.sampled_from([0.0, 0.01, 0.5, 0.999, 1.0]), st.floats(0, 1)),
    st.integers(0, 2**32 - 1),
)
def test_span_patterns_are_valid_and_reach_their_density(kind, batch, kv_len, density, seed):
    span_indptr, spans = refattn.span_pattern(kind, batch=batch, kv_len=kv_len, density=density,
                                              seed=seed)
    assert span_indptr.dtype == np.int32 and spans.dtype == np.int32
    contract.check_spans(span_indptr, spans, batch, kv_len)  # valid for refattn.span
    attended = np.floor(density * kv_len + 0.5)
    for b in range(batch):
        own = spans[span_indptr[b]:span_indptr[b + 1]]
        assert np.sum(own[:, 1] - own[:, 0]) == attended
        assert np.all(own[1:, 0] > own[:-1, 1])  # never touching
        if kv_len:
            assert abs(attended / kv_len - density) <= 0.5 / kv_len + 1e-12
        if attended and kind != "sinks_window":
            assert own[-1, 1] == kv_len  # the newest token is attended
        if kind == "arithmetic":
            assert len(own) <= 3 and (attended < 3 or own[0, 0] == 0)  # the question comes first
    again = refattn.span_pattern(kind, batch=batch, kv_len=kv_len, density=density, seed=seed)
    np.testing.assert_array_equal(again[0], span_indptr)
    np.testing.assert_array_equal(again[1], spans)


@given(st.integers(0, 2000), st.floats(0, 1), st.integers(0, 10))
def test_sinks_window_pattern_is_sinks_and_window(kv_len, density, num_sinks):
    got = refattn.span_pattern("sinks_window", batch=2, kv_len=kv_len, density=density,
                               num_sinks=num_sinks)
    attended = int(np.floor(density * kv_len + 0.5))
    sinks = min(num_sinks, attended)
    want = refattn.spans_from_sinks_window([kv_len] * 2, num_sinks=sinks, window=attended - sinks)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@given(st.integers(1, 4000), st.floats(0.01, 1), st.integers(1, 200), st.integers(0, 2**32 - 1))
def test_summarization_spans_are_about_sentence_long(kv_len, density, sentence_len, seed):
    span_indptr, spans = refattn.span_pattern("summarization", batch=1, kv_len=kv_len,
                                              density=density, seed=seed,
                                              sentence_len=sentence_len)
    attended = int(np.floor(density * kv_len + 0.5))
    if attended:
        # one span per sentence at most (sentences may touch and merge)
        assert 1 <= len(spans) <= max(1, round(attended / sentence_len))


def test_span_patterns_have_their_shapes():
    _, spans = refattn.span_pattern("summarization", batch=1, kv_len=8192, density=0.2, seed=1)
    lens = spans[:, 1] - spans[:, 0]
    assert len(spans) >= 30 and np.median(lens) < 64  # many medium spans
    assert spans[0, 0] < 1024  # spread over the whole document, not bunched at the end
    _, spans = refattn.span_pattern("arithmetic", batch=1, kv_len=8192, density=0.05, seed=1)
    assert len(spans) == 3 and spans[0, 0] == 0 and spans[-1, 1] == 8192
    assert spans[1, 1] > 8192 - 8192 // 16 - 410  # the previous result sits near the end
    _, spans = refattn.span_pattern("sinks_window", batch=1, kv_len=8192, density=0.05)
    assert spans.tolist() == [[0, 4], [8192 - 406, 8192]]


def test_span_pattern_seeds():
    kw = dict(batch=3, kv_len=500, density=0.3)
    for kind in ("arithmetic", "summarization"):
        a = refattn.span_pattern(kind, seed=1, **kw)
        b = refattn.span_pattern(kind, seed=2, **kw)
        c = refattn.span_pattern(kind, seed=np.random.default_rng(1), **kw)
        d = refattn.span_pattern(kind, **kw)
        e = refattn.span_pattern(kind, seed=0, **kw)
        assert a[1].tolist() != b[1].tolist()  # the seed matters
        assert a[1].tolist() == c[1].tolist()  # an int seed or a Generator seeded alike
        assert d[1].tolist() == e[1].tolist()  # no seed: seed 0, reproducible
        assert a[1][a[0][0]:a[0][1]].tolist() != a[1][a[0][1]:a[0][2]].tolist()  # per sequence


@pytest.mark.parametrize(
    "kw, error, message",
    [
        (dict(kind=3), TypeError, "kind must be one of"),
        (dict(kind="sparse"), ValueError, "kind must be one of .* got 'sparse'"),
        (dict(batch=0), ValueError, "batch must be >= 1"),
        (dict(batch=2.0), TypeError, "batch must be a positive int"),
        (dict(kv_len=-1), ValueError, "kv_len must be >= 0"),
        (dict(density=1.5), ValueError, r"density must lie in \[0, 1\], got 1.5"),
        (dict(density=float("nan")), ValueError, "density must lie in"),
        (dict(density="0.5"), TypeError, "density must be a real number"),
        (dict(density=True), TypeError, "density must be a real number"),
        (dict(seed=-1), ValueError, "seed must be >= 0"),
        (dict(seed=1.5), TypeError, "seed must be None, an int"),
        (dict(num_sinks=2), ValueError, "num_sinks applies to kind='sinks_window' only"),
        (dict(kind="sinks_window", num_sinks=-1), ValueError, "num_sinks must be >= 0"),
        (dict(kind="summarization", sentence_len=0), ValueError, "sentence_len must be >= 1"),
        (dict(kind="sinks_window", sentence_len=8), ValueError, "sentence_len applies to"),
    ],
)
def test_bad_span_pattern_arguments_are_rejected(kw, error, message):
    args = dict(kind="arithmetic", batch=2, kv_len=100, density=0.3)
    args.update(kw)
    kind = args.pop("kind")
    with pytest.raises(error, match=message):
        refattn.span_pattern(kind, **args)


def test_docstring_example_runs():
    module = importlib.import_module("refattn.builders")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0
