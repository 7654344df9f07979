"""The shared-prefix kernel (Hydragen) against the float64 reference, on the GPU.

Skipped with a reason when CuPy or a CUDA GPU is missing; nothing touches the device at import.
Outputs are poisoned with NaN before every run, so an element the kernels never wrote fails.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import refattn
from test_kernels_gpu import _HAVE_GPU, _compare_nonfinite, _device, _host, _poisoned, _random, cp
from tolerances import LSE_ATOL, OUT_RTOL, lse_error, rel_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _HAVE_GPU, reason="needs CuPy and a CUDA GPU (run on the GPU machine)"),
]

DTYPES = ("float16", "bfloat16")
# (num_qo_heads, num_kv_heads): MHA, GQA 4, group 5, MQA.
HEADS = ((8, 8), (32, 8), (20, 4), (8, 1))


def _inputs(rng, dtype, batch, hq, hkv, d, prefix_len, suffix_len):
    return (_random(rng, (batch, hq, d), dtype),
            _random(rng, (prefix_len, hkv, d), dtype), _random(rng, (prefix_len, hkv, d), dtype),
            _random(rng, (batch, suffix_len, hkv, d), dtype), _random(rng, (batch, suffix_len, hkv, d), dtype))


def _run(q, kp, vp, ks, vs, suffix_lens, dtype, **kwargs):
    from gpukernels.shared_prefix import shared_prefix

    qd = _device(q)
    out = _poisoned(qd, q.shape, dtype)
    lse = _poisoned(qd, q.shape[:2], "float32")
    res = shared_prefix(qd, _device(kp), _device(vp), _device(ks), _device(vs), suffix_lens,
                        out=out, lse=lse, **kwargs)
    assert res[0] is out and res[1] is lse
    return out, lse


def _check(out, lse, ref_out, ref_lse, dtype):
    o, l = _host(out).astype(np.float64), _host(lse).astype(np.float64)
    assert not np.any(np.isnan(o)) and not np.any(np.isnan(l)), "NaN in the output (unwritten or wrong)"
    assert np.array_equal(np.isneginf(l), np.isneginf(ref_lse))
    err = rel_error(o, ref_out)
    assert err <= OUT_RTOL[dtype], f"out rel error {err:.3g} > {OUT_RTOL[dtype]} ({dtype})"
    finite = np.isfinite(ref_lse)
    assert lse_error(l[finite], ref_lse[finite]) <= LSE_ATOL[dtype] * 4


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    head_dim = draw(st.sampled_from((64, 128, 256)))
    hq, hkv = draw(st.sampled_from(HEADS))
    batch = draw(st.integers(1, 20))
    prefix_len = draw(st.sampled_from((0, 1, 31, 64, 65, 339, 1000, 4097)))
    suffix_len = draw(st.sampled_from((0, 1, 17, 130)))
    ragged = draw(st.booleans())
    chunk = draw(st.sampled_from((None, 64, 256)))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, head_dim, hq, hkv, batch, prefix_len, suffix_len, ragged, chunk, seed


@pytest.mark.parametrize("method", ["bifurcated", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ragged", [False, True])
def test_the_other_methods_match_the_reference(method, dtype, ragged):
    rng = np.random.default_rng(8)
    q, kp, vp, ks, vs = _inputs(rng, dtype, 9, 32, 8, 128, 1000, 40)
    lens = rng.integers(0, 41, size=9) if ragged else None
    ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, lens, method="bifurcated")
    out, lse = _run(q, kp, vp, ks, vs, lens, dtype, method=method)
    _check(out, lse, ref_out, ref_lse, dtype)


@given(cases())
@example(("float16", 128, 32, 8, 16, 4097, 130, True, None, 1))     # 64 query rows: one tile per KV head
@example(("bfloat16", 128, 32, 8, 17, 1000, 17, False, 64, 2))      # 68 rows: a second, partial tile
@example(("float16", 256, 20, 4, 3, 339, 0, False, None, 3))        # no suffix
@example(("bfloat16", 64, 8, 1, 20, 0, 130, True, None, 4))         # no prefix
@example(("float16", 64, 8, 8, 1, 65, 1, False, 64, 5))             # a prefix chunk of one row
def test_hydragen_matches_the_reference(case):
    dtype, d, hq, hkv, batch, prefix_len, suffix_len, ragged, chunk, seed = case
    rng = np.random.default_rng(seed)
    q, kp, vp, ks, vs = _inputs(rng, dtype, batch, hq, hkv, d, prefix_len, suffix_len)
    lens = rng.integers(0, suffix_len + 1, size=batch) if ragged else None
    if chunk is not None and d >= 256:
        chunk = max(chunk, 32)
    ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, lens)
    out, lse = _run(q, kp, vp, ks, vs, lens, dtype, prefix_chunk_size=chunk)
    _check(out, lse, ref_out, ref_lse, dtype)


def test_suffix_lengths_on_the_gpu():
    rng = np.random.default_rng(6)
    q, kp, vp, ks, vs = _inputs(rng, "float16", 5, 32, 8, 128, 700, 40)
    lens = np.array([40, 0, 13, 40, 1])
    ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, lens)
    out, lse = _run(q, kp, vp, ks, vs, cp.asarray(lens.astype(np.int32)), "float16")
    _check(out, lse, ref_out, ref_lse, "float16")


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_values_give_nan_where_the_reference_does(dtype):
    rng = np.random.default_rng(7)
    q, kp, vp, ks, vs = _inputs(rng, dtype, 6, 16, 4, 128, 300, 20)
    q[0, 3, 5] = np.nan          # one query head
    kp[100, 2, 0] = np.inf       # a prefix key: every sequence's heads of KV head 2
    vs[4, 7, 1, 9] = np.nan      # a suffix value element of sequence 4
    lens = np.array([20, 20, 20, 20, 20, 5])
    vs[5, 10, 0, :] = np.nan     # past suffix_lens[5]: never read
    ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, lens)
    out, lse = _run(q, kp, vp, ks, vs, lens, dtype)
    _compare_nonfinite(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize(
    "change, exc, name",
    [
        (dict(k_prefix=lambda a: a[:, :2]), ValueError, "v_prefix"),
        (dict(k_prefix=lambda a: a[..., :64]), ValueError, "head_dim"),
        (dict(k_suffix=lambda a: a[:2]), ValueError, "k_suffix"),
        (dict(v_suffix=lambda a: a[:, :3]), ValueError, "v_suffix"),
        (dict(q=lambda a: a.astype(cp.float32)), TypeError, "k_prefix"),
        (dict(q=lambda a: cp.asnumpy(a)), TypeError, "q"),
        (dict(k_prefix=lambda a: a[:, :, ::2]), ValueError, "head_dim"),
        (dict(suffix_lens=lambda a: np.array([5, 99, 0, 1])), ValueError, "suffix_lens"),
        (dict(suffix_lens=lambda a: np.array([1.5, 2, 0, 1])), TypeError, "suffix_lens"),
        (dict(method=lambda a: "fast"), ValueError, "method"),
        (dict(prefix_chunk_size=lambda a: 100), ValueError, "prefix_chunk_size"),
    ],
)
def test_malformed_calls_raise_before_launch(change, exc, name):
    from gpukernels.shared_prefix import shared_prefix

    args = dict(q=cp.zeros((4, 8, 128), cp.float16), k_prefix=cp.zeros((50, 4, 128), cp.float16),
                v_prefix=cp.zeros((50, 4, 128), cp.float16), k_suffix=cp.zeros((4, 10, 4, 128), cp.float16),
                v_suffix=cp.zeros((4, 10, 4, 128), cp.float16), suffix_lens=None)
    kwargs = {}
    for key, make in change.items():
        if key in ("method", "prefix_chunk_size"):
            kwargs[key] = make(None)
        else:
            args[key] = make(args[key])
    with pytest.raises(exc) as info:
        shared_prefix(*args.values(), **kwargs)
    assert name in str(info.value)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_plan_runs_many_times_with_lengths_on_the_gpu(dtype):
    from gpukernels.shared_prefix import SharedPrefix, plan_shared_prefix

    rng = np.random.default_rng(11)
    batch, hq, hkv, d, prefix_len, suffix_len = 6, 32, 8, 128, 1000, 70
    plan = plan_shared_prefix(batch, hq, hkv, d, prefix_len, suffix_len, dtype=dtype, num_sms=132)
    runner = SharedPrefix(plan)
    lens = np.array([70, 0, 1, 33, 70, 64])
    for _ in range(2):   # fresh inputs, the same plan and buffers
        q, kp, vp, ks, vs = _inputs(rng, dtype, batch, hq, hkv, d, prefix_len, suffix_len)
        ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, lens)
        qd = _device(q)
        out = _poisoned(qd, q.shape, dtype)
        lse = _poisoned(qd, q.shape[:2], "float32")
        if dtype == "bfloat16":   # q is a PyTorch tensor: the lengths too
            import torch

            lens_d = torch.from_numpy(lens.astype(np.int32)).cuda()
        else:
            lens_d = cp.asarray(lens.astype(np.int32))
        res = runner.run(qd, _device(kp), _device(vp), _device(ks), _device(vs), lens_d, out=out, lse=lse)
        assert res[0] is out and res[1] is lse
        _check(out, lse, ref_out, ref_lse, dtype)
    with pytest.raises(ValueError, match="k_prefix"):
        runner.run(qd, _device(kp[:-1]), _device(vp[:-1]), _device(ks), _device(vs))
