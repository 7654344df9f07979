"""The span list as a page table over the contiguous cache (gpukernels.span), checked on the CPU:
the paged reference over that table gives refattn.span's answer, and only attended rows are
listed."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from gpukernels.span import span_page_table


@st.composite
def span_sets(draw):
    batch = draw(st.integers(1, 4))
    align = draw(st.sampled_from([1, 3, 16, 64]))
    kv_len = align * draw(st.integers(0, 12))
    indptr, spans = [0], []
    for _ in range(batch):
        cuts = sorted(set(draw(st.lists(st.integers(0, kv_len // align), max_size=6))))
        own = [[a * align, b * align] for a, b in zip(cuts[::2], cuts[1::2]) if a < b]
        if own and draw(st.booleans()):   # one ragged end, as a sink span or a short span has
            i = draw(st.integers(0, len(own) - 1))
            own[i][1] -= draw(st.integers(0, own[i][1] - own[i][0] - 1))
        spans += own
        indptr.append(len(spans))
    spans = np.array(spans, dtype=np.int64).reshape(-1, 2)
    return batch, kv_len, np.array(indptr), spans, draw(st.integers(0, 2**31 - 1))


@given(span_sets())
def test_the_page_table_reads_exactly_the_spans(case):
    batch, kv_len, indptr, spans, seed = case
    rng = np.random.default_rng(seed)
    hq, hkv, d = 4, 2, 8
    q = rng.standard_normal((batch, hq, d))
    k = rng.standard_normal((batch, kv_len, hkv, d))
    v = rng.standard_normal((batch, kv_len, hkv, d))
    table = span_page_table(indptr, spans, batch, kv_len)
    page = table.page_size
    assert page & (page - 1) == 0 and kv_len % page == 0 and not np.any(spans[:, 0] % page)
    attended = np.zeros(batch, dtype=np.int64)
    np.add.at(attended, np.repeat(np.arange(batch), np.diff(indptr)), spans[:, 1] - spans[:, 0])
    pages = np.diff(table.kv_indptr)
    listed = np.where(pages > 0, (pages - 1) * page + table.kv_last_page_len, 0)
    np.testing.assert_array_equal(listed, attended)                      # every attended token once
    assert np.all((table.kv_last_page_len >= 1) | (pages == 0)) and np.all(table.kv_last_page_len <= page)
    assert len(set(table.kv_indices.tolist())) == len(table.kv_indices)   # no row twice
    ref_out, ref_lse = refattn.span(q, k, v, indptr, spans)
    pages = batch * kv_len // page
    out, lse = refattn.paged_decode(q, k.reshape(pages, page, hkv, d), v.reshape(pages, page, hkv, d),
                                    table.kv_indptr, table.kv_indices, table.kv_last_page_len)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-12)


def test_page_size_follows_the_span_boundaries():
    assert span_page_table([0, 2], np.array([[0, 4], [4096, 8192]]), 1, 8192).page_size == 64   # one ragged end
    assert span_page_table([0, 2], np.array([[0, 4], [4096, 8190]]), 1, 8192).page_size == 4    # 8190 ragged
    assert span_page_table([0, 2], np.array([[0, 4], [4100, 8192]]), 1, 8192).page_size == 4    # a start
    assert span_page_table([0, 2], np.array([[0, 64], [4096, 8192]]), 1, 8192).page_size == 64
    assert span_page_table([0, 1], np.array([[16, 48]]), 1, 8192).page_size == 16
    assert span_page_table([0, 1], np.array([[3, 48]]), 1, 8192).page_size == 1
    assert span_page_table([0, 1], np.array([[0, 64]]), 1, 100).page_size == 4   # kv_len too


def test_a_sinks_and_window_table():
    indptr, spans = refattn.spans_from_sinks_window([32768, 100], num_sinks=4, window=4096)
    table = span_page_table(indptr, spans, 2, 32768)
    # Pages of 64: the sinks' page, 4 tokens of it attended, listed last.
    assert table.page_size == 64
    assert table.kv_indptr.tolist() == [0, 64 + 1, 64 + 1 + 2]
    assert table.kv_indices[:65].tolist() == list(range(28672 // 64, 32768 // 64)) + [0]
    assert table.kv_indices[65:].tolist() == [512, 513]
    assert table.kv_last_page_len.tolist() == [4, 100 - 64]


@pytest.mark.parametrize("indptr, spans, error", [
    ([0, 1], np.array([[5, 3]]), ValueError),
    ([0, 1], np.array([[0, 9000]]), ValueError),
    ([0, 2], np.array([[0, 10], [5, 20]]), ValueError),
    ([0, 1], np.array([[0.5, 3]]), TypeError),
])
def test_malformed_spans_are_refused(indptr, spans, error):
    with pytest.raises(error):
        span_page_table(indptr, spans, 1, 8192)


def test_a_span_plan_is_made_on_the_host():
    from gpukernels.span import plan_span

    indptr, spans = refattn.spans_from_sinks_window([32768, 100], num_sinks=4, window=4096)
    plan = plan_span(indptr, spans, batch=2, kv_len=32768, num_qo_heads=32, num_kv_heads=8, head_dim=128,
                     gpu="H200")
    assert plan.table.page_size == 64 and plan.split.page_size == 64
    assert plan.attended_tokens.tolist() == [4100, 100]
    assert plan.split.num_sms == 132
    with pytest.raises(ValueError, match="head_dim"):
        plan_span(indptr, spans, batch=2, kv_len=32768, num_qo_heads=32, num_kv_heads=8, head_dim=96)
    with pytest.raises(ValueError):
        plan_span(indptr, spans, batch=3, kv_len=32768, num_qo_heads=32, num_kv_heads=8, head_dim=128)


@given(span_sets())
def test_the_windows_read_exactly_the_spans(case):
    """Windows: runs of 1 to 16 consecutive rows, each inside one span, grouped by sequence, that
    together list each sequence's attended rows once; the reference over those rows gives
    refattn.span's answer."""
    from gpukernels.span import span_windows
    from gpukernels.split_kv import WINDOW_LEN_BITS, WINDOW_ROWS

    batch, kv_len, indptr, spans, seed = case
    w = span_windows(indptr, spans, batch, kv_len)
    assert w.kv_indptr.dtype == np.int32 and w.windows.dtype == np.int32
    first = w.windows.astype(np.int64) >> WINDOW_LEN_BITS
    rows = (w.windows & (WINDOW_ROWS - 1)) + 1
    rng = np.random.default_rng(seed)
    hq, hkv, d = 4, 2, 8
    q = rng.standard_normal((batch, hq, d))
    k = rng.standard_normal((batch, kv_len, hkv, d))
    v = rng.standard_normal((batch, kv_len, hkv, d))
    out = np.zeros((batch, hq, d))
    for b in range(batch):
        own = slice(w.kv_indptr[b], w.kv_indptr[b + 1])
        listed = np.concatenate([np.arange(f, f + n) for f, n in zip(first[own], rows[own])] or [[]]).astype(int)
        expected = np.concatenate([b * kv_len + np.arange(s, e) for s, e in spans[indptr[b]:indptr[b + 1]]]
                                  or [[]]).astype(int)
        assert sorted(listed) == sorted(expected) and len(set(listed)) == len(listed)
        assert w.tokens[b] == len(expected)
        if len(listed):
            rows_of_b = k.reshape(-1, hkv, d)[listed], v.reshape(-1, hkv, d)[listed]
            out[b] = refattn.decode(q[b:b + 1], rows_of_b[0][None], rows_of_b[1][None])[0][0]
    ref, _ = refattn.span(q, k, v, indptr, spans)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_spans_with_arbitrary_boundaries_are_read_by_windows_in_half_precision():
    from gpukernels.span import plan_span

    indptr, spans = np.array([0, 2, 3]), np.array([[3, 40], [100, 117], [5, 6]])
    kwargs = dict(batch=2, kv_len=1000, num_qo_heads=8, num_kv_heads=2, head_dim=128, gpu="H200")
    half = plan_span(indptr, spans, dtype="float16", **kwargs)
    assert half.layout == "windows" and half.split.page_size == 16 and half.table.page_size == 1
    assert half.windows.kv_indptr.tolist() == [0, 5, 6]     # 37 rows: 3 windows, 17 rows: 2, 1 row: 1
    assert half.attended_tokens.tolist() == [54, 1]
    single = plan_span(indptr, spans, dtype="float32", **kwargs)
    assert single.layout == "pages" and single.split.page_size == 1
    assert single.attended_tokens.tolist() == [54, 1]
    aligned = plan_span([0, 1, 1], np.array([[0, 4096]]), dtype="float16", **{**kwargs, "kv_len": 8192})
    assert aligned.layout == "pages" and aligned.table.page_size == 64   # whole pages need no windows
