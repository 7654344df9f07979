"""The shared-prefix kernels (Hydragen, bifurcated attention; contiguous and paged suffixes)
against the float64 reference, on the GPU.

Skipped with a reason when CuPy or a CUDA GPU is missing; nothing touches the device at import.
Outputs are poisoned with NaN before every run, so an element the kernels never wrote fails.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import refattn
from test_kernels_gpu import _HAVE_GPU, _check_with_empty, _compare_nonfinite, _device, _host, _poisoned, _random, cp
from tolerances import LSE_ATOL, OUT_RTOL, lse_error, rel_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _HAVE_GPU, reason="needs CuPy and a CUDA GPU (run on the GPU machine)"),
]

DTYPES = ("float16", "bfloat16")
BIFURCATED_DTYPES = ("float16", "bfloat16", "float32")
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
@example(("float16", 128, 8, 1, 20, 4097, 130, True, None, 6))      # 160 rows: two-warpgroup blocks on Hopper
@example(("bfloat16", 64, 32, 8, 20, 1000, 17, False, 256, 7))      # 80 rows, head_dim 64, a partial KV tile
@example(("float16", 128, 32, 8, 64, 4097, 17, True, None, 8))      # 256 rows: two whole blocks a KV head
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


@given(cases())
@example(("float16", 128, 32, 8, 64, 4097, 17, True, None, 8))      # 256 rows: two-warpgroup blocks on Hopper
@example(("bfloat16", 64, 8, 1, 20, 1000, 130, False, 64, 3))       # MQA, many chunks
@example(("float16", 256, 20, 4, 3, 339, 0, False, None, 4))        # no suffix: the chunks' merge alone
def test_hydragen_with_a_merge_launch_matches_the_reference(case):
    """The cases of test_hydragen_matches_the_reference planned with a merge launch (three
    launches: the suffixes merging no states, then the merge of both), lengths on the GPU."""
    import dataclasses

    from gpukernels.shared_prefix import SharedPrefix, plan_shared_prefix

    dtype, d, hq, hkv, batch, prefix_len, suffix_len, ragged, chunk, seed = case
    rng = np.random.default_rng(seed)
    q, kp, vp, ks, vs = _inputs(rng, dtype, batch, hq, hkv, d, prefix_len, suffix_len)
    lens = rng.integers(0, suffix_len + 1, size=batch) if ragged else np.full(batch, suffix_len)
    if chunk is not None and d >= 256:
        chunk = max(chunk, 32)
    ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, lens)
    plan = plan_shared_prefix(batch, hq, hkv, d, prefix_len, suffix_len, dtype=dtype, prefix_chunk_size=chunk,
                              num_sms=132)
    runner = SharedPrefix(dataclasses.replace(plan, merge_launch=True))
    qd = _device(q)
    out, lse = _poisoned(qd, q.shape, dtype), _poisoned(qd, q.shape[:2], "float32")
    runner.run(qd, _device(kp), _device(vp), _device(ks), _device(vs), _lens_on_device(lens, qd), out=out, lse=lse)
    _check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_both_prefix_pass_kernels_match_the_reference(dtype, head_dim):
    """The same call planned with blocks of two warpgroups (128 query rows, on Hopper) and of one
    (64 rows): both match the reference, and the first is what Hopper's plan takes."""
    import dataclasses

    from gpukernels.shared_prefix import QUERY_ROWS, SharedPrefix, plan_shared_prefix
    from gpukernels.split_kv import device_gpu

    rng = np.random.default_rng(head_dim)
    batch, hq, hkv, prefix_len, suffix_len = 37, 32, 8, 2000, 50   # 148 rows a KV head
    q, kp, vp, ks, vs = _inputs(rng, dtype, batch, hq, hkv, head_dim, prefix_len, suffix_len)
    ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, None)
    gpu = device_gpu(0)
    plan = plan_shared_prefix(batch, hq, hkv, head_dim, prefix_len, suffix_len, dtype=dtype, gpu=gpu)
    if gpu is not None and gpu.key in ("h100_sxm", "h100_pcie", "h200"):
        assert plan.prefix_block_rows == 128
    for block_rows in (plan.prefix_block_rows, QUERY_ROWS):
        runner = SharedPrefix(dataclasses.replace(plan, prefix_block_rows=block_rows))
        qd = _device(q)
        out, lse = _poisoned(qd, q.shape, dtype), _poisoned(qd, q.shape[:2], "float32")
        runner.run(qd, _device(kp), _device(vp), _device(ks), _device(vs), out=out, lse=lse)
        _check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("chunk", [64, 192, 320, 2048])
def test_blocks_of_two_warpgroups_mask_the_rows_past_their_chunk(chunk):
    """The two-warpgroup pass copies whole tiles of 128 prefix rows, so with a chunk that is not a
    multiple of 128 a chunk's last tile holds the next chunk's first rows (and the prefix's last
    tile rows past its end, read as zeros): the softmax must leave them out, or the merged output
    counts them twice."""
    import dataclasses

    from gpukernels.shared_prefix import SharedPrefix, plan_shared_prefix

    rng = np.random.default_rng(chunk)
    batch, hq, hkv, d, prefix_len, suffix_len = 40, 32, 8, 128, 1000, 24   # 160 rows a KV head
    q, kp, vp, ks, vs = _inputs(rng, "float16", batch, hq, hkv, d, prefix_len, suffix_len)
    ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, None)
    plan = plan_shared_prefix(batch, hq, hkv, d, prefix_len, suffix_len, prefix_chunk_size=chunk, num_sms=132,
                              gpu="H200")
    assert plan.prefix_block_rows == 128
    for merge_launch in (False, True):
        runner = SharedPrefix(dataclasses.replace(plan, merge_launch=merge_launch))
        qd = _device(q)
        out, lse = _poisoned(qd, q.shape, "float16"), _poisoned(qd, q.shape[:2], "float32")
        runner.run(qd, _device(kp), _device(vp), _device(ks), _device(vs), out=out, lse=lse)
        _check(out, lse, ref_out, ref_lse, "float16")


@pytest.mark.parametrize("name", ["q", "k_prefix", "v_prefix", "k_suffix"])
def test_an_array_off_a_16_byte_boundary_is_refused_before_launch(name):
    from gpukernels.shared_prefix import shared_prefix

    rng = np.random.default_rng(11)
    arrays = dict(zip(("q", "k_prefix", "v_prefix", "k_suffix", "v_suffix"),
                      (_device(x) for x in _inputs(rng, "float16", 40, 32, 8, 128, 500, 20))))
    a = arrays[name]
    shifted = cp.empty(a.size + 1, dtype=a.dtype)[1:].reshape(a.shape)   # contiguous, 2 bytes off
    shifted[...] = a
    arrays[name] = shifted
    out = cp.full((40, 32, 128), 7.0, dtype=cp.float16)
    with pytest.raises(ValueError, match=f"{name} must start at a 16-byte aligned address"):
        shared_prefix(*arrays.values(), out=out)
    cp.cuda.Device().synchronize()
    assert bool((out == 7.0).all())                                      # nothing launched


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


# ---------------------------------------------------------------------------------------------
# Bifurcated attention's kernels (gpukernels.bifurcated)


@st.composite
def bifurcated_cases(draw):
    dtype = draw(st.sampled_from(BIFURCATED_DTYPES))
    head_dim = draw(st.sampled_from((64, 128, 256)))
    hq, hkv = draw(st.sampled_from(HEADS))
    batch = draw(st.integers(1, 20))
    prefix_len = draw(st.sampled_from((0, 1, 31, 64, 65, 339, 1000, 4097)))
    suffix_len = draw(st.sampled_from((0, 1, 17, 130)))
    lens = draw(st.sampled_from(("none", "host", "gpu")))
    chunk = draw(st.sampled_from((None, 64, 256)))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, head_dim, hq, hkv, batch, prefix_len, suffix_len, lens, chunk, seed


def _lens_on_device(lens, like):
    """int32 lengths on the GPU, of the same array library as `like`."""
    if hasattr(like, "data_ptr") and not hasattr(like, "get"):
        import torch

        return torch.from_numpy(np.asarray(lens, dtype=np.int32)).cuda()
    return cp.asarray(np.asarray(lens, dtype=np.int32))


@given(bifurcated_cases())
@example(("float16", 128, 32, 8, 16, 4097, 130, "host", None, 1))   # 64 query rows: one row tile
@example(("bfloat16", 128, 32, 8, 17, 1000, 17, "gpu", 64, 2))      # 68 rows: a second, partial tile
@example(("float32", 256, 20, 4, 3, 339, 0, "none", None, 3))       # float32 on the CUDA cores, no suffix
@example(("float32", 64, 8, 1, 20, 1000, 130, "host", 64, 4))       # MQA, 160 rows of 16-row tiles
@example(("bfloat16", 64, 8, 1, 20, 0, 130, "host", None, 5))       # no prefix
@example(("float16", 256, 8, 8, 1, 65, 1, "none", 64, 6))           # a prefix chunk of one token
@example(("float16", 64, 8, 8, 3, 0, 17, "host", None, 7))          # lens may be 0: nothing to attend to
def test_bifurcated_matches_the_reference(case):
    dtype, d, hq, hkv, batch, prefix_len, suffix_len, lens_at, chunk, seed = case
    rng = np.random.default_rng(seed)
    q, kp, vp, ks, vs = _inputs(rng, dtype, batch, hq, hkv, d, prefix_len, suffix_len)
    lens = None if lens_at == "none" else rng.integers(0, suffix_len + 1, size=batch)
    if lens is not None and prefix_len == 0:
        lens[0] = 0                                   # one sequence with nothing to attend to
    if chunk is not None and dtype != "float32" and d >= 256:
        chunk = max(chunk, 32)
    ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, lens, method="bifurcated")
    qd = _device(q)
    given_lens = _lens_on_device(lens, qd) if lens_at == "gpu" else lens
    out = _poisoned(qd, q.shape, dtype)
    lse = _poisoned(qd, q.shape[:2], "float32")
    from gpukernels.shared_prefix import shared_prefix

    res = shared_prefix(qd, _device(kp), _device(vp), _device(ks), _device(vs), given_lens, method="bifurcated",
                        prefix_chunk_size=chunk, out=out, lse=lse)
    assert res[0] is out and res[1] is lse
    _check_with_empty(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", BIFURCATED_DTYPES)
def test_bifurcated_non_finite_values_give_nan_where_the_reference_does(dtype):
    rng = np.random.default_rng(17)
    q, kp, vp, ks, vs = _inputs(rng, dtype, 6, 16, 4, 128, 300, 20)
    q[0, 3, 5] = np.nan          # one query head
    kp[100, 2, 0] = np.inf       # a prefix key: every sequence's heads of KV head 2
    vp[7, 1, 4] = np.inf         # a prefix value element: element 4 of every head of KV head 1
    vs[4, 7, 1, 9] = np.nan      # a suffix value element of sequence 4
    ks[3, 2, 0, 0] = -np.inf     # a suffix key of sequence 3
    lens = np.array([20, 20, 20, 20, 20, 5])
    vs[5, 10, 0, :] = np.nan     # past suffix_lens[5]: never read
    ks[5, 11, 3, :] = np.inf
    ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, lens, method="bifurcated")
    out, lse = _run(q, kp, vp, ks, vs, lens, dtype, method="bifurcated")
    _compare_nonfinite(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", BIFURCATED_DTYPES)
def test_bifurcated_device_lengths_out_of_range_poison_their_sequence_only(dtype):
    rng = np.random.default_rng(18)
    q, kp, vp, ks, vs = _inputs(rng, dtype, 4, 16, 4, 64, 200, 40)
    lens = np.array([40, -1, 41, 7])
    out, lse = _run(q, kp, vp, ks, vs, _lens_on_device(lens, _device(q)), dtype, method="bifurcated")
    o, l = _host(out).astype(np.float64), _host(lse).astype(np.float64)
    assert np.isnan(o[1:3]).all() and np.isnan(l[1:3]).all()
    good = [0, 3]
    ref_out, ref_lse = refattn.shared_prefix(q[good], kp, vp, ks[good], vs[good], lens[good], method="bifurcated")
    _check(out[good], lse[good], ref_out, ref_lse, dtype)


@pytest.mark.parametrize("paged", [False, True])
def test_hydragen_suffixes_overlapping_the_prefix_pass_give_the_same_bits(paged, monkeypatch):
    """The suffix launch starts while the prefix pass runs: its first wave waits for the prefix
    states only before merging them, the later blocks at their start (prefetching them). 24
    sequences x 32 heads make 768 suffix blocks, two to three waves: both kinds; the bits are those
    of the launch that waits at its start, and the answer the reference's."""
    import gpukernels._runtime as rt
    sk = importlib.import_module("gpukernels.split_kv")   # the module (the package exports a function by its name)

    launches = []
    call = rt.Kernel.__call__

    def spy(self, grid, block, args, **kwargs):
        launches.append((self.name, kwargs.get("programmatic", False)))
        return call(self, grid, block, args, **kwargs)

    monkeypatch.setattr(rt.Kernel, "__call__", spy)
    rng = np.random.default_rng(23)
    batch, hq, hkv, d, prefix_len, suffix_len = 24, 32, 32, 64, 200, 40
    q, kp, vp, ks, vs = _inputs(rng, "float16", batch, hq, hkv, d, prefix_len, suffix_len)
    lens = rng.integers(0, suffix_len + 1, batch)
    ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, lens)
    kwargs = {}
    if paged:   # pages of 16, one sequence after another
        pages = -(-lens // 16)
        kwargs = dict(kv_indptr=np.concatenate([[0], np.cumsum(pages)]), kv_indices=np.arange(pages.sum()),
                      kv_last_page_len=np.where(lens > 0, lens - 16 * (pages - 1), 0))
        cache_k = np.zeros((max(pages.sum(), 1), 16, hkv, d), dtype=ks.dtype)
        cache_v = np.zeros_like(cache_k)
        for b in range(batch):
            at = kwargs["kv_indptr"][b] * 16
            cache_k.reshape(-1, hkv, d)[at:at + lens[b]] = ks[b, :lens[b]]
            cache_v.reshape(-1, hkv, d)[at:at + lens[b]] = vs[b, :lens[b]]
        ks, vs, lens = cache_k, cache_v, None
    results = []
    for overlap in (True, False):
        sk.STATES_OVERLAP = overlap
        launches.clear()
        try:
            out, lse = _run(q, kp, vp, ks, vs, lens, "float16", prefix_chunk_size=64, **kwargs)
        finally:
            sk.STATES_OVERLAP = True
        _check(out, lse, ref_out, ref_lse, "float16")
        results.append((_host(out), _host(lse)))
        assert [programmatic for _, programmatic in launches] == [False, overlap], launches
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("paged", [False, True])
def test_the_suffixes_with_a_merge_launch_match_the_reference(dtype, head_dim, paged, monkeypatch):
    """Hydragen in three launches (`merge_launch`): the prefix pass, the suffixes merging no states
    (launched dependent on the pass: all their blocks but the last start without waiting for it),
    then the merge of both in place (launched dependent on the suffixes'). Ragged suffixes, lengths (or page tables) on the GPU with one
    out of range: that sequence NaN, the others right; 64 and 164 query rows a KV head (both
    prefix-pass kernels on Hopper)."""
    import dataclasses

    import gpukernels._runtime as rt
    from gpukernels.shared_prefix import SharedPrefix, plan_shared_prefix

    launches = []
    call = rt.Kernel.__call__

    def spy(self, grid, block, args, **kwargs):
        launches.append((self.name.split("<")[0].split("::")[-1], kwargs.get("programmatic", False)))
        return call(self, grid, block, args, **kwargs)

    monkeypatch.setattr(rt.Kernel, "__call__", spy)
    rng = np.random.default_rng(head_dim + paged)
    for batch in (16, 41):
        hq, hkv, prefix_len, suffix_len, page_size = 32, 8, 1500, 60, 16
        q, kp, vp, ks, vs, lens, caches, tables = _paged_inputs(rng, dtype, batch, hq, hkv, head_dim, prefix_len,
                                                                 suffix_len, page_size)
        ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, lens)
        plan = plan_shared_prefix(batch, hq, hkv, head_dim, prefix_len, suffix_len, dtype=dtype, num_sms=132,
                                  prefix_chunk_size=512, page_size=page_size if paged else 0)
        runner = SharedPrefix(dataclasses.replace(plan, merge_launch=True))
        qd = _device(q)
        bad = 0   # a whole suffix (_paged_inputs), given a length past it / its last page past the page size
        out, lse = _poisoned(qd, q.shape, dtype), _poisoned(qd, q.shape[:2], "float32")
        launches.clear()
        if paged:
            last = tables[2].copy()
            last[bad] = page_size + 1
            runner.run_paged(qd, _device(kp), _device(vp), *(_device(c) for c in caches),
                             *(_lens_on_device(t, qd) for t in (tables[0], tables[1], last)), out=out, lse=lse)
        else:
            bad_lens = lens.copy()
            bad_lens[bad] = suffix_len + 1
            runner.run(qd, _device(kp), _device(vp), _device(ks), _device(vs), _lens_on_device(bad_lens, qd),
                       out=out, lse=lse)
        o, l = _host(out), _host(lse)
        good = np.arange(batch) != bad
        assert np.all(np.isnan(o[bad])) and np.all(np.isnan(l[bad]))
        _check(o[good], l[good], ref_out[good], ref_lse[good], dtype)
        assert [name for name, _ in launches][1:] == ["split_kv_mma_kernel", "merge_prefix_chunks_kernel"], launches
        assert [p for _, p in launches][1:] == [True, True], launches


def _check_graph_replays(runner, rng, dtype, shape, lens, method):
    """`runner.run` captured in a CUDA graph on a stream of its own (after one run there, which
    makes that stream's buffers) and replayed on new queries, each replay against the reference."""
    batch, hq, hkv, d, prefix_len, suffix_len = shape
    q, kp, vp, ks, vs = (cp.asarray(x) for x in _inputs(rng, dtype, batch, hq, hkv, d, prefix_len, suffix_len))
    lens_d = None if lens is None else cp.asarray(lens.astype(np.int32))
    out = cp.full((batch, hq, d), np.nan, dtype=q.dtype)
    lse = cp.full((batch, hq), np.nan, dtype=cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        runner.run(q, kp, vp, ks, vs, lens_d, out=out, lse=lse)   # this stream's buffers
        stream.synchronize()
        stream.begin_capture()
        runner.run(q, kp, vp, ks, vs, lens_d, out=out, lse=lse)
        graph = stream.end_capture()
        for _ in range(2):
            q[...] = cp.asarray(_random(rng, (batch, hq, d), dtype))
            out.fill(np.nan)
            lse.fill(np.nan)
            graph.launch(stream)
            stream.synchronize()
            ref_out, ref_lse = refattn.shared_prefix(*(cp.asnumpy(x) for x in (q, kp, vp, ks, vs)), lens,
                                                     method=method)
            _check(out, lse, ref_out, ref_lse, dtype)


# 64 query rows a KV head, and 160 (two-warpgroup blocks on Hopper) in two launches and in three
@pytest.mark.parametrize("batch, merge_launch", [(16, False), (40, False), (40, True)])
def test_a_hydragen_plan_runs_in_a_cuda_graph(batch, merge_launch):
    """Captured and replayed, in two launches and in three (the suffixes' launch dependent on the
    prefix pass, then the merge)."""
    import dataclasses

    from gpukernels.shared_prefix import SharedPrefix, plan_shared_prefix

    rng = np.random.default_rng(24)
    shape = (batch, 32, 8, 128, 2000, 90)
    plan = plan_shared_prefix(*shape, dtype="float16", gpu="H200")
    runner = SharedPrefix(dataclasses.replace(plan, merge_launch=merge_launch))
    _check_graph_replays(runner, rng, "float16", shape, rng.integers(0, shape[-1] + 1, shape[0]), "hydragen")


# Suffixes of one length, no lengths given, more (sequence, KV head) items than the GPU holds
# blocks: the three launches' suffixes by the persistent kernel, beside the prefix pass.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, hq, hkv, batch, suffix_len", [
    (128, 32, 32, 24, 128),    # MHA: 768 items of the longest suffix it runs at head_dim 128
    (128, 32, 8, 100, 77),     # GQA 4: 800 items
    (64, 16, 16, 40, 300),     # head_dim 64: 640 items
])
def test_hydragen_three_launches_with_persistent_suffixes(dtype, head_dim, hq, hkv, batch, suffix_len):
    """Against the reference, run after run (the kernel's item counter is left at zero for the
    next), and captured in a CUDA graph and replayed."""
    import dataclasses

    from gpukernels.shared_prefix import SharedPrefix, plan_shared_prefix
    from gpukernels.split_kv import persistent_grid

    rng = np.random.default_rng(batch + suffix_len)
    prefix_len = 1500
    plan = plan_shared_prefix(batch, hq, hkv, head_dim, prefix_len, suffix_len, dtype=dtype, num_sms=132)
    plan = dataclasses.replace(plan, merge_launch=True, suffix_persistent=True)
    assert persistent_grid(plan.suffix, cp.cuda.Device().id) is not None
    runner = SharedPrefix(plan)
    for _ in range(3):
        q, kp, vp, ks, vs = _inputs(rng, dtype, batch, hq, hkv, head_dim, prefix_len, suffix_len)
        ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, None)
        qd = _device(q)
        out, lse = _poisoned(qd, q.shape, dtype), _poisoned(qd, q.shape[:2], "float32")
        runner.run(qd, _device(kp), _device(vp), _device(ks), _device(vs), out=out, lse=lse)
        _check(out, lse, ref_out, ref_lse, dtype)
    if dtype == "float16":   # CuPy's graph capture takes CuPy arrays
        _check_graph_replays(runner, rng, dtype, (batch, hq, hkv, head_dim, prefix_len, suffix_len), None,
                             "hydragen")


@pytest.mark.parametrize("dtype", BIFURCATED_DTYPES)
def test_a_bifurcated_plan_runs_many_times_and_in_a_cuda_graph(dtype):
    from gpukernels.shared_prefix import SharedPrefix, plan_shared_prefix

    rng = np.random.default_rng(19)
    batch, hq, hkv, d, prefix_len, suffix_len = 6, 32, 8, 128, 1000, 70
    plan = plan_shared_prefix(batch, hq, hkv, d, prefix_len, suffix_len, method="bifurcated", dtype=dtype,
                              num_sms=132)
    runner = SharedPrefix(plan)
    lens = np.array([70, 0, 1, 33, 70, 64])
    for _ in range(2):   # fresh inputs, the same plan and workspace
        q, kp, vp, ks, vs = _inputs(rng, dtype, batch, hq, hkv, d, prefix_len, suffix_len)
        ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, lens, method="bifurcated")
        qd = _device(q)
        out = _poisoned(qd, q.shape, dtype)
        lse = _poisoned(qd, q.shape[:2], "float32")
        res = runner.run(qd, _device(kp), _device(vp), _device(ks), _device(vs), _lens_on_device(lens, qd),
                         out=out, lse=lse)
        assert res[0] is out and res[1] is lse
        _check(out, lse, ref_out, ref_lse, dtype)
    if dtype == "bfloat16":
        return                   # CuPy's graph capture takes CuPy arrays
    _check_graph_replays(runner, rng, dtype, (batch, hq, hkv, d, prefix_len, suffix_len), lens, "bifurcated")


# ---------------------------------------------------------------------------------------------
# Suffixes in a paged cache (both methods)


@st.composite
def paged_cases(draw):
    method = draw(st.sampled_from(("hydragen", "bifurcated")))
    dtype = draw(st.sampled_from(DTYPES if method == "hydragen" else BIFURCATED_DTYPES))
    head_dim = draw(st.sampled_from((64, 128, 256)))
    hq, hkv = draw(st.sampled_from(HEADS))
    batch = draw(st.integers(1, 12))
    prefix_len = draw(st.sampled_from((0, 1, 65, 339, 1000)))
    suffix_len = draw(st.sampled_from((1, 17, 130)))
    page_size = draw(st.sampled_from((1, 7, 16)))
    tables_on_gpu = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return method, dtype, head_dim, hq, hkv, batch, prefix_len, suffix_len, page_size, tables_on_gpu, seed


def _paged_inputs(rng, dtype, batch, hq, hkv, d, prefix_len, suffix_len, page_size):
    """q, the prefix, contiguous suffixes with ragged lengths, and the same suffixes in shuffled
    pages (with junk in the slots no sequence owns)."""
    q, kp, vp, ks, vs = _inputs(rng, dtype, batch, hq, hkv, d, prefix_len, suffix_len)
    lens = rng.integers(0, suffix_len + 1, size=batch)
    lens[0] = suffix_len
    kc, vc, indptr, indices, last = refattn.paged_from_contiguous(ks, vs, lens, page_size=page_size,
                                                                  shuffle=rng, extra_pages=2)
    return q, kp, vp, ks, vs, lens, (kc, vc), (indptr, indices, last)


@given(paged_cases())
@example(("hydragen", "float16", 128, 32, 8, 5, 1000, 130, 16, True, 1))
@example(("bifurcated", "float16", 128, 32, 8, 5, 1000, 130, 16, True, 2))
@example(("bifurcated", "float32", 64, 20, 4, 3, 339, 17, 1, False, 3))
@example(("hydragen", "bfloat16", 256, 8, 1, 12, 0, 17, 7, False, 4))
def test_paged_suffixes_match_the_reference(case):
    from gpukernels.shared_prefix import shared_prefix

    method, dtype, d, hq, hkv, batch, prefix_len, suffix_len, page_size, on_gpu, seed = case
    rng = np.random.default_rng(seed)
    q, kp, vp, ks, vs, lens, caches, tables = _paged_inputs(rng, dtype, batch, hq, hkv, d, prefix_len, suffix_len,
                                                            page_size)
    ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, lens, method=method)
    qd = _device(q)
    if on_gpu:
        tables = tuple(_lens_on_device(t, qd) for t in tables)
    out = _poisoned(qd, q.shape, dtype)
    lse = _poisoned(qd, q.shape[:2], "float32")
    res = shared_prefix(qd, _device(kp), _device(vp), *(_device(c) for c in caches), method=method,
                        kv_indptr=tables[0], kv_indices=tables[1], kv_last_page_len=tables[2], out=out, lse=lse)
    assert res[0] is out and res[1] is lse
    _check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("method", ["hydragen", "bifurcated"])
def test_paged_device_tables_out_of_range_poison_their_sequence_only(method):
    from gpukernels.shared_prefix import shared_prefix

    rng = np.random.default_rng(20)
    batch, hq, hkv, d, page = 3, 8, 2, 128, 16
    q, kp, vp = _inputs(rng, "float16", batch, hq, hkv, d, 100, 0)[:3]
    kc, vc = (_random(rng, (12, page, hkv, d), "float16") for _ in range(2))
    indptr, indices, last = np.array([0, 4, 8, 12]), rng.permutation(12), np.array([16, 5, 16])
    dev = lambda x: cp.asarray(np.asarray(x, dtype=np.int32))  # noqa: E731
    args = (cp.asarray(q), cp.asarray(kp), cp.asarray(vp), cp.asarray(kc), cp.asarray(vc))
    # Sequence 2's pages run past the end of kv_indices; sequence 1 names a page outside the cache.
    bad_indptr, bad_indices = np.array([0, 4, 8, 13]), indices.copy()
    bad_indices[5] = 12
    out, lse = shared_prefix(*args, method=method, kv_indptr=dev(bad_indptr), kv_indices=dev(bad_indices),
                             kv_last_page_len=dev(last))
    o, l = _host(out).astype(np.float64), _host(lse).astype(np.float64)
    assert np.isnan(o[1:]).all() and np.isnan(l[1:]).all()
    ks = np.stack([kc[indices[4 * b:4 * b + 4]].reshape(4 * page, hkv, d) for b in range(batch)])
    vs = np.stack([vc[indices[4 * b:4 * b + 4]].reshape(4 * page, hkv, d) for b in range(batch)])
    ref_out, ref_lse = refattn.shared_prefix(q[:1], kp, vp, ks[:1], vs[:1], [64], method=method)
    _check(out[:1], lse[:1], ref_out, ref_lse, "float16")
    with pytest.raises(ValueError, match="kv_indptr"):
        shared_prefix(*args, method=method, kv_indptr=bad_indptr, kv_indices=bad_indices, kv_last_page_len=last)


@pytest.mark.parametrize("method, dtype", [("hydragen", "float16"), ("bifurcated", "bfloat16"),
                                           ("bifurcated", "float32")])
def test_a_paged_plan_runs_many_times(method, dtype):
    from gpukernels.shared_prefix import SharedPrefix, plan_shared_prefix

    rng = np.random.default_rng(21)
    batch, hq, hkv, d, prefix_len, suffix_len, page = 6, 28, 4, 64, 700, 90, 16
    plan = plan_shared_prefix(batch, hq, hkv, d, prefix_len, suffix_len, method=method, dtype=dtype,
                              page_size=page, num_sms=132)
    runner = SharedPrefix(plan)
    for _ in range(2):
        q, kp, vp, ks, vs, lens, caches, tables = _paged_inputs(rng, dtype, batch, hq, hkv, d, prefix_len,
                                                                suffix_len, page)
        ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, lens, method=method)
        qd = _device(q)
        out = _poisoned(qd, q.shape, dtype)
        lse = _poisoned(qd, q.shape[:2], "float32")
        res = runner.run_paged(qd, _device(kp), _device(vp), *(_device(c) for c in caches),
                               *(_lens_on_device(t, qd) for t in tables), out=out, lse=lse)
        assert res[0] is out and res[1] is lse
        _check(out, lse, ref_out, ref_lse, dtype)
    with pytest.raises(ValueError, match="run_paged"):
        runner.run(qd, _device(kp), _device(vp), _device(ks), _device(vs))


@pytest.mark.parametrize("method", ["hydragen", "bifurcated"])
@pytest.mark.parametrize(
    "change, exc, name",
    [
        (dict(k_cache=lambda a: a[..., :64]), ValueError, "head_dim"),
        (dict(v_cache=lambda a: a[:, :8]), ValueError, "v_cache"),
        (dict(k_prefix=lambda a: a[:, :1]), ValueError, "k_prefix"),
        (dict(v_prefix=lambda a: a[:7]), ValueError, "v_prefix"),
        (dict(k_prefix=lambda a: a.astype(cp.float32)), TypeError, "k_prefix"),
        (dict(kv_indptr=lambda a: np.array([0, 1, 2])), ValueError, "kv_indptr"),
        (dict(kv_indices=lambda a: np.array([0, 9])), ValueError, "kv_indices"),
        (dict(kv_last_page_len=lambda a: np.array([17])), ValueError, "kv_last_page_len"),
        (dict(kv_indptr=lambda a: cp.asarray([0, 2, 2], dtype=cp.int32)), ValueError, "kv_indptr"),
        (dict(kv_indices=lambda a: cp.asarray([0.0, 1.0])), TypeError, "kv_indices"),
    ],
)
def test_malformed_paged_calls_raise_before_launch(method, change, exc, name):
    from gpukernels.shared_prefix import shared_prefix

    args = dict(q=cp.zeros((1, 8, 128), cp.float16), k_prefix=cp.zeros((50, 2, 128), cp.float16),
                v_prefix=cp.zeros((50, 2, 128), cp.float16), k_cache=cp.zeros((4, 16, 2, 128), cp.float16),
                v_cache=cp.zeros((4, 16, 2, 128), cp.float16), kv_indptr=np.array([0, 2]),
                kv_indices=np.array([3, 1]), kv_last_page_len=np.array([5]))
    for key, make in change.items():
        args[key] = make(args[key])
    q, kp, vp, kc, vc, indptr, indices, last = args.values()
    with pytest.raises(exc) as info:
        shared_prefix(q, kp, vp, kc, vc, method=method, kv_indptr=indptr, kv_indices=indices,
                      kv_last_page_len=last)
    assert name in str(info.value)


# The suffixes attended inside the prefix pass (`plan_shared_prefix(..., fused=True)`): blocks of
# 128 query rows (more than 64 query rows a KV head), head_dim 64 and 128, on Hopper.
@st.composite
def fused_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    head_dim = draw(st.sampled_from((64, 128)))
    hq, hkv = draw(st.sampled_from(((32, 8), (20, 4), (8, 1), (16, 16))))
    group = hq // hkv
    batch = draw(st.integers(64 // group + 1, 64 // group + 48))
    prefix_len = draw(st.sampled_from((1, 65, 339, 1000, 4097)))
    suffix_len = draw(st.sampled_from((1, 17, 64, 130)))
    lens = draw(st.sampled_from(("none", "host", "gpu")))
    chunk = draw(st.sampled_from((None, 128, 256, 1024)))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, head_dim, hq, hkv, batch, prefix_len, suffix_len, lens, chunk, seed


def _fused_runner(batch, hq, hkv, d, prefix_len, suffix_len, dtype, chunk=None):
    from gpukernels.shared_prefix import SharedPrefix, plan_shared_prefix

    plan = plan_shared_prefix(batch, hq, hkv, d, prefix_len, suffix_len, dtype=dtype, prefix_chunk_size=chunk,
                              gpu="H200", fused=True)
    assert plan.fused
    return SharedPrefix(plan)


def _run_fused(runner, q, kp, vp, ks, vs, lens):
    qd = _device(q)
    out, lse = _poisoned(qd, q.shape, runner.plan.dtype), _poisoned(qd, q.shape[:2], "float32")
    lens_d = None if lens is None else _lens_on_device(lens, qd)
    runner.run(qd, _device(kp), _device(vp), _device(ks), _device(vs), lens_d, out=out, lse=lse)
    return out, lse


@given(fused_cases())
@example(("float16", 128, 32, 8, 128, 4097, 130, "gpu", None, 1))    # 512 rows: four blocks of rows a head
@example(("bfloat16", 64, 20, 4, 13, 1000, 17, "none", 128, 2))     # group 5: sequences across both consumers
@example(("float16", 128, 8, 1, 9, 65, 64, "host", 128, 3))         # MQA: 72 rows, one chunk
@example(("bfloat16", 128, 16, 16, 70, 339, 130, "gpu", 256, 4))    # MHA: a consumer's 64 sequences
def test_the_suffixes_inside_the_prefix_pass_match_the_reference(case):
    dtype, d, hq, hkv, batch, prefix_len, suffix_len, lens_kind, chunk, seed = case
    if not _is_hopper():
        pytest.skip("the fused pass runs on Hopper (sm_90a)")
    rng = np.random.default_rng(seed)
    q, kp, vp, ks, vs = _inputs(rng, dtype, batch, hq, hkv, d, prefix_len, suffix_len)
    lens = None if lens_kind == "none" else rng.integers(0, suffix_len + 1, size=batch)
    ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, lens)
    runner = _fused_runner(batch, hq, hkv, d, prefix_len, suffix_len, dtype, chunk)
    if lens_kind == "host":
        out, lse = _run(q, kp, vp, ks, vs, lens, dtype, prefix_chunk_size=chunk)   # the one-shot call
        _check(out, lse, ref_out, ref_lse, dtype)
    out, lse = _run_fused(runner, q, kp, vp, ks, vs, lens)
    _check(out, lse, ref_out, ref_lse, dtype)


def _is_hopper() -> bool:
    return cp.cuda.Device().compute_capability == "90"


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_fused_pass_keeps_non_finite_values_to_their_sequence(dtype):
    """A non-finite suffix value is zeroed out of the pass's product (which would carry it to
    every row of the block through their zero probabilities) and its dim made NaN for its own
    sequence's rows only; non-finite keys of a suffix, and values past a suffix's length, stay out
    of the other sequences' rows too."""
    if not _is_hopper():
        pytest.skip("the fused pass runs on Hopper (sm_90a)")
    rng = np.random.default_rng(31)
    batch, hq, hkv, d, prefix_len, suffix_len = 40, 32, 8, 128, 700, 90
    q, kp, vp, ks, vs = _inputs(rng, dtype, batch, hq, hkv, d, prefix_len, suffix_len)
    q[0, 3, 5] = np.nan           # one query head
    kp[100, 2, 0] = np.inf        # a prefix key: every sequence's heads of KV head 2
    vs[4, 7, 1, 9] = np.nan       # a suffix value of sequence 4: dim 9 of its KV head 1's heads
    vs[17, 70, 5, 100] = -np.inf  # sequence 17, past its first 64 tokens
    ks[3, 2, 0, 0] = -np.inf      # a suffix key of sequence 3
    lens = np.full(batch, suffix_len)
    lens[5] = 10
    vs[5, 10:, 0, :] = np.nan     # past suffix_lens[5]: never read
    ks[5, 12, 3, :] = np.inf
    ref_out, ref_lse = refattn.shared_prefix(q, kp, vp, ks, vs, lens)
    runner = _fused_runner(batch, hq, hkv, d, prefix_len, suffix_len, dtype, 256)
    out, lse = _run_fused(runner, q, kp, vp, ks, vs, lens)
    _compare_nonfinite(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_fused_pass_poisons_a_sequence_whose_length_is_out_of_range(dtype):
    if not _is_hopper():
        pytest.skip("the fused pass runs on Hopper (sm_90a)")
    rng = np.random.default_rng(32)
    batch, hq, hkv, d, prefix_len, suffix_len = 24, 32, 8, 64, 500, 40
    q, kp, vp, ks, vs = _inputs(rng, dtype, batch, hq, hkv, d, prefix_len, suffix_len)
    lens = rng.integers(0, suffix_len + 1, size=batch)
    lens[1], lens[2] = -1, suffix_len + 1
    runner = _fused_runner(batch, hq, hkv, d, prefix_len, suffix_len, dtype, 128)
    out, lse = _run_fused(runner, q, kp, vp, ks, vs, lens)
    o, l = _host(out).astype(np.float64), _host(lse).astype(np.float64)
    assert np.isnan(o[1:3]).all() and np.isnan(l[1:3]).all()
    good = [b for b in range(batch) if b not in (1, 2)]
    ref_out, ref_lse = refattn.shared_prefix(q[good], kp, vp, ks[good], vs[good], lens[good])
    _check(out[good], lse[good], ref_out, ref_lse, dtype)


def test_a_fused_plan_runs_in_a_cuda_graph():
    if not _is_hopper():
        pytest.skip("the fused pass runs on Hopper (sm_90a)")
    rng = np.random.default_rng(33)
    shape = (40, 32, 8, 128, 2000, 90)
    runner = _fused_runner(*shape, "float16")
    _check_graph_replays(runner, rng, "float16", shape, rng.integers(0, shape[-1] + 1, shape[0]), "hydragen")


def test_a_plan_made_without_a_gpu_named_is_for_the_gpu_this_process_runs_on():
    """On an H200, a plan without `gpu` or `num_sms` is the H200's (the H100's has as many SMs and
    took a chunk twice as long for this row, 16% slower there), not the cost model's default."""
    import gpukernels
    from costmodel.gpus import get_gpu
    from gpukernels.shared_prefix import plan_shared_prefix
    from gpukernels.split_kv import device_gpu

    here = device_gpu(cp.cuda.runtime.getDevice())
    if here is None:
        pytest.skip("a GPU the cost model does not know: plans keep its default")
    shape = (16, 32, 8, 128, 8192, 256)
    assert plan_shared_prefix(*shape) == plan_shared_prefix(*shape, gpu=here)
    assert gpukernels.plan_split_kv(1, 32, 8, 128, 32768) == gpukernels.plan_split_kv(1, 32, 8, 128, 32768, gpu=here)
    if here == get_gpu("H200"):   # the H100's plan differs, and an SM count alone still gives it
        assert plan_shared_prefix(*shape).prefix_chunk_size != plan_shared_prefix(*shape, gpu="H100").prefix_chunk_size
        assert plan_shared_prefix(*shape, num_sms=132) == plan_shared_prefix(*shape, gpu="H100")
