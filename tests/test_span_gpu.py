"""Span attention on the GPU (gpukernels.span: the spans as a page table for the paged kernel)
against the float64 reference. Skipped with a reason without CuPy and a CUDA GPU."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from test_kernels_gpu import DTYPES, _HAVE_GPU, _check, _check_with_empty, _device, _poisoned, _random, cp
from test_span_pages import span_sets

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _HAVE_GPU, reason="needs CuPy and a CUDA GPU (run on the GPU machine)"),
]


@given(span_sets(), st.sampled_from(DTYPES), st.sampled_from([64, 128, 256]), st.sampled_from([None, 1, 3]))
def test_span_matches_the_reference(case, dtype, head_dim, num_splits):
    gspan = importlib.import_module("gpukernels.span")

    batch, kv_len, indptr, spans, seed = case
    rng = np.random.default_rng(seed)
    q = _random(rng, (batch, 16, head_dim), dtype)
    k = _random(rng, (batch, kv_len, 4, head_dim), dtype)
    v = _random(rng, (batch, kv_len, 4, head_dim), dtype)
    ref_out, ref_lse = refattn.span(q, k, v, indptr, spans)
    qd = _device(q)
    out = _poisoned(qd, q.shape, dtype)
    lse = _poisoned(qd, q.shape[:2], "float32")
    gspan.span(qd, _device(k), _device(v), indptr, spans, num_splits=num_splits, out=out, lse=lse)
    _check_with_empty(out, lse, ref_out, ref_lse, dtype)


def test_sinks_and_window_at_long_context():
    gspan = importlib.import_module("gpukernels.span")

    rng = np.random.default_rng(3)
    q, k, v = (_random(rng, s, "float16") for s in ((2, 32, 128), (2, 40000, 8, 128), (2, 40000, 8, 128)))
    indptr, spans = refattn.spans_from_sinks_window([40000, 3000], num_sinks=4, window=4096)
    ref_out, ref_lse = refattn.span(q, k, v, indptr, spans)
    out, lse = gspan.span(cp.asarray(q), cp.asarray(k), cp.asarray(v), indptr, spans)
    _check(out, lse, ref_out, ref_lse, "float16")


def test_malformed_spans_raise_before_launch():
    gspan = importlib.import_module("gpukernels.span")

    q = cp.zeros((2, 8, 64), cp.float16)
    k = cp.zeros((2, 100, 4, 64), cp.float16)
    for indptr, spans in (([0, 1, 1], [[5, 3]]), ([0, 1, 1], [[0, 101]]), ([0, 2, 2], [[0, 10], [5, 20]]),
                          ([0, 1], [[0, 10]])):
        with pytest.raises(ValueError):
            gspan.span(q, k, k, indptr, np.array(spans))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sink_logits(dtype):
    gspan = importlib.import_module("gpukernels.span")

    rng = np.random.default_rng(4)
    q, k, v = (_random(rng, s, dtype) for s in ((3, 8, 128), (3, 600, 2, 128), (3, 600, 2, 128)))
    indptr, spans = np.array([0, 2, 2, 3]), np.array([[0, 16], [300, 600], [64, 128]])
    sinks = np.array([0.0, 1.0, -np.inf, 2.0, 5.0, -1.0, 0.5, 3.0], dtype=np.float32)
    ref_out, ref_lse = refattn.span(q, k, v, indptr, spans, sinks=sinks)
    qd = _device(q)
    sinks_d = cp.asarray(sinks) if hasattr(qd, "get") else __import__("torch").as_tensor(sinks, device="cuda")
    out, lse = gspan.span(qd, _device(k), _device(v), indptr, spans, sinks=sinks_d)
    _check_with_empty(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_plan_runs_many_times_and_checks_its_shapes(dtype):
    gspan = importlib.import_module("gpukernels.span")

    rng = np.random.default_rng(7)
    batch, kv_len, hq, hkv, d = 3, 1000, 16, 4, 128
    indptr, spans = np.array([0, 2, 2, 4]), np.array([[0, 4], [512, 1000], [3, 17], [64, 700]])
    plan = gspan.plan_span(indptr, spans, batch=batch, kv_len=kv_len, num_qo_heads=hq, num_kv_heads=hkv,
                           head_dim=d, dtype=dtype)
    assert plan.attended_tokens.tolist() == [492, 0, 650]
    runner = gspan.Span(plan)
    for _ in range(2):   # fresh inputs each time, the same plan and tables
        q = _random(rng, (batch, hq, d), dtype)
        k = _random(rng, (batch, kv_len, hkv, d), dtype)
        v = _random(rng, (batch, kv_len, hkv, d), dtype)
        ref_out, ref_lse = refattn.span(q, k, v, indptr, spans)
        qd = _device(q)
        out = _poisoned(qd, q.shape, dtype)
        lse = _poisoned(qd, q.shape[:2], "float32")
        runner.run(qd, _device(k), _device(v), out=out, lse=lse)
        _check_with_empty(out, lse, ref_out, ref_lse, dtype)
    with pytest.raises(ValueError, match="as planned"):
        runner.run(qd, _device(k[:, :999]), _device(v[:, :999]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("pattern", ["arithmetic", "summarization"])
def test_spans_with_arbitrary_boundaries_run_as_windows(dtype, pattern):
    gspan = importlib.import_module("gpukernels.span")

    rng = np.random.default_rng(11)
    batch, kv_len, hq, hkv, d = 3, 5000, 8, 2, 128
    indptr, spans = refattn.span_pattern(pattern, batch=batch, kv_len=kv_len, density=0.1, seed=3)
    plan = gspan.plan_span(indptr, spans, batch=batch, kv_len=kv_len, num_qo_heads=hq, num_kv_heads=hkv,
                           head_dim=d, dtype=dtype)
    assert plan.layout == "windows"
    q, k, v = (_random(rng, s, dtype) for s in ((batch, hq, d), (batch, kv_len, hkv, d), (batch, kv_len, hkv, d)))
    ref_out, ref_lse = refattn.span(q, k, v, indptr, spans)
    qd = _device(q)
    out = _poisoned(qd, q.shape, dtype)
    lse = _poisoned(qd, q.shape[:2], "float32")
    gspan.Span(plan).run(qd, _device(k), _device(v), out=out, lse=lse)
    _check_with_empty(out, lse, ref_out, ref_lse, dtype)


def test_a_window_outside_the_cache_poisons_its_sequence_only():
    """run_windows reads the windows it is given without a host check: one that reaches past the
    cache's rows gives its sequence NaN and reads nothing outside (compute-sanitizer)."""
    import gpukernels
    from gpukernels.split_kv import WINDOW_LEN_BITS, WINDOW_ROWS

    rng = np.random.default_rng(5)
    batch, rows, hq, hkv, d = 2, 64, 8, 2, 128
    q = _random(rng, (batch, hq, d), "float16")
    k, v = (_random(rng, (rows, hkv, d), "float16") for _ in range(2))
    windows = np.array([(0 << WINDOW_LEN_BITS) | 15, (16 << WINDOW_LEN_BITS) | 4,     # sequence 0: rows 0-20
                        (60 << WINDOW_LEN_BITS) | 7], dtype=np.int32)                 # sequence 1: rows 60-67
    plan = gpukernels.plan_split_kv(batch, hq, hkv, d, 32, dtype="float16", page_size=WINDOW_ROWS)
    out, lse = gpukernels.SplitKV(plan).run_windows(
        _device(q), _device(k), _device(v), cp.asarray(np.array([0, 2, 3], np.int32)), cp.asarray(windows),
        cp.asarray(np.array([WINDOW_ROWS, WINDOW_ROWS], np.int32)))
    ref_out, ref_lse = refattn.decode(q[:1], k[None, :21], v[None, :21])
    _check(out[:1], lse[:1], ref_out, ref_lse, "float16")
    assert cp.isnan(out[1]).all() and cp.isnan(lse[1]).all()
