"""The split-KV (Flash-Decoding) plan: how one decode call is cut into thread blocks.

A plan is plain frozen data computed on the host. The CUDA kernels in `gpukernels` run it and the
cost model predicts from it, so a prediction always describes the schedule that actually runs.

Schedule: every (sequence, KV head, head group) pair is cut along the KV length into chunks of
`chunk_size` tokens; chunk `s` covers tokens `[s * chunk_size, min((s + 1) * chunk_size, kv_len))`.
One thread block handles one chunk for the `heads_per_block` query heads of one head group, reading
each K/V row once for all of them. With more than one split, each block writes a float32 partial
`(out, lse)` to the workspace and the last block of its (sequence, KV head, head group) to finish
merges the partials (an atomic counter decides which block is last), so a call is one launch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Kernel constants the plan must agree with (gpukernels/cuda/decode.cu reads the same numbers).
NUM_WARPS = 4                # warps per thread block
TILE_TOKENS = 64             # tokens one block consumes per iteration (NUM_WARPS warps x 16 rows)
MIN_CHUNK_TOKENS = 256       # shorter chunks spend more on setup and merge than they gain
HEADS_PER_BLOCK_CHOICES = (1, 2, 4, 8)  # query heads served by one block (template parameter)
DEFAULT_NUM_SMS = 132        # H100 SXM; plans for another GPU pass its count


def heads_per_block_for(group_size: int) -> int:
    """Smallest template width that holds the group, capped at the widest one."""
    for g in HEADS_PER_BLOCK_CHOICES:
        if g >= group_size:
            return g
    return HEADS_PER_BLOCK_CHOICES[-1]


@dataclass(frozen=True)
class SplitKVPlan:
    batch: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    max_kv_len: int
    chunk_size: int          # tokens per split, a multiple of TILE_TOKENS
    num_splits: int          # chunks of the longest sequence (grid width), >= 1
    heads_per_block: int     # query heads per block (template width)
    head_groups: int         # blocks per KV head along the query heads
    num_sms: int
    page_size: int = 0       # 0: contiguous cache; otherwise tokens per page

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads

    @property
    def num_blocks(self) -> int:
        return self.num_splits * self.batch * self.num_kv_heads * self.head_groups

    @property
    def grid(self) -> tuple[int, int]:
        """(x, y) grid of the decode kernel: x over splits, y over (sequence, KV head, head group)."""
        return (self.num_splits, self.batch * self.num_kv_heads * self.head_groups)

    @property
    def partial_out_elems(self) -> int:
        """float32 partial outputs: [num_splits, batch, num_qo_heads, head_dim] when split."""
        if self.num_splits == 1:
            return 0
        return self.num_splits * self.batch * self.num_qo_heads * self.head_dim

    @property
    def partial_lse_elems(self) -> int:
        if self.num_splits == 1:
            return 0
        return self.num_splits * self.batch * self.num_qo_heads

    @property
    def counter_elems(self) -> int:
        """int32 arrival counters, one per (sequence, KV head, head group); reset by the merging block."""
        if self.num_splits == 1:
            return 0
        return self.batch * self.num_kv_heads * self.head_groups

    @property
    def workspace_bytes(self) -> int:
        return 4 * (self.partial_out_elems + self.partial_lse_elems + self.counter_elems)

    def splits_for(self, kv_len: int) -> int:
        """Chunks that hold tokens for a sequence of this length (at least one, even when empty)."""
        return max(1, -(-kv_len // self.chunk_size))

    def chunk_bounds(self, kv_len: int) -> list[tuple[int, int]]:
        """[start, end) token ranges of the chunks a sequence of this length is cut into."""
        return [
            (s * self.chunk_size, min((s + 1) * self.chunk_size, kv_len))
            for s in range(self.splits_for(kv_len))
        ]


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def choose_num_splits(base_blocks: int, max_kv_len: int, num_sms: int) -> int:
    """Initial split choice: about four resident blocks per SM, chunks no shorter than MIN_CHUNK_TOKENS."""
    if max_kv_len <= MIN_CHUNK_TOKENS:
        return 1
    target_blocks = 4 * num_sms
    if base_blocks >= target_blocks:
        return 1
    want = max(1, round(target_blocks / base_blocks))
    cap = max(1, max_kv_len // MIN_CHUNK_TOKENS)
    return max(1, min(want, cap))


def plan_split_kv(
    batch: int,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_kv_len: int,
    *,
    dtype: str = "float16",
    num_splits: int | None = None,
    num_sms: int = DEFAULT_NUM_SMS,
    page_size: int = 0,
) -> SplitKVPlan:
    """Cut a decode call into blocks. `num_splits=None` lets the plan choose; 1 means no split."""
    for name, value in (
        ("batch", batch), ("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim), ("num_sms", num_sms),
    ):
        if not isinstance(value, (int,)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(max_kv_len, int) or max_kv_len < 0:
        raise ValueError(f"max_kv_len must be an int >= 0, got {max_kv_len!r}")
    if num_qo_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_qo_heads must be a multiple of num_kv_heads, got {num_qo_heads} and {num_kv_heads}"
        )
    group_size = num_qo_heads // num_kv_heads
    heads_per_block = heads_per_block_for(group_size)
    head_groups = -(-group_size // heads_per_block)
    base_blocks = batch * num_kv_heads * head_groups
    if num_splits is None:
        num_splits = choose_num_splits(base_blocks, max_kv_len, num_sms)
    elif not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    # Equal chunks, whole tiles; the split count may shrink when rounding makes chunks cover more.
    chunk_size = _round_up(max(1, math.ceil(max(max_kv_len, 1) / num_splits)), TILE_TOKENS)
    num_splits = max(1, -(-max_kv_len // chunk_size))
    return SplitKVPlan(
        batch=batch, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        dtype=dtype, max_kv_len=max_kv_len, chunk_size=chunk_size, num_splits=num_splits,
        heads_per_block=heads_per_block, head_groups=head_groups, num_sms=num_sms,
        page_size=page_size,
    )
