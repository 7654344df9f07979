// Single-query attention over a KV cache, cut along its length into splits (Flash-Decoding).
//
// One thread block handles one split of one (sequence, KV head, head group): it streams each K/V
// row of its split from memory once and serves every query head of the group from that read.
// The rows are cut into tiles of TILE_TOKENS; with S splits, split s takes tiles s, s + S, s + 2S, ...
// so all the blocks of a sequence move through the cache together, one front of adjacent rows,
// instead of S fronts a chunk apart (measured on H100: 1-3% faster at batch 1, never slower).
// Inside a block, each warp takes its NUM_WARPS-th share of every tile; inside a warp, LANES_PER_ROW
// lanes share one row (16 bytes each), so a warp load covers ROWS_PER_LOAD rows and every lane
// keeps ROWS_PER_LANE rows of K and V in flight per tile. The online softmax runs in base 2 on
// float32 with log2(e) folded into the query scale.
//
// With one split per sequence the block writes the output directly. Otherwise it writes a float32
// partial (out, lse) and bumps the sequence's arrival counter; the last block to arrive merges the
// partials in split order, writes the output and resets the counter, so a call is one launch.
//
// The same kernel reads a paged cache (PAGED): row t of sequence b lives at slot t % page_size of
// page kv_indices[kv_indptr[b] + t / page_size]. The tensor-core kernel also reads windows (spans
// with arbitrary boundaries): each entry of kv_indices is a warp tile of 1 to 16 consecutive rows
// starting anywhere in the cache, read as whole rows like a page; the rows past a window's count
// are masked (instead of pages of one row, each looked up on its own). That reading is an
// instantiation of its own (WINDOWS), so neither loop carries the other's code.

#include "common.cuh"

namespace decode_attention {

constexpr int NUM_WARPS = 4;
constexpr int TILE_TOKENS = 64;   // the unit the splits interleave by (costmodel.split_kv.TILE_TOKENS)
// Grid: x runs over the splits, y over (sequence, KV head, head group), continued in z past the
// 65535 rows y can hold (blocks past the last row do nothing). Launching the KV heads of a split
// next to each other instead measured the same on H100.
__device__ __forceinline__ int split_index() { return blockIdx.x; }
__device__ __forceinline__ int seq_head_index() { return blockIdx.z * gridDim.y + blockIdx.y; }
__device__ __forceinline__ int grid_splits() { return gridDim.x; }
constexpr int NUM_THREADS = NUM_WARPS * 32;
// Tensor-core path: two resident blocks per SM at least (measured on H100: better than one block
// with more registers), except at head_dim 256, whose output accumulators alone take 128 registers
// and whose pipeline stages fill an SM's shared memory with one block. The CUDA-core path needs its
// registers for wide groups.
template <int HEAD_DIM>
constexpr int mma_min_blocks_per_sm() { return HEAD_DIM >= 256 ? 1 : 2; }

template <typename T, int HEAD_DIM, int GROUP>
struct SplitKVShape {
  static constexpr int VEC = VecTraits<T>::kElems;                         // elements per 16 bytes
  static constexpr int LANES_PER_ROW = (HEAD_DIM / VEC) < 32 ? (HEAD_DIM / VEC) : 32;
  static constexpr int VECS = HEAD_DIM / (VEC * LANES_PER_ROW);            // 16-byte loads per lane per row
  static constexpr int ROWS_PER_LOAD = 32 / LANES_PER_ROW;
  // Rows each lane holds per tile: 8 loads of K (and of V) in flight, fewer for wide groups so the
  // scores stay in registers.
  static constexpr int ROWS_PER_LANE = (GROUP >= 8 ? (HEAD_DIM >= 256 ? 2 : 4) : 8) / VECS;
  static constexpr int WARP_ROWS = ROWS_PER_LOAD * ROWS_PER_LANE;           // rows of one warp tile
  static constexpr int DIMS_PER_LANE = VEC * VECS;
  static_assert(HEAD_DIM % (VEC * LANES_PER_ROW) == 0, "head_dim must fill whole 16-byte lanes");
  static_assert(ROWS_PER_LANE >= 1, "tile too small");
};

// row / page_size and row % page_size: a shift and a mask for a power of two (every usual page
// size), a division otherwise. A division by a runtime value costs about 20 instructions, and the
// tensor-core loop needs six of each per tile (measured on H200: the paged kernel was issue-bound).
struct PageDiv {
  int size, shift = 0;
  bool pow2;
  __device__ explicit PageDiv(int s) : size(s), pow2(s > 0 && (s & (s - 1)) == 0) {
    while (pow2 && (1 << shift) < s) ++shift;
  }
  __device__ __forceinline__ int div(int x) const { return pow2 ? x >> shift : x / size; }
  __device__ __forceinline__ int mod(int x) const { return pow2 ? x & (size - 1) : x % size; }
};

// Offset (in elements) of row `row` of sequence `b`, KV head `kh`; -1 for a page index out of range.
template <bool PAGED>
__device__ __forceinline__ long long row_offset(int row, int b, int kh, int kv_len, int num_kv_heads,
                                                int head_dim, const int* kv_indptr,
                                                const int* kv_indices, int num_pages, const PageDiv& pdiv) {
  if constexpr (PAGED) {
    const int page = __ldg(kv_indices + __ldg(kv_indptr + b) + pdiv.div(row));
    if (page < 0 || page >= num_pages) return -1;
    const long long slot = static_cast<long long>(page) * pdiv.size + pdiv.mod(row);
    return (slot * num_kv_heads + kh) * head_dim;
  } else {
    const long long token = static_cast<long long>(b) * kv_len + row;
    return (token * num_kv_heads + kh) * head_dim;
  }
}


__device__ __forceinline__ int atomic_add_acq_rel(int* p, int v) {
  int old;
  asm volatile("atom.add.acq_rel.gpu.global.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

// States computed elsewhere that the block writing a row's output merges into it: `count` float32
// states per (sequence, query head) row, extra_out [count, batch, num_qo_heads, HEAD_DIM] and
// extra_lse [count, batch, num_qo_heads] (natural log). Hydragen's prefix chunks, written by the
// prefix pass before this kernel runs, so that the suffix's launch is also the merge's. count 0:
// none.
struct ExtraStates {
  const float* out = nullptr;
  const float* lse = nullptr;
  int count = 0;
};

// The first extra states of a thread's first (head, 4 dims) item in finish_block, loaded when a
// block that writes its output directly starts, so that their latency passes behind its rows
// (loaded at the end instead, they added one memory round trip to every block: 20 us over the 31
// waves of short blocks of 32/32 heads x 256 sequences x 128 suffix tokens). Up to
// prefetched_states<HEAD_DIM>() of them; more are loaded at the end. Head_dim 128 holds 8 (its two
// blocks an SM leave the registers: 40 more a thread); the others 2.
template <int HEAD_DIM>
__host__ __device__ constexpr int prefetched_states() { return HEAD_DIM == 128 ? 8 : 2; }
constexpr int PREFETCHED_STATES = 2;   // the kernels without states (their finish_block's default)
template <int N = PREFETCHED_STATES>
struct PrefetchedStates {
  float lse[N];
  float4 out[N];
  int count = 0;   // loaded here (0: none, all loaded at the end)
};

template <int HEAD_DIM>
__device__ __forceinline__ PrefetchedStates<prefetched_states<HEAD_DIM>()> prefetch_states(
    const ExtraStates& extra, int b, int head0, int heads_here, int splits_here, int batch, int num_qo_heads) {
  constexpr int N = prefetched_states<HEAD_DIM>();
  PrefetchedStates<N> p;
  const int t = threadIdx.x;
  if (splits_here != 1 || extra.count < 1 || extra.count > N || t >= heads_here * (HEAD_DIM / 4)) {
    return p;
  }
  const long long row = static_cast<long long>(b) * num_qo_heads + head0 + t / (HEAD_DIM / 4);
  const int d = (t % (HEAD_DIM / 4)) * 4;
  const long long stride = static_cast<long long>(batch) * num_qo_heads;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const bool here = i < extra.count;
    p.lse[i] = here ? __ldcg(extra.lse + i * stride + row) : neg_inf();
    p.out[i] = here ? __ldcg(reinterpret_cast<const float4*>(extra.out + (i * stride + row) * HEAD_DIM + d))
                    : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  p.count = extra.count;
  return p;
}

// The end of every block: merge the warps' states (in warp order), then either write the output
// (one split) or write a float32 partial and, in the last block to arrive, merge all the partials of
// this (sequence, KV head, head group) in split order; the extra states, if any, are merged last.
template <typename T, int HEAD_DIM, int GROUP, int PRE = PREFETCHED_STATES>
__device__ __forceinline__ void finish_block(const float (&smem_o)[NUM_WARPS][GROUP][HEAD_DIM],
                                             const float (&smem_m)[NUM_WARPS][GROUP],
                                             const float (&smem_l)[NUM_WARPS][GROUP],
                                             T* __restrict__ out, float* __restrict__ lse,
                                             float* __restrict__ partial_out,
                                             float* __restrict__ partial_lse, int* __restrict__ counters,
                                             int b, int split, int splits_here, int head0, int heads_here,
                                             int batch, int num_qo_heads, ExtraStates extra,
                                             const PrefetchedStates<PRE>& pre = PrefetchedStates<PRE>{}) {
  __shared__ int smem_is_last;

  // Merge the warps in warp order; each thread finishes 4 adjacent dims of one head at a time.
  const bool direct = splits_here == 1;
  const long long state_stride = static_cast<long long>(batch) * num_qo_heads;   // rows between states
  for (int t = threadIdx.x; t < heads_here * (HEAD_DIM / 4); t += NUM_THREADS) {
    const int g = t / (HEAD_DIM / 4);
    const int d = (t % (HEAD_DIM / 4)) * 4;
    // A warp whose running max is NaN saw a non-finite score (or a bad page): the head's result
    // is NaN (fmaxf alone would drop it).
    float m_tot = neg_inf();
    bool poisoned = false;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) {
      m_tot = fmaxf(m_tot, smem_m[w][g]);
      poisoned = poisoned || is_nan(smem_m[w][g]);
    }
    float l_tot = 0.0f;
    float4 o_tot = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) {
      const float a = rescale(smem_m[w][g], m_tot);
      const float4 o_w = *reinterpret_cast<const float4*>(&smem_o[w][g][d]);
      l_tot += smem_l[w][g] * a;
      o_tot.x = fmaf(o_w.x, a, o_tot.x);
      o_tot.y = fmaf(o_w.y, a, o_tot.y);
      o_tot.z = fmaf(o_w.z, a, o_tot.z);
      o_tot.w = fmaf(o_w.w, a, o_tot.w);
    }
    const float inv = l_tot > 0.0f ? 1.0f / l_tot : 0.0f;
    const float4 o_final =
        poisoned ? make_float4(quiet_nan(), quiet_nan(), quiet_nan(), quiet_nan())
                 : make_float4(finite_or_nan(o_tot.x * inv), finite_or_nan(o_tot.y * inv),
                               finite_or_nan(o_tot.z * inv), finite_or_nan(o_tot.w * inv));
    const float lse_final = poisoned ? quiet_nan() : l_tot > 0.0f ? (m_tot + log2f(l_tot)) * kLn2 : neg_inf();
    const int h = head0 + g;
    if (direct && extra.count > 0) {
      const long long row = static_cast<long long>(b) * num_qo_heads + h;
      // This block's state first, then the extra states.
      RunningMerge r;
      fold_states<1>(r, {lse_final}, {o_final});
      if (pre.count > 0 && t == threadIdx.x) {
        fold_states(r, pre.lse, pre.out);   // the states not loaded hold lse -inf: empty
      } else {
        merge_states_into(r, extra.out, extra.lse, extra.count, state_stride, row, d, HEAD_DIM);
      }
      write_merged<T>(r, out + row * HEAD_DIM + d, lse + row, d);
    } else if (direct) {
      T* o = out + static_cast<long long>(b * num_qo_heads + h) * HEAD_DIM + d;
      o[0] = from_float<T>(o_final.x);
      o[1] = from_float<T>(o_final.y);
      o[2] = from_float<T>(o_final.z);
      o[3] = from_float<T>(o_final.w);
      if (d == 0) lse[b * num_qo_heads + h] = lse_final;
    } else {
      const long long row = static_cast<long long>(split) * batch * num_qo_heads + b * num_qo_heads + h;
      *reinterpret_cast<float4*>(partial_out + row * HEAD_DIM + d) = o_final;
      if (d == 0) partial_lse[row] = lse_final;
    }
  }
  if (direct) return;

  // Arrive; the last block of this (sequence, KV head, head group) merges the partials. The block's
  // partial writes are ordered before the arrival by the barrier and thread 0's release; the
  // merging block's loads after the other blocks' partials by thread 0's acquire and the barrier
  // (acq_rel instead of __threadfence's sequentially consistent fence in every thread).
  __syncthreads();
  int* counter = counters + seq_head_index();
  if (threadIdx.x == 0) {
    const int arrived = atomic_add_acq_rel(counter, 1);
    smem_is_last = arrived == splits_here - 1;
  }
  __syncthreads();
  if (!smem_is_last) return;
  // Each thread merges 4 adjacent dims of one head over all splits (merge_states_into: 8 splits'
  // partials a load batch), then the extra states. (The stride is computed again here: reusing
  // state_stride changed the code of the decode kernels' merge.)
  const long long split_stride = static_cast<long long>(batch) * num_qo_heads;
  for (int t = threadIdx.x; t < heads_here * (HEAD_DIM / 4); t += NUM_THREADS) {
    const int g = t / (HEAD_DIM / 4);
    const int d = (t % (HEAD_DIM / 4)) * 4;
    const long long base = static_cast<long long>(b) * num_qo_heads + head0 + g;
    RunningMerge r;
    merge_states_into<8, false>(r, partial_out, partial_lse, splits_here, split_stride, base, d, HEAD_DIM);
    if (extra.count > 0) merge_states_into(r, extra.out, extra.lse, extra.count, split_stride, base, d, HEAD_DIM);
    write_merged<T>(r, out + base * HEAD_DIM + d, lse + base, d);
  }
  if (threadIdx.x == 0) *counter = 0;  // ready for the next call (and the next graph replay)
}

// What one block works on. Returns false when the block has nothing to do (a split beyond its
// sequence's length, or a sequence whose length is impossible, whose output it then poisons).
// Its rows: tiles first, first + step, ... (each TILE_TOKENS long) below end.
struct BlockWork {
  int split, b, kh, head0, heads_here, splits_here, first, step, end;
};

// WAIT: the block waits for the kernel before it (programmatic dependent launch) here, at its
// start; without it the caller waits later itself.
template <typename T, int HEAD_DIM, int GROUP, bool PAGED, bool WAIT = true>
__device__ __forceinline__ bool block_work(BlockWork& w, T* __restrict__ out, float* __restrict__ lse,
                                           const int* __restrict__ kv_lens,
                                           const int* __restrict__ kv_indptr,
                                           const int* __restrict__ kv_last_page_len, int batch,
                                           int kv_len, int page_size, int num_qo_heads,
                                           int num_kv_heads, int head_groups, int chunk_size) {
  if (seq_head_index() >= batch * num_kv_heads * head_groups) return false;   // the z tail
  // Launched dependent on the kernel before it (`pdl`), a block reads nothing before that kernel
  // has finished: q, the lengths, the page table and the cache may all be its outputs.
  if constexpr (WAIT) wait_for_previous_grid();
  const int split = split_index();
  const int hg = seq_head_index() % head_groups;
  const int kh = (seq_head_index() / head_groups) % num_kv_heads;
  const int b = seq_head_index() / (head_groups * num_kv_heads);
  const int group_size = num_qo_heads / num_kv_heads;
  const int head0 = kh * group_size + hg * GROUP;          // first query head of this block
  const int heads_here = min(GROUP, group_size - hg * GROUP);

  // This sequence's length; a length outside the cache poisons the output instead of reading past it.
  int len;
  bool bad_len = false;
  if constexpr (PAGED) {
    // kv_len holds the number of entries of kv_indices here: a sequence's pages must lie inside it.
    const int begin = kv_indptr[b], n = kv_indptr[b + 1] - begin;
    len = n > 0 ? (n - 1) * page_size + kv_last_page_len[b] : 0;
    bad_len = n < 0 || begin < 0 || begin + n > kv_len ||
              (n > 0 && (kv_last_page_len[b] < 1 || kv_last_page_len[b] > page_size));
  } else {
    len = kv_lens != nullptr ? kv_lens[b] : kv_len;
    bad_len = len < 0 || len > kv_len;
  }
  // A sequence longer than the plan's max_kv_len keeps the grid's splits, each taking more tiles.
  const int splits_here = bad_len ? 1 : min(grid_splits(), max(1, (len + chunk_size - 1) / chunk_size));
  if (split >= splits_here) return false;
  if (bad_len) {
    for (int t = threadIdx.x; t < heads_here * HEAD_DIM; t += NUM_THREADS) {
      out[static_cast<long long>(b * num_qo_heads + head0 + t / HEAD_DIM) * HEAD_DIM + t % HEAD_DIM] =
          from_float<T>(quiet_nan());
    }
    for (int g = threadIdx.x; g < heads_here; g += NUM_THREADS) {
      lse[b * num_qo_heads + head0 + g] = quiet_nan();
    }
    return false;
  }
  w = BlockWork{split, b, kh, head0, heads_here, splits_here, split * TILE_TOKENS,
                splits_here * TILE_TOKENS, len};
  return true;
}

template <typename T, int HEAD_DIM, int GROUP, bool PAGED>
__global__ void __launch_bounds__(NUM_THREADS)
split_kv_kernel(const T* __restrict__ q,                 // [batch, num_qo_heads, HEAD_DIM]
                const T* __restrict__ k,                 // [batch, kv_len, Hkv, D] or [pages, page_size, Hkv, D]
                const T* __restrict__ v,
                const int* __restrict__ kv_lens,         // [batch] or null (contiguous)
                const int* __restrict__ kv_indptr,       // [batch + 1] (paged)
                const int* __restrict__ kv_indices,      // [nnz_pages] (paged)
                const int* __restrict__ kv_last_page_len,  // [batch] (paged)
                T* __restrict__ out,                     // [batch, num_qo_heads, HEAD_DIM]
                float* __restrict__ lse,                 // [batch, num_qo_heads]
                float* __restrict__ partial_out,         // [num_splits, batch, num_qo_heads, HEAD_DIM]
                float* __restrict__ partial_lse,         // [num_splits, batch, num_qo_heads]
                int* __restrict__ counters,              // [batch * num_kv_heads * head_groups]
                int batch, int kv_len, int num_pages, int page_size, int num_qo_heads,
                int num_kv_heads, int head_groups, int chunk_size, float scale_log2, int windows,
                const float* __restrict__ extra_out,      // ExtraStates (count 0: none)
                const float* __restrict__ extra_lse, int extra_count, int late_states_blocks) {
  (void)windows;   // windows are read by the tensor-core kernel alone (the launcher sends 0 here)
  (void)late_states_blocks;   // states are merged by the tensor-core kernel alone
  using S = SplitKVShape<T, HEAD_DIM, GROUP>;
  constexpr int VEC = S::VEC;
  constexpr int LPR = S::LANES_PER_ROW;
  constexpr int VECS = S::VECS;
  constexpr int RPL = S::ROWS_PER_LOAD;
  constexpr int R = S::ROWS_PER_LANE;
  constexpr int DPL = S::DIMS_PER_LANE;

  __shared__ __align__(16) float smem_o[NUM_WARPS][GROUP][HEAD_DIM];
  __shared__ float smem_m[NUM_WARPS][GROUP];
  __shared__ float smem_l[NUM_WARPS][GROUP];

  BlockWork w;
  if (!block_work<T, HEAD_DIM, GROUP, PAGED>(w, out, lse, kv_lens, kv_indptr, kv_last_page_len, batch,
                                             kv_len, page_size, num_qo_heads, num_kv_heads,
                                             head_groups, chunk_size)) {
    return;
  }
  const int split = w.split, b = w.b, kh = w.kh, head0 = w.head0, heads_here = w.heads_here;
  const int splits_here = w.splits_here, end = w.end;
  (void)extra_out, (void)extra_lse, (void)extra_count;   // states: the tensor-core kernel's alone

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int row_in_load = lane / LPR;
  const int lane_col = lane % LPR;

  // Query heads of the group in registers, scaled so that scores come out in log2 units.
  float qf[GROUP][DPL];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
#pragma unroll
    for (int j = 0; j < VECS; ++j) {
      const int dim = (j * LPR + lane_col) * VEC;
      if (g < heads_here) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(
            q + static_cast<long long>(b * num_qo_heads + head0 + g) * HEAD_DIM + dim));
        to_float<T>(raw, &qf[g][j * VEC]);
#pragma unroll
        for (int e = 0; e < VEC; ++e) qf[g][j * VEC + e] *= scale_log2;
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) qf[g][j * VEC + e] = 0.0f;
      }
    }
  }

  float m[GROUP], l[GROUP], o[GROUP][DPL];
  bool nonfinite[GROUP];   // a NaN or infinite score of head g (its result is NaN)
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    nonfinite[g] = false;
    m[g] = neg_inf();
    l[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < DPL; ++e) o[g][e] = 0.0f;
  }

  // Software pipeline within each warp: V of this tile and K of the next tile are in flight while
  // the scores and the output of this tile are computed, so a warp never waits on both at once.
  // The block covers a TILE_TOKENS tile in steps of NUM_WARPS warp tiles, then jumps to its next tile.
  constexpr int BLOCK_ROWS = NUM_WARPS * S::WARP_ROWS;
  static_assert(TILE_TOKENS % BLOCK_ROWS == 0, "block steps must tile TILE_TOKENS");
  auto next_rows = [&](int rows) {
    return rows % TILE_TOKENS + BLOCK_ROWS < TILE_TOKENS ? rows + BLOCK_ROWS
                                                         : rows + BLOCK_ROWS + w.step - TILE_TOKENS;
  };
  uint4 kb[R][VECS], vb[R][VECS];
  long long off[R];   // element offsets of this tile's rows; -1 for a row past the sequence
  int tile = w.first + warp * S::WARP_ROWS;
  bool bad_page = false;
  const PageDiv pdiv(page_size);
  auto locate = [&](int first_row, long long (&offsets)[R]) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int row = first_row + i * RPL + row_in_load;
      offsets[i] = -1;
      if (row < end) {
        offsets[i] = row_offset<PAGED>(row, b, kh, kv_len, num_kv_heads, HEAD_DIM, kv_indptr,
                                       kv_indices, num_pages, pdiv);
        bad_page = bad_page || offsets[i] < 0;
      }
    }
  };
  auto load_rows = [&](const T* base, const long long (&offsets)[R], uint4 (&buf)[R][VECS]) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
      for (int j = 0; j < VECS; ++j) {
        buf[i][j] = offsets[i] >= 0 ? load_stream(base + offsets[i] + (j * LPR + lane_col) * VEC)
                                    : zero_vec();
      }
    }
  };
  if (tile < end) {
    locate(tile, off);
    load_rows(k, off, kb);
  }
  for (; tile < end; tile = next_rows(tile)) {
    load_rows(v, off, vb);
    bool valid[R];
#pragma unroll
    for (int i = 0; i < R; ++i) valid[i] = off[i] >= 0;

    // Partial dot products over this lane's dims, then summed across the lanes of a row.
    float s[GROUP][R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
      for (int g = 0; g < GROUP; ++g) s[g][i] = 0.0f;
#pragma unroll
      for (int j = 0; j < VECS; ++j) {
        float kf[VEC];
        to_float<T>(kb[i][j], kf);
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) s[g][i] = fmaf(qf[g][j * VEC + e], kf[e], s[g][i]);
        }
      }
    }
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
#pragma unroll
      for (int i = 0; i < R; ++i) {
#pragma unroll
        for (int offset = LPR / 2; offset >= 1; offset /= 2) {
          s[g][i] += __shfl_xor_sync(kFullMask, s[g][i], offset);
        }
        if (!valid[i]) {
          s[g][i] = neg_inf();
        } else if (!is_finite(s[g][i])) {
          nonfinite[g] = true;   // NaN or infinity in q or in this K row
        }
      }
    }
    // Scores are in registers: K's buffer is free for the next tile.
    if (next_rows(tile) < end) {
      locate(next_rows(tile), off);
      load_rows(k, off, kb);
    }
    // A page index out of range poisons the result rather than reading outside the cache.
    if (bad_page) {
#pragma unroll
      for (int g = 0; g < GROUP; ++g) s[g][0] = quiet_nan();
    }

    // Online softmax update; s becomes the probabilities.
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      float m_new = m[g];
#pragma unroll
      for (int i = 0; i < R; ++i) m_new = fmaxf(m_new, s[g][i]);
      const float alpha = rescale(m[g], m_new);
      float p_sum = 0.0f;
#pragma unroll
      for (int i = 0; i < R; ++i) {
        s[g][i] = m_new == neg_inf() ? 0.0f : exp2f(s[g][i] - m_new);
        p_sum += s[g][i];
      }
      l[g] = l[g] * alpha + p_sum;
      m[g] = m_new;
#pragma unroll
      for (int e = 0; e < DPL; ++e) o[g][e] *= alpha;
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
      for (int j = 0; j < VECS; ++j) {
        float vf[VEC];
        to_float<T>(vb[i][j], vf);
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) o[g][j * VEC + e] = fmaf(s[g][i], vf[e], o[g][j * VEC + e]);
        }
      }
    }
  }

  // Merge the row groups of the warp (lanes holding the same dims for different rows).
#pragma unroll
  for (int offset = LPR; offset < 32; offset *= 2) {
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      nonfinite[g] = __shfl_xor_sync(kFullMask, static_cast<int>(nonfinite[g]), offset) || nonfinite[g];
      const float m_other = __shfl_xor_sync(kFullMask, m[g], offset);
      const float l_other = __shfl_xor_sync(kFullMask, l[g], offset);
      const float m_new = fmaxf(m[g], m_other);
      const float a_self = rescale(m[g], m_new);
      const float a_other = rescale(m_other, m_new);
      l[g] = l[g] * a_self + l_other * a_other;
#pragma unroll
      for (int e = 0; e < DPL; ++e) {
        const float o_other = __shfl_xor_sync(kFullMask, o[g][e], offset);
        o[g][e] = o[g][e] * a_self + o_other * a_other;
      }
      m[g] = m_new;
    }
  }
  const bool warp_bad_page = __any_sync(kFullMask, bad_page);
  if (row_in_load == 0) {
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
#pragma unroll
      for (int j = 0; j < VECS; ++j) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) smem_o[warp][g][(j * LPR + lane_col) * VEC + e] = o[g][j * VEC + e];
      }
      if (lane == 0) {
        smem_m[warp][g] = nonfinite[g] || warp_bad_page ? quiet_nan() : m[g];
        smem_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();
  finish_block<T, HEAD_DIM, GROUP>(smem_o, smem_m, smem_l, out, lse, partial_out, partial_lse, counters,
                                   b, split, splits_here, head0, heads_here, batch, num_qo_heads,
                                   ExtraStates{});
}


// ---------------------------------------------------------------------------------------------
// Tensor-core form for float16 / bfloat16 (head_dim 64, 128 or 256): the same blocks, splits, warp
// tiles and epilogue, but each warp computes the scores of its 16 rows for all heads of the group
// with mma.sync (query heads as the 16 rows of A, zero-padded) and the output likewise, so the
// arithmetic per row costs a few instructions instead of a few hundred. K and V stream through a
// cp.async pipeline in shared memory, STAGES tiles deep per warp. From a contiguous cache each
// warp copy instruction takes whole rows and drops every 16-byte piece into the slot of the lane
// that reads it (a warp barrier after the wait); so does a paged cache whose pages hold whole warp
// tiles (pages of 16 rows and up); from smaller pages each lane copies exactly the pieces it later
// reads as operands. The head_dim index is permuted
// consistently in Q and K (a dot product does not care about order), and in V and the output (each
// output element goes back to its own dim), which makes every load 16 contiguous bytes.

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], unsigned a0, unsigned a2, unsigned b0,
                                          unsigned b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], unsigned a0, unsigned a2,
                                                  unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], unsigned a0, unsigned a2,
                                                         unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

// The same product keeping only rows 0..7 of the accumulator (the query heads; rows 8..15 of A are
// zero padding): D's rows 8..15 go to registers that die at once and C's are zero, so the caller
// holds 2 accumulators per n-tile instead of 4 (head_dim 256: 64 registers fewer, no spills).
#define DECODE_ATTENTION_MMA_TOP(CTYPE, PTXTYPE)                                                     \
  template <>                                                                                      \
  __device__ __forceinline__ void mma_16816_top<CTYPE>(float& d0, float& d1, unsigned a0,          \
                                                       unsigned a2, unsigned b0, unsigned b1) {    \
    float unused2, unused3;                                                                        \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTXTYPE "." PTXTYPE                      \
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%10,%10};\n"                  \
                 : "+f"(d0), "+f"(d1), "=f"(unused2), "=f"(unused3)                                \
                 : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(0.0f));               \
  }
template <typename T>
__device__ __forceinline__ void mma_16816_top(float& d0, float& d1, unsigned a0, unsigned a2,
                                              unsigned b0, unsigned b1);
DECODE_ATTENTION_MMA_TOP(__half, "f16")
DECODE_ATTENTION_MMA_TOP(__nv_bfloat16, "bf16")
#undef DECODE_ATTENTION_MMA_TOP

__device__ __forceinline__ unsigned word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Through L1 (.ca), so the lanes that share a 32-byte sector make one request: with .cg each
// 16-byte piece reached L2 on its own (measured on H100: 50% L2 hit rate, twice the L2 traffic,
// 25% slower; with whole-row copies .cg still measured 1 x 8 x 128k in 265 against 189 us). A row
// past the sequence is zero-filled without a read.
// No L2 hints: an L2::256B prefetch hint measured 0.5-1% faster on H100 and 7-10% slower on H200
// (64 x 8 x 16k: 1052 against 939 us). An L2 evict_first policy looks 8% faster at 1x8x32k on H100
// after a benchmark's write flush only because it leaves the flush's dirty lines in L2 (their
// write-back falls outside the timed call), and it is 5% slower at 128k.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0));
}
// The same copy to shared address `smem_base + OFFSET` bytes, the offset an immediate of the
// instruction: at head_dim 256 a warp tile takes 32 copies per lane, and with computed addresses
// the compiler kept each stage's 32 destinations in registers (255 registers and spills).
template <int OFFSET>
__device__ __forceinline__ void cp_async_16_at(unsigned smem_base, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0+%3], [%1], 16, %2;\n" ::"r"(smem_base), "l"(gmem),
               "r"(valid ? 16 : 0), "n"(OFFSET));
}

// 16-byte slots one lane fills per tile: K rows tile + n*8 + gid (n = 0, 1), CHUNKS each, then V
// rows tile + {0, 1, 8, 9} + 2*tig, VCHUNKS each.
template <int HEAD_DIM>
struct MmaSlots {
  static constexpr int CHUNKS = HEAD_DIM / 32;
  static constexpr int VCHUNKS = HEAD_DIM / 64;
  static constexpr int K = 2 * CHUNKS;
  static constexpr int TOTAL = K + 4 * VCHUNKS;
};

// Where a lane's whole-row copy i of a warp tile lands in stage `stage`: K row r's piece pc is read
// by lane (r % 8) * 4 + pc % 4 from slot (r / 8) * CHUNKS + pc / 4; V row r's piece pc by lane
// (pc % 8) * 4 + (r % 8) / 2 from slot K + (r % 2 + (r / 8) * 2) * VCHUNKS + pc / 8 (the operand
// layouts of mma_consume_tile), r = i * ROWS_PER_COPY + copy_row.
template <int HEAD_DIM>
struct WholeRowSlots {
  static constexpr int ROWS_PER_COPY = 32 / (HEAD_DIM / 8);
  uint4* warp_slots;   // this warp's slots of stage 0
  int copy_row, copy_piece;
  __device__ __forceinline__ uint4* k(int stage, int i) const {
    const int r = i * ROWS_PER_COPY + copy_row;
    return warp_slots + stage * (NUM_WARPS * MmaSlots<HEAD_DIM>::TOTAL * 32) +
           ((r / 8) * MmaSlots<HEAD_DIM>::CHUNKS + copy_piece / 4) * 32 + (r % 8) * 4 + copy_piece % 4;
  }
  __device__ __forceinline__ uint4* v(int stage, int i) const {
    const int r = i * ROWS_PER_COPY + copy_row;
    return warp_slots + stage * (NUM_WARPS * MmaSlots<HEAD_DIM>::TOTAL * 32) +
           (MmaSlots<HEAD_DIM>::K + (r % 2 + (r / 8) * 2) * MmaSlots<HEAD_DIM>::VCHUNKS + copy_piece / 8) * 32 +
           (copy_piece % 8) * 4 + (r % 8) / 2;
  }
};

// One warp tile of the tensor-core kernel, its K and V already in this lane's slots of one stage
// (`slots`: slot i of this lane at slots[i * 32]): the scores of its `tile_rows` rows for the
// group's heads, the online softmax update of (m, l) and the output accumulators o, and the
// non-finite flag.
template <typename T, int HEAD_DIM, int ACC, typename QFragment>
__device__ __forceinline__ void mma_consume_tile(const uint4* slots, QFragment q_fragment, int tile_rows,
                                                 float scale_log2, int tig,
                                                 float (&o)[HEAD_DIM / 8][ACC], float& m, float& l,
                                                 bool& nonfinite) {
  constexpr int CHUNKS = MmaSlots<HEAD_DIM>::CHUNKS;
  constexpr int VCHUNKS = MmaSlots<HEAD_DIM>::VCHUNKS;
  constexpr int DIM_TILES = HEAD_DIM / 8;
  auto slot = [&](int i) -> const uint4* { return slots + i * 32; };
  // Scores: s[n][0..1] = head gid, rows tile + n*8 + 2*tig + {0, 1}; s[n][2..3] are padding rows.
  float s[2][4];
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const uint4 kc = *slot(n * CHUNKS + c);
      const uint4 qc = q_fragment(c);
      mma_16816<T>(s[n], qc.x, qc.y, kc.x, kc.y);
      mma_16816<T>(s[n], qc.z, qc.w, kc.z, kc.w);
    }
  }

  float m_new = m;
#pragma unroll
  for (int n = 0; n < 2; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (n * 8 + 2 * tig + e < tile_rows) {
        nonfinite = nonfinite || !is_finite(s[n][e]);   // NaN or infinity in q or this K row
        s[n][e] *= scale_log2;
      } else {
        s[n][e] = neg_inf();
      }
      m_new = fmaxf(m_new, s[n][e]);
    }
  }
  m_new = fmaxf(m_new, __shfl_xor_sync(kFullMask, m_new, 1));
  m_new = fmaxf(m_new, __shfl_xor_sync(kFullMask, m_new, 2));
  const float alpha = rescale(m, m_new);
  m = m_new;
  float p[2][2];
#pragma unroll
  for (int n = 0; n < 2; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      p[n][e] = m_new == neg_inf() ? 0.0f : exp2f(s[n][e] - m_new);
      l = l * (n == 0 && e == 0 ? alpha : 1.0f) + p[n][e];
    }
  }
  // P as the A fragment: k index = row within the tile (n-tile 0: k 0..7, n-tile 1: k 8..15).
  const unsigned pa0 = pack2<T>(p[0][0], p[0][1]);
  const unsigned pa2 = pack2<T>(p[1][0], p[1][1]);
  // Once the running max settles, alpha is 1 in every lane: skip the rescale (exact).
  if (__any_sync(kFullMask, alpha != 1.0f)) {
#pragma unroll
    for (int j = 0; j < DIM_TILES; ++j) {
      o[j][0] *= alpha;
      o[j][1] *= alpha;
    }
  }
  // V, 64 dims at a time (4 rows x 16 bytes per lane: few registers live at head_dim 256).
#pragma unroll
  for (int c = 0; c < VCHUNKS; ++c) {
    uint4 vb[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) vb[r] = *slot(MmaSlots<HEAD_DIM>::K + r * VCHUNKS + c);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      // B fragment for dim n-tile j = c*8 + e: column gid is dim c*64 + gid*8 + e; rows are the
      // tile's rows 2*tig + {0,1} (b0) and 8 + 2*tig + {0,1} (b1): pair the halves of two V rows.
      const unsigned sel = (e & 1) ? 0x7632u : 0x5410u;
      const unsigned b0 = __byte_perm(word(vb[0], e >> 1), word(vb[1], e >> 1), sel);
      const unsigned b1 = __byte_perm(word(vb[2], e >> 1), word(vb[3], e >> 1), sel);
      if constexpr (ACC == 2) {
        mma_16816_top<T>(o[c * 8 + e][0], o[c * 8 + e][1], pa0, pa2, b0, b1);
      } else {
        mma_16816<T>(o[c * 8 + e], pa0, pa2, b0, b1);
      }
    }
  }
}

// A warp's state at the end of its rows, stored for finish_block: l summed over the 4 lanes of
// each group; o[j][e] of head gid at dim (j/8)*64 + (2*tig + e)*8 + j%8. A non-finite score of head
// gid in any lane of its group, or (PAGES) a page index outside the cache anywhere in the warp's
// rows, makes the head's max NaN, which the merge in finish_block carries through. (Every lane
// takes part in every shuffle: no short-circuit between them.)
template <int HEAD_DIM, int GROUP, int ACC, bool PAGES>
__device__ __forceinline__ void store_warp_state(float (&smem_o)[NUM_WARPS][GROUP][HEAD_DIM],
                                                 float (&smem_m)[NUM_WARPS][GROUP],
                                                 float (&smem_l)[NUM_WARPS][GROUP],
                                                 const float (&o)[HEAD_DIM / 8][ACC], float m, float l,
                                                 bool nonfinite, bool bad_page, int warp, int gid, int tig) {
  l += __shfl_xor_sync(kFullMask, l, 1);
  l += __shfl_xor_sync(kFullMask, l, 2);
  bool warp_bad_page = false;
  if constexpr (PAGES) warp_bad_page = __any_sync(kFullMask, bad_page);
  int group_nonfinite = static_cast<int>(nonfinite);
  group_nonfinite |= __shfl_xor_sync(kFullMask, group_nonfinite, 1);
  group_nonfinite |= __shfl_xor_sync(kFullMask, group_nonfinite, 2);
  const bool poisoned = warp_bad_page || group_nonfinite != 0;
  if (poisoned) m = quiet_nan();
  if (gid < GROUP) {
#pragma unroll
    for (int j = 0; j < HEAD_DIM / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) smem_o[warp][gid][(j / 8) * 64 + (2 * tig + e) * 8 + j % 8] = o[j][e];
    }
    if (tig == 0) {
      smem_m[warp][gid] = m;
      smem_l[warp][gid] = l;
    }
  }
}

// STATES: the launch merges extra states into its outputs (ExtraStates; Hydragen's suffixes). Without
// it the kernel ignores extra_out, extra_lse and extra_count and carries no code for them (holding
// prefetched states through the loop measured 4-7% slower on few-block decode rows).
// late_states_blocks: with STATES, launched dependent on the kernel that writes the states (its
// blocks having let this launch start: `let_dependents_start`), blocks of linear index below it
// (the first wave) attend to their tokens while that kernel still runs and wait for it only
// before they read the states, at their end; the later blocks wait at their start and prefetch
// their states. Only for a launch whose q, cache and tables that kernel does not write. Without
// STATES, the blocks below it never wait for the kernel before (they read none of its outputs) and
// the others wait at their start: with all but the last block below it, the launch runs beside
// that kernel and still ends after it (Hydragen's suffixes beside a prefix pass of fewer blocks
// than SMs).
template <typename T, int HEAD_DIM, int GROUP, bool PAGED, int STAGES, bool STATES = false, bool WINDOWS = false>
__global__ void __launch_bounds__(NUM_THREADS, mma_min_blocks_per_sm<HEAD_DIM>())
split_kv_mma_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                    const int* __restrict__ kv_lens, const int* __restrict__ kv_indptr,
                    const int* __restrict__ kv_indices, const int* __restrict__ kv_last_page_len,
                    T* __restrict__ out, float* __restrict__ lse, float* __restrict__ partial_out,
                    float* __restrict__ partial_lse, int* __restrict__ counters, int batch, int kv_len,
                    int num_pages, int page_size, int num_qo_heads, int num_kv_heads, int head_groups,
                    int chunk_size, float scale_log2, int windows, const float* __restrict__ extra_out,
                    const float* __restrict__ extra_lse, int extra_count, int late_states_blocks) {
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256,
                "tensor-core path: head_dim 64, 128 or 256");
  static_assert(GROUP <= 8, "at most 8 query heads per block (rows 8..15 of A stay zero)");
  static_assert(STAGES >= 2, "at least double buffering");
  static_assert(PAGED || !WINDOWS, "windows are read as pages of WARP_ROWS");
  (void)windows;   // the instantiation says whether kv_indices holds windows (WINDOWS)
  constexpr int WARP_ROWS = 16;             // rows per warp tile: two n-tiles of 8 for the scores
  constexpr int CHUNKS = MmaSlots<HEAD_DIM>::CHUNKS;    // 16-byte loads per K row per lane
  constexpr int VCHUNKS = MmaSlots<HEAD_DIM>::VCHUNKS;  // 16-byte loads per V row per lane
  constexpr int SLOTS = MmaSlots<HEAD_DIM>::TOTAL;
  constexpr int DIM_TILES = HEAD_DIM / 8;   // n-tiles of the output

  // Per warp, STAGES tiles in flight through cp.async; slot-major so a warp's 16-byte accesses are
  // contiguous (no bank conflicts). After the loop the same memory holds the epilogue's state.
  extern __shared__ uint4 smem_stage[];     // [STAGES][NUM_WARPS][SLOTS][32]
  __shared__ float smem_m[NUM_WARPS][GROUP];
  __shared__ float smem_l[NUM_WARPS][GROUP];
  __shared__ int smem_tile_rows[NUM_WARPS][STAGES];   // windows: rows of the tile in each stage

  BlockWork w;
  // STATES: blocks of the first wave wait at their end (late_states_blocks), the others here.
  // Without STATES, blocks below late_states_blocks read nothing the kernel before writes and never
  // wait for it; the others wait here (a launch beside Hydragen's prefix pass: all but its last block).
  const bool late_states =
      static_cast<long long>(blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x < late_states_blocks;
  if (!late_states) wait_for_previous_grid();
  if (!block_work<T, HEAD_DIM, GROUP, PAGED, false>(w, out, lse, kv_lens, kv_indptr, kv_last_page_len, batch,
                                                    kv_len, page_size, num_qo_heads, num_kv_heads,
                                                    head_groups, chunk_size)) {
    return;
  }
  const ExtraStates extra = STATES ? ExtraStates{extra_out, extra_lse, extra_count} : ExtraStates{};
  PrefetchedStates<STATES ? prefetched_states<HEAD_DIM>() : PREFETCHED_STATES> pre;
  if constexpr (STATES) {
    if (!late_states) {
      pre = prefetch_states<HEAD_DIM>(extra, w.b, w.head0, w.heads_here, w.splits_here, batch, num_qo_heads);
    }
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int gid = lane >> 2;   // row of A / column of B and C
  const int tig = lane & 3;    // thread in group

  // Q as A fragments: head `gid`, dims c*32 + tig*8 + [0, 8) for chunk c (the K permutation).
  // At head_dim 256 the fragments wait in shared memory (32 registers fewer: no spills); each warp
  // stores the same values, so no barrier is needed.
  constexpr bool Q_IN_SMEM = HEAD_DIM >= 256;
  __shared__ uint4 smem_q[Q_IN_SMEM ? NUM_WARPS : 1][Q_IN_SMEM ? CHUNKS : 1][32];
  uint4 qa[Q_IN_SMEM ? 1 : CHUNKS];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const uint4 qc = gid < w.heads_here
                         ? __ldg(reinterpret_cast<const uint4*>(
                               q + static_cast<long long>(w.b * num_qo_heads + w.head0 + gid) * HEAD_DIM +
                               c * 32 + tig * 8))
                         : zero_vec();
    if constexpr (Q_IN_SMEM) {
      smem_q[warp][c][lane] = qc;
    } else {
      qa[c] = qc;
    }
  }
  auto q_fragment = [&](int c) -> uint4 {
    if constexpr (Q_IN_SMEM) {
      return smem_q[warp][c][lane];   // written by this lane itself
    } else {
      return qa[c];
    }
  };

  // Output accumulators: o[j][0..1] are head gid's (rows 8..15 of the product are padding, kept in
  // registers only where that costs no spills: below head_dim 256).
  constexpr int ACC = HEAD_DIM >= 256 ? 2 : 4;
  float o[DIM_TILES][ACC];
#pragma unroll
  for (int j = 0; j < DIM_TILES; ++j) {
#pragma unroll
    for (int e = 0; e < ACC; ++e) o[j][e] = 0.0f;
  }
  float m = neg_inf();   // running max of head gid (same in the 4 lanes of a group)
  bool nonfinite = false;   // this lane saw a NaN or infinite score of head gid
  float l = 0.0f;        // this lane's share of the running sum

  static_assert(NUM_WARPS * WARP_ROWS == TILE_TOKENS, "one block step is one tile");
  const int stride = w.step;
  bool bad_page = false;
  uint4* const my_slots = smem_stage + warp * SLOTS * 32 + lane;   // this lane's slots of stage 0
  auto slot = [&](int stage, int i) -> uint4* {
    return my_slots + stage * (NUM_WARPS * SLOTS * 32) + i * 32;
  };
  // The six rows a lane copies per tile: K rows tile + n*8 + gid (n = 0, 1), V rows
  // tile + {0, 1, 8, 9} + 2*tig.
  auto lane_row = [&](int tile, int i) -> int {
    return i < 2 ? tile + i * 8 + gid : tile + ((i - 2) & 1) + ((i - 2) >> 1) * 8 + 2 * tig;
  };
  // Paged caches: the page of each of those rows, read one tile ahead of its copy so the lookup's
  // latency hides behind a tile of work instead of stalling the copies.
  int pages[6];
  const int page_base = PAGED ? __ldg(kv_indptr + w.b) : 0;
  const int first_tile = w.first + warp * WARP_ROWS;   // this warp's first row
  const PageDiv pdiv(page_size);
  const long long page_elems = static_cast<long long>(page_size) * num_kv_heads * HEAD_DIM;
  const int row_elems = num_kv_heads * HEAD_DIM;
  // Pages of a power-of-two size of at least WARP_ROWS rows hold whole warp tiles (a warp tile
  // starts at a multiple of WARP_ROWS): one lookup per tile instead of six, and each of the lane's
  // rows at a fixed distance from the tile's first row (the usual page sizes, 16 and up). Measured
  // on H200 with pages of 16, two A/B rounds: 1 x 8 x 128k 146.4 -> 139.3 us, 1 x 32 x 32k 145.0 ->
  // 138.2, 8 x 8 x 32k 263.1 -> 259.9, 16 x 32 x 8k 503.5 -> 500.7.
  // Windows (WINDOWS, page_size WARP_ROWS): entry (start << WINDOW_LEN_BITS) | (rows - 1) is a
  // warp tile of 1..WARP_ROWS rows from `start` of the cache seen as num_pages rows, read whole.
  constexpr int WINDOW_LEN_BITS = 4;
  static_assert((1 << WINDOW_LEN_BITS) == WARP_ROWS, "a window's row count fills the low bits");
  const bool whole_tiles = PAGED && (WINDOWS || (pdiv.pow2 && page_size >= WARP_ROWS));
  // The page indices come ahead of their use through a ring of four registers per lane, each
  // loaded three registers before it is read, so a lookup is a shuffle. With whole tiles a
  // register holds the pages of 32 of the warp's tiles (lane j: the tile of ordinal base + j); with
  // smaller pages, of two tiles (lane j: row j % 16 of the tile of ordinal base + j / 16). Looked up
  // one tile ahead instead, each lookup's latency held up the next tile's copies: 8 x 8 x 24576
  // tokens with pages of 16 ran at 216 us against 188 for the same tokens contiguous (H200, two
  // splits); with the ring, 201 (2 stages) and 196 (3).
  const int ring_tiles = whole_tiles ? 32 : 2;   // tiles per ring register
  int ring[4] = {0, 0, 0, 0};
  int ring_base = 0;       // ordinal of the first tile ring[0] holds
  int look_n = 0;          // ordinal of the next tile looked up
  auto ring_load = [&](int base) -> int {
    const int ordinal = whole_tiles ? base + lane : base + lane / 16;
    const long long row = first_tile + static_cast<long long>(ordinal) * stride + (whole_tiles ? 0 : lane % 16);
    return row < w.end ? __ldg(kv_indices + page_base + pdiv.div(static_cast<int>(row))) : 0;
  };
  if constexpr (PAGED) {
#pragma unroll
    for (int r = 0; r < 4; ++r) ring[r] = ring_load(r * ring_tiles);
  }
  auto look_up = [&](int tile) {
    if constexpr (PAGED) {
      if (look_n == ring_base + ring_tiles) {   // warp-uniform: the next register's turn
        ring_base += ring_tiles;
        ring[0] = ring[1];
        ring[1] = ring[2];
        ring[2] = ring[3];
        ring[3] = ring_load(ring_base + 3 * ring_tiles);
      }
      const int at = look_n - ring_base;
      ++look_n;
      if (whole_tiles) {
        pages[0] = __shfl_sync(kFullMask, ring[0], at);
        return;
      }
#pragma unroll
      for (int i = 0; i < 6; ++i) pages[i] = __shfl_sync(kFullMask, ring[0], at * 16 + lane_row(tile, i) - tile);
    }
  };
  // Pages smaller than a warp tile (each lane copies its own operand rows): the offset of the
  // lane's row i of a tile, or -1 past the end or on a page out of range (which poisons the output).
  auto offset_of = [&](int tile, int i) -> long long {
    const int row = lane_row(tile, i);
    if (row >= w.end) return -1;
    if (pages[i] < 0 || pages[i] >= num_pages) {
      bad_page = true;
      return -1;
    }
    return pages[i] * page_elems + static_cast<long long>(pdiv.mod(row)) * row_elems + w.kh * HEAD_DIM;
  };
  // Contiguous caches, and pages that hold whole warp tiles: each warp copy instruction takes
  // whole rows (ROWS_PER_COPY rows of PIECES 16-byte pieces: full 128-byte lines), and each piece
  // lands in the slot of the lane that reads it as an operand (measured on H100 with read-only
  // kernels: copying each lane's own operand pieces, half lines of 8 rows per instruction, read
  // 1 x 8 x 128k in 198 against 188 us). A lane's pieces sit at a constant distance from one
  // pointer per cache (contiguous: advancing by a constant per tile; paged: from the tile's page).
  constexpr int PIECES = HEAD_DIM / 8;           // 16-byte pieces per row
  constexpr int ROWS_PER_COPY = 32 / PIECES;
  constexpr int COPIES = WARP_ROWS / ROWS_PER_COPY;   // of K (and of V) per lane per tile
  static_assert(COPIES == MmaSlots<HEAD_DIM>::K, "one K slot per copy");
  const int copy_row = lane / PIECES, copy_piece = lane % PIECES;
  const int first = first_tile;
  const long long tile_step = static_cast<long long>(stride) * row_elems;
  const long long copy_step = static_cast<long long>(ROWS_PER_COPY) * row_elems;
  const T* kp = k;
  const T* vp = v;
  if constexpr (!PAGED) {
    const long long at = (static_cast<long long>(w.b) * kv_len + first + copy_row) * row_elems +
                         w.kh * HEAD_DIM + copy_piece * 8;
    kp = k + at;
    vp = v + at;
  }
  // Where copy i of this lane lands (WholeRowSlots: the operand layouts below).
  const WholeRowSlots<HEAD_DIM> slots_of{smem_stage + warp * SLOTS * 32, copy_row, copy_piece};
  auto k_dst = [&](int stage, int i) -> uint4* { return slots_of.k(stage, i); };
  auto v_dst = [&](int stage, int i) -> uint4* { return slots_of.v(stage, i); };
  // The whole-row copies of the warp tile at `tile`, this lane's first K and V pieces at kr and vr.
  // Head_dim 256 (one row per copy instruction, copy_row 0): the destinations as this lane's base
  // plus immediates, the sources by stepping one row at a time.
  const unsigned lane_k_smem = static_cast<unsigned>(__cvta_generic_to_shared(k_dst(0, 0)));
  const unsigned lane_v_smem = static_cast<unsigned>(__cvta_generic_to_shared(v_dst(0, 0)));
  auto copy_rows = [&](int stage, const T* kr, const T* vr, bool ok, int tile_rows) {
    if constexpr (ROWS_PER_COPY == 1) {
      const unsigned stage_bytes = stage * (NUM_WARPS * SLOTS * 32 * 16);
      static_for<COPIES>([&](auto ic) {
        constexpr int i = decltype(ic)::value;
        constexpr int K_OFFSET = ((i / 8) * CHUNKS * 32 + (i % 8) * 4) * 16;
        constexpr int V_OFFSET = (((i % 2) + (i / 8) * 2) * VCHUNKS * 32 + (i % 8) / 2) * 16;
        const bool valid = ok && i < tile_rows;
        cp_async_16_at<K_OFFSET>(lane_k_smem + stage_bytes, valid ? kr : k, valid);
        cp_async_16_at<V_OFFSET>(lane_v_smem + stage_bytes, valid ? vr : v, valid);
        kr += copy_step;
        vr += copy_step;
      });
    } else {
#pragma unroll
      for (int i = 0; i < COPIES; ++i) {
        const bool valid = ok && i * ROWS_PER_COPY + copy_row < tile_rows;
        cp_async_16(k_dst(stage, i), valid ? kr + i * copy_step : k, valid);
        cp_async_16(v_dst(stage, i), valid ? vr + i * copy_step : v, valid);
      }
    }
  };
  auto issue = [&](int tile, int stage) {
    if constexpr (PAGED) {
      if constexpr (WINDOWS) {
        if (tile < w.end) {
          // A window: rows start .. start + rows - 1 of the cache seen as rows (num_pages of them).
          const unsigned entry = static_cast<unsigned>(pages[0]);
          const long long start = entry >> WINDOW_LEN_BITS;
          const int rows = static_cast<int>(entry & (WARP_ROWS - 1)) + 1;
          const bool window_ok = start + rows <= num_pages;
          bad_page = bad_page || !window_ok;
          const long long at = window_ok ? (start + copy_row) * row_elems + w.kh * HEAD_DIM + copy_piece * 8 : 0;
          if (lane == 0) smem_tile_rows[warp][stage] = rows;
          copy_rows(stage, k + at, v + at, window_ok, rows);
        }
      } else if (tile < w.end && whole_tiles) {
        // The warp tile lies in one page: whole rows, as from a contiguous cache.
        const int page = pages[0];
        const bool page_ok = page >= 0 && page < num_pages;
        bad_page = bad_page || !page_ok;
        const long long at = page_ok ? page * page_elems +
                                           static_cast<long long>(pdiv.mod(tile) + copy_row) * row_elems +
                                           w.kh * HEAD_DIM + copy_piece * 8
                                     : 0;
        copy_rows(stage, k + at, v + at, page_ok, w.end - tile);
      } else if (tile < w.end) {
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const long long off = offset_of(tile, n);
          const bool valid = off >= 0;
          const T* src = valid ? k + off + tig * 8 : k;
#pragma unroll
          for (int c = 0; c < CHUNKS; ++c) cp_async_16(slot(stage, n * CHUNKS + c), src + c * 32, valid);
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const long long off = offset_of(tile, 2 + r);
          const bool valid = off >= 0;
          const T* src = valid ? v + off + gid * 8 : v;
#pragma unroll
          for (int c = 0; c < VCHUNKS; ++c) {
            cp_async_16(slot(stage, MmaSlots<HEAD_DIM>::K + r * VCHUNKS + c), src + c * 64, valid);
          }
        }
      }
    } else {
      if (tile < w.end) copy_rows(stage, kp, vp, true, w.end - tile);
      kp += tile_step;
      vp += tile_step;
    }
    cp_async_commit();  // one group per tile, empty past the end, so the counting stays uniform
  };

#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    look_up(first + st * stride);
    issue(first + st * stride, st);
  }
  look_up(first + (STAGES - 1) * stride);
  int stage = 0;
  for (int tile = first; tile < w.end; tile += stride) {
    // The stage read in the previous iteration is free again (its values were consumed by every
    // lane of the warp: with whole-row copies, lanes fill each other's slots).
    __syncwarp();
    issue(tile + (STAGES - 1) * stride, (stage + STAGES - 1) % STAGES);
    look_up(tile + STAGES * stride);
    cp_async_wait<STAGES - 1>();   // this lane's copies of this tile have landed
    __syncwarp();   // and every lane's

    // Rows of this tile that hold tokens: a window's own count, else up to the sequence's end.
    const int tile_rows = WINDOWS ? smem_tile_rows[warp][stage] : w.end - tile;
    mma_consume_tile<T, HEAD_DIM, ACC>(my_slots + stage * (NUM_WARPS * SLOTS * 32), q_fragment, tile_rows,
                                       scale_log2, tig, o, m, l, nonfinite);
    stage = (stage + 1) % STAGES;
  }
  cp_async_wait<0>();
  __syncthreads();   // every warp is done with its stages: the memory now holds the epilogue state
  auto& smem_o = *reinterpret_cast<float (*)[NUM_WARPS][GROUP][HEAD_DIM]>(smem_stage);

  store_warp_state<HEAD_DIM, GROUP, ACC, PAGED>(smem_o, smem_m, smem_l, o, m, l, nonfinite, bad_page, warp, gid,
                                                tig);
  if constexpr (STATES) {
    if (late_states) wait_for_previous_grid();   // the states are now written
  }
  __syncthreads();
  finish_block<T, HEAD_DIM, GROUP, STATES ? prefetched_states<HEAD_DIM>() : PREFETCHED_STATES>(
      smem_o, smem_m, smem_l, out, lse, partial_out, partial_lse, counters, w.b, w.split, w.splits_here, w.head0,
      w.heads_here, batch, num_qo_heads, extra, pre);
}

// ---------------------------------------------------------------------------------------------
// Persistent form of the tensor-core kernel, for contiguous caches whose sequences all hold
// kv_len tokens and plans of one split (many short sequences and heads: more blocks than the SMs
// hold at once). The grid holds at most the resident blocks; block i takes the (sequence, KV head,
// head group) items i, i + G, i + 2G, ... (G blocks in the grid: equal items, so a static share
// is balanced). Each warp's copies run STAGES - 1 tiles ahead through the end of one item into
// the next, so the pipeline never drains between items: one block per item instead left each
// block's start (its first copies' latency) and end (the merge of its warps) without reads in
// flight, about a tenth of the time of an item of 1000 tokens. The epilogue's state goes to the
// stage the warps read last (the others already hold the next item's rows); shared memory of its
// own would raise the SM's shared-memory carve-out and shrink the L1 the copies pass through
// (measured: 8-14% slower).
// TAKE: items past the first come from a counter (counters[0], zero before the launch and left at
// zero after it: the block that makes the launch's last take resets it; the launch beside a kernel.
// Otherwise block i takes items i, i + G, ...: with the ring below that form measured 2-3% slower
// at 64 x 16/16 heads x 64, 1000 tokens): a block
// takes its next item when it starts an item and learns it at that item's end, a ring of STAGES + 1
// items in shared memory holding those its copies reach ahead. Blocks that start late (the launch
// beside Hydragen's prefix pass, whose blocks hold some SMs for a while) then take fewer items
// instead of holding up the launch's end with a share as large as the others'.
// late_states_blocks > 0: the launch runs beside the kernel before it (reading none of its
// outputs): no block waits for that kernel at its start, each waits at its end, so the launch
// still ends after it.
template <typename T, int HEAD_DIM, int GROUP, int STAGES, bool TAKE = false>
__global__ void __launch_bounds__(NUM_THREADS, mma_min_blocks_per_sm<HEAD_DIM>())
split_kv_mma_persistent_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                               const int* __restrict__ kv_lens, const int* __restrict__ kv_indptr,
                               const int* __restrict__ kv_indices, const int* __restrict__ kv_last_page_len,
                               T* __restrict__ out, float* __restrict__ lse, float* __restrict__ partial_out,
                               float* __restrict__ partial_lse, int* __restrict__ counters, int batch,
                               int kv_len, int num_pages, int page_size, int num_qo_heads, int num_kv_heads,
                               int head_groups, int chunk_size, float scale_log2, int windows,
                               const float* __restrict__ extra_out, const float* __restrict__ extra_lse,
                               int extra_count, int late_states_blocks) {
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "persistent form: head_dim 64 or 128");
  // launches with states run one block per item
  (void)extra_out, (void)extra_lse, (void)extra_count;
  static_assert(GROUP <= 8, "at most 8 query heads per block (rows 8..15 of A stay zero)");
  static_assert(STAGES >= 2, "at least double buffering");
  static_assert(NUM_WARPS * GROUP * HEAD_DIM * 4 <= NUM_WARPS * MmaSlots<HEAD_DIM>::TOTAL * 32 * 16,
                "the epilogue's state fits in one stage");
  constexpr int WARP_ROWS = 16;
  constexpr int CHUNKS = MmaSlots<HEAD_DIM>::CHUNKS;
  constexpr int VCHUNKS = MmaSlots<HEAD_DIM>::VCHUNKS;
  constexpr int SLOTS = MmaSlots<HEAD_DIM>::TOTAL;
  constexpr int DIM_TILES = HEAD_DIM / 8;
  constexpr int ACC = 4;
  extern __shared__ uint4 smem_stage[];     // [STAGES][NUM_WARPS][SLOTS][32]
  __shared__ float smem_m[NUM_WARPS][GROUP];
  __shared__ float smem_l[NUM_WARPS][GROUP];
  constexpr int RING = STAGES + 1;
  __shared__ int ring[RING];   // the block's items by ordinal o at ring[o % RING]

  const bool beside = late_states_blocks > 0;
  if (!beside) wait_for_previous_grid();
  const int items = batch * num_kv_heads * head_groups;
  const int item_step = gridDim.y * gridDim.z;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int gid = lane >> 2;
  const int tig = lane & 3;
  const int group_size = num_qo_heads / num_kv_heads;
  const int row_elems = num_kv_heads * HEAD_DIM;
  // Every sequence holds kv_len tokens (the launcher passes no lengths here).
  const int len = kv_len;
  uint4* const my_slots = smem_stage + warp * SLOTS * 32 + lane;

  // Whole-row copies as in split_kv_mma_kernel: copy i of this lane takes row i * ROWS_PER_COPY +
  // copy_row of the warp tile, piece copy_piece, into the slot of the lane that reads it.
  constexpr int PIECES = HEAD_DIM / 8;
  constexpr int ROWS_PER_COPY = 32 / PIECES;
  constexpr int COPIES = WARP_ROWS / ROWS_PER_COPY;
  static_assert(COPIES == MmaSlots<HEAD_DIM>::K, "one K slot per copy");
  const int copy_row = lane / PIECES, copy_piece = lane % PIECES;
  const long long copy_step = static_cast<long long>(ROWS_PER_COPY) * row_elems;
  const WholeRowSlots<HEAD_DIM> slots_of{smem_stage + warp * SLOTS * 32, copy_row, copy_piece};
  auto k_dst = [&](int stage, int i) -> uint4* { return slots_of.k(stage, i); };
  auto v_dst = [&](int stage, int i) -> uint4* { return slots_of.v(stage, i); };

  // The copies' cursor: this warp's next tile is row p_row of item p_item, its first piece at
  // element p_at of K and V; one commit group per call, empty past the last item. Every warp takes
  // the block's count of tiles per item (a warp past the end gets tiles of no rows, zero-filled
  // without a read), so all warps reach an item's end at the same stage, which then holds the
  // epilogue's state. The item's offset is computed once per item and the tile's advanced by a
  // constant, as split_kv_mma_kernel does: with the offset computed per tile (two divisions by
  // runtime values) every shape ran 1-3% slower still.
  const int tiles = (len + TILE_TOKENS - 1) / TILE_TOKENS;   // per warp and item
  const int item_end = warp * WARP_ROWS + tiles * TILE_TOKENS;

  // The block's items: ordinal 0 is its index in the grid; then, from a counter, the grid's size
  // plus each take, or with no counter every item_step-th. The copies run `ahead` items ahead of
  // the item being consumed at most, so the item of ordinal o + ahead + 1 is taken when item o
  // starts and written to the ring at its end (thread 0; the take's latency passes behind the item).
  // A take at or past `items` ends the block's takes: `items` takes in all (one for each item past
  // the grid's first, one failure a block), the last of which resets the counter.
  const bool dynamic = TAKE && counters != nullptr && items > item_step;
  const int ahead = (STAGES - 1 + max(tiles, 1) - 1) / max(tiles, 1);
  bool taking = threadIdx.x == 0;   // thread 0 takes until a take fails
  auto resolve = [&](int taken, int ordinal) -> int {   // thread 0: the item of a take
    if (!dynamic) {
      const long long it = seq_head_index() + static_cast<long long>(ordinal) * item_step;
      return it < items ? static_cast<int>(it) : items;
    }
    if (taken < 0) return items;
    const int it = item_step + taken;
    if (it >= items) {
      taking = false;
      if (taken == items - 1) atomicExch(counters, 0);   // the last take of the launch
      return items;
    }
    return it;
  };
  auto take = [&]() -> int { return dynamic && taking ? atomicAdd(counters, 1) : -1; };
  if constexpr (TAKE) {
    if (threadIdx.x == 0) {
      ring[0] = seq_head_index() < items ? seq_head_index() : items;
      for (int o = 1; o <= ahead; ++o) ring[o % RING] = resolve(take(), o);
    }
    __syncthreads();
  }
  const long long tile_step = static_cast<long long>(TILE_TOKENS) * row_elems;
  auto item_at = [&](int it) -> long long {
    const int b = it / (head_groups * num_kv_heads);
    const int kh = (it / head_groups) % num_kv_heads;
    return (static_cast<long long>(b) * kv_len + warp * WARP_ROWS + copy_row) * row_elems + kh * HEAD_DIM +
           copy_piece * 8;
  };
  int p_ord = 0;
  int p_item = tiles > 0 ? (TAKE ? ring[0] : seq_head_index()) : items;
  int p_row = warp * WARP_ROWS;
  long long p_at = p_item < items ? item_at(p_item) : 0;
  auto issue_next = [&](int stage) {
    if (p_row >= item_end && (!TAKE || p_item < items)) {   // the item's last tile was issued: the next item
      if constexpr (TAKE) {
        ++p_ord;
        p_item = ring[p_ord % RING];
      } else {
        p_item += item_step;
      }
      p_row = warp * WARP_ROWS;
      if (p_item < items) p_at = item_at(p_item);
    }
    if (p_item < items) {
      const int tile_rows = len - p_row;
#pragma unroll
      for (int i = 0; i < COPIES; ++i) {
        const bool valid = i * ROWS_PER_COPY + copy_row < tile_rows;
        cp_async_16(k_dst(stage, i), valid ? k + p_at + i * copy_step : k, valid);
        cp_async_16(v_dst(stage, i), valid ? v + p_at + i * copy_step : v, valid);
      }
      p_row += TILE_TOKENS;
      p_at += tile_step;
    }
    cp_async_commit();
  };

#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) issue_next(st);
  int stage = 0;
  int next_item = seq_head_index();   // without TAKE
  for (int ordinal = 0;; ++ordinal) {
    int item;
    if constexpr (TAKE) {
      item = ring[ordinal % RING];
    } else {
      item = next_item;
      next_item += item_step;
    }
    if (item >= items) break;
    const int taken = TAKE ? take() : -1;   // the item of ordinal + ahead + 1, learnt at this item's end
    const int hg = item % head_groups;
    const int kh = (item / head_groups) % num_kv_heads;
    const int b = item / (head_groups * num_kv_heads);
    const int head0 = kh * group_size + hg * GROUP;
    const int heads_here = min(GROUP, group_size - hg * GROUP);
    uint4 qa[CHUNKS];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      qa[c] = gid < heads_here
                  ? __ldg(reinterpret_cast<const uint4*>(
                        q + static_cast<long long>(b * num_qo_heads + head0 + gid) * HEAD_DIM + c * 32 + tig * 8))
                  : zero_vec();
    }
    auto q_fragment = [&](int c) -> uint4 { return qa[c]; };
    float o[DIM_TILES][ACC];
#pragma unroll
    for (int j = 0; j < DIM_TILES; ++j) {
#pragma unroll
      for (int e = 0; e < ACC; ++e) o[j][e] = 0.0f;
    }
    float m = neg_inf();
    bool nonfinite = false;
    float l = 0.0f;
    for (int t = 0, row = warp * WARP_ROWS; t < tiles; ++t, row += TILE_TOKENS) {
      __syncwarp();   // the stage about to be refilled was read by every lane last iteration
      issue_next((stage + STAGES - 1) % STAGES);
      cp_async_wait<STAGES - 1>();   // this lane's copies of this tile have landed
      __syncwarp();   // and every lane's
      mma_consume_tile<T, HEAD_DIM, ACC>(my_slots + stage * (NUM_WARPS * SLOTS * 32), q_fragment, len - row,
                                         scale_log2, tig, o, m, l, nonfinite);
      stage = (stage + 1) % STAGES;
    }
    // The warps' states merged and written as split_kv_mma_kernel does with one split. The stage
    // every warp just read is free until the next item's first copy: it holds the state.
    __syncthreads();
    auto& smem_o = *reinterpret_cast<float (*)[NUM_WARPS][GROUP][HEAD_DIM]>(
        smem_stage + ((stage + STAGES - 1) % STAGES) * (NUM_WARPS * SLOTS * 32));
    store_warp_state<HEAD_DIM, GROUP, ACC, false>(smem_o, smem_m, smem_l, o, m, l, nonfinite, false, warp, gid, tig);
    __syncthreads();
    finish_block<T, HEAD_DIM, GROUP>(smem_o, smem_m, smem_l, out, lse, partial_out, partial_lse, nullptr, b, 0,
                                     1, head0, heads_here, batch, num_qo_heads,
                                     ExtraStates{});
    if constexpr (TAKE) {
      if (threadIdx.x == 0) ring[(ordinal + ahead + 1) % RING] = resolve(taken, ordinal + ahead + 1);
    }
    __syncthreads();   // the epilogue's state is free for the next item; the ring holds the next
  }
  cp_async_wait<0>();
  if (beside) wait_for_previous_grid();   // the launch ends after the kernel before it
}

}  // namespace decode_attention
