"""Input checks of the API contract, shared by every layer.

`refattn`, `gpukernels` and the command line call these before any work, so bad input fails the same
way everywhere: `TypeError` for a wrong type or dtype, `ValueError` for a wrong shape, length or
index, and the message names the argument, the expected shape template (known sizes filled in,
`*` where any size is fine) and what came:

    k must be [batch, kv_len, num_kv_heads, head_dim] = [4, *, *, 128], got (4, 100, 8, 64)

Tensor arguments (q, k, v, caches, outs, lses) may be NumPy, CuPy or PyTorch arrays: only their
`.shape`, `.dtype` and `.ndim` are read, never their data. Index arguments (kv_lens, kv_indptr,
kv_indices, kv_last_page_len, suffix_lens, seg_indptr, path_indptr, path_segs, span_indptr, spans)
are host NumPy arrays or array-likes of integers; callers holding device arrays copy them first.

Decisions this module makes for every layer:

- `batch`, head counts and `head_dim` must be >= 1 (a call with no sequences is a `ValueError`:
  a GPU launch over an empty grid is invalid, and an empty batch is almost always a caller's bug).
  Lengths may be 0: `kv_len`, `prefix_len`, `suffix_len`, `kv_lens[b]`, an empty path or a
  sequence without spans all mean "nothing to attend to" (out = 0, lse = -inf).
- `sm_scale` is `None` (meaning `1/sqrt(head_dim)`) or a finite real number > 0. A string, a
  bool or a complex number is a `TypeError`; NaN, infinity, zero or a negative number is a
  `ValueError` (a non-positive scale turns attention into anti-attention or a plain mean, which
  in a decode step is a bug, not a request).
- A tree path lists each segment at most once; the order of segments within a path is free.
- Paged sequences may share pages (that is how a paged cache shares a prefix).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
LSE_DTYPES = ("float32", "float64")
SHARED_PREFIX_METHODS = ("hydragen", "bifurcated")


# --------------------------------------------------------------------------------------------
# dtypes, shapes and scalars


def dtype_name(x) -> str:
    """Canonical dtype name of an array or a dtype object: "float16", "bfloat16", "int32", ...

    Works for NumPy (incl. ml_dtypes bfloat16), CuPy and PyTorch arrays and their dtype objects
    without importing CuPy or PyTorch: `torch.bfloat16` prints as "torch.bfloat16".
    """
    if isinstance(x, np.dtype):
        return x.name
    if isinstance(x, type):  # np.float32, ml_dtypes.bfloat16, float, ...
        try:
            return np.dtype(x).name
        except TypeError:
            return x.__name__
    if isinstance(x, str):
        try:
            return np.dtype(x).name
        except TypeError:
            return x.removeprefix("torch.")
    inner = getattr(x, "dtype", None)
    if inner is not None and inner is not x:
        return dtype_name(inner)
    return str(x).removeprefix("torch.")


def _shape_of(x) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _require_array(x, name: str) -> None:
    if not all(hasattr(x, attr) for attr in ("shape", "dtype", "ndim")):
        raise TypeError(
            f"{name} must be an array (NumPy, CuPy or PyTorch), got {type(x).__name__}"
        )


def _require_dtype(x, name: str, dtypes) -> str:
    _require_array(x, name)
    name_of_dtype = dtype_name(x)
    if name_of_dtype not in dtypes:
        allowed = dtypes[0] if len(dtypes) == 1 else f"{', '.join(dtypes[:-1])} or {dtypes[-1]}"
        raise TypeError(f"{name} must have dtype {allowed}, got {name_of_dtype}")
    return name_of_dtype


def _require_same_dtype(x, name: str, dtype: str, first: str = "q") -> None:
    _require_array(x, name)
    got = dtype_name(x)
    if got != dtype:
        raise TypeError(f"{name} must have the same dtype as {first} ({dtype}), got {got}")


def _template(dims) -> str:
    names = ", ".join(n for n, _ in dims)
    if all(v is None for _, v in dims):
        return f"[{names}]"
    values = ", ".join("*" if v is None else str(v) for _, v in dims)
    return f"[{names}] = [{values}]"


def _require_shape(x, name: str, dims, *, positive=()) -> tuple[int, ...]:
    """Check `x.shape` against `dims`, a list of (dimension name, required size or None).

    Dimensions named in `positive` must be >= 1.
    """
    shape = _shape_of(x)
    matches = len(shape) == len(dims) and all(
        want is None or got == want for got, (_, want) in zip(shape, dims)
    )
    if not matches:
        raise ValueError(f"{name} must be {_template(dims)}, got {shape}")
    too_small = [dim for dim, got in zip(dims, shape) if dim[0] in positive and got < 1]
    if too_small:
        which = ", ".join(dim[0] for dim in too_small)
        raise ValueError(f"{name} must be {_template(dims)} with {which} >= 1, got {shape}")
    return shape


def default_sm_scale(head_dim) -> float:
    """The softmax scale used when none is given: 1 / sqrt(head_dim)."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    return 1.0 / math.sqrt(int(head_dim))


def check_sm_scale(sm_scale, head_dim) -> float:
    """`None` -> 1/sqrt(head_dim); otherwise a finite real number > 0, returned as a float."""
    if sm_scale is None:
        return default_sm_scale(head_dim)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real):
        raise TypeError(
            f"sm_scale must be a real number or None, got {type(sm_scale).__name__} {sm_scale!r}"
        )
    value = float(sm_scale)
    if not math.isfinite(value):
        raise ValueError(f"sm_scale must be finite, got {value}")
    if value <= 0.0:
        raise ValueError(f"sm_scale must be > 0, got {value}")
    return value


def check_positive_int(value, name: str, *, allow_none: bool = False):
    """An int >= 1 (NumPy integers too, bool not), or None when allowed; returned as int."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "a positive int or None" if allow_none else "a positive int"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_nonnegative_int(value, name: str) -> int:
    """An int >= 0 (NumPy integers too, bool not), returned as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 0, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


# --------------------------------------------------------------------------------------------
# index arrays (host)


def as_index_array(x, name: str) -> np.ndarray:
    """A host integer array-like as int64 NumPy; `TypeError` unless its dtype is an integer one.

    An empty Python list or tuple counts as integer (NumPy would make it float64).
    """
    if x is None:
        raise TypeError(f"{name} must be an integer array, got None")
    try:
        arr = np.asarray(x)
    except Exception as err:  # a device array refusing implicit host conversion, ragged lists
        raise TypeError(
            f"{name} must be a host integer array (copy device arrays to the host first), "
            f"got {type(x).__name__}"
        ) from err
    if not isinstance(x, np.ndarray) and arr.size == 0 and arr.dtype == np.float64:
        arr = arr.astype(np.int64)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must have an integer dtype, got {dtype_name(arr)}")
    return arr.astype(np.int64)


def _index_array(x, name: str, dims) -> np.ndarray:
    arr = as_index_array(x, name)
    _require_shape(arr, name, dims)
    return arr


def _first(mask: np.ndarray):
    """Index of the first True entry, or None."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _check_lengths(lens, name: str, batch: int, limit: int, limit_name: str) -> np.ndarray:
    """Per-sequence lengths: int [batch], 0 <= lens[b] <= limit; None -> all `limit`."""
    if lens is None:
        return np.full(batch, limit, dtype=np.int64)
    arr = _index_array(lens, name, [("batch", batch)])
    b = _first((arr < 0) | (arr > limit))
    if b is not None:
        raise ValueError(
            f"{name} must satisfy 0 <= {name}[b] <= {limit_name} = {limit}, "
            f"got {name}[{b}] = {int(arr[b])}"
        )
    return arr


def _check_indptr(arr: np.ndarray, name: str, end: int, end_desc: str) -> None:
    """An offsets array: starts at 0, never decreases, ends at `end`."""
    if arr[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(arr[0])}")
    i = _first(np.diff(arr) < 0)
    if i is not None:
        raise ValueError(
            f"{name} must be non-decreasing, got {name}[{i}] = {int(arr[i])} > "
            f"{name}[{i + 1}] = {int(arr[i + 1])}"
        )
    if arr[-1] != end:
        raise ValueError(f"{name}[-1] must equal {end_desc} = {end}, got {int(arr[-1])}")


def _check_index_range(arr: np.ndarray, name: str, stop: int, stop_desc: str) -> None:
    i = _first((arr < 0) | (arr >= stop))
    if i is not None:
        raise ValueError(
            f"{name} must lie in [0, {stop_desc}) = [0, {stop}), got {name}[{i}] = {int(arr[i])}"
        )


# --------------------------------------------------------------------------------------------
# shared pieces of the variants


def _check_query(q, dtypes) -> tuple[int, int, int, str]:
    dtype = _require_dtype(q, "q", dtypes)
    batch, num_qo_heads, head_dim = _require_shape(
        q, "q", [("batch", None), ("num_qo_heads", None), ("head_dim", None)],
        positive=("batch", "num_qo_heads", "head_dim"),
    )
    return batch, num_qo_heads, head_dim, dtype


def _check_pair(k, v, k_name: str, v_name: str, dims, dtype: str, positive,
                first: str = "q") -> tuple[int, ...]:
    """A key array and its value array: `first`'s dtype, shape `dims`, value shaped as key."""
    _require_same_dtype(k, k_name, dtype, first)
    shape = _require_shape(k, k_name, dims, positive=positive)
    _require_same_dtype(v, v_name, dtype, first)
    _require_shape(v, v_name, [(n, s) for (n, _), s in zip(dims, shape)])
    return shape


def _check_heads(num_qo_heads: int, num_kv_heads: int, kv_heads_at: str) -> None:
    """GQA needs whole groups; `kv_heads_at` names where num_kv_heads came from ("k.shape[2]")."""
    if num_qo_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_qo_heads (q.shape[1] = {num_qo_heads}) must be a multiple of num_kv_heads "
            f"({kv_heads_at} = {num_kv_heads})"
        )


class _HeadsMixin:
    @property
    def group_size(self) -> int:
        """Query heads per KV head: query head h reads KV head h // group_size."""
        return self.num_qo_heads // self.num_kv_heads


def check_contiguous_cache(k, v, kv_lens=None, *, dtypes=FLOAT_DTYPES):
    """Check a contiguous cache on its own (no query): k, v [batch, kv_len, num_kv_heads,
    head_dim] of one dtype, batch >= 1; return (batch, kv_len, num_kv_heads, head_dim, kv_lens)
    with host int64 kv_lens [batch].
    """
    dtype = _require_dtype(k, "k", dtypes)
    shape = _check_pair(
        k, v, "k", "v",
        [("batch", None), ("kv_len", None), ("num_kv_heads", None), ("head_dim", None)],
        dtype, positive=("batch", "num_kv_heads", "head_dim"), first="k",
    )
    kv_lens = _check_lengths(kv_lens, "kv_lens", shape[0], shape[1], "kv_len")
    return (*shape, kv_lens)


# --------------------------------------------------------------------------------------------
# decode / split_kv


@dataclass(frozen=True)
class DecodeProblem(_HeadsMixin):
    batch: int
    kv_len: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    sm_scale: float


def check_kv_lens(kv_lens, batch: int, kv_len: int) -> np.ndarray:
    """A contiguous cache's valid lengths: int [batch] in [0, kv_len] (None: all kv_len), as host
    int64."""
    return _check_lengths(kv_lens, "kv_lens", batch, kv_len, "kv_len")


def check_decode(q, k, v, kv_lens=None, *, sm_scale=None, dtypes=FLOAT_DTYPES):
    """Check a contiguous-cache call; return (DecodeProblem, host int64 kv_lens [batch])."""
    batch, num_qo_heads, head_dim, dtype = _check_query(q, dtypes)
    _, kv_len, num_kv_heads, _ = _check_pair(
        k, v, "k", "v",
        [("batch", batch), ("kv_len", None), ("num_kv_heads", None), ("head_dim", head_dim)],
        dtype, positive=("num_kv_heads",),
    )
    _check_heads(num_qo_heads, num_kv_heads, "k.shape[2]")
    kv_lens = check_kv_lens(kv_lens, batch, kv_len)
    scale = check_sm_scale(sm_scale, head_dim)
    problem = DecodeProblem(batch, kv_len, num_qo_heads, num_kv_heads, head_dim, dtype, scale)
    return problem, kv_lens


# --------------------------------------------------------------------------------------------
# paged_decode


@dataclass(frozen=True)
class PagedProblem(_HeadsMixin):
    batch: int
    num_pages: int
    page_size: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    sm_scale: float
    max_kv_len: int


def _paged_lengths(indptr: np.ndarray, last: np.ndarray, page_size: int, name: str, owner: str) -> np.ndarray:
    """Tokens of each owner of pages indptr[i] .. indptr[i+1] - 1, the last one filled to last[i]
    (1 .. page_size with pages, 0 without), as int64."""
    pages = np.diff(indptr)
    i = _first(np.where(pages > 0, (last < 1) | (last > page_size), last != 0))
    if i is not None:
        want = f"in [1, page_size] = [1, {page_size}]" if pages[i] > 0 else "0"
        raise ValueError(f"{name}[{i}] must be {want} for a {owner} with {int(pages[i])} pages, got {int(last[i])}")
    return np.where(pages > 0, (pages - 1) * page_size + last, 0).astype(np.int64)


def check_paged(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, *,
                sm_scale=None, dtypes=FLOAT_DTYPES):
    """Check a paged-cache call; return (PagedProblem, host int64 kv_lens [batch]).

    Sequence b owns pages kv_indices[kv_indptr[b]:kv_indptr[b+1]]; with n >= 1 pages its length
    is (n - 1) * page_size + kv_last_page_len[b] and 1 <= kv_last_page_len[b] <= page_size;
    with no pages kv_last_page_len[b] must be 0.
    """
    layout = check_paged_layout(q, k_cache, v_cache, sm_scale=sm_scale, dtypes=dtypes)
    batch, num_pages, page_size = layout.batch, layout.num_pages, layout.page_size
    indptr = _index_array(kv_indptr, "kv_indptr", [("batch + 1", batch + 1)])
    indices = _index_array(kv_indices, "kv_indices", [("nnz_pages", None)])
    last = _index_array(kv_last_page_len, "kv_last_page_len", [("batch", batch)])
    _check_indptr(indptr, "kv_indptr", indices.size, "len(kv_indices)")
    _check_index_range(indices, "kv_indices", num_pages, "num_pages")
    kv_lens = _paged_lengths(indptr, last, page_size, "kv_last_page_len", "sequence")
    return dataclasses.replace(layout, max_kv_len=int(kv_lens.max())), kv_lens


def check_paged_layout(q, k_cache, v_cache, *, sm_scale=None, dtypes=FLOAT_DTYPES):
    """Check a paged-cache call's query and cache by their metadata alone (the page tables' values
    are left to whoever reads them); return a PagedProblem whose max_kv_len is 0 (unknown)."""
    batch, num_qo_heads, head_dim, dtype = _check_query(q, dtypes)
    num_pages, page_size, num_kv_heads, _ = _check_pair(
        k_cache, v_cache, "k_cache", "v_cache",
        [("num_pages", None), ("page_size", None), ("num_kv_heads", None), ("head_dim", head_dim)],
        dtype, positive=("page_size", "num_kv_heads"),
    )
    _check_heads(num_qo_heads, num_kv_heads, "k_cache.shape[2]")
    scale = check_sm_scale(sm_scale, head_dim)
    return PagedProblem(batch, num_pages, page_size, num_qo_heads, num_kv_heads, head_dim, dtype,
                        scale, 0)


# --------------------------------------------------------------------------------------------
# merge_states


def check_merge_states(outs, lses, *, dtypes=FLOAT_DTYPES):
    """Check partial states; return (num_states, batch, num_heads, head_dim).

    outs [num_states, batch, num_heads, head_dim] of a float dtype, lses [num_states, batch,
    num_heads] of float32 or float64. num_states may be 0 (the merge is then the empty state).
    """
    _require_dtype(outs, "outs", dtypes)
    shape = _require_shape(
        outs, "outs",
        [("num_states", None), ("batch", None), ("num_heads", None), ("head_dim", None)],
        positive=("batch", "num_heads", "head_dim"),
    )
    _require_dtype(lses, "lses", LSE_DTYPES)
    _require_shape(
        lses, "lses", [("num_states", shape[0]), ("batch", shape[1]), ("num_heads", shape[2])]
    )
    return shape


# --------------------------------------------------------------------------------------------
# shared_prefix


@dataclass(frozen=True)
class SharedPrefixProblem(_HeadsMixin):
    batch: int
    prefix_len: int
    suffix_len: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    sm_scale: float
    method: str


def check_method(method) -> str:
    """The shared-prefix method: "hydragen" or "bifurcated"."""
    if not isinstance(method, str):
        raise TypeError(
            f"method must be one of {SHARED_PREFIX_METHODS}, got {type(method).__name__} {method!r}"
        )
    if method not in SHARED_PREFIX_METHODS:
        raise ValueError(f"method must be one of {SHARED_PREFIX_METHODS}, got {method!r}")
    return method


def check_shared_prefix(q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens=None, *,
                        sm_scale=None, method="hydragen", dtypes=FLOAT_DTYPES):
    """Check a shared-prefix call; return (SharedPrefixProblem, host int64 suffix_lens [batch])."""
    batch, num_qo_heads, head_dim, dtype = _check_query(q, dtypes)
    prefix_len, num_kv_heads, _ = _check_pair(
        k_prefix, v_prefix, "k_prefix", "v_prefix",
        [("prefix_len", None), ("num_kv_heads", None), ("head_dim", head_dim)],
        dtype, positive=("num_kv_heads",),
    )
    _check_heads(num_qo_heads, num_kv_heads, "k_prefix.shape[1]")
    _, suffix_len, _, _ = _check_pair(
        k_suffix, v_suffix, "k_suffix", "v_suffix",
        [("batch", batch), ("suffix_len", None), ("num_kv_heads", num_kv_heads),
         ("head_dim", head_dim)],
        dtype, positive=(),
    )
    suffix_lens = _check_lengths(suffix_lens, "suffix_lens", batch, suffix_len, "suffix_len")
    method = check_method(method)
    scale = check_sm_scale(sm_scale, head_dim)
    problem = SharedPrefixProblem(
        batch, prefix_len, suffix_len, num_qo_heads, num_kv_heads, head_dim, dtype, scale, method
    )
    return problem, suffix_lens


# --------------------------------------------------------------------------------------------
# tree


@dataclass(frozen=True)
class TreeProblem(_HeadsMixin):
    batch: int
    total_tokens: int
    num_segs: int
    num_path_entries: int   # len(path_segs)
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    sm_scale: float
    max_kv_len: int         # tokens on the longest path


def check_tree(q, k_segs, v_segs, seg_indptr, path_indptr, path_segs, *,
               sm_scale=None, dtypes=FLOAT_DTYPES) -> TreeProblem:
    """Check a tree call: segment s is tokens [seg_indptr[s], seg_indptr[s+1]) of k_segs/v_segs;
    sequence b attends to segments path_segs[path_indptr[b]:path_indptr[b+1]], each at most once.
    """
    batch, num_qo_heads, head_dim, dtype = _check_query(q, dtypes)
    total_tokens, num_kv_heads, _ = _check_pair(
        k_segs, v_segs, "k_segs", "v_segs",
        [("total_tokens", None), ("num_kv_heads", None), ("head_dim", head_dim)],
        dtype, positive=("num_kv_heads",),
    )
    _check_heads(num_qo_heads, num_kv_heads, "k_segs.shape[1]")
    seg_indptr, path_indptr, path_segs = check_tree_index(
        seg_indptr, path_indptr, path_segs, batch, total_tokens
    )
    seg_lens = np.diff(seg_indptr)  # [num_segs]
    max_kv_len = max(
        int(seg_lens[path_segs[path_indptr[b]:path_indptr[b + 1]]].sum()) for b in range(batch)
    )
    scale = check_sm_scale(sm_scale, head_dim)
    return TreeProblem(
        batch, total_tokens, seg_indptr.size - 1, int(path_segs.size), num_qo_heads, num_kv_heads,
        head_dim, dtype, scale, max_kv_len,
    )


def check_tree_index(seg_indptr, path_indptr, path_segs, batch: int, total_tokens: int):
    """Check a tree's index arrays; return them as host int64 arrays.

    seg_indptr [num_segs+1] runs from 0 to total_tokens without decreasing (empty segments are
    fine); path_indptr [batch+1] runs from 0 to len(path_segs); path_segs lie in [0, num_segs)
    and a path holds each segment at most once.
    """
    seg_indptr = _index_array(seg_indptr, "seg_indptr", [("num_segs + 1", None)])
    if seg_indptr.size < 1:
        raise ValueError("seg_indptr must be [num_segs + 1] with at least one entry, got (0,)")
    _check_indptr(seg_indptr, "seg_indptr", total_tokens, "total_tokens (k_segs.shape[0])")
    num_segs = seg_indptr.size - 1
    path_indptr = _index_array(path_indptr, "path_indptr", [("batch + 1", batch + 1)])
    path_segs = _index_array(path_segs, "path_segs", [("nnz", None)])
    _check_indptr(path_indptr, "path_indptr", path_segs.size, "len(path_segs)")
    _check_index_range(path_segs, "path_segs", num_segs, "num_segs")
    for b in range(batch):
        path = path_segs[path_indptr[b]:path_indptr[b + 1]]
        if np.unique(path).size != path.size:
            raise ValueError(
                f"path_segs must list each segment at most once per path, got sequence {b}'s path "
                f"{path.tolist()}"
            )
    return seg_indptr, path_indptr, path_segs


def check_tree_pages(seg_kv_indptr, seg_kv_indices, seg_kv_last_page_len, *, num_pages: int | None,
                     page_size: int):
    """Check the page tables of a tree's segments (segment s owns pages
    seg_kv_indices[seg_kv_indptr[s]:seg_kv_indptr[s+1]], the last filled to
    seg_kv_last_page_len[s], as `check_paged` checks a sequence's); `num_pages` None: the page ids
    only non-negative (the cache is not known yet). Return host int64 (indptr, indices, seg_lens)."""
    page_size = check_positive_int(page_size, "page_size")
    indptr = _index_array(seg_kv_indptr, "seg_kv_indptr", [("num_segs + 1", None)])
    if indptr.size < 1:
        raise ValueError("seg_kv_indptr must be [num_segs + 1] with at least one entry, got (0,)")
    num_segs = indptr.size - 1
    indices = _index_array(seg_kv_indices, "seg_kv_indices", [("nnz_pages", None)])
    last = _index_array(seg_kv_last_page_len, "seg_kv_last_page_len", [("num_segs", num_segs)])
    _check_indptr(indptr, "seg_kv_indptr", indices.size, "len(seg_kv_indices)")
    if num_pages is None:
        i = _first(indices < 0)
        if i is not None:
            raise ValueError(f"seg_kv_indices must be >= 0, got seg_kv_indices[{i}] = {int(indices[i])}")
    else:
        _check_index_range(indices, "seg_kv_indices", num_pages, "num_pages")
    seg_lens = _paged_lengths(indptr, last, page_size, "seg_kv_last_page_len", "segment")
    return indptr, indices, seg_lens


# --------------------------------------------------------------------------------------------
# span


@dataclass(frozen=True)
class SpanProblem(_HeadsMixin):
    batch: int
    kv_len: int
    num_spans: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    sm_scale: float
    max_span_tokens: int    # tokens attended by the busiest sequence


def check_spans(span_indptr, spans, batch: int, kv_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Check a span list; return host int64 (span_indptr [batch+1], spans [num_spans, 2]).

    Sequence b attends to the half-open intervals spans[span_indptr[b]:span_indptr[b+1]], each
    non-empty, inside [0, kv_len), sorted and non-overlapping (touching ones are allowed).
    """
    spans = _index_array(spans, "spans", [("num_spans", None), ("2", 2)])
    span_indptr = _index_array(span_indptr, "span_indptr", [("batch + 1", batch + 1)])
    _check_indptr(span_indptr, "span_indptr", spans.shape[0], "num_spans (len(spans))")
    starts, ends = spans[:, 0], spans[:, 1]
    i = _first(starts >= ends)
    if i is not None:
        raise ValueError(
            f"spans[{i}] = {spans[i].tolist()} is empty: every span must have start < end"
        )
    i = _first((starts < 0) | (ends > kv_len))
    if i is not None:
        raise ValueError(
            f"spans[{i}] = {spans[i].tolist()} must lie inside [0, kv_len) = [0, {kv_len})"
        )
    # Consecutive spans of one sequence must not go backwards or overlap.
    first_of_sequence = np.zeros(spans.shape[0], dtype=bool)
    first_of_sequence[span_indptr[:-1][span_indptr[:-1] < spans.shape[0]]] = True
    i = _first(~first_of_sequence[1:] & (starts[1:] < ends[:-1]))
    if i is not None:
        b = int(np.searchsorted(span_indptr, i + 1, side="right") - 1)
        raise ValueError(
            f"spans of sequence {b} must be sorted and non-overlapping, got spans[{i}] = "
            f"{spans[i].tolist()} followed by spans[{i + 1}] = {spans[i + 1].tolist()}"
        )
    return span_indptr, spans


def check_sinks(sinks, num_qo_heads: int) -> None:
    """Per-head sink logits by their metadata: None, or an array (NumPy, CuPy or PyTorch)
    [num_qo_heads] of a float dtype. TypeError for something that is not an array or has another
    dtype, ValueError for another shape; values are not checked (non-finite sinks follow the
    rules of `span`)."""
    if sinks is None:
        return
    if not all(hasattr(sinks, attr) for attr in ("shape", "dtype", "ndim")):
        raise TypeError(
            f"sinks must be None or an array [num_qo_heads] (NumPy, CuPy or PyTorch), "
            f"got {type(sinks).__name__}"
        )
    dtype = dtype_name(sinks)
    if dtype not in FLOAT_DTYPES:
        allowed = ", ".join(FLOAT_DTYPES[:-1]) + f" or {FLOAT_DTYPES[-1]}"
        raise TypeError(f"sinks must have dtype {allowed}, got {dtype}")
    shape = tuple(int(s) for s in sinks.shape)
    if shape != (num_qo_heads,):
        raise ValueError(f"sinks must be [num_qo_heads] = [{num_qo_heads}], got {shape}")


def check_span(q, k, v, span_indptr, spans, *, sm_scale=None, dtypes=FLOAT_DTYPES) -> SpanProblem:
    """Check a span call (contiguous k, v as in `check_decode`, plus a span list)."""
    batch, num_qo_heads, head_dim, dtype = _check_query(q, dtypes)
    _, kv_len, num_kv_heads, _ = _check_pair(
        k, v, "k", "v",
        [("batch", batch), ("kv_len", None), ("num_kv_heads", None), ("head_dim", head_dim)],
        dtype, positive=("num_kv_heads",),
    )
    _check_heads(num_qo_heads, num_kv_heads, "k.shape[2]")
    span_indptr, spans = check_spans(span_indptr, spans, batch, kv_len)
    tokens = np.zeros(batch, dtype=np.int64)
    np.add.at(tokens, np.repeat(np.arange(batch), np.diff(span_indptr)), spans[:, 1] - spans[:, 0])
    scale = check_sm_scale(sm_scale, head_dim)
    return SpanProblem(
        batch, kv_len, spans.shape[0], num_qo_heads, num_kv_heads, head_dim, dtype, scale,
        int(tokens.max()),
    )
