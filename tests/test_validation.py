"""Bad input fails before any work, with TypeError (type, dtype) or ValueError (shape, length,
index), and a message naming the argument and, for shapes, what came."""

import math

import ml_dtypes
import numpy as np
import pytest

import refattn
from decode_attention import contract

B, HQ, HKV, D, S = 2, 4, 2, 8, 10
rng = np.random.default_rng(0)
Q = rng.standard_normal((B, HQ, D)).astype(np.float32)
K = rng.standard_normal((B, S, HKV, D)).astype(np.float32)
V = rng.standard_normal((B, S, HKV, D)).astype(np.float32)
# Paged: 4 pages of 4 tokens; sequence 0 owns pages 2, 0 (6 tokens), sequence 1 page 3 (1 token).
K_CACHE = rng.standard_normal((4, 4, HKV, D)).astype(np.float32)
V_CACHE = rng.standard_normal((4, 4, HKV, D)).astype(np.float32)
INDPTR, INDICES, LAST = np.array([0, 2, 3]), np.array([2, 0, 3]), np.array([2, 1])
# Shared prefix: 5 prefix tokens, suffixes of up to 3.
KP = rng.standard_normal((5, HKV, D)).astype(np.float32)
KS = rng.standard_normal((B, 3, HKV, D)).astype(np.float32)
# Tree: segments of 3, 2, 4 tokens; paths [0, 1] and [0, 2].
KSEG = rng.standard_normal((9, HKV, D)).astype(np.float32)
SEG_INDPTR, PATH_INDPTR, PATH_SEGS = np.array([0, 3, 5, 9]), np.array([0, 2, 4]), np.array([0, 1, 0, 2])
# Spans: sequence 0 reads [0, 2) and [5, 9), sequence 1 reads [3, 10).
SPAN_INDPTR, SPANS = np.array([0, 2, 3]), np.array([[0, 2], [5, 9], [3, 10]])
OUTS = rng.standard_normal((3, B, HQ, D))
LSES = rng.standard_normal((3, B, HQ))


def decode(**kw):
    args = dict(q=Q, k=K, v=V, kv_lens=None)
    args.update(kw)
    sm_scale = args.pop("sm_scale", None)
    return refattn.decode(*args.values(), sm_scale=sm_scale)


def split(**kw):
    return refattn.split_kv(Q, K, V, **kw)


def paged(**kw):
    args = dict(q=Q, k_cache=K_CACHE, v_cache=V_CACHE, kv_indptr=INDPTR, kv_indices=INDICES,
                kv_last_page_len=LAST)
    args.update(kw)
    return refattn.paged_decode(*args.values())


def prefix(method="hydragen", **kw):
    args = dict(q=Q, k_prefix=KP, v_prefix=KP, k_suffix=KS, v_suffix=KS, suffix_lens=None)
    args.update(kw)
    return refattn.shared_prefix(*args.values(), method=method)


def tree(**kw):
    args = dict(q=Q, k_segs=KSEG, v_segs=KSEG, seg_indptr=SEG_INDPTR, path_indptr=PATH_INDPTR,
                path_segs=PATH_SEGS)
    args.update(kw)
    return refattn.tree(*args.values())


def span(**kw):
    args = dict(q=Q, k=K, v=V, span_indptr=SPAN_INDPTR, spans=SPANS)
    args.update(kw)
    return refattn.span(*args.values())


def merge(outs=OUTS, lses=LSES):
    return refattn.merge_states(outs, lses)


class DeviceArray:
    """Stands in for a device array: NumPy may not convert it implicitly."""

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed")


# (id, call, exception, substrings the message must contain)
CASES = [
    # decode: q, k, v
    ("q wrong ndim", lambda: decode(q=Q[0]), ValueError, ["q must be", "got (4, 8)"]),
    ("q a list", lambda: decode(q=Q.tolist()), TypeError, ["q must be an array", "list"]),
    ("q int dtype", lambda: decode(q=Q.astype(np.int32)), TypeError, ["q", "int32"]),
    ("q float16 with float32 k", lambda: decode(q=Q.astype(np.float16)), TypeError, ["k", "float16", "float32"]),
    ("batch 0", lambda: decode(q=Q[:0], k=K[:0], v=V[:0]), ValueError, ["q", "batch >= 1", "got (0, 4, 8)"]),
    ("head_dim 0", lambda: decode(q=Q[..., :0], k=K[..., :0], v=V[..., :0]), ValueError, ["q", "head_dim >= 1"]),
    ("k wrong head_dim", lambda: decode(k=K[..., :4]), ValueError,
     ["k must be [batch, kv_len, num_kv_heads, head_dim] = [2, *, *, 8]", "got (2, 10, 2, 4)"]),
    ("k wrong ndim", lambda: decode(k=K[0]), ValueError, ["k must be", "got (10, 2, 8)"]),
    ("k mismatched batch", lambda: decode(k=K[:1], v=V[:1]), ValueError, ["k must be", "got (1, 10, 2, 8)"]),
    ("k no kv heads", lambda: decode(k=K[:, :, :0], v=V[:, :, :0]), ValueError, ["k", "num_kv_heads >= 1"]),
    ("v shape differs from k", lambda: decode(v=V[:, :9]), ValueError, ["v must be", "[2, 10, 2, 8]", "got (2, 9, 2, 8)"]),
    ("v dtype differs", lambda: decode(v=V.astype(np.float16)), TypeError, ["v", "float16"]),
    ("v bfloat16", lambda: decode(v=V.astype(ml_dtypes.bfloat16)), TypeError, ["v", "bfloat16"]),
    ("heads not dividing", lambda: decode(k=K[:, :, :1].repeat(3, 2), v=V[:, :, :1].repeat(3, 2)),
     ValueError, ["num_qo_heads", "num_kv_heads", "4", "3"]),
    # kv_lens
    ("kv_lens > kv_len", lambda: decode(kv_lens=np.array([3, 11])), ValueError, ["kv_lens", "11"]),
    ("kv_lens negative", lambda: decode(kv_lens=np.array([-1, 3])), ValueError, ["kv_lens", "-1"]),
    ("kv_lens float", lambda: decode(kv_lens=np.array([1.0, 2.0])), TypeError, ["kv_lens", "float64"]),
    ("kv_lens bool", lambda: decode(kv_lens=np.array([True, False])), TypeError, ["kv_lens", "bool"]),
    ("kv_lens wrong length", lambda: decode(kv_lens=np.array([1, 2, 3])), ValueError, ["kv_lens", "[2]", "got (3,)"]),
    ("kv_lens 2-D", lambda: decode(kv_lens=np.array([[1, 2]])), ValueError, ["kv_lens", "got (1, 2)"]),
    ("kv_lens on the device", lambda: decode(kv_lens=DeviceArray()), TypeError, ["kv_lens", "host"]),
    # sm_scale
    ("sm_scale nan", lambda: decode(sm_scale=math.nan), ValueError, ["sm_scale", "nan"]),
    ("sm_scale inf", lambda: decode(sm_scale=math.inf), ValueError, ["sm_scale", "inf"]),
    ("sm_scale -inf", lambda: decode(sm_scale=-math.inf), ValueError, ["sm_scale"]),
    ("sm_scale negative", lambda: decode(sm_scale=-0.5), ValueError, ["sm_scale", "> 0"]),
    ("sm_scale zero", lambda: decode(sm_scale=0.0), ValueError, ["sm_scale", "> 0"]),
    ("sm_scale string", lambda: decode(sm_scale="0.1"), TypeError, ["sm_scale", "str"]),
    ("sm_scale complex", lambda: decode(sm_scale=1j), TypeError, ["sm_scale", "complex"]),
    ("sm_scale bool", lambda: decode(sm_scale=True), TypeError, ["sm_scale", "bool"]),
    # split_kv
    ("num_splits 0", lambda: split(num_splits=0), ValueError, ["num_splits", ">= 1", "0"]),
    ("num_splits float", lambda: split(num_splits=2.0), TypeError, ["num_splits", "float"]),
    ("chunk_size 0", lambda: split(chunk_size=0), ValueError, ["chunk_size"]),
    ("num_splits and chunk_size", lambda: split(num_splits=2, chunk_size=4), ValueError, ["num_splits", "chunk_size"]),
    ("split_kv checks q first", lambda: split(num_splits=2, sm_scale="x"), TypeError, ["sm_scale"]),
    # merge_states
    ("merge lses shape mismatch", lambda: merge(lses=LSES[:, :, :3]), ValueError,
     ["lses must be [num_states, batch, num_heads] = [3, 2, 4]", "got (3, 2, 3)"]),
    ("merge lses fewer states", lambda: merge(lses=LSES[:2]), ValueError, ["lses", "got (2, 2, 4)"]),
    ("merge outs wrong ndim", lambda: merge(outs=OUTS[0]), ValueError, ["outs must be", "got (2, 4, 8)"]),
    ("merge lses float16", lambda: merge(lses=LSES.astype(np.float16)), TypeError, ["lses", "float16"]),
    ("merge outs int", lambda: merge(outs=OUTS.astype(np.int64)), TypeError, ["outs", "int64"]),
    # paged_decode
    ("page index out of range", lambda: paged(kv_indices=np.array([2, 4, 3])), ValueError,
     ["kv_indices", "[0, 4)", "kv_indices[1] = 4"]),
    ("page index negative", lambda: paged(kv_indices=np.array([2, -1, 3])), ValueError, ["kv_indices", "-1"]),
    ("indptr not starting at 0", lambda: paged(kv_indptr=np.array([1, 2, 3])), ValueError, ["kv_indptr[0]", "1"]),
    ("indptr decreasing", lambda: paged(kv_indptr=np.array([0, 3, 2]), kv_indices=np.array([2, 0])),
     ValueError, ["kv_indptr", "non-decreasing"]),
    ("indptr last != nnz", lambda: paged(kv_indptr=np.array([0, 2, 2])), ValueError,
     ["kv_indptr[-1]", "len(kv_indices) = 3", "got 2"]),
    ("indptr wrong length", lambda: paged(kv_indptr=np.array([0, 3])), ValueError, ["kv_indptr", "got (2,)"]),
    ("last_page_len 0", lambda: paged(kv_last_page_len=np.array([0, 1])), ValueError,
     ["kv_last_page_len[0]", "[1, 4]", "got 0"]),
    ("last_page_len > page_size", lambda: paged(kv_last_page_len=np.array([2, 5])), ValueError,
     ["kv_last_page_len[1]", "got 5"]),
    ("last_page_len of a pageless sequence", lambda: paged(
        kv_indptr=np.array([0, 3, 3]), kv_last_page_len=np.array([2, 1])), ValueError,
     ["kv_last_page_len[1]", "0 pages"]),
    ("k_cache page_size 0", lambda: paged(k_cache=K_CACHE[:, :0], v_cache=V_CACHE[:, :0]), ValueError,
     ["k_cache", "page_size >= 1"]),
    ("v_cache shape differs", lambda: paged(v_cache=V_CACHE[:3]), ValueError, ["v_cache", "got (3, 4, 2, 8)"]),
    ("k_cache dtype differs", lambda: paged(k_cache=K_CACHE.astype(np.float64)), TypeError, ["k_cache", "float64"]),
    ("kv_indices float", lambda: paged(kv_indices=INDICES.astype(np.float32)), TypeError, ["kv_indices", "float32"]),
    # shared_prefix
    ("suffix_lens > suffix_len", lambda: prefix(suffix_lens=np.array([4, 0])), ValueError,
     ["suffix_lens", "suffix_len = 3", "got suffix_lens[0] = 4"]),
    ("unknown method", lambda: prefix(method="flash"), ValueError, ["method", "flash", "hydragen"]),
    ("method not a string", lambda: prefix(method=None), TypeError, ["method"]),
    ("k_suffix heads differ from k_prefix", lambda: prefix(k_suffix=KS[:, :, :1], v_suffix=KS[:, :, :1]),
     ValueError, ["k_suffix", "got (2, 3, 1, 8)"]),
    ("k_prefix wrong ndim", lambda: prefix(k_prefix=KS, v_prefix=KS), ValueError, ["k_prefix", "got (2, 3, 2, 8)"]),
    # tree
    ("path_segs out of range", lambda: tree(path_segs=np.array([0, 1, 0, 3])), ValueError,
     ["path_segs", "[0, 3)", "path_segs[3] = 3"]),
    ("seg_indptr wrong end", lambda: tree(seg_indptr=np.array([0, 3, 5, 8])), ValueError,
     ["seg_indptr[-1]", "9", "got 8"]),
    ("seg_indptr decreasing", lambda: tree(seg_indptr=np.array([0, 5, 3, 9])), ValueError, ["seg_indptr", "non-decreasing"]),
    ("path_indptr wrong end", lambda: tree(path_indptr=np.array([0, 2, 3])), ValueError, ["path_indptr[-1]", "got 3"]),
    ("segment twice in a path", lambda: tree(path_segs=np.array([0, 1, 2, 2])), ValueError, ["path_segs", "at most once"]),
    ("k_segs heads not dividing", lambda: tree(k_segs=KSEG[:, :1].repeat(3, 1), v_segs=KSEG[:, :1].repeat(3, 1)),
     ValueError, ["num_kv_heads", "k_segs.shape[1] = 3"]),
    # span
    ("unsorted spans", lambda: span(spans=np.array([[5, 9], [0, 2], [3, 10]])), ValueError,
     ["spans", "sorted", "[5, 9]", "[0, 2]"]),
    ("overlapping spans", lambda: span(spans=np.array([[0, 6], [5, 9], [3, 10]])), ValueError,
     ["spans", "non-overlapping"]),
    ("span out of range", lambda: span(spans=np.array([[0, 2], [5, 11], [3, 10]])), ValueError,
     ["spans[1] = [5, 11]", "[0, 10)"]),
    ("span negative start", lambda: span(spans=np.array([[-1, 2], [5, 9], [3, 10]])), ValueError, ["spans[0]"]),
    ("empty span", lambda: span(spans=np.array([[0, 2], [5, 5], [3, 10]])), ValueError, ["spans[1]", "empty"]),
    ("spans wrong shape", lambda: span(spans=np.array([[0, 2, 5], [5, 9, 9]]), span_indptr=np.array([0, 1, 2])),
     ValueError, ["spans must be [num_spans, 2]", "got (2, 3)"]),
    ("span_indptr wrong end", lambda: span(span_indptr=np.array([0, 2, 2])), ValueError, ["span_indptr[-1]", "got 2"]),
    ("spans float", lambda: span(spans=SPANS.astype(np.float64)), TypeError, ["spans", "float64"]),
    # builders
    ("page_size 0", lambda: refattn.paged_from_contiguous(K, V, page_size=0), ValueError, ["page_size"]),
    ("shuffle True", lambda: refattn.paged_from_contiguous(K, V, page_size=4, shuffle=True), TypeError, ["shuffle"]),
    ("extra_pages negative", lambda: refattn.paged_from_contiguous(K, V, page_size=4, extra_pages=-1),
     ValueError, ["extra_pages"]),
    ("builder kv_lens too long", lambda: refattn.paged_from_contiguous(K, V, [1, 2, 3], page_size=4),
     ValueError, ["kv_lens", "got (3,)"]),
    ("mask not bool", lambda: refattn.spans_from_mask(np.ones((2, 3))), TypeError, ["mask", "float64"]),
    ("mask 1-D", lambda: refattn.spans_from_mask(np.ones(3, dtype=bool)), ValueError, ["mask", "(3,)"]),
    ("tree path out of range", lambda: refattn.tree_from_paths([KSEG], [KSEG], [[0, 1]]), ValueError, ["path_segs"]),
    ("tree segments differ", lambda: refattn.tree_from_paths([KSEG, KSEG[:, :1]], [KSEG, KSEG], [[0]]),
     ValueError, ["segments_k[1]", "got (9, 1, 8)"]),
    ("window negative", lambda: refattn.spans_from_sinks_window([4], num_sinks=1, window=-1), ValueError, ["window"]),
]


@pytest.mark.parametrize("call, error, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_call_raises_naming_the_argument(call, error, needles):
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_the_valid_base_calls_pass():
    # The malformed calls above each break exactly one thing of these.
    decode()
    split(num_splits=3)
    paged()
    prefix()
    prefix(method="bifurcated")
    tree()
    span()
    merge()


# ---------------------------------------------------------------------------------------------
# contract pieces


class FakeDtype:
    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text


class FakeTensor:
    """Only shape, dtype and ndim, as a CuPy array or a PyTorch tensor offers; no host data."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype, self.ndim = tuple(shape), dtype, len(shape)

    def __array__(self, *args, **kwargs):
        raise AssertionError("the contract must not read a tensor's data")


@pytest.mark.parametrize(
    "x, want",
    [
        (np.zeros(2, np.float16), "float16"),
        (np.zeros(2, ml_dtypes.bfloat16), "bfloat16"),
        (np.dtype(ml_dtypes.bfloat16), "bfloat16"),
        (ml_dtypes.bfloat16, "bfloat16"),
        (np.float32, "float32"),
        (np.dtype("f8"), "float64"),
        ("float32", "float32"),
        (FakeDtype("torch.bfloat16"), "bfloat16"),
        (FakeDtype("torch.float16"), "float16"),
        (FakeTensor((2,), FakeDtype("torch.float32")), "float32"),
        (FakeTensor((2,), np.dtype(np.float16)), "float16"),
        (np.zeros(2, np.int32), "int32"),
    ],
)
def test_dtype_name(x, want):
    assert contract.dtype_name(x) == want


def test_checks_read_only_shape_dtype_and_ndim():
    bf16 = FakeDtype("torch.bfloat16")
    q = FakeTensor((3, 8, 64), bf16)
    k = FakeTensor((3, 100, 2, 64), bf16)
    problem, kv_lens = contract.check_decode(q, k, k, [100, 0, 7], dtypes=("float16", "bfloat16"))
    assert problem == contract.DecodeProblem(3, 100, 8, 2, 64, "bfloat16", 1 / 8)
    assert problem.group_size == 4
    assert kv_lens.dtype == np.int64 and kv_lens.tolist() == [100, 0, 7]
    with pytest.raises(TypeError, match="q must have dtype float16 or bfloat16, got float32"):
        contract.check_decode(
            FakeTensor((3, 8, 64), FakeDtype("torch.float32")), k, k, dtypes=("float16", "bfloat16")
        )


def test_restricted_dtypes_reject_float64():
    with pytest.raises(TypeError, match="q must have dtype float16, bfloat16 or float32, got float64"):
        contract.check_decode(Q.astype(np.float64), K, V, dtypes=("float16", "bfloat16", "float32"))


def test_check_sm_scale():
    assert contract.check_sm_scale(None, 64) == 0.125
    assert contract.check_sm_scale(np.float32(0.5), 64) == 0.5
    assert contract.check_sm_scale(2, 64) == 2.0
    assert contract.default_sm_scale(16) == 0.25


def test_problems_report_what_a_launcher_needs():
    problem, kv_lens = contract.check_paged(Q, K_CACHE, V_CACHE, INDPTR, INDICES, LAST)
    assert kv_lens.tolist() == [6, 1] and problem.max_kv_len == 6
    assert (problem.num_pages, problem.page_size) == (4, 4)
    tree_problem = contract.check_tree(Q, KSEG, KSEG, SEG_INDPTR, PATH_INDPTR, PATH_SEGS)
    assert (tree_problem.num_segs, tree_problem.max_kv_len, tree_problem.total_tokens) == (3, 7, 9)
    span_problem = contract.check_span(Q, K, V, SPAN_INDPTR, SPANS)
    assert (span_problem.num_spans, span_problem.max_span_tokens) == (3, 7)
    prefix_problem, suffix_lens = contract.check_shared_prefix(Q, KP, KP, KS, KS)
    assert (prefix_problem.prefix_len, prefix_problem.suffix_len) == (5, 3)
    assert suffix_lens.tolist() == [3, 3]
    assert contract.check_merge_states(OUTS, LSES) == (3, B, HQ, D)


def test_empty_index_lists_count_as_integer():
    # A Python [] becomes float64 in NumPy; as an index list it is simply empty.
    out, lse = refattn.paged_decode(Q, K_CACHE, V_CACHE, [0, 0, 0], [], [0, 0])
    assert np.all(out == 0) and np.all(np.isneginf(lse))


def test_touching_spans_are_allowed():
    span(spans=np.array([[0, 2], [2, 9], [3, 10]]))


# ---------------------------------------------------------------------------------------------
# cost model entry points: sizes are integers of any kind (NumPy's too, as refattn takes them);
# a wrong type is a TypeError, a wrong value a ValueError, each naming the argument and what came


from costmodel import decode as CM_DECODE  # noqa: E402  (the cost model's section)
from costmodel import merge_states as CM_MERGE  # noqa: E402
from costmodel import paged_decode as CM_PAGED  # noqa: E402
from costmodel import shared_prefix as CM_PREFIX  # noqa: E402
from costmodel import span as CM_SPAN  # noqa: E402
from costmodel import split_kv as CM_SPLIT  # noqa: E402
from costmodel import tree as CM_TREE  # noqa: E402
from costmodel.explain import Workload as WORKLOAD  # noqa: E402
from costmodel.explain import explain as cm_explain  # noqa: E402


def cm_plan(*args, **kw):
    base = [2, 8, 2, 64, 1000]
    base[:len(args)] = args
    return CM_SPLIT.plan_split_kv(*base, **kw)


@pytest.mark.parametrize("int_type", [np.int64, np.int32, np.uint16, np.uint64])
def test_cost_model_takes_numpy_integers(int_type):
    i = int_type
    plan = CM_SPLIT.plan_split_kv(i(2), i(8), i(2), i(64), i(1000), num_sms=i(108), page_size=i(16))
    assert plan == CM_SPLIT.plan_split_kv(2, 8, 2, 64, 1000, num_sms=108, page_size=16)
    assert all(type(getattr(plan, f)) is int for f in ("batch", "num_qo_heads", "head_dim", "max_kv_len",
                                                       "num_sms", "page_size", "num_splits"))
    assert CM_SPLIT.plan_split_kv(2, 8, 2, 64, 1000, num_splits=i(4)).num_splits == 4
    assert CM_DECODE.plan_decode(i(2), i(8), i(2), i(64), i(1000)).num_splits == 1
    assert CM_PAGED.plan_paged_decode(2, 8, 2, 64, 1000, page_size=i(16)).page_size == 16
    w = WORKLOAD(batch=i(4), num_qo_heads=i(8), num_kv_heads=i(2), head_dim=i(64),
                            prefix_len=i(500), suffix_len=i(20), num_spans=i(4), page_size=i(16),
                            density=np.float32(0.5))
    assert w == WORKLOAD(batch=4, num_qo_heads=8, num_kv_heads=2, head_dim=64, prefix_len=500,
                                    suffix_len=20, num_spans=4, page_size=16, density=0.5)
    assert type(w.batch) is int and type(w.density) is float
    assert cm_explain(w, "H100").winner
    shape = CM_PREFIX.SharedPrefixShape(i(4), i(8), i(2), i(64), i(500), i(20), suffix_lens=np.array([20, 3, 0, 7], i))
    assert shape.suffix_lens == (20, 3, 0, 7) and type(shape.prefix_len) is int
    assert CM_PREFIX.plan_hydragen(shape, prefix_chunk_size=i(256)).prefix_chunk_size == 256
    assert CM_TREE.TreeShape(i(4), 8, 2, 64, np.array([[1, 100], [4, 20]], i)).levels == ((1, 100), (4, 20))
    assert CM_SPAN.SpanShape(i(2), 8, 2, 64, i(100), np.array([3, 4], i)).span_lens == (3, 4)
    assert CM_SPAN.SpanShape.from_density(2, 8, 2, 64, i(100), density=0.5, num_spans=i(2)).span_lens == (25, 25)
    assert CM_MERGE.MergeStatesShape(i(3), i(2), i(8), i(64)).num_states == 3
    p = CM_SPLIT.predict(plan, kv_lens=np.array([5, 1000], i), gpu="H100")
    assert p.bytes_by_tensor["k"] == 1005 * 2 * 64 * 2


COST_MODEL_CASES = [
    # plan_split_kv
    ("batch float", lambda: cm_plan(2.0), TypeError, ["batch", "int", "float", "2.0"]),
    ("batch bool", lambda: cm_plan(True), TypeError, ["batch", "bool"]),
    ("batch str", lambda: cm_plan("2"), TypeError, ["batch", "str"]),
    ("batch numpy float", lambda: cm_plan(np.float64(2)), TypeError, ["batch", "float64"]),
    ("batch 0", lambda: cm_plan(0), ValueError, ["batch", ">= 1", "0"]),
    ("head_dim negative", lambda: cm_plan(2, 8, 2, -64), ValueError, ["head_dim", "-64"]),
    ("max_kv_len float", lambda: cm_plan(2, 8, 2, 64, 1000.0), TypeError, ["max_kv_len", "float"]),
    ("max_kv_len negative", lambda: cm_plan(2, 8, 2, 64, -1), ValueError, ["max_kv_len", ">= 0", "-1"]),
    ("heads not grouping", lambda: cm_plan(2, 8, 3), ValueError, ["num_qo_heads", "num_kv_heads", "8", "3"]),
    ("num_splits float", lambda: cm_plan(num_splits=2.0), TypeError, ["num_splits", "float"]),
    ("num_splits 0", lambda: cm_plan(num_splits=0), ValueError, ["num_splits", ">= 1"]),
    ("num_sms str", lambda: cm_plan(num_sms="132"), TypeError, ["num_sms", "str"]),
    ("num_sms 0", lambda: cm_plan(num_sms=0), ValueError, ["num_sms", ">= 1"]),
    ("page_size bool", lambda: cm_plan(page_size=False), TypeError, ["page_size", "bool"]),
    ("page_size negative", lambda: cm_plan(page_size=-16), ValueError, ["page_size", "-16"]),
    ("dtype not a name", lambda: cm_plan(dtype=np.float16), TypeError, ["dtype", "float16"]),
    ("dtype unknown", lambda: cm_plan(dtype="float64"), ValueError, ["dtype", "float64", "bfloat16"]),
    ("gpu not a name", lambda: cm_plan(gpu=132), TypeError, ["gpu", "int"]),
    ("gpu unknown", lambda: cm_plan(gpu="H100 MIG 1g.10gb"), ValueError, ["unknown GPU", "H100 MIG"]),
    ("gpu empty", lambda: cm_plan(gpu=""), ValueError, ["gpu", "empty"]),
    ("choose_num_splits float", lambda: CM_SPLIT.choose_num_splits(2, 8, 2, 64, 1000.5), TypeError, ["max_kv_len"]),
    # decode, paged_decode
    ("plan_decode float", lambda: CM_DECODE.plan_decode(2, 8, 2, 64.0, 1000), TypeError, ["head_dim", "float"]),
    ("page_size 0", lambda: CM_PAGED.plan_paged_decode(2, 8, 2, 64, 1000, page_size=0), ValueError,
     ["page_size", ">= 1"]),
    ("page_size float", lambda: CM_PAGED.plan_paged_decode(2, 8, 2, 64, 1000, page_size=16.0), TypeError,
     ["page_size", "float"]),
    # predict
    ("predict kv_lens float", lambda: CM_SPLIT.predict(cm_plan(), kv_lens=np.array([1.0, 2.0]), gpu="H100"),
     TypeError, ["kv_lens", "float64"]),
    ("predict kv_lens wrong length", lambda: CM_SPLIT.predict(cm_plan(), kv_lens=[1, 2, 3], gpu="H100"),
     ValueError, ["kv_lens", "[2]", "(3,)"]),
    ("predict kv_lens too long", lambda: CM_SPLIT.predict(cm_plan(num_splits=1), kv_lens=[1, 5000], gpu="H100"),
     ValueError, ["kv_lens", "5000"]),
    ("predict plan not a plan", lambda: CM_SPLIT.predict("plan", gpu="H100"), TypeError, ["plan", "SplitKVPlan", "str"]),
    ("predict calibration a dict", lambda: CM_SPLIT.predict(cm_plan(), gpu="H100", calibration={}), TypeError,
     ["calibration", "dict"]),
    ("predict gpu None", lambda: CM_SPLIT.predict(cm_plan(), gpu=None), TypeError, ["gpu", "NoneType"]),
    # shapes
    ("prefix_len float", lambda: CM_PREFIX.SharedPrefixShape(4, 8, 2, 64, 500.0, 20), TypeError, ["prefix_len", "float"]),
    ("suffix_lens float", lambda: CM_PREFIX.SharedPrefixShape(2, 8, 2, 64, 500, 20, suffix_lens=(2.5, 3)),
     TypeError, ["suffix_lens[0]", "float"]),
    ("suffix_lens negative", lambda: CM_PREFIX.SharedPrefixShape(2, 8, 2, 64, 500, 20, suffix_lens=(-1, 3)),
     ValueError, ["suffix_lens[0]", "-1"]),
    ("prefix chunk float", lambda: CM_PREFIX.plan_hydragen(CM_PREFIX.SharedPrefixShape(4, 8, 2, 64, 500, 20),
                                                           prefix_chunk_size=256.0), TypeError, ["prefix_chunk_size"]),
    ("hydragen shape wrong type", lambda: CM_PREFIX.plan_hydragen((4, 8, 2, 64, 500, 20)), TypeError,
     ["shape", "SharedPrefixShape", "tuple"]),
    ("method not a str", lambda: CM_PREFIX.predict(CM_PREFIX.SharedPrefixShape(4, 8, 2, 64, 500, 20), method=None,
                                                    gpu="H100"), TypeError, ["method"]),
    ("tree level float", lambda: CM_TREE.TreeShape(4, 8, 2, 64, ((1, 100.0), (4, 20))), TypeError,
     ["levels[0]", "float"]),
    ("tree level triple", lambda: CM_TREE.TreeShape(4, 8, 2, 64, ((1, 100, 3),)), ValueError, ["levels[0]"]),
    ("tree plan wrong type", lambda: CM_TREE.predict(CM_TREE.TreeShape(4, 8, 2, 64, ((1, 100),)), gpu="H100",
                                                      plan="plan"), TypeError, ["plan", "TreePlan"]),
    ("span kv_len float", lambda: CM_SPAN.SpanShape(2, 8, 2, 64, 100.0, (3, 4)), TypeError, ["kv_len", "float"]),
    ("span_lens float", lambda: CM_SPAN.SpanShape(2, 8, 2, 64, 100, (3.0, 4)), TypeError, ["span_lens[0]"]),
    ("span_lens too long", lambda: CM_SPAN.SpanShape(2, 8, 2, 64, 100, (60, 60)), ValueError, ["span_lens", "100"]),
    ("num_spans float", lambda: CM_SPAN.SpanShape.from_density(2, 8, 2, 64, 100, density=0.5, num_spans=2.0),
     TypeError, ["num_spans", "float"]),
    ("density str", lambda: CM_SPAN.SpanShape.from_density(2, 8, 2, 64, 100, density="0.5", num_spans=2),
     TypeError, ["density", "str"]),
    ("window float", lambda: CM_SPAN.SpanShape.sinks_window(2, 8, 2, 64, 100, num_sinks=4, window=8.0),
     TypeError, ["window", "float"]),
    ("merge num_states float", lambda: CM_MERGE.MergeStatesShape(3.0, 2, 8, 64), TypeError, ["num_states"]),
    # Workload, explain
    ("workload batch float", lambda: WORKLOAD(batch=16.0), TypeError, ["batch", "float", "16.0"]),
    ("workload batch bool", lambda: WORKLOAD(batch=True), TypeError, ["batch", "bool"]),
    ("workload batch 0", lambda: WORKLOAD(batch=0), ValueError, ["batch", ">= 1", "0"]),
    ("workload prefix_len negative", lambda: WORKLOAD(prefix_len=-1), ValueError, ["prefix_len", "-1"]),
    ("workload suffix_len str", lambda: WORKLOAD(suffix_len="256"), TypeError, ["suffix_len", "str"]),
    ("workload density str", lambda: WORKLOAD(density="0.5"), TypeError, ["density", "str"]),
    ("workload density bool", lambda: WORKLOAD(density=True), TypeError, ["density", "bool"]),
    ("workload density 0", lambda: WORKLOAD(density=0.0), ValueError, ["density", "(0, 1]", "0.0"]),
    ("workload dtype not a name", lambda: WORKLOAD(dtype=np.float16), TypeError, ["dtype"]),
    ("explain not a workload", lambda: cm_explain({"batch": 16}), TypeError, ["workload", "Workload", "dict"]),
    ("explain gpu unknown", lambda: cm_explain(WORKLOAD(), "A100 PCIe"), ValueError, ["unknown GPU"]),
]


@pytest.mark.parametrize("call, error, needles", [c[1:] for c in COST_MODEL_CASES],
                         ids=[c[0] for c in COST_MODEL_CASES])
def test_cost_model_bad_input_raises_naming_the_argument(call, error, needles):
    test_malformed_call_raises_naming_the_argument(call, error, needles)
