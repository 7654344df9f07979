"""Non-finite input in every reference variant (docs/design.md, "Non-finite inputs").

Each variant is called on its own storage with NaN or infinities written anywhere in it, in tokens
that are attended or not. What must come out follows from the tokens each sequence attends to
(its context), for query head h reading KV head j = h // G:

- a NaN or infinity in q[b, h], or in a key of KV head j that b attends to: out[b, h] and lse[b, h]
  are NaN;
- otherwise a NaN or infinity in a value v[l, j, d] that b attends to: out[b, h, d] is NaN and
  lse[b, h] is as without it;
- a sequence with nothing to attend to: out = 0, lse = -inf, whatever q holds;
- everything else is as without the bad values: tokens that are not attended are never read.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from strategies import NP_DTYPE

BATCH, NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM = 3, 4, 2, 5  # GQA: query heads 0, 1 read KV head 0
GROUP_SIZE = NUM_QO_HEADS // NUM_KV_HEADS
BAD_VALUES = [np.nan, np.inf, -np.inf]


@dataclass
class Variant:
    """A reference variant called on storage it builds; `contexts` gives, per sequence, the keys and
    values [L_b, Hkv, D] it attends to, read from that same storage."""

    name: str
    build: Callable[[np.random.Generator], dict]
    call: Callable[[dict], tuple]
    contexts: Callable[[dict], list]
    keys: tuple[str, ...]    # storage arrays holding keys
    values: tuple[str, ...]  # storage arrays holding values


def _normal(rng, *shape):
    return rng.standard_normal(shape)


def _contiguous(rng, kv_len=9, kv_lens=(9, 0, 4)):
    """q [B, Hq, D], k and v [B, kv_len, Hkv, D], kv_lens: sequence 1 is empty, 2 is ragged."""
    return dict(
        q=_normal(rng, BATCH, NUM_QO_HEADS, HEAD_DIM),
        k=_normal(rng, BATCH, kv_len, NUM_KV_HEADS, HEAD_DIM),
        v=_normal(rng, BATCH, kv_len, NUM_KV_HEADS, HEAD_DIM),
        kv_lens=np.array(kv_lens),
    )


def _contiguous_contexts(a):
    return [(a["k"][b, :n], a["v"][b, :n]) for b, n in enumerate(a["kv_lens"])]


def _paged(rng):
    a = _contiguous(rng)
    paged = refattn.paged_from_contiguous(
        a["k"], a["v"], a["kv_lens"], page_size=2, shuffle=1, extra_pages=2
    )  # the last pages' tails and the two extra pages are slots no sequence reads
    names = ("k_cache", "v_cache", "kv_indptr", "kv_indices", "kv_last_page_len")
    return dict(q=a["q"], **dict(zip(names, paged)))


def _paged_contexts(a):
    contexts = []
    page_size = a["k_cache"].shape[1]
    for b in range(BATCH):
        pages = a["kv_indices"][a["kv_indptr"][b]:a["kv_indptr"][b + 1]]
        n = 0 if len(pages) == 0 else (len(pages) - 1) * page_size + a["kv_last_page_len"][b]
        contexts.append((a["k_cache"][pages].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:n],
                         a["v_cache"][pages].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:n]))
    return contexts


def _prefix(prefix_len):
    def build(rng):
        return dict(
            q=_normal(rng, BATCH, NUM_QO_HEADS, HEAD_DIM),
            k_prefix=_normal(rng, prefix_len, NUM_KV_HEADS, HEAD_DIM),
            v_prefix=_normal(rng, prefix_len, NUM_KV_HEADS, HEAD_DIM),
            k_suffix=_normal(rng, BATCH, 5, NUM_KV_HEADS, HEAD_DIM),
            v_suffix=_normal(rng, BATCH, 5, NUM_KV_HEADS, HEAD_DIM),
            suffix_lens=np.array([5, 0, 2]),  # with no prefix, sequence 1 attends to nothing
        )
    return build


def _prefix_call(method):
    def call(a):
        return refattn.shared_prefix(a["q"], a["k_prefix"], a["v_prefix"], a["k_suffix"],
                                     a["v_suffix"], a["suffix_lens"], method=method)
    return call


def _prefix_contexts(a):
    return [
        (np.concatenate([a["k_prefix"], a["k_suffix"][b, :n]]),
         np.concatenate([a["v_prefix"], a["v_suffix"][b, :n]]))
        for b, n in enumerate(a["suffix_lens"])
    ]


TREE_SEG_LENS = (4, 3, 0, 2, 3)  # segment 2 is empty, segment 4 is on no path
TREE_PATHS = ([0, 1], [], [0, 3, 2])


def _tree(rng):
    ks = [_normal(rng, n, NUM_KV_HEADS, HEAD_DIM) for n in TREE_SEG_LENS]
    vs = [_normal(rng, n, NUM_KV_HEADS, HEAD_DIM) for n in TREE_SEG_LENS]
    names = ("k_segs", "v_segs", "seg_indptr", "path_indptr", "path_segs")
    return dict(q=_normal(rng, BATCH, NUM_QO_HEADS, HEAD_DIM),
                **dict(zip(names, refattn.tree_from_paths(ks, vs, list(TREE_PATHS)))))


def _tree_contexts(a):
    contexts = []
    for b in range(BATCH):
        segs = a["path_segs"][a["path_indptr"][b]:a["path_indptr"][b + 1]]
        tokens = np.concatenate(
            [np.arange(a["seg_indptr"][s], a["seg_indptr"][s + 1]) for s in segs]
            + [np.zeros(0, dtype=np.int64)]
        )
        contexts.append((a["k_segs"][tokens], a["v_segs"][tokens]))
    return contexts


SPANS = ([[0, 2], [5, 8]], [], [[3, 12]])


def _span(rng):
    a = _contiguous(rng, kv_len=12, kv_lens=(12, 12, 12))
    del a["kv_lens"]
    a["span_indptr"] = np.cumsum([0] + [len(s) for s in SPANS])
    a["spans"] = np.array([span for spans in SPANS for span in spans])
    return a


def _span_contexts(a):
    contexts = []
    for b, spans in enumerate(SPANS):
        tokens = np.array([t for start, end in spans for t in range(start, end)], dtype=np.int64)
        contexts.append((a["k"][b, tokens], a["v"][b, tokens]))
    return contexts


VARIANTS = [
    Variant("decode", _contiguous,
            lambda a: refattn.decode(a["q"], a["k"], a["v"], a["kv_lens"]),
            _contiguous_contexts, ("k",), ("v",)),
    Variant("split_kv", _contiguous,
            lambda a: refattn.split_kv(a["q"], a["k"], a["v"], a["kv_lens"], num_splits=3),
            _contiguous_contexts, ("k",), ("v",)),
    Variant("paged_decode", _paged,
            lambda a: refattn.paged_decode(a["q"], a["k_cache"], a["v_cache"], a["kv_indptr"],
                                           a["kv_indices"], a["kv_last_page_len"]),
            _paged_contexts, ("k_cache",), ("v_cache",)),
    *[
        Variant(f"shared_prefix-{method}-prefix{prefix_len}", _prefix(prefix_len),
                _prefix_call(method), _prefix_contexts, ("k_prefix", "k_suffix"),
                ("v_prefix", "v_suffix"))
        for method in ("hydragen", "bifurcated") for prefix_len in (3, 0)
    ],
    Variant("tree", _tree,
            lambda a: refattn.tree(a["q"], a["k_segs"], a["v_segs"], a["seg_indptr"],
                                   a["path_indptr"], a["path_segs"]),
            _tree_contexts, ("k_segs",), ("v_segs",)),
    Variant("span", _span,
            lambda a: refattn.span(a["q"], a["k"], a["v"], a["span_indptr"], a["spans"]),
            _span_contexts, ("k",), ("v",)),
]


def expected_nan(q, contexts):
    """Where out and lse must be NaN, from q and the contexts (see the module docstring)."""
    nan_lse = np.zeros(q.shape[:2], dtype=bool)  # [B, Hq]
    nan_out = np.zeros(q.shape, dtype=bool)  # [B, Hq, D]
    for b, (k_b, v_b) in enumerate(contexts):
        if len(k_b) == 0:
            continue  # nothing to attend to: the empty state, whatever q holds
        for h in range(q.shape[1]):
            j = h // GROUP_SIZE
            nan_lse[b, h] = not (np.all(np.isfinite(q[b, h])) and np.all(np.isfinite(k_b[:, j])))
            nan_out[b, h] = nan_lse[b, h] | ~np.all(np.isfinite(v_b[:, j]), axis=0)
    return nan_lse, nan_out


def _is_empty(contexts):
    return np.array([len(k_b) == 0 for k_b, _ in contexts])


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@given(
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from(["float16", "bfloat16", "float32", "float64"]),
    sites=st.lists(
        st.tuples(st.sampled_from(["q", "key", "value"]), st.integers(0, 10**6),
                  st.sampled_from(BAD_VALUES)),
        min_size=1, max_size=3,
    ),
)
def test_bad_values_give_nan_exactly_where_they_are_read(variant, seed, dtype, sites):
    args = variant.build(np.random.default_rng(seed))
    for name in ("q", *variant.keys, *variant.values):
        args[name] = args[name].astype(NP_DTYPE[dtype])
    clean_out, clean_lse = variant.call(args)
    for kind, position, value in sites:
        names = {"q": ("q",), "key": variant.keys, "value": variant.values}[kind]
        name = names[position % len(names)]
        if args[name].size == 0:
            continue
        args[name] = args[name].copy()
        args[name].reshape(-1)[position % args[name].size] = value

    out, lse = variant.call(args)
    contexts = variant.contexts(args)
    nan_lse, nan_out = expected_nan(np.asarray(args["q"], dtype=np.float64), contexts)
    np.testing.assert_array_equal(np.isnan(lse), nan_lse)
    np.testing.assert_array_equal(np.isnan(out), nan_out)
    assert not np.any(np.isinf(out)), "an infinity in out: it must be NaN"
    empty = _is_empty(contexts)
    assert np.all(out[empty] == 0.0) and np.all(np.isneginf(lse[empty]))
    # Everything else is as without the bad values.
    np.testing.assert_allclose(lse[~nan_lse], clean_lse[~nan_lse], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(out[~nan_out], clean_out[~nan_out], rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# The cases that used to be hidden, one by one.


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_query_head_gives_nan_not_zero(variant, value):
    args = variant.build(np.random.default_rng(0))
    args["q"][:, 1, 2] = value  # head 1 of every sequence
    out, lse = variant.call(args)
    empty = _is_empty(variant.contexts(args))
    assert np.all(np.isnan(out[~empty, 1])) and np.all(np.isnan(lse[~empty, 1]))
    assert np.all(np.isfinite(out[:, [0, 2, 3]])) and not np.any(np.isnan(lse[:, [0, 2, 3]]))
    assert np.all(out[empty] == 0.0) and np.all(np.isneginf(lse[empty]))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_key_of_minus_inf_is_not_a_masked_token(variant):
    # q . k = -inf would weigh the token exactly 0 and pass for masking: it must be NaN instead.
    args = variant.build(np.random.default_rng(1))
    args["q"][...] = np.abs(args["q"])
    for name in variant.keys:
        args[name][...] = -np.inf  # every key of every KV head
    out, lse = variant.call(args)
    empty = _is_empty(variant.contexts(args))
    assert np.all(np.isnan(out[~empty])) and np.all(np.isnan(lse[~empty]))
    assert np.all(out[empty] == 0.0) and np.all(np.isneginf(lse[empty]))


@pytest.mark.parametrize("value", BAD_VALUES)
def test_decode_value_makes_its_output_element_nan(value):
    args = _contiguous(np.random.default_rng(2))
    clean_out, clean_lse = refattn.decode(args["q"], args["k"], args["v"], args["kv_lens"])
    args["v"][0, 3, 1, 4] = value  # sequence 0, token 3, KV head 1 (query heads 2, 3), element 4
    out, lse = refattn.decode(args["q"], args["k"], args["v"], args["kv_lens"])
    assert np.all(np.isnan(out[0, 2:, 4]))
    np.testing.assert_array_equal(lse, clean_lse)  # the lse does not read v
    untouched = np.ones(out.shape, dtype=bool)
    untouched[0, 2:, 4] = False
    np.testing.assert_array_equal(out[untouched], clean_out[untouched])


def test_decode_nan_past_kv_lens_changes_nothing():
    args = _contiguous(np.random.default_rng(3))
    want = refattn.decode(args["q"], args["k"], args["v"], args["kv_lens"])
    for b, n in enumerate(args["kv_lens"]):
        args["k"][b, n:] = np.nan
        args["v"][b, n:] = np.inf
    got = refattn.decode(args["q"], args["k"], args["v"], args["kv_lens"])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
