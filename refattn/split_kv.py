"""Split-KV (Flash-Decoding): cut each cache into chunks, attend to each, merge by LSE.

The reference really chunks and merges, so "split equals whole" is checked, not assumed.

Example:
    >>> import numpy as np
    >>> from refattn import decode, split_kv
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((3, 4, 8))
    >>> k, v = rng.standard_normal((2, 3, 50, 2, 8))
    >>> kv_lens = np.array([50, 7, 0])
    >>> split = split_kv(q, k, v, kv_lens, num_splits=4)
    >>> whole = decode(q, k, v, kv_lens)
    >>> bool(np.allclose(split[0], whole[0]) and np.allclose(split[1], whole[1]))
    True
"""

import numpy as np

from decode_attention import contract

from .decode import decode
from .merge_states import merge_states

# Chunk length when neither num_splits nor chunk_size is given. Any choice gives the same result;
# 256 tokens is about the shortest chunk worth a GPU thread block of its own.
DEFAULT_CHUNK_SIZE = 256


def chunk_size_for(kv_len: int, num_splits=None, chunk_size=None) -> tuple[int, int]:
    """(chunk_size, num_chunks) for a cache of kv_len tokens.

    num_splits = n: chunk_size = ceil(kv_len / n) (at least 1) and exactly n chunks, trailing ones
    empty when kv_len < n. chunk_size = c: ceil(kv_len / c) chunks (at least 1). Neither:
    chunk_size = DEFAULT_CHUNK_SIZE. Giving both is an error.
    """
    num_splits = contract.check_positive_int(num_splits, "num_splits", allow_none=True)
    chunk_size = contract.check_positive_int(chunk_size, "chunk_size", allow_none=True)
    if num_splits is not None and chunk_size is not None:
        raise ValueError(
            f"give num_splits or chunk_size, not both (got num_splits={num_splits}, "
            f"chunk_size={chunk_size})"
        )
    if num_splits is not None:
        return max(1, -(-kv_len // num_splits)), num_splits
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE
    return chunk_size, max(1, -(-kv_len // chunk_size))


def split_kv(q, k, v, kv_lens=None, *, num_splits=None, chunk_size=None, sm_scale=None):
    """Decode attention computed chunk by chunk and merged.

    Chunk s covers cache positions [s * c, (s + 1) * c) of every sequence (c = chunk size, the
    same for all sequences, as the kernels' grid has it); sequence b contributes the part of it
    below kv_lens[b], possibly nothing. Each chunk gives a state (out_s, lse_s) = decode on the
    chunk, and

        out, lse = merge_states([out_0, ..., out_{n-1}], [lse_0, ..., lse_{n-1}])

    which equals decode(q, k, v, kv_lens). Exactly one of num_splits (chunk count) and chunk_size
    (tokens per chunk) may be given; with neither, chunks are DEFAULT_CHUNK_SIZE tokens.

    Shapes and result as in `refattn.decode`.
    """
    problem, kv_lens = contract.check_decode(q, k, v, kv_lens, sm_scale=sm_scale)
    chunk, num_chunks = chunk_size_for(problem.kv_len, num_splits, chunk_size)
    outs = np.zeros((num_chunks, problem.batch, problem.num_qo_heads, problem.head_dim))
    lses = np.zeros((num_chunks, problem.batch, problem.num_qo_heads))
    for s in range(num_chunks):
        start, stop = s * chunk, (s + 1) * chunk
        lens_in_chunk = np.clip(kv_lens - start, 0, chunk)  # [B] tokens of each sequence here
        outs[s], lses[s] = decode(
            q, k[:, start:stop], v[:, start:stop], lens_in_chunk, sm_scale=problem.sm_scale
        )
    return merge_states(outs, lses)
