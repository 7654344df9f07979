"""GPU kernels against the float64 references (decode, split_kv, merge_states, paged_decode).

Skipped with a reason when CuPy or a CUDA GPU is missing; nothing touches the device at import.
Every run writes into outputs poisoned with NaN first, so an element the kernel never wrote fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import refattn
from tolerances import LSE_ATOL, OUT_RTOL, lse_error, rel_error

try:
    import cupy as cp

    _HAVE_GPU = cp.cuda.runtime.getDeviceCount() > 0
except Exception:  # noqa: BLE001 - no CuPy, no driver or no device
    cp = None
    _HAVE_GPU = False

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _HAVE_GPU, reason="needs CuPy and a CUDA GPU (run on the GPU machine)"),
]

DTYPES = ("float16", "bfloat16", "float32")
HEAD_DIMS = (64, 128, 256)
# (num_qo_heads, num_kv_heads): MHA, GQA 4, GQA 7 (28/4), MQA, group 16 (two head groups).
HEADS = ((8, 8), (32, 8), (28, 4), (8, 1), (32, 2))
LENGTHS = (0, 1, 17, 339, 4097)


def _host_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _device(x_host):
    """Copy a host array to the GPU as a torch tensor for bfloat16 (CuPy lacks it), CuPy otherwise."""
    if x_host.dtype == _host_dtype("bfloat16"):
        import torch

        return torch.from_numpy(x_host.view(np.uint16).astype(np.int16)).cuda().view(torch.bfloat16)
    return cp.asarray(x_host)


def _host(x):
    if hasattr(x, "data_ptr") and not hasattr(x, "get"):
        import torch

        if x.dtype == torch.bfloat16:
            return x.float().cpu().numpy()
        return x.cpu().numpy()
    return cp.asnumpy(x)


def _poisoned(like, shape, dtype):
    """Output buffers filled with NaN in the caller's kind."""
    if hasattr(like, "data_ptr") and not hasattr(like, "get"):
        import torch

        return torch.full(shape, float("nan"), dtype=getattr(torch, dtype), device=like.device)
    return cp.full(shape, np.nan, dtype=_host_dtype(dtype))


def _random(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(_host_dtype(dtype))


def _random_qkv(rng, dtype, batch, hq, hkv, kv_len, head_dim):
    """q [batch, hq, head_dim] and a contiguous K, V [batch, kv_len, hkv, head_dim]."""
    return (_random(rng, (batch, hq, head_dim), dtype),
            _random(rng, (batch, kv_len, hkv, head_dim), dtype),
            _random(rng, (batch, kv_len, hkv, head_dim), dtype))


def _check(out, lse, ref_out, ref_lse, dtype):
    o, l = _host(out).astype(np.float64), _host(lse).astype(np.float64)
    assert not np.any(np.isnan(o)), "output has NaN (unwritten or wrong)"
    err = rel_error(o, ref_out)
    assert err <= OUT_RTOL[dtype], f"out rel error {err:.3g} > {OUT_RTOL[dtype]} ({dtype})"
    lerr = lse_error(l, ref_lse)
    assert lerr <= LSE_ATOL[dtype] * 4, f"lse error {lerr:.3g} ({dtype})"


@st.composite
def decode_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    hq, hkv = draw(st.sampled_from(HEADS))
    batch = draw(st.integers(1, 3))
    kv_len = draw(st.sampled_from(LENGTHS + (64, 100, 1000)))
    ragged = draw(st.booleans())
    num_splits = draw(st.sampled_from((None, 1, 2, 3, 7)))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, head_dim, hq, hkv, batch, kv_len, ragged, num_splits, seed


@given(decode_cases())
@example(("float16", 128, 28, 4, 2, 4097, True, None, 1))
@example(("bfloat16", 128, 32, 8, 1, 339, False, 3, 2))
@example(("float32", 256, 8, 1, 3, 1, True, None, 3))
@example(("float16", 64, 32, 2, 2, 0, False, 2, 4))
def test_split_kv_matches_reference(case):
    import gpukernels

    dtype, head_dim, hq, hkv, batch, kv_len, ragged, num_splits, seed = case
    rng = np.random.default_rng(seed)
    q, k, v = _random_qkv(rng, dtype, batch, hq, hkv, kv_len, head_dim)
    kv_lens = rng.integers(0, kv_len + 1, size=batch) if ragged else None
    ref_out, ref_lse = refattn.decode(q, k, v, kv_lens)
    qd, kd, vd = _device(q), _device(k), _device(v)
    out = _poisoned(qd, (batch, hq, head_dim), dtype)
    lse = _poisoned(qd, (batch, hq), "float32")
    res = gpukernels.split_kv(qd, kd, vd, kv_lens, num_splits=num_splits, out=out, lse=lse)
    assert res[0] is out and res[1] is lse
    _check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_len", [1, 339, 4097, 100003])
def test_decode_lengths(dtype, kv_len):
    import gpukernels

    rng = np.random.default_rng(kv_len)
    q, k, v = _random_qkv(rng, dtype, 1, 28, 4, kv_len, 128)
    ref_out, ref_lse = refattn.decode(q, k, v)
    for fn in (gpukernels.decode, gpukernels.split_kv):
        out, lse = fn(_device(q), _device(k), _device(v))
        _check(out, lse, ref_out, ref_lse, dtype)


def test_large_scores_stay_finite():
    import gpukernels

    rng = np.random.default_rng(7)
    q = _random(rng, (2, 8, 64), "float32", scale=30.0)
    k = _random(rng, (2, 500, 8, 64), "float32", scale=30.0)
    v = _random(rng, (2, 500, 8, 64), "float32")
    ref_out, ref_lse = refattn.decode(q, k, v)
    assert np.max(np.abs(ref_lse)) > 1e3
    out, lse = gpukernels.split_kv(cp.asarray(q), cp.asarray(k), cp.asarray(v), num_splits=4)
    o = cp.asnumpy(out)
    assert np.all(np.isfinite(o))
    assert rel_error(o, ref_out) < 1e-4
    assert np.max(np.abs(cp.asnumpy(lse) - ref_lse) / np.abs(ref_lse)) < 1e-5


@st.composite
def paged_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    hq, hkv = draw(st.sampled_from(HEADS))
    batch = draw(st.integers(1, 3))
    kv_len = draw(st.sampled_from((0, 1, 17, 339, 1000)))
    page_size = draw(st.sampled_from((1, 3, 16, 64)))
    num_splits = draw(st.sampled_from((None, 1, 3)))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, head_dim, hq, hkv, batch, kv_len, page_size, num_splits, seed


@given(paged_cases())
@example(("float16", 128, 28, 4, 3, 339, 1, None, 5))
@example(("bfloat16", 128, 32, 8, 2, 1000, 16, 3, 6))
@example(("float32", 64, 8, 8, 2, 17, 64, None, 7))
def test_paged_decode_matches_reference(case):
    import gpukernels

    dtype, head_dim, hq, hkv, batch, kv_len, page_size, num_splits, seed = case
    rng = np.random.default_rng(seed)
    q, k, v = _random_qkv(rng, dtype, batch, hq, hkv, kv_len, head_dim)
    kv_lens = rng.integers(0, kv_len + 1, size=batch)
    k_cache, v_cache, indptr, indices, last = refattn.paged_from_contiguous(
        k, v, kv_lens, page_size=page_size, shuffle=seed, extra_pages=3)
    ref_out, ref_lse = refattn.decode(q, k, v, kv_lens)
    qd = _device(q)
    out = _poisoned(qd, (batch, hq, head_dim), dtype)
    lse = _poisoned(qd, (batch, hq), "float32")
    gpukernels.paged_decode(qd, _device(k_cache.astype(_host_dtype(dtype))),
                            _device(v_cache.astype(_host_dtype(dtype))), indptr, indices, last,
                            num_splits=num_splits, out=out, lse=lse)
    _check(out, lse, ref_out, ref_lse, dtype)


@given(st.sampled_from(("float16", "float32")), st.integers(1, 9), st.integers(1, 3),
       st.sampled_from((64, 128)), st.integers(0, 2**31 - 1))
def test_merge_states_matches_reference(dtype, num_states, batch, head_dim, seed):
    import gpukernels

    rng = np.random.default_rng(seed)
    outs = _random(rng, (num_states, batch, 4, head_dim), dtype)
    lses = (rng.standard_normal((num_states, batch, 4)) * 5).astype(np.float32)
    lses[rng.random(lses.shape) < 0.3] = -np.inf  # empty states are the identity
    ref_out, ref_lse = refattn.merge_states(outs, lses)
    out, lse = gpukernels.merge_states(cp.asarray(outs), cp.asarray(lses))
    _check(out, lse, ref_out, ref_lse, dtype)


def test_torch_in_torch_out_without_copies():
    import torch

    import gpukernels

    q = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 700, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 700, 8, 128, device="cuda", dtype=torch.bfloat16)
    out, lse = gpukernels.split_kv(q, k, v)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and out.is_cuda
    assert isinstance(lse, torch.Tensor) and lse.dtype == torch.float32
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float().unsqueeze(2), k.float().transpose(1, 2), v.float().transpose(1, 2), enable_gqa=True
    ).squeeze(2)
    assert rel_error(out.float().cpu().numpy(), ref.cpu().numpy()) < OUT_RTOL["bfloat16"]


def test_plan_run_in_a_cuda_graph():
    import gpukernels

    rng = np.random.default_rng(11)
    batch, hq, hkv, d, kv_len = 3, 32, 8, 128, 5000
    q = cp.asarray(_random(rng, (batch, hq, d), "float16"))
    k = cp.asarray(_random(rng, (batch, kv_len, hkv, d), "float16"))
    v = cp.asarray(_random(rng, (batch, kv_len, hkv, d), "float16"))
    lens_host = np.array([5000, 1234, 1], dtype=np.int32)
    kv_lens = cp.asarray(lens_host)
    plan = gpukernels.plan_split_kv(batch, hq, hkv, d, kv_len, dtype="float16", num_splits=6)
    runner = gpukernels.SplitKV(plan)
    out = cp.full((batch, hq, d), np.nan, dtype=cp.float16)
    lse = cp.full((batch, hq), np.nan, dtype=cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        runner.run(q, k, v, kv_lens, out=out, lse=lse)  # warm-up: compile and allocate
        stream.synchronize()
        out.fill(np.nan)
        stream.begin_capture()
        runner.run(q, k, v, kv_lens, out=out, lse=lse)
        graph = stream.end_capture()
        for trial in range(3):
            # Replays pick up new inputs in place: the plan holds no host data about them.
            q[...] = cp.asarray(_random(rng, (batch, hq, d), "float16"))
            out.fill(np.nan)
            graph.launch(stream)
            stream.synchronize()
            ref_out, ref_lse = refattn.decode(cp.asnumpy(q), cp.asnumpy(k), cp.asnumpy(v), lens_host)
            _check(out, lse, ref_out, ref_lse, "float16")


def test_one_plan_on_two_streams_at_once():
    """Each stream gets its own partials and arrival counters, so runs that overlap stay correct.
    Whether two runs do overlap depends on timing (on an H100 machine a shared workspace gave no
    wrong output in 40 tries), so the buffers themselves are compared as well."""
    import gpukernels

    rng = np.random.default_rng(12)
    batch, hq, hkv, d, kv_len = 1, 32, 8, 128, 30000     # 64 blocks a run: two runs fit at once
    plan = gpukernels.plan_split_kv(batch, hq, hkv, d, kv_len, dtype="float16", num_splits=8)
    runner = gpukernels.SplitKV(plan)
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]
    cases = []
    for stream in streams:
        q, k, v = _random_qkv(rng, "float16", batch, hq, hkv, kv_len, d)
        with stream:
            dev = [cp.asarray(x) for x in (q, k, v)]
            out = _poisoned(dev[0], (batch, hq, d), "float16")
            lse = _poisoned(dev[0], (batch, hq), "float32")
        stream.synchronize()
        cases.append((q, k, v, dev, out, lse))
    for _ in range(5):              # queued back to back on both streams, free to overlap
        for stream, (_, _, _, dev, out, lse) in zip(streams, cases):
            with stream:
                runner.run(*dev, out=out, lse=lse)
    for stream in streams:
        stream.synchronize()
    for q, k, v, _, out, lse in cases:
        _check(out, lse, *refattn.decode(q, k, v), "float16")
    first, second = (runner._workspace_for("cupy", 0, stream.ptr).pointers(plan) for stream in streams)
    assert not set(first) & set(second)


def test_offsets_past_two_to_the_31_elements():
    """A cache of more than 2^31 elements: the last sequence starts beyond int32 offsets."""
    import gpukernels

    batch, hkv, d, kv_len = 2, 8, 128, 1_100_000     # 2 * 1.1e6 * 8 * 128 = 2.25e9 elements
    free, _ = cp.cuda.runtime.memGetInfo()  # 9 GB of cache
    if free < 2 * batch * kv_len * hkv * d * 2 + (1 << 30):
        pytest.skip("not enough GPU memory for a 2^31-element cache")
    rng = np.random.default_rng(3)
    k = cp.empty((batch, kv_len, hkv, d), dtype=cp.float16)
    v = cp.empty((batch, kv_len, hkv, d), dtype=cp.float16)
    k[...] = 0.5
    v[...] = 0.0
    # The last 300 tokens of sequence 1 hold random data; everything before them is constant.
    tail_k = _random(rng, (300, hkv, d), "float16")
    tail_v = _random(rng, (300, hkv, d), "float16")
    k[1, -300:] = cp.asarray(tail_k)
    v[1, -300:] = cp.asarray(tail_v)
    q = cp.asarray(_random(rng, (batch, 32, d), "float16"))
    assert k.size > 2**31
    out, lse = gpukernels.split_kv(q, k, v)
    # Reference for sequence 1 from its tail plus the constant part, computed exactly.
    qh = cp.asnumpy(q)[1:2].astype(np.float64)
    kfull = np.concatenate([np.full((1, 1, hkv, d), 0.5), tail_k[None].astype(np.float64)], axis=1)
    vfull = np.concatenate([np.zeros((1, 1, hkv, d)), tail_v[None].astype(np.float64)], axis=1)
    s_const = refattn.decode(qh, kfull[:, :1], vfull[:, :1])[1]          # lse of one constant row
    tail_out, tail_lse = refattn.decode(qh, kfull[:, 1:], vfull[:, 1:])
    n_const = kv_len - 300
    const_lse = s_const + math.log(n_const)
    ref_lse = np.logaddexp(const_lse, tail_lse)
    ref_out = tail_out * np.exp(tail_lse - ref_lse)[..., None]            # constant rows have v = 0
    _check(out[1:2], lse[1:2], ref_out, ref_lse, "float16")


@pytest.mark.parametrize("dtype, num_splits, paged",
                         [("float16", 1, False), ("float16", 2, False), ("float32", 2, False), ("float16", 2, True)])
def test_more_sequence_heads_than_a_grid_row_holds(dtype, num_splits, paged):
    """batch x KV heads past 65535: the grid continues in z, and every sequence head is written."""
    import gpukernels

    batch, hq, hkv, d, kv_len = 2100, 32, 32, 64, 40          # 67200 (sequence, KV head) pairs
    rng = np.random.default_rng(11)
    q, k, v = _random_qkv(rng, dtype, batch, hq, hkv, kv_len, d)
    kv_lens = rng.integers(1, kv_len + 1, size=batch)
    ref_out, ref_lse = refattn.decode(q, k, v, kv_lens)
    plan = gpukernels.plan_split_kv(batch, hq, hkv, d, kv_len, dtype=dtype, num_splits=num_splits)
    qd = cp.asarray(q)
    out = _poisoned(qd, (batch, hq, d), dtype)
    lse = _poisoned(qd, (batch, hq), "float32")
    if paged:   # pages of 8 rows; each sequence's pages stored in reverse order
        pages = kv_len // 8
        kp, vp = (x.reshape(batch, pages, 8, hkv, d)[:, ::-1].reshape(-1, 8, hkv, d) for x in (k, v))
        used = -(-kv_lens // 8)
        table = np.concatenate([b * pages + pages - 1 - np.arange(used[b]) for b in range(batch)])
        indptr = np.concatenate([[0], np.cumsum(used)])
        last = kv_lens - (used - 1) * 8
        plan = gpukernels.plan_split_kv(batch, hq, hkv, d, kv_len, dtype=dtype, num_splits=num_splits,
                                        page_size=8)
        gpukernels.SplitKV(plan).run_paged(
            qd, cp.asarray(np.ascontiguousarray(kp)), cp.asarray(np.ascontiguousarray(vp)),
            *(cp.asarray(x.astype(np.int32)) for x in (indptr, table, last)), out=out, lse=lse)
    else:
        gpukernels.SplitKV(plan).run(qd, cp.asarray(k), cp.asarray(v), cp.asarray(kv_lens.astype(np.int32)),
                                     out=out, lse=lse)
    assert plan.grid[2] == 2
    _check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize(
    "call, exc, name",
    [
        (lambda g, q, k, v: g.split_kv(q, k[:, :, :3], v), ValueError, "k"),
        (lambda g, q, k, v: g.split_kv(q.astype(cp.float32), k, v), TypeError, "k"),
        (lambda g, q, k, v: g.split_kv(q, k, v, np.array([5, 999])), ValueError, "kv_lens"),
        (lambda g, q, k, v: g.split_kv(q, k, v, num_splits=0), ValueError, "num_splits"),
        (lambda g, q, k, v: g.split_kv(q[:, :, :32], k[..., :32], v[..., :32]), ValueError, "head_dim"),
        (lambda g, q, k, v: g.split_kv(cp.asnumpy(q), k, v), TypeError, "q"),
        (lambda g, q, k, v: g.split_kv(q, k, v, sm_scale=float("nan")), ValueError, "sm_scale"),
        (lambda g, q, k, v: g.split_kv(q, k[:, :, :, ::2], v[:, :, :, ::2]), ValueError, "k"),
        (lambda g, q, k, v: g.paged_decode(q, k, v, np.array([0, 1, 2]), np.array([0, 9]),
                                           np.array([4, 4])), ValueError, "kv_indices"),
        (lambda g, q, k, v: g.merge_states(k, q.astype(cp.float32)), ValueError, "lses"),
        (lambda g, q, k, v: g.merge_states(k, k[..., 0]), TypeError, "lses"),
    ],
)
def test_malformed_inputs_raise_before_launch(call, exc, name):
    import gpukernels

    q = cp.zeros((2, 8, 64), dtype=cp.float16)
    k = cp.zeros((2, 10, 4, 64), dtype=cp.float16)
    v = cp.zeros((2, 10, 4, 64), dtype=cp.float16)
    with pytest.raises(exc) as info:
        call(gpukernels, q, k, v)
    assert name in str(info.value)


def _off_boundary(a):
    """A contiguous copy of `a` whose data starts one element past a 16-byte boundary."""
    shifted = cp.empty(a.size + 1, dtype=a.dtype)[1:].reshape(a.shape)
    shifted[...] = a
    assert shifted.data.ptr % 16
    return shifted


def _state_call(g, arrays):
    """SplitKV.run merging one float32 state (states_out, states_lse) into its output."""
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    plan = g.plan_split_kv(2, 8, 4, 64, 10, dtype="float16")
    states = (arrays["states_out"], cp.zeros((1, 2, 8), dtype=cp.float32))
    return g.SplitKV(plan).run(q, k, v, states=states, out=arrays["out"])


_TABLES = (np.array([0, 2, 3]), np.array([0, 1, 2]), np.array([4, 4]))   # pages of 4: 8 and 4 tokens


@pytest.mark.parametrize("call, name", [
    (lambda g, a: g.split_kv(a["q"], a["k"], a["v"], out=a["out"]), "q"),
    (lambda g, a: g.split_kv(a["q"], a["k"], a["v"], out=a["out"]), "k"),
    (lambda g, a: g.split_kv(a["q"], a["k"], a["v"], out=a["out"]), "v"),
    (lambda g, a: g.decode(a["q"], a["k"], a["v"], out=a["out"]), "k"),
    (lambda g, a: g.paged_decode(a["q"], a["k_cache"], a["v_cache"], *_TABLES, out=a["out"]), "k_cache"),
    (lambda g, a: g.paged_decode(a["q"], a["k_cache"], a["v_cache"], *_TABLES, out=a["out"]), "v_cache"),
    (lambda g, a: g.span(a["q"], a["k"], a["v"], [0, 1, 2], [[0, 7], [2, 9]], out=a["out"]), "k"),
    (lambda g, a: g.span(a["q"], a["k"], a["v"], [0, 1, 2], [[0, 7], [2, 9]], out=a["out"]), "q"),
    (lambda g, a: g.tree(a["q"], a["k_segs"], a["v_segs"], [0, 6, 10, 13], [0, 2, 4], [0, 1, 0, 2],
                         out=a["out"]), "k_segs"),
    (lambda g, a: g.tree(a["q"], a["k_segs"], a["v_segs"], [0, 6, 10, 13], [0, 2, 4], [0, 1, 0, 2],
                         out=a["out"]), "q"),
    (_state_call, "states_out"),
])
def test_an_array_off_a_16_byte_boundary_is_refused_before_launch(call, name):
    """Every launcher reads q, the caches and the states in 16-byte pieces: a contiguous view that
    does not start on a 16-byte boundary is a ValueError naming it, before any launch (never a
    misaligned access on the GPU)."""
    import gpukernels

    rng = np.random.default_rng(5)
    arrays = {
        "q": cp.asarray(_random(rng, (2, 8, 64), "float16")),
        "k": cp.asarray(_random(rng, (2, 10, 4, 64), "float16")),
        "v": cp.asarray(_random(rng, (2, 10, 4, 64), "float16")),
        "k_cache": cp.asarray(_random(rng, (3, 4, 4, 64), "float16")),
        "v_cache": cp.asarray(_random(rng, (3, 4, 4, 64), "float16")),
        "k_segs": cp.asarray(_random(rng, (13, 4, 64), "float16")),
        "v_segs": cp.asarray(_random(rng, (13, 4, 64), "float16")),
        "states_out": cp.zeros((1, 2, 8, 64), dtype=cp.float32),
        "out": cp.full((2, 8, 64), 7.0, dtype=cp.float16),
    }
    call(gpukernels, arrays)   # aligned: runs
    cp.cuda.Device().synchronize()
    arrays["out"].fill(7.0)
    arrays[name] = _off_boundary(arrays[name])
    with pytest.raises(ValueError, match=f"{name} must start at a 16-byte aligned address"):
        call(gpukernels, arrays)
    cp.cuda.Device().synchronize()
    assert bool((arrays["out"] == 7.0).all())   # nothing launched


# --------------------------------------------------------------------------------------------
# The one-shot call: index values on the GPU are checked by the kernel, not copied to the host.


def test_one_shot_device_lengths_are_not_read_on_the_host(monkeypatch):
    import gpukernels
    from gpukernels import _runtime as rt

    rng = np.random.default_rng(11)
    q, k, v = _random_qkv(rng, "float16", 3, 32, 8, 1000, 128)
    kv_lens = np.array([1000, 0, 357])
    ref_out, ref_lse = refattn.decode(q, k, v, kv_lens)

    def no_host_copy(*args, **kwargs):
        raise AssertionError("an index array was copied to the host")

    monkeypatch.setattr(rt, "host_ints", no_host_copy)
    for lens in (cp.asarray(kv_lens.astype(np.int32)), cp.asarray(kv_lens)):   # int32 and int64
        out, lse = gpukernels.split_kv(cp.asarray(q), cp.asarray(k), cp.asarray(v), lens)
        _check_with_empty(out, lse, ref_out, ref_lse, "float16")


def _check_with_empty(out, lse, ref_out, ref_lse, dtype):
    """_check, where sequences with nothing to attend to must give out = 0, lse = -inf."""
    o, l = _host(out).astype(np.float64), _host(lse).astype(np.float64)
    assert not np.any(np.isnan(o)) and not np.any(np.isnan(l))
    assert rel_error(o, ref_out) <= OUT_RTOL[dtype]
    assert np.array_equal(np.isneginf(l), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    assert lse_error(l[finite], ref_lse[finite]) <= LSE_ATOL[dtype] * 4


def test_one_shot_device_lengths_out_of_range_poison_their_sequence_only():
    import torch

    import gpukernels

    rng = np.random.default_rng(12)
    q, k, v = _random_qkv(rng, "bfloat16", 4, 16, 4, 300, 64)
    lens = np.array([300, -1, 301, 123])
    lens_dev = torch.as_tensor(lens, dtype=torch.int32, device="cuda")
    out, lse = gpukernels.split_kv(_device(q), _device(k), _device(v), lens_dev)
    o, l = _host(out), _host(lse)
    assert np.isnan(o[1]).all() and np.isnan(l[1]).all() and np.isnan(o[2]).all() and np.isnan(l[2]).all()
    good = [0, 3]
    ref_out, ref_lse = refattn.decode(q[good], k[good], v[good], lens[good])
    assert rel_error(o[good].astype(np.float64), ref_out) <= OUT_RTOL["bfloat16"]
    with pytest.raises(ValueError, match="kv_lens"):
        gpukernels.split_kv(_device(q), _device(k), _device(v), lens_dev, check_values=True)


def test_paged_device_tables_out_of_range_poison_their_sequence_only():
    import gpukernels

    rng = np.random.default_rng(13)
    batch, hq, hkv, d, page = 3, 8, 2, 128, 16
    q = _random(rng, (batch, hq, d), "float16")
    kc, vc = (_random(rng, (12, page, hkv, d), "float16") for _ in range(2))
    indptr = np.array([0, 4, 8, 12])
    indices = rng.permutation(12)
    last = np.array([16, 5, 16])
    ref_out, ref_lse = refattn.paged_decode(q, kc, vc, indptr, indices, last)
    dev = lambda x: cp.asarray(x.astype(np.int32))  # noqa: E731
    out, lse = gpukernels.paged_decode(cp.asarray(q), cp.asarray(kc), cp.asarray(vc), dev(indptr),
                                       dev(indices), dev(last))
    _check(out, lse, ref_out, ref_lse, "float16")
    # Sequence 2's pages run past the end of kv_indices; sequence 1 names a page outside the cache;
    # sequence 0 is intact.
    bad_indptr = np.array([0, 4, 8, 13])
    bad_indices = indices.copy()
    bad_indices[5] = 12
    out, lse = gpukernels.paged_decode(cp.asarray(q), cp.asarray(kc), cp.asarray(vc), dev(bad_indptr),
                                       dev(bad_indices), dev(last))
    o, l = _host(out), _host(lse)
    assert np.isnan(o[1:]).all() and np.isnan(l[1:]).all()
    assert rel_error(o[:1].astype(np.float64), ref_out[:1]) <= OUT_RTOL["float16"]
    with pytest.raises(ValueError, match="kv_indptr"):
        gpukernels.paged_decode(cp.asarray(q), cp.asarray(kc), cp.asarray(vc), dev(bad_indptr),
                                dev(bad_indices), dev(last), check_values=True)


@pytest.mark.parametrize("paged", [False, True])
def test_a_plan_runs_sequences_longer_than_its_max_kv_len(paged):
    import gpukernels

    rng = np.random.default_rng(14)
    batch, hq, hkv, d, kv_len = 2, 32, 8, 128, 5000
    q, k, v = _random_qkv(rng, "float16", batch, hq, hkv, kv_len, d)
    ref_out, ref_lse = refattn.decode(q, k, v)
    plan = gpukernels.plan_split_kv(batch, hq, hkv, d, 700, dtype="float16", num_splits=4,
                                    page_size=16 if paged else 0)
    assert plan.num_splits * plan.chunk_size < kv_len
    run = gpukernels.SplitKV(plan)
    if paged:
        pages = -(-kv_len // 16)
        pad = ((0, 0), (0, pages * 16 - kv_len), (0, 0), (0, 0))
        kc, vc = (cp.asarray(np.pad(x, pad).reshape(-1, 16, hkv, d)) for x in (k, v))
        dev = lambda x: cp.asarray(np.asarray(x, dtype=np.int32))  # noqa: E731
        out, lse = run.run_paged(cp.asarray(q), kc, vc, dev(np.arange(batch + 1) * pages),
                                 dev(np.arange(batch * pages)), dev([kv_len - (pages - 1) * 16] * batch))
    else:
        out, lse = run.run(cp.asarray(q), cp.asarray(k), cp.asarray(v))
    _check(out, lse, ref_out, ref_lse, "float16")


def test_one_shot_calls_reuse_their_plan():
    import importlib

    import gpukernels

    skv = importlib.import_module("gpukernels.split_kv")
    rng = np.random.default_rng(15)
    q, k, v = (cp.asarray(x) for x in _random_qkv(rng, "float16", 2, 32, 8, 2000, 128))
    gpukernels.split_kv(q, k, v)
    gpukernels.split_kv(q, k, v, np.array([1985, 5]))
    before = skv._cached_plan.cache_info()
    for n in (1990, 1995, 2000):   # lengths read on the host: one length bucket with 1985
        gpukernels.split_kv(q, k, v, np.array([n, 5]))
    gpukernels.split_kv(q, k, v)   # the whole cache: the plan of the first call
    after = skv._cached_plan.cache_info()
    assert after.misses == before.misses and after.hits >= before.hits + 4


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("hq, hkv", [(16, 16), (16, 2), (8, 1), (20, 4)])
def test_head_dim_256_on_the_tensor_cores(dtype, hq, hkv):
    import importlib

    import gpukernels

    skv = importlib.import_module("gpukernels.split_kv")
    assert "split_kv_mma_kernel" in skv.name_expression(dtype, 256, 8, False)
    rng = np.random.default_rng(hq * 100 + hkv)
    q, k, v = _random_qkv(rng, dtype, 2, hq, hkv, 3001, 256)
    kv_lens = np.array([3001, 1234])
    ref_out, ref_lse = refattn.decode(q, k, v, kv_lens)
    for num_splits in (None, 1, 8):
        out = _poisoned(_device(q), (2, hq, 256), dtype)
        lse = _poisoned(_device(q), (2, hq), "float32")
        gpukernels.split_kv(_device(q), _device(k), _device(v), kv_lens, num_splits=num_splits,
                            out=out, lse=lse)
        _check(out, lse, ref_out, ref_lse, dtype)


# --------------------------------------------------------------------------------------------
# Non-finite inputs never hide (docs/design.md, "Non-finite inputs"): the kernels give NaN exactly where the references do.


def _compare_nonfinite(out, lse, ref_out, ref_lse, dtype):
    o, l = _host(out).astype(np.float64), _host(lse).astype(np.float64)
    assert np.array_equal(np.isnan(o), np.isnan(ref_out)), "out: NaN pattern differs from refattn"
    assert np.array_equal(np.isnan(l), np.isnan(ref_lse)), "lse: NaN pattern differs from refattn"
    assert np.array_equal(np.isneginf(l), np.isneginf(ref_lse))
    ok = ~np.isnan(ref_out)
    if ok.any():
        assert rel_error(o[ok], ref_out[ok]) <= OUT_RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("paged", [False, True])
def test_non_finite_inputs_give_nan_where_the_reference_does(dtype, head_dim, num_splits, paged):
    import gpukernels

    rng = np.random.default_rng(head_dim + num_splits)
    batch, hq, hkv, kv_len = 5, 16, 4, 700
    q, k, v = _random_qkv(rng, dtype, batch, hq, hkv, kv_len, head_dim)
    kv_lens = np.array([700, 0, 650, 700, 300])
    q[0, 5, 3] = np.nan                  # one query head of sequence 0
    k[2, 17, 1, 0] = np.inf              # an attended key row: every head of KV head 1, sequence 2
    v[3, 600, 2, 7] = -np.inf            # one value element: dim 7 of KV head 2's heads, sequence 3
    k[4, 500, 0, :] = np.nan             # past kv_lens[4]: never read
    q[1, 0, 0] = np.nan                  # an empty sequence stays empty
    ref_out, ref_lse = refattn.decode(q, k, v, kv_lens)
    qd = _device(q)
    out = _poisoned(qd, (batch, hq, head_dim), dtype)
    lse = _poisoned(qd, (batch, hq), "float32")
    if paged:
        page = 16
        pages = -(-kv_len // page)
        pad = ((0, 0), (0, pages * page - kv_len), (0, 0), (0, 0))
        kc, vc = (np.ascontiguousarray(np.pad(x, pad).reshape(-1, page, hkv, head_dim)) for x in (k, v))
        used = -(-kv_lens // page)
        indptr = np.concatenate([[0], np.cumsum(used)])
        indices = np.concatenate([b * pages + np.arange(used[b]) for b in range(batch)])
        last = np.where(used > 0, kv_lens - (used - 1) * page, 0)
        gpukernels.paged_decode(qd, _device(kc), _device(vc), indptr, indices, last,
                                num_splits=num_splits, out=out, lse=lse)
    else:
        gpukernels.split_kv(qd, _device(k), _device(v), kv_lens, num_splits=num_splits, out=out, lse=lse)
    _compare_nonfinite(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_states_lets_non_finite_states_through(dtype):
    import gpukernels

    rng = np.random.default_rng(21)
    outs = _random(rng, (3, 4, 2, 64), dtype)
    lses = rng.standard_normal((3, 4, 2)).astype(np.float32)
    lses[1, 0, 0] = np.nan           # row (0, 0): NaN
    lses[2, 1, 1] = np.inf           # row (1, 1): NaN
    lses[:, 2, 0] = -np.inf          # row (2, 0): all empty -> 0, -inf
    outs[0, 2, 0] = np.nan           # ... even with NaN in an empty state's out
    outs[1, 3, 1, 5] = np.inf        # row (3, 1), element 5: NaN
    lses[0, 3, 0] = -np.inf
    outs[0, 3, 0] = np.nan           # an empty state's out is never read
    ref_out, ref_lse = refattn.merge_states(outs.astype(np.float64), lses.astype(np.float64))
    out, lse = gpukernels.merge_states(_device(outs), _device(lses))
    _compare_nonfinite(out, lse, ref_out, ref_lse, dtype)


def _random_states(rng, num_states, batch, hq, head_dim):
    """float32 states (out [n, batch, hq, head_dim], lse [n, batch, hq]), some of them empty (lse
    -inf, out NaN: an empty state's out must never be read)."""
    outs = rng.standard_normal((num_states, batch, hq, head_dim)).astype(np.float32)
    lses = (rng.standard_normal((num_states, batch, hq)) * 3).astype(np.float32)
    empty = rng.random((num_states, batch, hq)) < 0.2
    lses[empty] = -np.inf
    outs[empty] = np.nan
    return outs, lses


def _paged_cache(k, v, kv_lens, page):
    """k, v [batch, kv_len, hkv, d] as a paged cache with each sequence's pages in order, and the
    three tables."""
    batch, kv_len = k.shape[:2]
    pages = max(-(-kv_len // page), 1)
    pad = ((0, 0), (0, pages * page - kv_len), (0, 0), (0, 0))
    kc, vc = (np.ascontiguousarray(np.pad(x, pad).reshape(-1, page, *x.shape[2:])) for x in (k, v))
    used = -(-np.asarray(kv_lens) // page)
    indptr = np.concatenate([[0], np.cumsum(used)])
    indices = np.concatenate([b * pages + np.arange(used[b]) for b in range(batch)] + [np.zeros(0, int)])
    last = np.where(used > 0, kv_lens - (used - 1) * page, 0)
    return kc, vc, indptr, indices, last


@given(st.sampled_from(("float16", "bfloat16")), st.sampled_from(HEAD_DIMS), st.sampled_from(HEADS),
       st.integers(1, 3), st.sampled_from((0, 1, 17, 339, 1000)), st.integers(1, 9), st.sampled_from((1, 3)), st.booleans(),
       st.sampled_from((False, 16)), st.integers(0, 2**31 - 1))
@example("float16", 64, (8, 8), 3, 1000, 4, 1, False, False, 1)     # the persistent kernel
@example("bfloat16", 128, (32, 8), 2, 339, 9, 3, True, 16, 2)
@example("float16", 128, (32, 8), 2, 0, 2, 1, False, False, 3)       # no tokens: the states alone
def test_split_kv_merges_the_given_states(dtype, head_dim, heads, batch, kv_len, num_states, num_splits, ragged,
                                          page, seed):
    """`states`: the output is the LSE merge of the given states and the attention over the cache,
    as refattn.merge_states computes it (the states' empty entries never read)."""
    from gpukernels.split_kv import SplitKV, plan_split_kv

    hq, hkv = heads
    rng = np.random.default_rng(seed)
    q, k, v = _random_qkv(rng, dtype, batch, hq, hkv, kv_len, head_dim)
    kv_lens = rng.integers(0, kv_len + 1, size=batch) if ragged or page else np.full(batch, kv_len)
    s_out, s_lse = _random_states(rng, num_states, batch, hq, head_dim)
    own_out, own_lse = refattn.decode(q, k, v, kv_lens)
    ref_out, ref_lse = refattn.merge_states(np.concatenate([s_out, own_out[None]]).astype(np.float64),
                                            np.concatenate([s_lse, own_lse[None]]).astype(np.float64))
    qd = _device(q)
    out = _poisoned(qd, (batch, hq, head_dim), dtype)
    lse = _poisoned(qd, (batch, hq), "float32")
    states = (cp.asarray(s_out), cp.asarray(s_lse))
    plan = plan_split_kv(batch, hq, hkv, head_dim, max(kv_len, 1), dtype=dtype, num_splits=num_splits,
                         page_size=page or 0)
    runner = SplitKV(plan)
    if page:
        kc, vc, indptr, indices, last = _paged_cache(k, v, kv_lens, page)
        tables = [cp.asarray(x.astype(np.int32)) for x in (indptr, indices, last)]
        runner.run_paged(qd, _device(kc), _device(vc), *tables, out=out, lse=lse, states=states)
    else:
        lens = cp.asarray(kv_lens.astype(np.int32)) if ragged else None
        runner.run(qd, _device(k), _device(v), lens, out=out, lse=lse, states=states)
    o, l = _host(out).astype(np.float64), _host(lse).astype(np.float64)
    assert not np.any(np.isnan(o)), "output has NaN (unwritten, or an empty state's out was read)"
    assert np.array_equal(np.isneginf(l), np.isneginf(ref_lse))
    err = rel_error(o, ref_out)
    assert err <= OUT_RTOL[dtype], f"out rel error {err:.3g} > {OUT_RTOL[dtype]} ({dtype})"
    finite = np.isfinite(ref_lse)
    lerr = lse_error(l[finite], ref_lse[finite])
    assert lerr <= LSE_ATOL[dtype] * 4, f"lse error {lerr:.3g} ({dtype})"


@pytest.mark.parametrize("num_splits", [1, 3])
def test_split_kv_states_let_non_finite_values_through(num_splits):
    from gpukernels.split_kv import SplitKV, plan_split_kv

    rng = np.random.default_rng(5 + num_splits)
    batch, hq, hkv, d, kv_len = 3, 8, 2, 128, 700
    q, k, v = _random_qkv(rng, "float16", batch, hq, hkv, kv_len, d)
    s_out, s_lse = _random_states(rng, 4, batch, hq, d)
    s_lse[1, 0, 2] = np.nan                       # row (0, 2): NaN
    s_lse[2, 1, 3] = np.inf                       # row (1, 3): NaN
    s_lse[0, 2, 5] = 0.5
    s_out[0, 2, 5, 9] = np.inf                    # row (2, 5), element 9: NaN
    own_out, own_lse = refattn.decode(q, k, v)
    ref_out, ref_lse = refattn.merge_states(np.concatenate([s_out, own_out[None]]).astype(np.float64),
                                            np.concatenate([s_lse, own_lse[None]]).astype(np.float64))
    qd = _device(q)
    out, lse = _poisoned(qd, (batch, hq, d), "float16"), _poisoned(qd, (batch, hq), "float32")
    SplitKV(plan_split_kv(batch, hq, hkv, d, kv_len, num_splits=num_splits)).run(
        qd, _device(k), _device(v), out=out, lse=lse, states=(cp.asarray(s_out), cp.asarray(s_lse)))
    _compare_nonfinite(out, lse, ref_out, ref_lse, "float16")


@pytest.mark.parametrize("states, exc, words", [
    ("x", TypeError, "tuple"),
    ((np.zeros((1, 2, 8, 64), np.float32), np.zeros((1, 2, 8), np.float32)), TypeError, "CuPy"),
    (("shape", (1, 2, 8, 32), (1, 2, 8)), ValueError, "states_out"),
    (("shape", (1, 2, 8, 64), (2, 2, 8)), ValueError, "states_lse"),
    (("dtype", "float16"), TypeError, "float32"),
    (("kernel", "float32"), TypeError, "tensor-core"),
])
def test_split_kv_states_are_checked_before_launch(states, exc, words):
    from gpukernels.split_kv import SplitKV, plan_split_kv

    tag = states[0] if isinstance(states, tuple) and isinstance(states[0], str) else None
    dtype = "float32" if tag == "kernel" else "float16"
    q = cp.zeros((2, 8, 64), dtype)
    k = cp.zeros((2, 16, 2, 64), dtype)
    if tag == "shape":
        states = (cp.zeros(states[1], cp.float32), cp.zeros(states[2], cp.float32))
    elif tag in ("dtype", "kernel"):
        states = (cp.zeros((1, 2, 8, 64), states[1]), cp.zeros((1, 2, 8), cp.float32))
    out = cp.full((2, 8, 64), np.nan, dtype)
    with pytest.raises(exc, match=words):
        SplitKV(plan_split_kv(2, 8, 2, 64, 16, dtype=dtype)).run(q, k, k, out=out, states=states)
    assert bool(cp.isnan(out).all()), "nothing may run before the checks"


# A kernel that spins for `cycles` clock cycles, then copies `n` 16-bit values: the kernel before a
# programmatic launch, still running when the launch could start.
_SPIN_THEN_COPY = r"""
extern "C" __global__ void spin_then_copy(const unsigned short* src, unsigned short* dst, int n,
                                          long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {}
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) dst[i] = src[i];
}
"""


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_programmatic_launch_waits_for_the_kernel_before_it(dtype, paged):
    """SplitKV(plan, programmatic=True) may start while the kernel before it runs; q written by that
    kernel (after spinning for about 0.1 ms, from a NaN-poisoned buffer) must be the q it reads,
    so the output matches the reference and the plain launch's bit for bit, also in a CUDA graph."""
    import gpukernels

    rng = np.random.default_rng(31)
    batch, hq, hkv, d, kv_len, page = 3, 8, 2, 128, 700, 16
    q, k, v = _random_qkv(rng, dtype, batch, hq, hkv, kv_len, d)
    ref_out, ref_lse = refattn.decode(q, k, v)
    spin = cp.RawKernel(_SPIN_THEN_COPY, "spin_then_copy")
    q_src = cp.asarray(q)
    q_dst = cp.full(q.shape, np.nan, dtype=q.dtype)
    elems = q_src.nbytes // 2
    plan = gpukernels.plan_split_kv(batch, hq, hkv, d, kv_len, dtype=dtype, num_splits=2,
                                    page_size=page if paged else 0)
    if paged:
        pages = -(-kv_len // page)
        pad = ((0, 0), (0, pages * page - kv_len), (0, 0), (0, 0))
        kc, vc = (cp.asarray(np.ascontiguousarray(np.pad(x, pad).reshape(-1, page, hkv, d))) for x in (k, v))
        tables = (cp.asarray(np.arange(batch + 1, dtype=np.int32) * pages),
                  cp.asarray(np.arange(batch * pages, dtype=np.int32)),
                  cp.asarray(np.full(batch, kv_len - (pages - 1) * page, np.int32)))
    else:
        kc, vc = cp.asarray(k), cp.asarray(v)

    def step(runner, out, lse):
        spin((1,), (256,), (q_src.view(cp.uint16), q_dst.view(cp.uint16), np.int32(elems), np.int64(200_000)))
        if paged:
            runner.run_paged(q_dst, kc, vc, *tables, out=out, lse=lse)
        else:
            runner.run(q_dst, kc, vc, out=out, lse=lse)

    results = {}
    for programmatic in (False, True):
        runner = gpukernels.SplitKV(plan, programmatic=programmatic)
        out, lse = _poisoned(q_dst, q.shape, dtype), _poisoned(q_dst, q.shape[:2], "float32")
        q_dst.fill(np.nan)
        step(runner, out, lse)
        cp.cuda.Device().synchronize()
        _check(out, lse, ref_out, ref_lse, dtype)
        results[programmatic] = (cp.asnumpy(out), cp.asnumpy(lse))
        # the same two launches captured in a graph and replayed
        stream = cp.cuda.Stream(non_blocking=True)
        graph_out, graph_lse = _poisoned(q_dst, q.shape, dtype), _poisoned(q_dst, q.shape[:2], "float32")
        with stream:
            stream.begin_capture()
            step(runner, graph_out, graph_lse)
            graph = stream.end_capture()
            q_dst.fill(np.nan)
            graph.launch(stream)
        stream.synchronize()
        _check(graph_out, graph_lse, ref_out, ref_lse, dtype)
    np.testing.assert_array_equal(results[True][0], results[False][0])
    np.testing.assert_array_equal(results[True][1], results[False][1])


# More (sequence, KV head, head group) items than the GPU holds blocks at once, all of one length:
# the persistent kernel (a grid of the resident blocks, each running on from item to item).
PERSISTENT_SHAPES = [   # head_dim, num_qo_heads, num_kv_heads, batch
    (64, 16, 16, 24),       # MHA: 384 items
    (64, 32, 8, 40),        # GQA 4: 320
    (64, 28, 4, 80),        # GQA 7: 320
    (64, 8, 1, 300),        # MQA: 300
]


def _persistent_run(monkeypatch, persistent, plan, qd, kd, vd, dtype):
    import importlib

    import gpukernels

    sk = importlib.import_module("gpukernels.split_kv")
    monkeypatch.setattr(sk, "PERSISTENT", persistent)
    assert (sk.persistent_grid(plan, cp.cuda.Device().id) is not None) == persistent
    out = _poisoned(qd, (plan.batch, plan.num_qo_heads, plan.head_dim), dtype)
    lse = _poisoned(qd, (plan.batch, plan.num_qo_heads), "float32")
    gpukernels.SplitKV(plan).run(qd, kd, vd, out=out, lse=lse)
    return out, lse


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim, hq, hkv, batch", PERSISTENT_SHAPES)
@pytest.mark.parametrize("kv_len", [0, 1, 333, 1000])
def test_persistent_items_match_reference_and_one_block_per_item(monkeypatch, dtype, head_dim, hq, hkv, batch,
                                                                 kv_len):
    import gpukernels

    rng = np.random.default_rng(kv_len + head_dim + hq + batch)
    q, k, v = _random_qkv(rng, dtype, batch, hq, hkv, kv_len, head_dim)
    ref_out, ref_lse = refattn.decode(q, k, v)
    qd, kd, vd = _device(q), _device(k), _device(v)
    plan = gpukernels.plan_split_kv(batch, hq, hkv, head_dim, max(kv_len, 1), dtype=dtype, num_splits=1)
    out, lse = _persistent_run(monkeypatch, True, plan, qd, kd, vd, dtype)
    if kv_len == 0:
        _check_with_empty(out, lse, ref_out, ref_lse, dtype)
    else:
        _check(out, lse, ref_out, ref_lse, dtype)
    # the same arithmetic in the same order as one block per item: the same bits
    one_out, one_lse = _persistent_run(monkeypatch, False, plan, qd, kd, vd, dtype)
    np.testing.assert_array_equal(_host(out), _host(one_out))
    np.testing.assert_array_equal(_host(lse), _host(one_lse))


# Head_dim 128: the persistent kernel for sequences of at most 128 tokens (more items than the
# 3 x 132 blocks the H200 holds).
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("hq, hkv, batch", [(32, 32, 16), (32, 8, 64), (8, 1, 500)])
@pytest.mark.parametrize("kv_len", [1, 77, 128])
def test_persistent_items_at_head_dim_128_run_after_run(monkeypatch, dtype, hq, hkv, batch, kv_len):
    """Against the reference and bit for bit as one block per item, three runs in a row (the items
    come from a counter that each launch leaves at zero for the next)."""
    import importlib

    import gpukernels

    head_dim = 128
    rng = np.random.default_rng(kv_len + hq + batch)
    q, k, v = _random_qkv(rng, dtype, batch, hq, hkv, kv_len, head_dim)
    ref_out, ref_lse = refattn.decode(q, k, v)
    qd, kd, vd = _device(q), _device(k), _device(v)
    plan = gpukernels.plan_split_kv(batch, hq, hkv, head_dim, kv_len, dtype=dtype, num_splits=1)
    one_out, one_lse = _persistent_run(monkeypatch, False, plan, qd, kd, vd, dtype)
    sk = importlib.import_module("gpukernels.split_kv")
    monkeypatch.setattr(sk, "PERSISTENT", True)
    assert sk.persistent_grid(plan, cp.cuda.Device().id) is not None
    runner = gpukernels.SplitKV(plan)
    for run in range(4):   # the plan's runner three times, then the one-shot call (its stream's workspace)
        out = _poisoned(qd, (batch, hq, head_dim), dtype)
        lse = _poisoned(qd, (batch, hq), "float32")
        if run < 3:
            runner.run(qd, kd, vd, out=out, lse=lse)
        else:
            out, lse = gpukernels.split_kv(qd, kd, vd, num_splits=1)
        _check(out, lse, ref_out, ref_lse, dtype)
        np.testing.assert_array_equal(_host(out), _host(one_out))
        np.testing.assert_array_equal(_host(lse), _host(one_lse))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64])
def test_persistent_items_let_non_finite_inputs_through(monkeypatch, dtype, head_dim):
    import gpukernels

    rng = np.random.default_rng(head_dim)
    batch, hq, hkv, kv_len = 80, 16, 4, 200
    q, k, v = _random_qkv(rng, dtype, batch, hq, hkv, kv_len, head_dim)
    q[0, 5, 3] = np.nan                  # one query head of sequence 0
    k[2, 17, 1, 0] = np.inf              # a key row: every head of KV head 1, sequence 2
    v[3, 150, 2, 7] = -np.inf            # one value element: dim 7 of KV head 2's heads, sequence 3
    q[79, 15, 0] = np.nan                # the last item
    ref_out, ref_lse = refattn.decode(q, k, v)
    qd = _device(q)
    plan = gpukernels.plan_split_kv(batch, hq, hkv, head_dim, kv_len, dtype=dtype, num_splits=1)
    out, lse = _persistent_run(monkeypatch, True, plan, qd, _device(k), _device(v), dtype)
    _compare_nonfinite(out, lse, ref_out, ref_lse, dtype)
