"""Builders of the index structures the variants take, from plain descriptions.

- `paged_from_contiguous`: a page table and paged caches holding the same tokens as a contiguous
  cache, pages optionally shuffled, unused slots filled with junk.
- `tree_from_paths`: segments back to back plus the CSR arrays of the paths through them.
- `spans_from_sinks_window`, `spans_from_mask`: span lists.
- `quest_block_scores`, `spans_from_block_scores`: Quest-style page selection (arXiv 2406.10774),
  the top-k blocks of each sequence by an upper bound of their scores, as spans.
- `span_pattern`: synthetic span lists shaped like the self-selected attention span paper's
  tasks (Jin et al., 2024), at a given density.

All index outputs are int32 NumPy arrays, the width the GPU kernels read.

Example:
    >>> import numpy as np
    >>> from refattn import spans_from_block_scores, spans_from_mask, span_pattern
    >>> mask = np.array([[1, 1, 0, 1], [0, 0, 0, 0]], dtype=bool)
    >>> span_indptr, spans = spans_from_mask(mask)
    >>> span_indptr.tolist(), spans.tolist()
    ([0, 2, 2], [[0, 2], [3, 4]])

    The best 3 of 4 blocks of 4 tokens; sequence 1 has 10 tokens, so 3 blocks, the last clipped:
    >>> scores = np.array([[0.5, 2.0, 1.0, -1.0], [0.0, 3.0, 3.0, 9.0]])
    >>> span_indptr, spans = spans_from_block_scores(scores, block_size=4, top_k=3,
    ...                                              kv_lens=[16, 10])
    >>> span_indptr.tolist(), spans.tolist()
    ([0, 1, 2], [[0, 12], [0, 10]])
    >>> span_indptr, spans = spans_from_block_scores(scores, block_size=4, top_k=2)
    >>> spans.tolist()                          # sequence 1: the tie of 3.0s goes to block 1
    [[4, 12], [4, 8], [12, 16]]

    Sinks plus a window over a quarter of 64 tokens:
    >>> span_indptr, spans = span_pattern("sinks_window", batch=1, kv_len=64, density=0.25)
    >>> spans.tolist()
    [[0, 4], [52, 64]]
"""

import math
import numbers

import numpy as np

from decode_attention import contract

INDEX_DTYPE = np.int32
JUNK_STD = 3.0  # spread of the values in unused cache slots; any read of them shows in the output


def _generator(shuffle):
    """None -> None (pages in order); an int seed or a Generator -> a Generator."""
    if shuffle is None or isinstance(shuffle, np.random.Generator):
        return shuffle
    if isinstance(shuffle, numbers.Integral) and not isinstance(shuffle, bool):
        return np.random.default_rng(int(shuffle))
    raise TypeError(
        f"shuffle must be None, an int seed or a numpy.random.Generator, got "
        f"{type(shuffle).__name__} {shuffle!r}"
    )


def paged_from_contiguous(k, v, kv_lens=None, *, page_size, shuffle=None, extra_pages=0):
    """Cut a contiguous cache into pages of `page_size` tokens.

    Sequence b needs n_b = ceil(kv_lens[b] / page_size) pages. The cache has sum_b n_b +
    extra_pages pages; with `shuffle` (an int seed or a Generator) the pages sit at a random
    permutation of the page ids, otherwise in order. Slots no sequence owns (the tail of each last
    page and the extra pages) hold random junk, so a kernel that reads outside its pages is caught.

    k, v [batch, kv_len, num_kv_heads, head_dim]; kv_lens int [batch] (default kv_len).
    Returns k_cache, v_cache [num_pages, page_size, num_kv_heads, head_dim] in k's dtype, and int32
    kv_indptr [batch+1], kv_indices [nnz_pages], kv_last_page_len [batch].
    """
    batch, _, num_kv_heads, head_dim, kv_lens = contract.check_contiguous_cache(k, v, kv_lens)
    page_size = contract.check_positive_int(page_size, "page_size")
    extra_pages = contract.check_nonnegative_int(extra_pages, "extra_pages")
    rng = _generator(shuffle)
    k, v = np.asarray(k), np.asarray(v)  # [B, S, Hkv, D]

    pages_per_seq = -(-kv_lens // page_size)  # [B]
    kv_indptr = np.concatenate([[0], np.cumsum(pages_per_seq)])  # [B+1]
    used = int(kv_indptr[-1])
    num_pages = used + extra_pages
    page_ids = np.arange(num_pages) if rng is None else rng.permutation(num_pages)
    kv_indices = page_ids[:used]  # [nnz_pages]; the remaining ids are the extra pages

    junk = rng if rng is not None else np.random.default_rng(0)
    cache_shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = (JUNK_STD * junk.standard_normal(cache_shape)).astype(k.dtype)
    v_cache = (JUNK_STD * junk.standard_normal(cache_shape)).astype(v.dtype)
    for b in range(batch):
        for i, page in enumerate(kv_indices[kv_indptr[b]:kv_indptr[b + 1]]):
            start = i * page_size
            stop = min(start + page_size, int(kv_lens[b]))
            k_cache[page, : stop - start] = k[b, start:stop]
            v_cache[page, : stop - start] = v[b, start:stop]
    kv_last_page_len = np.where(pages_per_seq > 0, kv_lens - (pages_per_seq - 1) * page_size, 0)
    return (
        k_cache, v_cache, kv_indptr.astype(INDEX_DTYPE), kv_indices.astype(INDEX_DTYPE),
        kv_last_page_len.astype(INDEX_DTYPE),
    )


def tree_from_paths(segments_k, segments_v, paths):
    """Lay segments back to back and describe each sequence's path through them.

    segments_k, segments_v: equally long lists of [len_i, num_kv_heads, head_dim] arrays (one
    dtype, len_i may be 0); paths: one list of segment ids per sequence, each id at most once.
    Returns k_segs, v_segs [total_tokens, num_kv_heads, head_dim] and int32 seg_indptr
    [num_segs+1], path_indptr [batch+1], path_segs [nnz].
    """
    segments_k, segments_v = list(segments_k), list(segments_v)
    if len(segments_k) != len(segments_v):
        raise ValueError(
            f"segments_v must hold as many segments as segments_k ({len(segments_k)}), "
            f"got {len(segments_v)}"
        )
    if not segments_k:
        raise ValueError("segments_k must hold at least one segment, got none")
    first = segments_k[0]
    contract.check_contiguous_cache(first[None], first[None])  # a float array [len, Hkv, D]
    for i, (seg_k, seg_v) in enumerate(zip(segments_k, segments_v)):
        for name, seg in ((f"segments_k[{i}]", seg_k), (f"segments_v[{i}]", seg_v)):
            if contract.dtype_name(seg) != contract.dtype_name(first):
                raise TypeError(
                    f"{name} must have dtype {contract.dtype_name(first)} like segments_k[0], "
                    f"got {contract.dtype_name(seg)}"
                )
            if seg.ndim != 3 or tuple(seg.shape[1:]) != tuple(first.shape[1:]):
                raise ValueError(
                    f"{name} must be [len, num_kv_heads, head_dim] = [*, {first.shape[1]}, "
                    f"{first.shape[2]}], got {tuple(seg.shape)}"
                )
        if seg_v.shape[0] != seg_k.shape[0]:
            raise ValueError(
                f"segments_v[{i}] must have segments_k[{i}]'s length {seg_k.shape[0]}, "
                f"got {tuple(seg_v.shape)}"
            )
    paths = [list(path) for path in paths]
    if not paths:
        raise ValueError("paths must hold at least one path (batch >= 1), got none")

    k_segs = np.concatenate([np.asarray(s) for s in segments_k])  # [T, Hkv, D]
    v_segs = np.concatenate([np.asarray(s) for s in segments_v])  # [T, Hkv, D]
    seg_indptr = np.concatenate([[0], np.cumsum([s.shape[0] for s in segments_k])])
    path_indptr = np.concatenate([[0], np.cumsum([len(path) for path in paths])])
    path_segs = contract.as_index_array(
        np.concatenate([np.asarray(path, dtype=np.int64).reshape(-1) for path in paths]),
        "paths",
    )
    contract.check_tree_index(seg_indptr, path_indptr, path_segs, len(paths), k_segs.shape[0])
    return (
        k_segs, v_segs, seg_indptr.astype(INDEX_DTYPE), path_indptr.astype(INDEX_DTYPE),
        path_segs.astype(INDEX_DTYPE),
    )


def _csr(spans_per_seq) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence lists of (start, end) -> int32 (span_indptr [batch+1], spans [num_spans, 2])."""
    span_indptr = np.concatenate([[0], np.cumsum([len(s) for s in spans_per_seq])])
    spans = np.array([pair for seq in spans_per_seq for pair in seq], dtype=np.int64)
    return span_indptr.astype(INDEX_DTYPE), spans.reshape(-1, 2).astype(INDEX_DTYPE)


def spans_from_sinks_window(kv_lens, *, num_sinks, window):
    """Attention sinks plus a sliding window: the first `num_sinks` and the last `window` tokens.

    For a sequence of n tokens the spans are [0, min(num_sinks, n)) and [max(0, n - window), n),
    merged into [0, n) when they touch or overlap; empty ones are left out.
    kv_lens int [batch]. Returns int32 span_indptr [batch+1], spans [num_spans, 2].
    """
    kv_lens = contract.as_index_array(kv_lens, "kv_lens")
    if kv_lens.ndim != 1 or np.any(kv_lens < 0):
        raise ValueError(f"kv_lens must be [batch] with entries >= 0, got {kv_lens.tolist()}")
    num_sinks = contract.check_nonnegative_int(num_sinks, "num_sinks")
    window = contract.check_nonnegative_int(window, "window")
    spans_per_seq = []
    for n in kv_lens.tolist():
        sinks = (0, min(num_sinks, n))
        recent = (max(0, n - window), n)
        if sinks[1] > 0 and recent[1] > recent[0] and sinks[1] >= recent[0]:
            spans_per_seq.append([(0, n)])
        else:
            spans_per_seq.append([s for s in (sinks, recent) if s[1] > s[0]])
    return _csr(spans_per_seq)


def spans_from_mask(mask):
    """The maximal runs of True in each row of a bool mask [batch, kv_len], as spans.

    Returns int32 span_indptr [batch+1], spans [num_spans, 2].
    """
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must have dtype bool, got {contract.dtype_name(mask)}")
    if mask.ndim != 2:
        raise ValueError(f"mask must be [batch, kv_len], got {mask.shape}")
    spans_per_seq = []
    for row in mask:
        edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))  # +1: run starts, -1: ends
        spans_per_seq.append(list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))))
    return _csr(spans_per_seq)


# --------------------------------------------------------------------------------------------
# Quest-style block selection


def _float_array(x, name: str) -> np.ndarray:
    """An array-like of a float dtype (float16, bfloat16, float32, float64) as float64."""
    arr = np.asarray(x)
    if contract.dtype_name(arr) not in contract.FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a float dtype ({', '.join(contract.FLOAT_DTYPES)}), "
            f"got {contract.dtype_name(arr)}"
        )
    return arr.astype(np.float64)


def quest_block_scores(q, k, kv_lens=None, *, block_size):
    """Quest's per-block score: an upper bound of the attention scores in each block of tokens.

    Block i of sequence b holds tokens [i * block_size, min((i + 1) * block_size, kv_lens[b])).
    From the elementwise minimum and maximum of its keys of KV head j, kmin and kmax [head_dim],
    query head h (reading KV head j = h // G) gets

        bound[b, h, i] = sum_d max(q[b, h, d] * kmin[d], q[b, h, d] * kmax[d])
                      >= max over the block's tokens l of <q[b, h], k[b, l, j]>

    A span list is shared by all heads of a sequence, so the heads are reduced with a maximum:

        scores[b, i] = max_h bound[b, h, i]

    a block ranks high when any query head may attend to it strongly. The bound is of q.k
    without sm_scale: a positive scale, the same for every head, changes no ranking.

    q [batch, num_qo_heads, head_dim]; k [batch, kv_len, num_kv_heads, head_dim] (any float
    dtype); kv_lens int [batch] (default kv_len). Returns float64 scores [batch, num_blocks]
    with num_blocks = ceil(kv_len / block_size); blocks past a sequence's kv_lens[b] score
    -inf (give `spans_from_block_scores` the same kv_lens, and they are never selected).

    Non-finite input is not hidden: a block holding a NaN or infinity in a key (within kv_lens)
    scores NaN, and so does every block of a sequence whose query holds one; NaN ranks first
    in `spans_from_block_scores`, so the attention reads those tokens and shows the NaN.
    """
    problem, kv_lens = contract.check_decode(q, k, k, kv_lens)
    block_size = contract.check_positive_int(block_size, "block_size")
    q, k = np.asarray(q), np.asarray(k)  # q: [B, Hq, D]; k: [B, S, Hkv, D]
    num_blocks = -(-problem.kv_len // block_size)
    group = problem.group_size
    scores = np.full((problem.batch, num_blocks), -np.inf)  # [B, NB]
    for b in range(problem.batch):
        n = int(kv_lens[b])
        if n == 0:
            continue
        starts = np.arange(0, n, block_size)  # [nb]: first token of each block
        keys = k[b, :n].astype(np.float64)  # [n, Hkv, D]
        kmin = np.minimum.reduceat(keys, starts, axis=0)  # [nb, Hkv, D]
        kmax = np.maximum.reduceat(keys, starts, axis=0)  # [nb, Hkv, D]
        nonfinite = np.logical_or.reduceat(~np.isfinite(keys), starts, axis=0)  # [nb, Hkv, D]
        bad_block = nonfinite.any(axis=-1)  # [nb, Hkv]
        queries = q[b].astype(np.float64).reshape(problem.num_kv_heads, group, -1)  # [Hkv, G, D]
        bad_query = ~np.all(np.isfinite(queries), axis=-1)  # [Hkv, G]
        best = np.full(starts.size, -np.inf)  # [nb]
        for j in range(problem.num_kv_heads):
            with np.errstate(invalid="ignore", over="ignore"):  # 0 * inf: made NaN below anyway
                low = queries[j][:, None, :] * kmin[None, :, j, :]  # [G, nb, D]
                high = queries[j][:, None, :] * kmax[None, :, j, :]  # [G, nb, D]
                bound = np.sum(np.maximum(low, high), axis=-1)  # [G, nb]
            bound[bad_query[j]] = np.nan
            bound[:, bad_block[:, j]] = np.nan
            best = np.maximum(best, bound.max(axis=0))  # NaN wins: np.maximum propagates it
        scores[b, : starts.size] = best
    return scores


def spans_from_block_scores(block_scores, *, block_size, top_k, kv_lens=None):
    """The top_k blocks of each sequence by score, as spans (Quest's page selection).

    Block i covers tokens [i * block_size, (i + 1) * block_size). Sequence b chooses among its
    own ceil(kv_lens[b] / block_size) blocks only (the rest of its row is ignored) the
    min(top_k, that many) with the highest scores, ties going to the lower index; a NaN score
    ranks as +inf (it comes from a non-finite key or query, which the attention must read to
    show). The chosen blocks, the last one clipped to kv_lens[b], are merged where adjacent.

    block_scores float [batch, num_blocks] (higher is better, e.g. `quest_block_scores`);
    kv_lens int [batch] with 0 <= kv_lens[b] <= num_blocks * block_size (default: that
    maximum). Returns int32 span_indptr [batch+1], spans [num_spans, 2], sorted,
    non-overlapping and not touching.
    """
    scores = _float_array(block_scores, "block_scores")  # [B, NB]
    if scores.ndim != 2 or scores.shape[0] < 1:
        raise ValueError(
            f"block_scores must be [batch, num_blocks] with batch >= 1, got {scores.shape}"
        )
    batch, num_blocks = scores.shape
    block_size = contract.check_positive_int(block_size, "block_size")
    top_k = contract.check_nonnegative_int(top_k, "top_k")
    capacity = num_blocks * block_size
    if kv_lens is None:
        kv_lens = np.full(batch, capacity, dtype=np.int64)
    kv_lens = contract.as_index_array(kv_lens, "kv_lens")
    if kv_lens.shape != (batch,):
        raise ValueError(f"kv_lens must be [batch] = [{batch}], got {kv_lens.shape}")
    bad = np.flatnonzero((kv_lens < 0) | (kv_lens > capacity))
    if bad.size:
        raise ValueError(
            f"kv_lens must satisfy 0 <= kv_lens[b] <= num_blocks * block_size = {num_blocks} * "
            f"{block_size} = {capacity}, got kv_lens[{bad[0]}] = {int(kv_lens[bad[0]])}"
        )
    spans_per_seq = []
    for b in range(batch):
        n = int(kv_lens[b])
        own = scores[b, : -(-n // block_size)]  # [blocks of sequence b]
        rank = np.where(np.isnan(own), -np.inf, -own)  # ascending rank = descending score
        chosen = np.sort(np.argsort(rank, kind="stable")[:top_k])  # stable: ties to lower index
        spans_per_seq.append(_block_runs(chosen, block_size, n))
    return _csr(spans_per_seq)


def _block_runs(blocks: np.ndarray, block_size: int, n: int) -> list[tuple[int, int]]:
    """Sorted block indices -> the token spans of their runs of consecutive blocks, clipped to n."""
    if blocks.size == 0:
        return []
    runs = np.split(blocks, np.flatnonzero(np.diff(blocks) != 1) + 1)
    return [(int(run[0]) * block_size, min((int(run[-1]) + 1) * block_size, n)) for run in runs]


# --------------------------------------------------------------------------------------------
# Synthetic span patterns

SPAN_PATTERNS = ("arithmetic", "summarization", "sinks_window")
DEFAULT_NUM_SINKS = 4        # StreamingLLM keeps 4 initial tokens
DEFAULT_SENTENCE_LEN = 32    # tokens of an attended sentence, on average


def _check_kind(kind) -> str:
    if not isinstance(kind, str):
        raise TypeError(f"kind must be one of {SPAN_PATTERNS}, got {type(kind).__name__} {kind!r}")
    if kind not in SPAN_PATTERNS:
        raise ValueError(f"kind must be one of {SPAN_PATTERNS}, got {kind!r}")
    return kind


def _check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(
            f"density must be a real number in [0, 1], got {type(density).__name__} {density!r}"
        )
    value = float(density)
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"density must lie in [0, 1], got {value}")
    return value


def _seeded(seed) -> np.random.Generator:
    """None -> seed 0; an int >= 0 -> a Generator seeded with it; a Generator as it is."""
    if seed is None:
        return np.random.default_rng(0)
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(
            f"seed must be None, an int >= 0 or a numpy.random.Generator, got "
            f"{type(seed).__name__} {seed!r}"
        )
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(int(seed))


def _arithmetic_layout(rng, kv_len: int, attended: int, **_):
    """The question at the start, the previous step's result, the current step up to the end."""
    question = int(attended * rng.uniform(0.35, 0.65))
    result = int(attended * rng.uniform(0.10, 0.25))
    current = attended - question - result
    free = kv_len - attended
    near = int(rng.integers(0, max(1, free // 16) + 1)) if free else 0  # result -> current step
    return [question, result, current], [0, free - near, near, 0]


def _summarization_layout(rng, kv_len: int, attended: int, *, sentence_len: int, **_):
    """Sentences of about sentence_len tokens spread over the document in order; the last span
    ends at the newest token (the summary being written)."""
    if attended == 0:
        return [], [kv_len]
    num_spans = max(1, min(attended, round(attended / sentence_len)))
    # lengths: 1 + a near-even share of the rest (medium spans, not equal ones)
    lengths = 1 + rng.multinomial(attended - num_spans, rng.dirichlet(np.full(num_spans, 8.0)))
    # gaps before each span: a spread-out share of the unattended tokens, none after the last
    gaps = rng.multinomial(kv_len - attended, rng.dirichlet(np.full(num_spans, 2.0)))
    return [int(n) for n in lengths], [*(int(g) for g in gaps), 0]


def _sinks_window_layout(rng, kv_len: int, attended: int, *, num_sinks: int, **_):
    """The first min(num_sinks, attended) tokens and a recent window holding the rest."""
    sinks = min(num_sinks, attended)
    return [sinks, attended - sinks], [0, kv_len - attended, 0]


_LAYOUTS = {
    "arithmetic": _arithmetic_layout,
    "summarization": _summarization_layout,
    "sinks_window": _sinks_window_layout,
}


def _placed(lengths, gaps) -> list[tuple[int, int]]:
    """gaps[0], lengths[0], gaps[1], lengths[1], ... laid end to end -> the spans of the lengths,
    empty ones left out and touching ones merged."""
    spans, position = [], 0
    for gap, length in zip(gaps, lengths):
        position += gap
        if length and spans and spans[-1][1] == position:
            spans[-1] = (spans[-1][0], position + length)
        elif length:
            spans.append((position, position + length))
        position += length
    return spans


def span_pattern(kind, *, batch, kv_len, density, seed=None, num_sinks=None, sentence_len=None):
    """Synthetic span lists like those of the self-selected attention span paper's tasks.

    Every sequence has kv_len tokens and attends to exactly round(density * kv_len) of them
    (halves rounded up), so the achieved density is within 0.5 / kv_len of `density`:

    - "arithmetic" (stepwise arithmetic): each step attends to the question at the start (about
      half the attended tokens), the previous step's result (10-25%) and the current step, which
      ends at the newest token; the result lies shortly before it (a gap of at most 1/16 of the
      unattended tokens): at most three spans.
    - "summarization": the sentences being summarised, about `sentence_len` tokens each (default
      DEFAULT_SENTENCE_LEN), spread over the document in order with random gaps; the last
      span ends at the newest token (the summary being written).
    - "sinks_window": the first `num_sinks` tokens (default DEFAULT_NUM_SINKS) and a recent
      window holding the rest, as `spans_from_sinks_window`.

    Lengths and gaps are random, drawn per sequence from `seed` (an int >= 0, a Generator, or
    None for seed 0): the same seed gives the same spans. `num_sinks` and `sentence_len` belong
    to their kind only. Returns int32 span_indptr [batch+1], spans [num_spans, 2], sorted,
    non-overlapping and not touching, valid for `refattn.span` with any cache of kv_len tokens.
    """
    kind = _check_kind(kind)
    batch = contract.check_positive_int(batch, "batch")
    kv_len = contract.check_nonnegative_int(kv_len, "kv_len")
    density = _check_density(density)
    rng = _seeded(seed)
    for name, value, owner in (("num_sinks", num_sinks, "sinks_window"),
                               ("sentence_len", sentence_len, "summarization")):
        if value is not None and kind != owner:
            raise ValueError(f"{name} applies to kind={owner!r} only, got it with kind={kind!r}")
    num_sinks = contract.check_nonnegative_int(
        DEFAULT_NUM_SINKS if num_sinks is None else num_sinks, "num_sinks"
    )
    sentence_len = contract.check_positive_int(
        DEFAULT_SENTENCE_LEN if sentence_len is None else sentence_len, "sentence_len"
    )
    attended = math.floor(density * kv_len + 0.5)
    layout = _LAYOUTS[kind]
    spans_per_seq = [
        _placed(*layout(rng, kv_len, attended, num_sinks=num_sinks, sentence_len=sentence_len))
        for _ in range(batch)
    ]
    return _csr(spans_per_seq)
