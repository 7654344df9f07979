"""refattn.shared_prefix: both methods equal decode on the concatenated [prefix ; suffix] cache."""

import doctest
import importlib
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from strategies import (
    INDEX_DTYPES,
    NP_DTYPE,
    assert_same_state,
    dtypes,
    float_arrays,
    head_dims,
    head_layouts,
    lengths,
    merged_out_rtol,
    oracle,
    sm_scales,
)

METHODS = ("hydragen", "bifurcated")


@dataclass
class PrefixCase:
    q: np.ndarray         # [B, Hq, D]
    k_prefix: np.ndarray  # [P, Hkv, D]
    v_prefix: np.ndarray
    k_suffix: np.ndarray  # [B, S, Hkv, D]
    v_suffix: np.ndarray
    suffix_lens: object   # None or int [B]
    sm_scale: object

    @property
    def args(self):
        return (self.q, self.k_prefix, self.v_prefix, self.k_suffix, self.v_suffix, self.suffix_lens)

    @property
    def lens(self):
        if self.suffix_lens is None:
            return np.full(self.q.shape[0], self.k_suffix.shape[1])
        return np.asarray(self.suffix_lens)

    @property
    def scale(self):
        return 1 / np.sqrt(self.q.shape[-1]) if self.sm_scale is None else self.sm_scale

    def concatenated(self):
        """The same context as one contiguous cache: k, v [B, P + S, Hkv, D] and kv_lens."""
        batch = self.q.shape[0]
        k_prefix = np.broadcast_to(self.k_prefix, (batch, *self.k_prefix.shape))  # [B, P, Hkv, D]
        v_prefix = np.broadcast_to(self.v_prefix, (batch, *self.v_prefix.shape))
        k = np.concatenate([k_prefix, self.k_suffix], axis=1)
        v = np.concatenate([v_prefix, self.v_suffix], axis=1)
        return k, v, self.k_prefix.shape[0] + self.lens

    def magnitude(self):
        """The output over |values|: the scale of the rounding errors of the output."""
        k, v, kv_lens = self.concatenated()
        q, k, v = (x.astype(np.float64) for x in (self.q, k, v))
        return refattn.decode(q, k, np.abs(v), kv_lens, sm_scale=self.sm_scale)[0]

    def contexts(self):
        return [
            (np.concatenate([self.k_prefix, self.k_suffix[b, :n]]),
             np.concatenate([self.v_prefix, self.v_suffix[b, :n]]))
            for b, n in enumerate(self.lens)
        ]


@st.composite
def prefix_cases(draw, dtype=None, max_prefix_len=32, max_suffix_len=16):
    dtype = draw(dtypes) if dtype is None else dtype
    batch = draw(st.integers(1, 4))
    num_qo_heads, num_kv_heads = draw(head_layouts())
    head_dim = draw(head_dims)
    prefix_len = draw(lengths(max_prefix_len))
    suffix_len = draw(lengths(max_suffix_len))
    q = draw(float_arrays((batch, num_qo_heads, head_dim), dtype))
    k_prefix = draw(float_arrays((prefix_len, num_kv_heads, head_dim), dtype))
    v_prefix = draw(float_arrays((prefix_len, num_kv_heads, head_dim), dtype))
    k_suffix = draw(float_arrays((batch, suffix_len, num_kv_heads, head_dim), dtype))
    v_suffix = draw(float_arrays((batch, suffix_len, num_kv_heads, head_dim), dtype))
    suffix_lens = None
    if draw(st.booleans()):
        lens = draw(st.lists(st.integers(0, suffix_len), min_size=batch, max_size=batch))
        suffix_lens = np.asarray(lens, dtype=draw(st.sampled_from(INDEX_DTYPES)))
    return PrefixCase(q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens, draw(sm_scales))


@pytest.mark.parametrize("method", METHODS)
@given(case=prefix_cases())
def test_equals_decode_on_the_concatenated_cache(method, case):
    got = refattn.shared_prefix(*case.args, method=method, sm_scale=case.sm_scale)
    k, v, kv_lens = case.concatenated()
    want = refattn.decode(case.q, k, v, kv_lens, sm_scale=case.sm_scale)
    assert_same_state(got, want, out_rtol=merged_out_rtol(want[1]), magnitude=case.magnitude())


@pytest.mark.parametrize("method", METHODS)
@given(case=prefix_cases(dtype="float64"))
def test_matches_oracle_to_1e12(method, case):
    got = refattn.shared_prefix(*case.args, method=method, sm_scale=case.sm_scale)
    want = oracle(case.q, case.contexts(), case.scale)
    assert_same_state(got, want, out_rtol=merged_out_rtol(want[1]), magnitude=case.magnitude())


@given(prefix_cases())
def test_methods_agree(case):
    hydragen = refattn.shared_prefix(*case.args, method="hydragen", sm_scale=case.sm_scale)
    bifurcated = refattn.shared_prefix(*case.args, method="bifurcated", sm_scale=case.sm_scale)
    assert_same_state(
        hydragen, bifurcated, out_rtol=merged_out_rtol(bifurcated[1]), magnitude=case.magnitude()
    )


@pytest.mark.parametrize("method", METHODS)
@given(case=prefix_cases(max_prefix_len=0))
def test_no_prefix_is_plain_decode_on_the_suffix(method, case):
    got = refattn.shared_prefix(*case.args, method=method, sm_scale=case.sm_scale)
    want = refattn.decode(case.q, case.k_suffix, case.v_suffix, case.suffix_lens, sm_scale=case.sm_scale)
    assert_same_state(got, want)


@pytest.mark.parametrize("method", METHODS)
def test_nothing_to_attend_to_gives_zero_and_minus_inf(method):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 8))
    k_prefix = np.zeros((0, 2, 8))
    k_suffix = rng.standard_normal((2, 5, 2, 8))
    out, lse = refattn.shared_prefix(q, k_prefix, k_prefix, k_suffix, k_suffix, [0, 3], method=method)
    assert np.all(out[0] == 0.0) and np.all(np.isneginf(lse[0]))
    assert np.all(np.isfinite(lse[1]))


@pytest.mark.parametrize("method", METHODS)
@given(case=prefix_cases(dtype="float64"))
def test_suffix_padding_is_never_read(method, case):
    k_suffix, v_suffix = case.k_suffix.copy(), case.v_suffix.copy()
    for b, n in enumerate(case.lens):
        k_suffix[b, n:] = 1e300
        v_suffix[b, n:] = 1e300
    want = refattn.shared_prefix(*case.args, method=method, sm_scale=case.sm_scale)
    got = refattn.shared_prefix(case.q, case.k_prefix, case.v_prefix, k_suffix, v_suffix,
                                case.suffix_lens, method=method, sm_scale=case.sm_scale)
    assert_same_state(got, want)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_scores_of_1e4(method, sign):
    # Scores sign * (1e4 + c) with c exact multiples of 1/8: the answer depends on c only.
    rng = np.random.default_rng(1)
    prefix_len, suffix_len, batch = 24, 6, 3
    offsets = rng.integers(-80, 1, size=(batch, prefix_len + suffix_len)) / 8.0
    offsets[:, :prefix_len] = offsets[0, :prefix_len]  # the prefix is shared
    k = rng.standard_normal((batch, prefix_len + suffix_len, 1, 4))
    k[..., 0, 0] = 1e4 + offsets
    k[:, :prefix_len] = k[0, :prefix_len]
    v = rng.standard_normal((batch, prefix_len + suffix_len, 1, 4))
    v[:, :prefix_len] = v[0, :prefix_len]
    q = np.zeros((batch, 2, 4))
    q[..., 0] = sign
    rel = sign * offsets  # [B, P + S]
    top = rel.max(axis=1, keepdims=True)
    weights = np.exp(rel - top) / np.exp(rel - top).sum(axis=1, keepdims=True)
    want_out = np.repeat(np.einsum("bs,bsd->bd", weights, v[:, :, 0])[:, None], 2, axis=1)
    lse = sign * 1e4 + top + np.log(np.exp(rel - top).sum(axis=1, keepdims=True))  # [B, 1]
    want_lse = np.repeat(lse, 2, axis=1)
    got = refattn.shared_prefix(q, k[0, :prefix_len], v[0, :prefix_len], k[:, prefix_len:],
                                v[:, prefix_len:], method=method, sm_scale=1.0)
    magnitude = np.repeat(np.einsum("bs,bsd->bd", weights, np.abs(v[:, :, 0]))[:, None], 2, axis=1)
    assert_same_state(got, (want_out, want_lse), out_rtol=merged_out_rtol(1e4), magnitude=magnitude)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_fixed_larger_case(dtype):
    rng = np.random.default_rng(2)
    np_dtype = NP_DTYPE[dtype]
    q = rng.standard_normal((5, 28, 32)).astype(np_dtype)
    k_prefix, v_prefix = rng.standard_normal((2, 339, 4, 32)).astype(np_dtype)
    k_suffix, v_suffix = rng.standard_normal((2, 5, 17, 4, 32)).astype(np_dtype)
    suffix_lens = np.array([17, 0, 1, 9, 16])
    case = PrefixCase(q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens, None)
    want = oracle(q, case.contexts(), case.scale)
    for method in METHODS:
        assert_same_state(refattn.shared_prefix(*case.args, method=method), want)


def test_docstring_example_runs():
    module = importlib.import_module("refattn.shared_prefix")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0


# ---------------------------------------------------------------------------------------------
# The GPU launchers' plans and checks that run before any launch (no GPU needed).


def _gsp():
    import importlib

    return importlib.import_module("gpukernels.shared_prefix")   # the module, not the function


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_bifurcated_plan(dtype, head_dim):
    from gpukernels import bifurcated

    plan = _gsp().plan_shared_prefix(9, 28, 4, head_dim, 1001, 37, method="bifurcated", dtype=dtype, num_sms=132)
    assert plan.method == "bifurcated" and plan.suffix is None and plan.page_size == 0
    assert plan.prefix_chunk_size % bifurcated.chunk_tile(dtype, head_dim) == 0
    assert plan.logits_stride >= 1001 + 37 and plan.logits_stride % 4 == 0
    shapes = bifurcated.workspace_shapes(plan)
    assert shapes == {"logits": (9 * 28, plan.logits_stride), "stats": (9 * 28, 2),
                      "part_out": (plan.num_chunks, 9 * 28, head_dim)}


def test_bifurcated_logits_blocks_serve_every_row_tile_unless_the_grid_starves():
    plan = _gsp().plan_shared_prefix
    # 64 sequences x 4 heads: 4 row tiles; 128 prefix tiles x 8 KV heads fill 132 SMs: one block reads
    # each prefix tile for all four.
    assert plan(64, 32, 8, 128, 8192, 256, method="bifurcated", num_sms=132).logits_row_tiles == 4
    # One prefix tile and one KV head: 16 row tiles spread over 16 blocks.
    assert plan(256, 4, 1, 128, 64, 8, method="bifurcated", num_sms=132).logits_row_tiles == 1


def test_hydragen_plans_blocks_of_two_warpgroups_for_hopper_past_64_rows():
    gsp = _gsp()
    assert gsp.plan_shared_prefix(20, 32, 8, 128, 1000, 70, gpu="H200").prefix_block_rows == 128   # 80 rows
    assert gsp.plan_shared_prefix(16, 32, 8, 128, 1000, 70, gpu="H200").prefix_block_rows == 64    # 64 rows
    assert gsp.plan_shared_prefix(20, 32, 8, 256, 1000, 70, gpu="H200").prefix_block_rows == 64    # head_dim 256
    assert gsp.plan_shared_prefix(20, 32, 8, 128, 1000, 70, gpu="A100").prefix_block_rows == 64
    assert gsp.plan_shared_prefix(20, 32, 8, 128, 1000, 70, method="bifurcated", gpu="H200").prefix_block_rows == 64
    # the stages, the query tiles and the alignment fit one SM's 227 KB; both head dims are built
    assert gsp.pingpong_shared_bytes(128) <= 227 * 1024 and gsp.pingpong_shared_bytes(64) <= 227 * 1024
    built = gsp.all_name_expressions()
    assert all(gsp.specialized_name_expression(dt, d) in built for dt in gsp.PREFIX_DTYPES for d in (64, 128))


def test_a_fused_plan_attends_the_suffixes_in_the_prefix_pass_only_where_asked_and_possible():
    gsp = _gsp()
    assert not gsp.plan_shared_prefix(128, 32, 8, 128, 32768, 256, gpu="H200").fused   # not the default
    plan = gsp.plan_shared_prefix(128, 32, 8, 128, 32768, 256, gpu="H200", fused=True)
    # 4 tiles of 128 rows x 8 KV heads x 4 chunks: one block an SM of the H200's 132
    assert plan.fused and plan.num_chunks == 4 and not plan.merge_launch and not plan.suffix_persistent
    assert gsp.plan_shared_prefix(128, 32, 8, 128, 32768, 256, gpu="H200", fused=True,
                                  prefix_chunk_size=2048).num_chunks == 16
    built = gsp.all_name_expressions()
    assert all(gsp.fused_name_expression(dt, d) in built for dt in gsp.PREFIX_DTYPES for d in (64, 128))
    # a consumer's 64 rows touch at most 17 sequences of group 4, 5 slots of 64 tokens each (257)
    assert gsp.fused_tiles(gsp.plan_shared_prefix(40, 32, 8, 128, 700, 257, gpu="H200", fused=True,
                                                  prefix_chunk_size=256)) == 2 + -(-17 * 5 // 3)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(page_size=16), ValueError, "contiguous suffixes"),
    (dict(method="bifurcated"), ValueError, "only Hydragen"),
    (dict(batch=16), ValueError, "blocks of 128 query rows"),   # 64 query rows a KV head
    (dict(head_dim=256), ValueError, "blocks of 128 query rows"),
    (dict(gpu="A100"), ValueError, "blocks of 128 query rows"),
    (dict(suffix_len=0), ValueError, "prefix and suffix tokens"),
    (dict(prefix_len=0), ValueError, "prefix and suffix tokens"),
    (dict(fused=1), TypeError, "True or False"),
])
def test_a_fused_plan_is_refused_where_the_fused_pass_cannot_run(kwargs, exc, words):
    args = dict(batch=40, num_qo_heads=32, num_kv_heads=8, head_dim=128, prefix_len=1000, suffix_len=70, gpu="H200",
                fused=True) | kwargs
    with pytest.raises(exc, match=words):
        _gsp().plan_shared_prefix(**args)


def test_hydragen_plans_paged_suffixes_with_a_paged_split_plan():
    gsp = _gsp()
    plan = gsp.plan_shared_prefix(6, 32, 8, 128, 1000, 70, page_size=16, num_sms=132)
    assert plan.method == "hydragen" and plan.page_size == 16 and plan.suffix.page_size == 16
    assert gsp.plan_shared_prefix(6, 32, 8, 128, 1000, 70, num_sms=132).suffix.page_size == 0
    bif = gsp.plan_shared_prefix(6, 32, 8, 128, 1000, 70, method="bifurcated", page_size=1, num_sms=132)
    assert bif.page_size == 1 and bif.logits_stride >= 1070


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(dtype="float32"), TypeError, "Hydragen"),
    (dict(method="auto"), ValueError, "method"),
    (dict(method="cascade"), ValueError, "method"),
    (dict(method="bifurcated", dtype="float64"), TypeError, "float64"),
    (dict(method="bifurcated", page_size=-1), ValueError, "page_size"),
    (dict(method="bifurcated", prefix_chunk_size=48), ValueError, "prefix_chunk_size"),
])
def test_plans_reject_what_the_kernels_cannot_run(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        _gsp().plan_shared_prefix(4, 8, 2, 128, 100, 10, num_sms=132, **kwargs)


def test_float32_bifurcated_chunks_are_whole_cuda_core_tiles():
    plan = _gsp().plan_shared_prefix(4, 8, 2, 128, 100, 10, method="bifurcated", dtype="float32",
                                     prefix_chunk_size=32, num_sms=132)
    assert plan.prefix_chunk_size == 32 and plan.num_chunks == 4


@pytest.mark.parametrize("tables, lens, words", [
    (dict(kv_indptr=[0, 1]), None, "kv_indices, kv_last_page_len are missing"),
    (dict(kv_indptr=[0, 1], kv_indices=[0]), None, "kv_last_page_len is missing"),
    (dict(kv_indptr=[0, 1], kv_indices=[0], kv_last_page_len=[1]), [1], "suffix_lens must be None"),
])
def test_malformed_paged_calls_raise_before_any_launch(tables, lens, words):
    # NumPy inputs: the checks of the page tables' presence come before anything reads the arrays.
    q = np.zeros((1, 8, 128), np.float16)
    kp = np.zeros((10, 2, 128), np.float16)
    cache = np.zeros((4, 16, 2, 128), np.float16)
    with pytest.raises(ValueError, match=words):
        _gsp().shared_prefix(q, kp, kp, cache, cache, lens, **tables)


def test_an_unknown_method_is_rejected_before_the_arrays_are_read():
    q = np.zeros((1, 8, 128), np.float16)
    with pytest.raises(ValueError, match="'hydragen', 'bifurcated', 'auto'"):
        _gsp().shared_prefix(q, q, q, q, q, method="fast")


def test_name_expressions_and_their_sources():
    from gpukernels import bifurcated

    gsp = _gsp()
    sources = dict((e, s) for s, e in gsp.instantiations())
    assert set(sources) == set(gsp.all_name_expressions())
    bif = bifurcated.all_name_expressions()
    assert len(bif) == len(set(bif)) == 33 and all(sources[e] == "bifurcated" for e in bif)
    assert "decode_attention::bifurcated_prefix_values_kernel<__half, 256, 4>" in bif
    assert "decode_attention::bifurcated_prefix_values_simt_kernel<float, 64>" in bif
    assert not any("simt" in e for e in bif if "<float," not in e)   # half types: the tensor cores


@pytest.mark.parametrize("kernel, attr", [
    ("bifurcated_prefix_logits_kernel", "PREFIX_LOGITS_SIGNATURE"),
    ("bifurcated_prefix_logits_simt_kernel", "PREFIX_LOGITS_SIGNATURE"),
    ("bifurcated_suffix_logits_kernel", "SUFFIX_LOGITS_SIGNATURE"),
    ("bifurcated_softmax_kernel", "SOFTMAX_SIGNATURE"),
    ("bifurcated_prefix_values_kernel", "VALUES_SIGNATURE"),
    ("bifurcated_prefix_values_simt_kernel", "VALUES_SIGNATURE"),
    ("bifurcated_finish_kernel", "FINISH_SIGNATURE"),
])
def test_bifurcated_signatures_match_the_kernels(kernel, attr):
    from test_launch import _source_signature

    from gpukernels import bifurcated

    assert _source_signature("bifurcated", kernel) == getattr(bifurcated, attr)


def test_cost_model_counts_the_logits_workspace():
    from costmodel import shared_prefix as cm

    shape = cm.SharedPrefixShape(16, 32, 8, 128, 8192, 256, suffix_lens=tuple(range(200, 216)))
    launches = cm.bifurcated_launches(shape, 132)
    assert [launch.name for launch in launches] == ["prefix_logits", "suffix_logits", "softmax", "prefix_values",
                                                    "finish"]
    by = {launch.name: launch.bytes_by_tensor for launch in launches}
    tokens = sum(range(200, 216))
    logits_p, logits_s = 16 * 32 * 8192 * 4, 32 * tokens * 4          # float32, written once
    assert by["prefix_logits"]["logits_prefix_write"] == logits_p
    assert by["suffix_logits"]["logits_suffix_write"] == logits_s
    assert by["softmax"]["logits_read"] == logits_p + logits_s          # read by the softmax ...
    assert by["prefix_values"]["logits_prefix_read"] == logits_p        # ... and once more for P V
    assert by["finish"]["logits_suffix_read"] == logits_s
    # 64 query rows per KV head: one row tile, so the prefix K and V are read once.
    assert by["prefix_logits"]["k_prefix"] == by["prefix_values"]["v_prefix"] == 8192 * 8 * 128 * 2
    no_prefix = cm.bifurcated_launches(cm.SharedPrefixShape(4, 8, 2, 64, 0, 10), 132)
    assert [launch.name for launch in no_prefix] == ["suffix_logits", "softmax", "finish"]
