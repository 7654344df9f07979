// Bifurcated attention (Athiwaratkun et al., 2024): one softmax over the logits of the shared
// prefix and of each sequence's own suffix together, the logits kept in memory between launches.
//
// Query row (b, h) of the batch is row b * num_qo_heads + h of the float32 logits workspace
// [batch * num_qo_heads, logits_stride]: columns 0 .. prefix_len - 1 hold the prefix logits,
// prefix_len .. prefix_len + suffix_len(b) - 1 the suffix logits, both already multiplied by
// sm_scale * log2(e) (the softmax runs in base 2; lse is written in natural log). Five launches:
//
// 1. bifurcated_prefix_logits_kernel: per (prefix tile, KV head), the tile's keys in shared memory
//    once, against the query rows of all sequences and all heads of the group (64 rows at a time,
//    tensor cores). float32 inputs: bifurcated_prefix_logits_simt_kernel (CUDA cores).
// 2. bifurcated_suffix_logits_kernel: per (suffix tile, sequence, KV head), the tile's keys
//    against the sequence's query heads of the group (CUDA cores, any dtype).
// 3. bifurcated_softmax_kernel: per row, the max and the sum of exp2 over its logits (one pass);
//    writes them for the next launches and the row's lse.
// 4. bifurcated_prefix_values_kernel: per (prefix chunk, tile of 64 rows, KV head), P V on the
//    tensor cores with P = exp2(logit - max) recomputed from the workspace; a float32 partial
//    per (chunk, row). float32 inputs: bifurcated_prefix_values_simt_kernel.
// 5. bifurcated_finish_kernel: per row, the chunks' partials summed in a fixed order plus the
//    suffix's P V, divided by the row's sum. Deterministic: no atomics anywhere.
//
// Suffixes come contiguous ([batch, capacity, num_kv_heads, HEAD_DIM], lengths `suffix_lens`) or
// paged (a page table as the paged decode takes it). A length or page table that cannot be read
// makes that sequence's out and lse NaN, and nothing outside the arrays is read. Non-finite
// values never hide: a non-finite logit makes its row NaN, a non-finite value its output element.

#include "common.cuh"

namespace decode_attention {

constexpr int BF_WARPS = 4;
constexpr int BF_THREADS = BF_WARPS * 32;
constexpr int BF_QUERY_ROWS = BF_WARPS * 16;   // rows of a tensor-core row tile (a warp: m16)
constexpr int BF_LOGIT_TILE = 64;              // prefix tokens per tensor-core logits block
constexpr int BF_SIMT_TOKENS = 32;             // tokens per CUDA-core tile (a lane each)
constexpr int BF_SIMT_ROWS = 16;               // query rows per CUDA-core values block
constexpr int BF_FINISH_THREADS = 128;

// Where each sequence's suffix lies: contiguous (kv_indptr null) or paged.
template <typename T>
struct Suffixes {
  const T* k;
  const T* v;
  const int* lens;            // contiguous: [batch] or null (every suffix `capacity` long)
  const int* kv_indptr;       // paged: [batch + 1]
  const int* kv_indices;      // paged: [num_indices]
  const int* kv_last_page_len;  // paged: [batch]
  int capacity;               // the longest suffix the logits workspace holds (contiguous: suffix_len)
  int num_indices;
  int num_pages;
  int page_size;
  int num_kv_heads;

  // Suffix length of sequence b, or -1 when its length or page table cannot be read.
  __device__ __forceinline__ int length(int b) const {
    if (kv_indptr == nullptr) {
      const int n = lens != nullptr ? lens[b] : capacity;
      return n < 0 || n > capacity ? -1 : n;
    }
    const int begin = kv_indptr[b], pages = kv_indptr[b + 1] - begin;
    if (pages < 0 || begin < 0 || begin > num_indices - pages) return -1;
    if (pages == 0) return 0;
    const int last = kv_last_page_len[b];
    if (last < 1 || last > page_size) return -1;
    const long long n = static_cast<long long>(pages - 1) * page_size + last;
    return n > capacity ? -1 : static_cast<int>(n);
  }

  // Element offset of token t (< length(b)) of sequence b, KV head kh; -1 for a page outside the cache.
  __device__ __forceinline__ long long offset(int b, int t, int kh, int head_dim) const {
    long long slot;
    if (kv_indptr == nullptr) {
      slot = static_cast<long long>(b) * capacity + t;
    } else {
      const int page = kv_indices[kv_indptr[b] + t / page_size];
      if (page < 0 || page >= num_pages) return -1;
      slot = static_cast<long long>(page) * page_size + t % page_size;
    }
    return (slot * num_kv_heads + kh) * head_dim;
  }
};

// The query rows of KV head kh: row r = b * G + g is query head kh * G + g of sequence b, row
// b * num_qo_heads + kh * G + g of q and of the workspace.
__device__ __forceinline__ long long query_row(int r, int kh, int group_size, int num_qo_heads) {
  return static_cast<long long>(r / group_size) * num_qo_heads + kh * group_size + r % group_size;
}

// ---------------------------------------------------------------------------------------------
// 1. Prefix logits on the tensor cores.

template <int HEAD_DIM>
struct LogitTile {
  static constexpr int ROW_BYTES = HEAD_DIM * 2 + 16;     // one K row, padded: conflict-free ldmatrix
  static constexpr int BYTES = BF_LOGIT_TILE * ROW_BYTES;
  static constexpr int PIECES = HEAD_DIM / 8;             // 16-byte pieces per row
};

// Grid: x over prefix tiles of 64 tokens, y over runs of `row_tiles_per_block` tiles of 64 query
// rows, z over KV heads. The block reads its keys once and serves every row tile of its run.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(BF_THREADS)
bifurcated_prefix_logits_kernel(const T* __restrict__ q,          // [batch, num_qo_heads, HEAD_DIM]
                                const T* __restrict__ k_prefix,   // [prefix_len, num_kv_heads, HEAD_DIM]
                                float* __restrict__ logits,       // [batch * num_qo_heads, logits_stride]
                                int batch, int prefix_len, int num_qo_heads, int num_kv_heads,
                                int row_tiles_per_block, long long logits_stride, float scale_log2) {
  using Tile = LogitTile<HEAD_DIM>;
  constexpr int S_TILES = BF_LOGIT_TILE / 8;   // n-tiles of S
  __shared__ __align__(16) unsigned char k_tile[Tile::BYTES];
  const int kh = blockIdx.z, tile_start = blockIdx.x * BF_LOGIT_TILE;
  const int group_size = num_qo_heads / num_kv_heads;
  const int rows = batch * group_size;
  const long long row_elems = static_cast<long long>(num_kv_heads) * HEAD_DIM;

  const unsigned smem = static_cast<unsigned>(__cvta_generic_to_shared(k_tile));
  for (int piece = threadIdx.x; piece < BF_LOGIT_TILE * Tile::PIECES; piece += BF_THREADS) {
    const int row = piece / Tile::PIECES, col = piece % Tile::PIECES;
    const int p = tile_start + row;
    const bool valid = p < prefix_len;
    cp_async_16_zfill(smem + row * Tile::ROW_BYTES + col * 16,
                      k_prefix + (valid ? p * row_elems + kh * HEAD_DIM + col * 8 : 0), valid);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  // ldmatrix.x4 of K rows 8j + (lane % 8) at dims 32c + 8 (lane / 8): b0, b1 of k-steps 2c, 2c + 1.
  const unsigned k_lane = smem + (lane & 7) * Tile::ROW_BYTES + 16 * (lane >> 3);
  const int first_tile = blockIdx.y * row_tiles_per_block;
  const int end_tile = min(first_tile + row_tiles_per_block, (rows + BF_QUERY_ROWS - 1) / BF_QUERY_ROWS);
  for (int rt = first_tile; rt < end_tile; ++rt) {
    const int warp_row0 = rt * BF_QUERY_ROWS + warp * 16;
    if (warp_row0 >= rows) break;   // uniform over the warp
    long long qrow[2];
    bool ok[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = warp_row0 + gid + 8 * i;
      ok[i] = r < rows;
      qrow[i] = ok[i] ? query_row(r, kh, group_size, num_qo_heads) : 0;
    }
    float s[S_TILES][4];
#pragma unroll
    for (int j = 0; j < S_TILES; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
    static_for<HEAD_DIM / 32>([&](auto ci) {
      constexpr int c = decltype(ci)::value;
      unsigned a[2][4];   // A fragments of k-steps 2c and 2c + 1 (rows past the last are zero)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const T* qr = q + qrow[i] * HEAD_DIM + (2 * c + h) * 16 + 2 * tig;
          a[h][i] = ok[i] ? __ldg(reinterpret_cast<const unsigned*>(qr)) : 0u;
          a[h][2 + i] = ok[i] ? __ldg(reinterpret_cast<const unsigned*>(qr + 8)) : 0u;
        }
      }
      static_for<S_TILES>([&](auto ji) {
        constexpr int j = decltype(ji)::value;
        unsigned kb[4];
        ldmatrix_x4_at<8 * j * Tile::ROW_BYTES + 64 * c>(kb, k_lane);
        mma_16816_full<T>(s[j], a[0][0], a[0][1], a[0][2], a[0][3], kb[0], kb[1]);
        mma_16816_full<T>(s[j], a[1][0], a[1][1], a[1][2], a[1][3], kb[2], kb[3]);
      });
    });
    // s[j][2i], s[j][2i + 1]: row gid + 8i, prefix tokens tile_start + 8j + 2 tig + {0, 1}.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!ok[i]) continue;
      float* dst = logits + qrow[i] * logits_stride;
#pragma unroll
      for (int j = 0; j < S_TILES; ++j) {
        const int col = tile_start + 8 * j + 2 * tig;
        const float x = s[j][2 * i] * scale_log2, y = s[j][2 * i + 1] * scale_log2;
        if (col + 1 < prefix_len) {
          *reinterpret_cast<float2*>(dst + col) = make_float2(x, y);
        } else if (col < prefix_len) {
          dst[col] = x;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 1b, 2. Logits on the CUDA cores: a tile of up to 32 keys (float32 in shared memory, rows padded
// by one float: lane t reads key t without bank conflicts) against query rows, warp w taking rows
// w, w + 4, ...; lane t writes the logit of key t.

template <typename T, int HEAD_DIM, typename KeyAt, typename RowAt>
__device__ __forceinline__ void simt_logits_tile(const T* __restrict__ q, KeyAt key_at, int tokens,
                                                 int num_rows, RowAt row_at, float* __restrict__ logits,
                                                 long long logits_stride, int column0, float scale_log2) {
  constexpr int E = VecTraits<T>::kElems;     // elements per 16-byte load
  constexpr int PIECES = HEAD_DIM / E;
  __shared__ float k_s[BF_SIMT_TOKENS][HEAD_DIM + 1];
  __shared__ float q_s[BF_WARPS][HEAD_DIM];
  for (int piece = threadIdx.x; piece < BF_SIMT_TOKENS * PIECES; piece += BF_THREADS) {
    const int t = piece / PIECES, col = piece % PIECES;
    float f[E];
    if (t < tokens) {
      const T* src = key_at(t);   // null: a page outside the cache, whose logits must come out NaN
      if (src != nullptr) {
        to_float<T>(*reinterpret_cast<const uint4*>(src + col * E), f);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) f[e] = quiet_nan();
      }
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) f[e] = 0.0f;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) k_s[t][col * E + e] = f[e];
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = warp; i < num_rows; i += BF_WARPS) {
    const long long qrow = row_at(i);
    for (int d = lane; d < HEAD_DIM; d += 32) to_scalar_float(q + qrow * HEAD_DIM + d, &q_s[warp][d]);
    __syncwarp();
    if (lane < tokens) {
      float acc = 0.0f;
#pragma unroll 8
      for (int d = 0; d < HEAD_DIM; ++d) acc = fmaf(q_s[warp][d], k_s[lane][d], acc);
      logits[qrow * logits_stride + column0 + lane] = acc * scale_log2;
    }
    __syncwarp();   // q_s is rewritten for the warp's next row
  }
}

// float32 prefix: grid x over prefix tiles of 32 tokens, y over runs of `rows_per_block` query
// rows, z over KV heads.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(BF_THREADS)
bifurcated_prefix_logits_simt_kernel(const T* __restrict__ q, const T* __restrict__ k_prefix,
                                     float* __restrict__ logits, int batch, int prefix_len,
                                     int num_qo_heads, int num_kv_heads, int rows_per_block,
                                     long long logits_stride, float scale_log2) {
  const int kh = blockIdx.z, tile_start = blockIdx.x * BF_SIMT_TOKENS;
  const int group_size = num_qo_heads / num_kv_heads;
  const int row0 = blockIdx.y * rows_per_block;
  const int num_rows = min(rows_per_block, batch * group_size - row0);
  const long long row_elems = static_cast<long long>(num_kv_heads) * HEAD_DIM;
  simt_logits_tile<T, HEAD_DIM>(
      q, [&](int t) { return k_prefix + (tile_start + t) * row_elems + kh * HEAD_DIM; },
      min(BF_SIMT_TOKENS, prefix_len - tile_start), num_rows,
      [&](int i) { return query_row(row0 + i, kh, group_size, num_qo_heads); }, logits, logits_stride,
      tile_start, scale_log2);
}

// Suffixes: grid x over suffix tiles of 32 tokens, y over sequences, z over KV heads.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(BF_THREADS)
bifurcated_suffix_logits_kernel(const T* __restrict__ q, const T* __restrict__ k_suffix,
                                const int* __restrict__ suffix_lens, const int* __restrict__ kv_indptr,
                                const int* __restrict__ kv_indices, const int* __restrict__ kv_last_page_len,
                                float* __restrict__ logits, int prefix_len, int capacity, int num_indices,
                                int num_pages, int page_size, int num_qo_heads, int num_kv_heads,
                                long long logits_stride, float scale_log2) {
  const Suffixes<T> sfx{k_suffix, nullptr, suffix_lens, kv_indptr, kv_indices, kv_last_page_len, capacity,
                        num_indices, num_pages, page_size, num_kv_heads};
  const int b = blockIdx.y, kh = blockIdx.z, tile_start = blockIdx.x * BF_SIMT_TOKENS;
  const int len = sfx.length(b);   // -1: the softmax launch poisons the row
  if (tile_start >= len) return;   // uniform over the block
  const int group_size = num_qo_heads / num_kv_heads;
  simt_logits_tile<T, HEAD_DIM>(
      q,
      [&](int t) -> const T* {
        const long long at = sfx.offset(b, tile_start + t, kh, HEAD_DIM);
        return at < 0 ? nullptr : k_suffix + at;
      },
      min(BF_SIMT_TOKENS, len - tile_start), group_size,
      [&](int i) { return static_cast<long long>(b) * num_qo_heads + kh * group_size + i; }, logits,
      logits_stride, prefix_len + tile_start, scale_log2);
}

// ---------------------------------------------------------------------------------------------
// 3. The softmax's max and sum per row, in one pass over its logits (online, base 2).

__device__ __forceinline__ void merge_max_sum(float& m, float& l, float m2, float l2) {
  const float mx = fmaxf(m, m2);
  l = l * rescale(m, mx) + l2 * rescale(m2, mx);
  m = mx;
}

// Grid: one block per row. stats[row] = (max, sum), the sum NaN for a row that must come out NaN.
template <typename T>
__global__ void __launch_bounds__(BF_THREADS)
bifurcated_softmax_kernel(const float* __restrict__ logits, const int* __restrict__ suffix_lens,
                          const int* __restrict__ kv_indptr, const int* __restrict__ kv_last_page_len,
                          float2* __restrict__ stats,     // [batch * num_qo_heads]
                          float* __restrict__ lse,        // [batch * num_qo_heads]
                          int prefix_len, int capacity, int num_indices, int page_size, int num_qo_heads,
                          long long logits_stride) {
  const Suffixes<T> sfx{nullptr, nullptr, suffix_lens, kv_indptr, nullptr, kv_last_page_len, capacity,
                        num_indices, 0, page_size, 0};
  const long long row = blockIdx.x;
  const int len = sfx.length(static_cast<int>(row / num_qo_heads));
  float m = neg_inf(), l = 0.0f;
  bool bad = len < 0;
  if (!bad) {
    const float* lr = logits + row * logits_stride;
    const int n = prefix_len + len;
#pragma unroll 4
    for (int i = threadIdx.x; i < n; i += BF_THREADS) {
      const float s = lr[i];
      bad = bad || !is_finite(s);
      if (s > m) {
        l = l * rescale(m, s) + 1.0f;
        m = s;
      } else {
        l += exp2f(s - m);
      }
    }
  }
  __shared__ float sm[BF_WARPS], sl[BF_WARPS];
  __shared__ int sbad[BF_WARPS];
  int any_bad = __any_sync(kFullMask, bad);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    merge_max_sum(m, l, __shfl_xor_sync(kFullMask, m, off), __shfl_xor_sync(kFullMask, l, off));
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sm[warp] = m;
    sl[warp] = l;
    sbad[warp] = any_bad;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    m = sm[0];
    l = sl[0];
    any_bad = sbad[0];
#pragma unroll
    for (int w = 1; w < BF_WARPS; ++w) {
      merge_max_sum(m, l, sm[w], sl[w]);
      any_bad |= sbad[w];
    }
    stats[row] = make_float2(m, any_bad ? quiet_nan() : l);
    lse[row] = any_bad ? quiet_nan() : l > 0.0f ? (m + log2f(l)) * kLn2 : neg_inf();
  }
}

// ---------------------------------------------------------------------------------------------
// 4. P V over the prefix on the tensor cores: a float32 partial per (chunk, row), not normalised
// (every chunk's P is taken against the row's one max, so the partials add).

template <int HEAD_DIM>
struct ValueTile {
  static constexpr int KV_TILE = HEAD_DIM >= 256 ? 32 : 64;   // prefix rows per pipeline stage
  static constexpr int ROW_BYTES = HEAD_DIM * 2 + 16;
  static constexpr int BYTES = KV_TILE * ROW_BYTES;
  static constexpr int PIECES = HEAD_DIM / 8;
  static constexpr int COPIES = KV_TILE * PIECES / BF_THREADS;
  static_assert(KV_TILE * PIECES % BF_THREADS == 0, "whole copies per thread");
};

// The logits of workspace columns col and col + 1 (what lies past `end` is not read: 0), and
// exp2(logit - max) of them (zero past `end`).
__device__ __forceinline__ float2 logits2(const float* __restrict__ row, int col, int end) {
  if (col + 1 < end) return __ldg(reinterpret_cast<const float2*>(row + col));
  return make_float2(col < end ? __ldg(row + col) : 0.0f, 0.0f);
}
__device__ __forceinline__ float2 probs2(float2 s, int col, int end, float m) {
  return make_float2(col < end ? exp2f(s.x - m) : 0.0f, col + 1 < end ? exp2f(s.y - m) : 0.0f);
}

// Grid: x over prefix chunks of `chunk_size` tokens, y over tiles of 64 query rows, z over KV heads.
template <typename T, int HEAD_DIM, int STAGES>
__global__ void __launch_bounds__(BF_THREADS, HEAD_DIM >= 256 ? 1 : 2)
bifurcated_prefix_values_kernel(const float* __restrict__ logits, const float2* __restrict__ stats,
                                const T* __restrict__ v_prefix,   // [prefix_len, num_kv_heads, HEAD_DIM]
                                float* __restrict__ part_out,     // [num_chunks, batch * num_qo_heads, HEAD_DIM]
                                int batch, int prefix_len, int num_qo_heads, int num_kv_heads,
                                int chunk_size, long long logits_stride) {
  using Tile = ValueTile<HEAD_DIM>;
  constexpr int KV_TILE = Tile::KV_TILE;
  constexpr int PV_STEPS = KV_TILE / 16;   // k-steps of O = P V
  constexpr int O_TILES = HEAD_DIM / 8;    // n-tiles of O
  extern __shared__ __align__(16) unsigned char smem[];   // [STAGES][V tile]
  const int chunk = blockIdx.x, kh = blockIdx.z;
  const int group_size = num_qo_heads / num_kv_heads;
  const int rows = batch * group_size;
  const long long all_rows = static_cast<long long>(batch) * num_qo_heads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const long long row_elems = static_cast<long long>(num_kv_heads) * HEAD_DIM;
  const int kv_begin = chunk * chunk_size, kv_end = min(prefix_len, kv_begin + chunk_size);

  long long qrow[2];
  bool ok[2];
  float m[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = blockIdx.y * BF_QUERY_ROWS + warp * 16 + gid + 8 * i;
    ok[i] = r < rows;
    qrow[i] = ok[i] ? query_row(r, kh, group_size, num_qo_heads) : 0;
    m[i] = ok[i] ? stats[qrow[i]].x : 0.0f;
  }
  const bool warp_active = __any_sync(kFullMask, ok[0] || ok[1]);

  const unsigned smem_base = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  auto issue = [&](int tile_start, int stage) {
    const unsigned v_tile = smem_base + stage * Tile::BYTES;
#pragma unroll
    for (int c = 0; c < Tile::COPIES; ++c) {
      const int piece = threadIdx.x + c * BF_THREADS;
      const int row = piece / Tile::PIECES, col = piece % Tile::PIECES;
      const int kv = tile_start + row;
      const bool valid = kv < kv_end;
      cp_async_16_zfill(v_tile + row * Tile::ROW_BYTES + col * 16,
                        v_prefix + (valid ? kv * row_elems + kh * HEAD_DIM + col * 8 : 0), valid);
    }
    cp_async_commit();
  };

  float o[O_TILES][4];
#pragma unroll
  for (int j = 0; j < O_TILES; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  const int num_tiles = kv_end > kv_begin ? (kv_end - kv_begin + KV_TILE - 1) / KV_TILE : 0;
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < num_tiles) {
      issue(kv_begin + st * KV_TILE, st);
    } else {
      cp_async_commit();
    }
  }
  const float* lrow[2] = {logits + qrow[0] * logits_stride, logits + qrow[1] * logits_stride};
  // The logits of a tile this lane needs: rows gid, gid + 8; tokens 16kv + 2 tig + {0, 1} (lo) and
  // + 8 (hi). Up to head_dim 128 they are loaded a tile ahead, so that their latency passes behind
  // the tile before's products (loaded at the tile itself, each tile waited for them: the pass took
  // 3-6x its bytes' time); at 256 the registers are not there, and they are loaded at the tile.
  constexpr bool LOGITS_AHEAD = HEAD_DIM <= 128;
  float2 raw[PV_STEPS][2][2];
  auto load_logits = [&](int tile_start) {
#pragma unroll
    for (int kv = 0; kv < PV_STEPS; ++kv) {
      const int col = tile_start + 16 * kv + 2 * tig;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        raw[kv][i][0] = ok[i] ? logits2(lrow[i], col, kv_end) : make_float2(0.0f, 0.0f);
        raw[kv][i][1] = ok[i] ? logits2(lrow[i], col + 8, kv_end) : make_float2(0.0f, 0.0f);
      }
    }
  };
  if (LOGITS_AHEAD && num_tiles > 0) load_logits(kv_begin);
  for (int t = 0; t < num_tiles; ++t) {
    __syncthreads();   // the stage refilled below was read in iteration t - 1
    const int ahead = t + STAGES - 1;
    if (ahead < num_tiles) {
      issue(kv_begin + ahead * KV_TILE, ahead % STAGES);
    } else {
      cp_async_commit();
    }
    const int tile_start = kv_begin + t * KV_TILE;
    if (!LOGITS_AHEAD) load_logits(tile_start);
    // P's A fragments for every k-step of the tile: rows gid, gid + 8 (a0, a1: lo; a2, a3: hi).
    // Made before the wait, so that the work overlaps the copies.
    unsigned pa[PV_STEPS][4];
#pragma unroll
    for (int kv = 0; kv < PV_STEPS; ++kv) {
      const int col = tile_start + 16 * kv + 2 * tig;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float2 lo = ok[i] ? probs2(raw[kv][i][0], col, kv_end, m[i]) : make_float2(0.0f, 0.0f);
        const float2 hi = ok[i] ? probs2(raw[kv][i][1], col + 8, kv_end, m[i]) : make_float2(0.0f, 0.0f);
        pa[kv][i] = pack2<T>(lo.x, lo.y);
        pa[kv][2 + i] = pack2<T>(hi.x, hi.y);
      }
    }
    if (LOGITS_AHEAD && t + 1 < num_tiles) load_logits(tile_start + KV_TILE);
    cp_async_wait<STAGES - 1>();
    __syncthreads();   // every thread's copies of tile t have landed
    if (!warp_active) continue;
    // ldmatrix.x4.trans of V rows 16kv + (lane % 16) at dims 8 (2jj + lane / 16): b0, b1 of O's
    // n-tiles 2jj and 2jj + 1.
    const unsigned v_lane = smem_base + (t % STAGES) * Tile::BYTES + (lane & 15) * Tile::ROW_BYTES +
                            16 * (lane >> 4);
    static_for<PV_STEPS>([&](auto kvi) {
      constexpr int kv = decltype(kvi)::value;
      static_for<O_TILES / 2>([&](auto jji) {
        constexpr int jj = decltype(jji)::value;
        unsigned vb[4];
        ldmatrix_x4_trans_at<16 * kv * Tile::ROW_BYTES + 32 * jj>(vb, v_lane);
        mma_16816_full<T>(o[2 * jj], pa[kv][0], pa[kv][1], pa[kv][2], pa[kv][3], vb[0], vb[1]);
        mma_16816_full<T>(o[2 * jj + 1], pa[kv][0], pa[kv][1], pa[kv][2], pa[kv][3], vb[2], vb[3]);
      });
    });
  }
  cp_async_wait<0>();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!ok[i]) continue;
    float* dst = part_out + (chunk * all_rows + qrow[i]) * HEAD_DIM + 2 * tig;
#pragma unroll
    for (int j = 0; j < O_TILES; ++j) {
      *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[j][2 * i], o[j][2 * i + 1]);
    }
  }
}

// float32 prefix: grid x over prefix chunks, y over tiles of 16 query rows, z over KV heads;
// HEAD_DIM threads, thread d accumulating column d of the tile's rows.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(HEAD_DIM)
bifurcated_prefix_values_simt_kernel(const float* __restrict__ logits, const float2* __restrict__ stats,
                                     const T* __restrict__ v_prefix, float* __restrict__ part_out,
                                     int batch, int prefix_len, int num_qo_heads, int num_kv_heads,
                                     int chunk_size, long long logits_stride) {
  __shared__ float v_s[BF_SIMT_TOKENS][HEAD_DIM];
  __shared__ float p_s[BF_SIMT_ROWS][BF_SIMT_TOKENS];
  __shared__ long long row_s[BF_SIMT_ROWS];
  __shared__ float m_s[BF_SIMT_ROWS];
  const int chunk = blockIdx.x, kh = blockIdx.z, d = threadIdx.x;
  const int group_size = num_qo_heads / num_kv_heads;
  const int row0 = blockIdx.y * BF_SIMT_ROWS;
  const int num_rows = min(BF_SIMT_ROWS, batch * group_size - row0);
  const long long all_rows = static_cast<long long>(batch) * num_qo_heads;
  const long long row_elems = static_cast<long long>(num_kv_heads) * HEAD_DIM;
  const int kv_begin = chunk * chunk_size, kv_end = min(prefix_len, kv_begin + chunk_size);
  if (d < num_rows) {
    row_s[d] = query_row(row0 + d, kh, group_size, num_qo_heads);
    m_s[d] = stats[row_s[d]].x;
  }
  float acc[BF_SIMT_ROWS];
#pragma unroll
  for (int i = 0; i < BF_SIMT_ROWS; ++i) acc[i] = 0.0f;
  for (int tile_start = kv_begin; tile_start < kv_end; tile_start += BF_SIMT_TOKENS) {
    __syncthreads();   // the previous tile is read; row_s, m_s are written
    const int tokens = min(BF_SIMT_TOKENS, kv_end - tile_start);
    for (int t = 0; t < BF_SIMT_TOKENS; ++t) {
      float x = 0.0f;
      if (t < tokens) to_scalar_float(v_prefix + (tile_start + t) * row_elems + kh * HEAD_DIM + d, &x);
      v_s[t][d] = x;
    }
    for (int e = d; e < BF_SIMT_ROWS * BF_SIMT_TOKENS; e += HEAD_DIM) {
      const int i = e / BF_SIMT_TOKENS, t = e % BF_SIMT_TOKENS;
      p_s[i][t] = i < num_rows && t < tokens
                      ? exp2f(logits[row_s[i] * logits_stride + tile_start + t] - m_s[i])
                      : 0.0f;
    }
    __syncthreads();
    for (int t = 0; t < tokens; ++t) {
      const float x = v_s[t][d];
#pragma unroll
      for (int i = 0; i < BF_SIMT_ROWS; ++i) acc[i] = fmaf(p_s[i][t], x, acc[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < BF_SIMT_ROWS; ++i) {
    if (i < num_rows) part_out[(chunk * all_rows + row_s[i]) * HEAD_DIM + d] = acc[i];
  }
}

// ---------------------------------------------------------------------------------------------
// 5. Per row: the prefix chunks' partials in chunk order, plus P V over the row's suffix, over
// the row's sum. One block per row. The suffix is shared out among the warps, token t to warp
// t / 32 % BF_WARPS, so each warp follows its own chain of loads; a lane holds head_dim / 32
// adjacent dims of the output (one load of 4-16 bytes per token), and the warps' sums are added in
// warp order at the end (deterministic). With all threads on one token at a time (a thread per
// dim), each token waited out a full load's latency: 110 us for 256 tokens in one wave of rows.

// N adjacent elements of T at p (N * sizeof(T) bytes, aligned to that) as floats x[0 .. N - 1], in one
// or two vector loads.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&x)[8]) {
  constexpr int BYTES = N * static_cast<int>(sizeof(T));
  static_assert(BYTES == 4 || BYTES == 8 || BYTES % 16 == 0, "whole 4, 8 or 16-byte loads");
  alignas(16) T buf[N];
  if constexpr (BYTES % 16 == 0) {
#pragma unroll
    for (int i = 0; i < BYTES / 16; ++i) {
      reinterpret_cast<uint4*>(buf)[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
    }
  } else if constexpr (BYTES == 8) {
    *reinterpret_cast<uint2*>(buf) = __ldg(reinterpret_cast<const uint2*>(p));
  } else {
    *reinterpret_cast<unsigned*>(buf) = __ldg(reinterpret_cast<const unsigned*>(p));
  }
#pragma unroll
  for (int i = 0; i < N; ++i) to_scalar_float(&buf[i], &x[i]);
}

template <typename T>
__global__ void __launch_bounds__(BF_FINISH_THREADS)
bifurcated_finish_kernel(const float* __restrict__ logits, const float2* __restrict__ stats,
                         const float* __restrict__ part_out, const T* __restrict__ v_suffix,
                         const int* __restrict__ suffix_lens, const int* __restrict__ kv_indptr,
                         const int* __restrict__ kv_indices, const int* __restrict__ kv_last_page_len,
                         T* __restrict__ out,             // [batch * num_qo_heads, head_dim]
                         int num_chunks, int prefix_len, int capacity, int num_indices, int num_pages,
                         int page_size, int num_qo_heads, int num_kv_heads, int head_dim,
                         long long logits_stride) {
  constexpr int MAX_COLS = 2;        // head_dim <= 2 * BF_FINISH_THREADS: the prefix partials, per thread
  constexpr int MAX_LANE_DIMS = 8;   // head_dim <= 32 * 8: the suffix, per lane
  static_assert(BF_FINISH_THREADS == BF_WARPS * 32, "a warp per share of the suffix");
  const Suffixes<T> sfx{nullptr, v_suffix, suffix_lens, kv_indptr, kv_indices, kv_last_page_len, capacity,
                        num_indices, num_pages, page_size, num_kv_heads};
  __shared__ float warp_sum_s[BF_WARPS][MAX_LANE_DIMS * 32];
  const long long row = blockIdx.x;
  const long long all_rows = gridDim.x;
  const int b = static_cast<int>(row / num_qo_heads);
  const int kh = static_cast<int>(row % num_qo_heads) / (num_qo_heads / num_kv_heads);
  const float2 ms = stats[row];   // (max, sum); a NaN sum: the row comes out NaN
  const int len = sfx.length(b);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int lane_dims = head_dim / 32;   // 2, 4 or 8
  const int d0 = lane * lane_dims;

  // This warp's share of P V over the suffix: 32 tokens at a time, each lane computing one token's
  // weight and element offset, then every lane taking each token's dims in turn.
  float acc[MAX_LANE_DIMS];
#pragma unroll
  for (int j = 0; j < MAX_LANE_DIMS; ++j) acc[j] = 0.0f;
  const float* lr = logits + row * logits_stride + prefix_len;
  for (int t0 = warp * 32; t0 < len; t0 += BF_WARPS * 32) {   // len is uniform over the block
    const int t = t0 + lane;
    float p_mine = 0.0f;
    long long at_mine = 0;
    if (t < len) {
      p_mine = exp2f(lr[t] - ms.x);
      at_mine = sfx.offset(b, t, kh, head_dim);
    }
    const int n = min(32, len - t0);
#pragma unroll 4
    for (int i = 0; i < n; ++i) {
      const float p = __shfl_sync(kFullMask, p_mine, i);
      const long long at = __shfl_sync(kFullMask, at_mine, i);
      float x[MAX_LANE_DIMS];
      if (at >= 0) {
        const T* src = v_suffix + at + d0;
        if (lane_dims == 8) {
          load_floats<T, 8>(src, x);
        } else if (lane_dims == 4) {
          load_floats<T, 4>(src, x);
        } else {
          load_floats<T, 2>(src, x);
        }
      } else {
#pragma unroll
        for (int j = 0; j < MAX_LANE_DIMS; ++j) x[j] = quiet_nan();   // a page outside the cache
      }
#pragma unroll
      for (int j = 0; j < MAX_LANE_DIMS; ++j) {
        if (j < lane_dims) acc[j] = fmaf(p, x[j], acc[j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < MAX_LANE_DIMS; ++j) {
    if (j < lane_dims) warp_sum_s[warp][d0 + j] = acc[j];
  }
  __syncthreads();

  const bool bad = len < 0 || is_nan(ms.y);
  const float inv = ms.y > 0.0f ? 1.0f / ms.y : 0.0f;
#pragma unroll
  for (int c = 0; c < MAX_COLS; ++c) {
    const int d = threadIdx.x + c * BF_FINISH_THREADS;
    if (d >= head_dim) continue;
    float o = 0.0f;
#pragma unroll 4
    for (int k = 0; k < num_chunks; ++k) o += part_out[(k * all_rows + row) * head_dim + d];
#pragma unroll
    for (int w = 0; w < BF_WARPS; ++w) o += warp_sum_s[w][d];
    const float x = bad ? quiet_nan() : ms.y > 0.0f ? finite_or_nan(o * inv) : 0.0f;
    out[row * head_dim + d] = from_float<T>(x);
  }
}

}  // namespace decode_attention
