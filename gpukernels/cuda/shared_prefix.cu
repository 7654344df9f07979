// Hydragen's prefix pass: one prefix shared by every sequence, attended by the queries of all
// sequences and all query heads of a GQA group together, as tensor-core matrix products.
//
// For KV head kh, the query rows are r = b * G + g (sequence b, query head kh * G + g), R = batch * G
// of them. A block serves QUERY_ROWS = 64 of those rows (4 warps x 16: each warp one m16 tile, every
// row of it used) against one chunk of the prefix, so the chunk's keys and values are read from
// memory once for 64 query rows. Its K and V tiles of 64 rows (32 at head_dim 256) stream through shared memory
// (cp.async, STAGES deep, rows padded by 16 bytes so that the fragment loads are free of bank
// conflicts); each warp computes S = Q K^T for its 16 rows (mma.sync m16n8k16, K fragments by
// ldmatrix), keeps the online softmax in float32 (base 2, log2(e) folded into the scale), and
// accumulates O += P V (V fragments by ldmatrix.trans). The block writes a float32 partial state
// (out, lse) per query row for its chunk; the split-KV kernel that attends to the suffixes next
// merges the chunks' states into its output (split_kv.cu: ExtraStates), or, with no suffix tokens,
// `merge_prefix_chunks_kernel`.
//
// Grid: x over the prefix chunks, y over the tiles of 64 query rows, z over the KV heads.
// Non-finite values never hide: a NaN or infinite score of a row makes its state NaN.

#include "common.cuh"
#include "wgmma.cuh"

namespace decode_attention {

constexpr int SP_WARPS = 4;
constexpr int SP_THREADS = SP_WARPS * 32;
constexpr int QUERY_ROWS = SP_WARPS * 16;   // query rows per block (costmodel.segments.QUERY_TILE_ROWS)

template <int HEAD_DIM>
struct PrefixTile {
  // Prefix rows per pipeline stage: 64, or 32 at head_dim 256, whose output accumulators take 128
  // registers a lane (a 64-row tile's scores spilled there).
  static constexpr int KV_TILE = HEAD_DIM >= 256 ? 32 : 64;
  static constexpr int ROW_BYTES = HEAD_DIM * 2 + 16;               // one padded K or V row
  static constexpr int TILE_BYTES = KV_TILE * ROW_BYTES;            // K (or V) of one stage
  static constexpr int STAGE_BYTES = 2 * TILE_BYTES;                // K and V
  static constexpr int PIECES = HEAD_DIM / 8;                       // 16-byte pieces per row
  static constexpr int COPIES = KV_TILE * PIECES / SP_THREADS;      // pieces per thread per tile
  static_assert(KV_TILE * PIECES % SP_THREADS == 0, "whole copies per thread");
  // With wgmma (sm_90a) the tiles are stored swizzled (wgmma.cuh), unpadded, from the first
  // 1024-byte boundary of the dynamic shared memory: the launch's size (padded rows) covers that.
  static constexpr int SW_TILE_BYTES = KV_TILE * HEAD_DIM * 2;
  static constexpr int SW_STAGE_BYTES = 2 * SW_TILE_BYTES;
};

// Rows of a paged cache ([pages, page_size, num_kv_heads, HEAD_DIM] seen as rows): row r of the
// rows a work list names lies at row table[r / page_size] * page_size + r % page_size (the table
// checked on the host: every entry a page of the cache).
struct RowPages {
  const int* table;
  int size, shift;   // shift >= 0: size is 1 << shift
  __device__ RowPages(const int* t, int s) : table(t), size(s), shift(-1) {
    if (s > 0 && (s & (s - 1)) == 0) {
      shift = 0;
      while ((1 << shift) < s) ++shift;
    }
  }
  __device__ __forceinline__ long long row(int r) const {
    const int page = shift >= 0 ? r >> shift : r / size;
    const int in_page = shift >= 0 ? r & (size - 1) : r - page * size;
    return static_cast<long long>(__ldg(table + page)) * size + in_page;
  }
};

// The online softmax of a warp's two query rows (gid and gid + 8 of its m16 tile), one KV tile of
// S_TILES * 8 scores at a time, in base 2: the running maximum m (scaled), this lane's share of the
// running sum l, and `check`, NaN once a row has had a NaN or infinite score.
// A tile's scores s give P (unnormalised) as the A fragments of O += P V: P's k-step kv holds S's
// n-tiles 2kv, 2kv + 1 (the accumulator layout of S is the A layout of P). s[j][0..1] are row gid,
// s[j][2..3] row gid + 8; columns 8j + 2 tig + {0, 1}. The scores are only read: with wgmma the
// next tile's scores are being written meanwhile, and writes to any products' accumulators there
// would make the compiler wait for each product. The output so far is to be scaled by alpha
// (`rescale_rows`), once no product into it is in flight.
// Every score, masked or not, goes into `check` as s * 0 (NaN once any is NaN or infinite: the
// prefix rows past kv_end are zero-filled, so their scores are finite unless q is not); the
// maximum is taken over the raw scores (the scale is positive: a negative one flipped q's sign)
// and scaled once; exp2(s * scale - m) is one fused multiply-add.
template <typename T, int S_TILES>
struct RowsSoftmax {
  static constexpr int PV_STEPS = S_TILES / 2;
  float m[2] = {neg_inf(), neg_inf()};
  float l[2] = {0.0f, 0.0f};
  float check[2] = {0.0f, 0.0f};

  // Score e of n-tile j of a tile whose first prefix row is tile_start lies past kv_end (PARTIAL:
  // the last tile, rows past kv_end masked; a constant, so that the full tiles' code has no
  // masking).
  template <bool PARTIAL>
  static __device__ __forceinline__ bool outside_rows(int tile_start, int kv_end, int tig, int j, int e) {
    return PARTIAL && tile_start + 8 * j + 2 * tig + (e & 1) >= kv_end;
  }

  // The tile's new running maxima: each row's m, the bias -m of its exponentials (0 for a row
  // with no score yet: every p is 0) and alpha, the factor of the output and sum so far (l
  // scaled here); the scores into `check`.
  template <bool PARTIAL>
  __device__ __forceinline__ void maxima(const float (&s)[S_TILES][4], int tile_start, int kv_end, int tig,
                                         float scale_log2, float (&m_bias)[2], float (&alpha)[2]) {
    float m_raw[2] = {neg_inf(), neg_inf()};
#pragma unroll
    for (int j = 0; j < S_TILES; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        check[e >> 1] = nan_if_nonfinite(s[j][e], check[e >> 1]);
        const bool out = outside_rows<PARTIAL>(tile_start, kv_end, tig, j, e);
        m_raw[e >> 1] = fmaxf(m_raw[e >> 1], out ? neg_inf() : s[j][e]);
      }
    }
    update(m_raw, scale_log2, m_bias, alpha);
  }

  // The rows' new maxima from this lane's raw maxima of a tile (the group's 4 lanes reduced here).
  __device__ __forceinline__ void update(float (&m_raw)[2], float scale_log2, float (&m_bias)[2], float (&alpha)[2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      m_raw[i] = fmaxf(m_raw[i], __shfl_xor_sync(kFullMask, m_raw[i], 1));
      m_raw[i] = fmaxf(m_raw[i], __shfl_xor_sync(kFullMask, m_raw[i], 2));
      const float m_new = fmaxf(m[i], m_raw[i] * scale_log2);
      alpha[i] = rescale(m[i], m_new);
      m[i] = m_new;
      m_bias[i] = m_new == neg_inf() ? 0.0f : -m_new;
      l[i] *= alpha[i];
    }
  }

  // `exps` for a tile of N n-tiles (N <= S_TILES) whose scores `outside(i, j, e)` masks per row
  // (i: the lane's row gid or gid + 8) as well as per column: a masked score counts neither in the
  // maxima nor in `check` (a suffix tile of another sequence: its non-finite scores are not this
  // row's).
  template <int N, typename Outside>
  __device__ __forceinline__ void exps_masked(float (&s)[N][4], Outside outside, float scale_log2, float (&alpha)[2]) {
    static_assert(N <= S_TILES, "a tile within the scores' registers");
    float m_raw[2] = {neg_inf(), neg_inf()}, m_bias[2];
#pragma unroll
    for (int j = 0; j < N; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool out = outside(e >> 1, j, e);
        check[e >> 1] = out ? check[e >> 1] : nan_if_nonfinite(s[j][e], check[e >> 1]);
        m_raw[e >> 1] = fmaxf(m_raw[e >> 1], out ? neg_inf() : s[j][e]);
      }
    }
    update(m_raw, scale_log2, m_bias, alpha);
#pragma unroll
    for (int j = 0; j < N; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = outside(e >> 1, j, e) ? 0.0f : exp2f(fmaf(s[j][e], scale_log2, m_bias[e >> 1]));
        l[e >> 1] += s[j][e];
      }
    }
  }

  template <bool PARTIAL>
  __device__ __forceinline__ void tile(const float (&s)[S_TILES][4], int tile_start, int kv_end, int tig,
                                       float scale_log2, unsigned (&pa)[PV_STEPS][4], float (&alpha)[2]) {
    auto outside = [&](int j, int e) { return outside_rows<PARTIAL>(tile_start, kv_end, tig, j, e); };
    float m_bias[2];
    maxima<PARTIAL>(s, tile_start, kv_end, tig, scale_log2, m_bias, alpha);
#pragma unroll
    for (int kv = 0; kv < PV_STEPS; ++kv) {
      float p[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = 2 * kv + h;
          p[h][e] = outside(j, e) ? 0.0f : exp2f(fmaf(s[j][e], scale_log2, m_bias[e >> 1]));
          l[e >> 1] += p[h][e];
        }
      }
      pa[kv][0] = pack2<T>(p[0][0], p[0][1]);
      pa[kv][1] = pack2<T>(p[0][2], p[0][3]);
      pa[kv][2] = pack2<T>(p[1][0], p[1][1]);
      pa[kv][3] = pack2<T>(p[1][2], p[1][3]);
    }
  }

  // The same tile's softmax in two steps, for a product still reading the P before: `exps`
  // turns the scores s into their unnormalised probabilities in place (their product retired, s is
  // free), `pack` then writes them as P's fragments once that product is done with them.
  template <bool PARTIAL>
  __device__ __forceinline__ void exps_tile(float (&s)[S_TILES][4], int tile_start, int kv_end, int tig,
                                            float scale_log2, float (&alpha)[2]) {
    auto outside = [&](int j, int e) { return outside_rows<PARTIAL>(tile_start, kv_end, tig, j, e); };
    float m_bias[2];
    maxima<PARTIAL>(s, tile_start, kv_end, tig, scale_log2, m_bias, alpha);
#pragma unroll
    for (int j = 0; j < S_TILES; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = outside(j, e) ? 0.0f : exp2f(fmaf(s[j][e], scale_log2, m_bias[e >> 1]));
        l[e >> 1] += s[j][e];
      }
    }
  }
  __device__ __forceinline__ void exps(float (&s)[S_TILES][4], int tile_start, int kv_end, int tig, float scale_log2,
                                       float (&alpha)[2]) {
    if (tile_start + 8 * S_TILES > kv_end) {
      exps_tile<true>(s, tile_start, kv_end, tig, scale_log2, alpha);
    } else {
      exps_tile<false>(s, tile_start, kv_end, tig, scale_log2, alpha);
    }
  }
  template <int N = S_TILES>
  static __device__ __forceinline__ void pack(const float (&p)[N][4], unsigned (&pa)[PV_STEPS][4]) {
#pragma unroll
    for (int kv = 0; kv < N / 2; ++kv) {
      pa[kv][0] = pack2<T>(p[2 * kv][0], p[2 * kv][1]);
      pa[kv][1] = pack2<T>(p[2 * kv][2], p[2 * kv][3]);
      pa[kv][2] = pack2<T>(p[2 * kv + 1][0], p[2 * kv + 1][1]);
      pa[kv][3] = pack2<T>(p[2 * kv + 1][2], p[2 * kv + 1][3]);
    }
  }

  // The tile of scores s whose first prefix row is tile_start.
  __device__ __forceinline__ void operator()(const float (&s)[S_TILES][4], int tile_start, int kv_end, int tig,
                                             float scale_log2, unsigned (&pa)[PV_STEPS][4], float (&alpha)[2]) {
    if (tile_start + 8 * S_TILES > kv_end) {
      tile<true>(s, tile_start, kv_end, tig, scale_log2, pa, alpha);
    } else {
      tile<false>(s, tile_start, kv_end, tig, scale_log2, pa, alpha);
    }
  }
};

// The output's rescale, skipped by the warp when no row's maximum moved (most tiles after the
// first few).
template <int O_TILES>
__device__ __forceinline__ void rescale_rows(float (&o)[O_TILES][4], const float (&alpha)[2]) {
  if (__any_sync(kFullMask, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
    for (int j = 0; j < O_TILES; ++j) {
      o[j][0] *= alpha[0];
      o[j][1] *= alpha[0];
      o[j][2] *= alpha[1];
      o[j][3] *= alpha[1];
    }
  }
}

// Finish: the row sums over the 4 lanes of a group, then each row's state for this chunk (row
// row_state[i] of part_out [.., 8 * O_TILES] and part_lse; -1: a padding row, not written).
template <typename T, int S_TILES, int O_TILES>
__device__ __forceinline__ void write_row_states(RowsSoftmax<T, S_TILES>& sm, const float (&o)[O_TILES][4],
                                                 const long long (&row_state)[2], float* __restrict__ part_out,
                                                 float* __restrict__ part_lse, int tig) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = sm.l[i];
    l += __shfl_xor_sync(kFullMask, l, 1);
    l += __shfl_xor_sync(kFullMask, l, 2);
    int bad = static_cast<int>(is_nan(sm.check[i]));
    bad |= __shfl_xor_sync(kFullMask, bad, 1);
    bad |= __shfl_xor_sync(kFullMask, bad, 2);
    if (row_state[i] < 0) continue;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    float* out_row = part_out + row_state[i] * (8 * O_TILES);
#pragma unroll
    for (int j = 0; j < O_TILES; ++j) {
      const float x = bad ? quiet_nan() : finite_or_nan(o[j][2 * i] * inv);
      const float y = bad ? quiet_nan() : finite_or_nan(o[j][2 * i + 1] * inv);
      *reinterpret_cast<float2*>(out_row + 8 * j + 2 * tig) = make_float2(x, y);
    }
    if (tig == 0) part_lse[row_state[i]] = bad ? quiet_nan() : l > 0.0f ? (sm.m[i] + log2f(l)) * kLn2 : neg_inf();
  }
}

// O += P V on wgmma for one swizzled V tile of KV rows at v_tile: one m64nHEAD_DIM product per
// k-step of 16 rows, P as the A fragments pa, V read N-major (8-row groups 1024 bytes apart,
// columns of 64 dims COLUMN_ROWS * 128 bytes apart: the first KV rows of a larger tile); committed
// as one group.
template <typename T, int HEAD_DIM, int KV, int COLUMN_ROWS = KV>
__device__ __forceinline__ void values_product(float (&o)[HEAD_DIM / 8][4], const unsigned (&pa)[KV / 16][4],
                                               unsigned v_tile) {
  fence_accumulators(o);
  wgmma_fence();
#pragma unroll
  for (int kv = 0; kv < KV / 16; ++kv) {
    wgmma_rs<T, HEAD_DIM, 1>(o, pa[kv], sw128_descriptor(v_tile + kv * 16 * 128, COLUMN_ROWS * 128, 1024));
  }
  wgmma_commit();
}

// The work of one block: the (up to) 64 query rows of this block (a lane's two rows gid and
// gid + 8 of its warp's m16 tile: sequence row_b, query head row_h, and the row of part_out /
// part_lse its state goes to, -1 for a padding row) against rows kv_begin .. kv_end - 1 of k and v
// ([rows, num_kv_heads, HEAD_DIM]; PAGED: the rows `pages` maps them to) of KV head kh.
template <typename T, int HEAD_DIM, int STAGES, bool PAGED = false>
__device__ __forceinline__ void attend_rows(const T* __restrict__ q, const T* __restrict__ k_rows,
                                            const T* __restrict__ v_rows, float* __restrict__ part_out,
                                            float* __restrict__ part_lse, int num_qo_heads,
                                            int num_kv_heads, int kh, int kv_begin, int kv_end,
                                            const int (&row_b)[2], const int (&row_h)[2],
                                            const long long (&row_state)[2], float scale_log2,
                                            const RowPages* pages = nullptr) {
  using Tile = PrefixTile<HEAD_DIM>;
  static_assert(HEAD_DIM % 32 == 0, "K fragments come four 8-dim pieces at a time");
  static_assert(STAGES >= 2, "at least double buffering");
  constexpr int K_STEPS = HEAD_DIM / 16;     // k-steps of S = Q K^T
  constexpr int KV_TILE = Tile::KV_TILE;
  constexpr int S_TILES = KV_TILE / 8;       // n-tiles of S (8 prefix rows each)
  constexpr int PV_STEPS = KV_TILE / 16;     // k-steps of O = P V
  constexpr int O_TILES = HEAD_DIM / 8;      // n-tiles of O

  // The products on wgmma (sm_90a) up to head_dim 128; at 256 the query's fragments would not fit
  // in the registers beside the output's, and they stay on mma.sync.
  constexpr bool WG = HAS_WGMMA && HEAD_DIM <= 128;
  extern __shared__ __align__(16) unsigned char smem[];   // [STAGES][K tile, V tile]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tig = lane & 3;
  const long long row_elems = static_cast<long long>(num_kv_heads) * HEAD_DIM;
  const bool row_ok[2] = {row_state[0] >= 0, row_state[1] >= 0};
  // A warp whose 16 rows are all padding (fewer query rows than the block holds: MHA, small
  // batches, a segment with one sharer) still copies its share of every tile but skips the products.
  // With wgmma the four warps compute together: every warp takes part.
  const bool warp_active = WG || __any_sync(kFullMask, row_ok[0] || row_ok[1]);
  // Q as A fragments for every k-step (rows past R are zero). At head_dim 256 they wait in shared
  // memory, each lane's own (64 registers fewer: no spills); below, in registers.
  constexpr bool Q_IN_SMEM = HEAD_DIM >= 256;
  __shared__ unsigned smem_q[Q_IN_SMEM ? SP_WARPS : 1][Q_IN_SMEM ? K_STEPS : 1][4][32];
  unsigned qa[Q_IN_SMEM ? 1 : K_STEPS][4];
  // A negative scale: q's signs flipped (exact) and the scale made positive, so that the largest raw
  // score is the largest scaled one.
  const unsigned q_sign = scale_log2 < 0.0f ? 0x80008000u : 0u;
  scale_log2 = fabsf(scale_log2);
#pragma unroll
  for (int kk = 0; kk < K_STEPS; ++kk) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const T* qr = q + (static_cast<long long>(row_b[i]) * num_qo_heads + row_h[i]) * HEAD_DIM + kk * 16 +
                    2 * tig;
      const unsigned lo = (row_ok[i] ? __ldg(reinterpret_cast<const unsigned*>(qr)) : 0u) ^ q_sign;      // a0, a1
      const unsigned hi = (row_ok[i] ? __ldg(reinterpret_cast<const unsigned*>(qr + 8)) : 0u) ^ q_sign; // a2, a3
      if constexpr (Q_IN_SMEM) {
        smem_q[warp][kk][i][lane] = lo;
        smem_q[warp][kk][2 + i][lane] = hi;
      } else {
        qa[kk][i] = lo;
        qa[kk][2 + i] = hi;
      }
    }
  }
  auto q_frag = [&](int kk, int r) -> unsigned {
    if constexpr (Q_IN_SMEM) {
      return smem_q[warp][kk][r][lane];   // written by this lane itself
    } else {
      return qa[kk][r];
    }
  };

  // The copies of one tile: thread t takes pieces t, t + SP_THREADS, ... of the tile's rows.
  static_assert(!WG || STAGES * Tile::SW_STAGE_BYTES + 1024 <= STAGES * Tile::STAGE_BYTES,
                "the swizzled stages fit the launch's shared memory after alignment");
  constexpr int STAGE_BYTES = WG ? Tile::SW_STAGE_BYTES : Tile::STAGE_BYTES;
  constexpr int TILE_BYTES = WG ? Tile::SW_TILE_BYTES : Tile::TILE_BYTES;
  const unsigned smem_raw = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const unsigned smem_base = WG ? (smem_raw + 1023u) & ~1023u : smem_raw;
  // Paged rows on wgmma: the rows of the tile a step refills are looked up at the step's start, by
  // one thread a row, and kept in smem_rows until the refill, so that the page table's latency
  // passes behind the step's products (looked up at the refill, every copy waited for its page).
  constexpr bool ROWS_AHEAD = PAGED && WG;
  __shared__ int smem_rows[ROWS_AHEAD ? KV_TILE : 1];
  int row_ahead = 0;   // ROWS_AHEAD: the cache row of row threadIdx.x of the tile to refill next
  auto look_ahead = [&](int tile_start) {
    if constexpr (ROWS_AHEAD) {
      const int kv = tile_start + static_cast<int>(threadIdx.x);
      if (threadIdx.x < KV_TILE && kv < kv_end) row_ahead = static_cast<int>(pages->row(kv));
    }
  };
  auto keep_ahead = [&]() {
    if constexpr (ROWS_AHEAD) {
      if (threadIdx.x < KV_TILE) smem_rows[threadIdx.x] = row_ahead;
    }
  };
  auto issue = [&](int tile_start, int stage, bool rows_kept = false) {
    const unsigned k_tile = smem_base + stage * STAGE_BYTES;
    const unsigned v_tile = k_tile + TILE_BYTES;
#pragma unroll
    for (int c = 0; c < Tile::COPIES; ++c) {
      const int piece = threadIdx.x + c * SP_THREADS;
      const int row = piece / Tile::PIECES, col = piece % Tile::PIECES;
      const int kv = tile_start + row;
      const bool valid = kv < kv_end;
      long long kv_row = kv;
      if constexpr (PAGED) {
        if (ROWS_AHEAD && rows_kept) {
          kv_row = smem_rows[row];
        } else {
          kv_row = valid ? pages->row(kv) : 0;
        }
      }
      const long long at = valid ? kv_row * row_elems + kh * HEAD_DIM + col * 8 : 0;
      const unsigned dst = WG ? swizzled_offset<KV_TILE>(row, col) : row * Tile::ROW_BYTES + col * 16;
      cp_async_16_zfill(k_tile + dst, k_rows + at, valid);
      cp_async_16_zfill(v_tile + dst, v_rows + at, valid);
    }
    cp_async_commit();   // one group per tile, empty past the end: the counting stays uniform
  };

  float o[O_TILES][4];
#pragma unroll
  for (int j = 0; j < O_TILES; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  RowsSoftmax<T, S_TILES> rows_softmax;
  // The tile's softmax and the output's rescale (RowsSoftmax), giving P as the A fragments pa.
  auto softmax = [&](const float (&s)[S_TILES][4], int tile_start, unsigned (&pa)[PV_STEPS][4]) {
    float alpha[2];
    rows_softmax(s, tile_start, kv_end, tig, scale_log2, pa, alpha);
    rescale_rows(o, alpha);
  };

  const int num_tiles = kv_end > kv_begin ? (kv_end - kv_begin + KV_TILE - 1) / KV_TILE : 0;
  if constexpr (WG) {
    // While the tensor cores compute the next tile's scores, the warps take this tile's softmax:
    // two score buffers, the loop unrolled by two so that they swap without copies. Every stage is
    // filled ahead (STAGES tiles in flight) and refilled once the products of its tile are done.
    // S = Q K^T: one m64nKV_TILE product per k-step for the warpgroup's 64 rows, K read K-major
    // from the swizzled tile (k-step kk is 32 bytes into its column of 64 dims).
    auto scores = [&](float (&s)[S_TILES][4], int t) {
      const unsigned k_tile = smem_base + (t % STAGES) * STAGE_BYTES;
      fence_accumulators(s);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < K_STEPS; ++kk) {
        wgmma_rs<T, KV_TILE, 0>(s, qa[kk], sw128_descriptor(k_tile + (kk >> 2) * (KV_TILE * 128) + (kk & 3) * 32,
                                                           16, 1024), kk > 0);
      }
      wgmma_commit();
    };
    auto values = [&](const unsigned (&pa)[PV_STEPS][4], int t) {
      values_product<T, HEAD_DIM, KV_TILE>(o, pa, smem_base + (t % STAGES) * STAGE_BYTES + TILE_BYTES);
    };
    auto step = [&](float (&cur)[S_TILES][4], float (&next)[S_TILES][4], int t) {
      const bool more = t + 1 < num_tiles;
      if (t + STAGES < num_tiles) look_ahead(kv_begin + (t + STAGES) * KV_TILE);
      if (more) {   // tile t + 1 landed (one later tile may still be in flight): its scores
        cp_async_wait<STAGES - 2>();
        fence_async_shared();
        __syncthreads();
        scores(next, t + 1);
      }
      unsigned pa[PV_STEPS][4];
      softmax(cur, kv_begin + t * KV_TILE, pa);
      values(pa, t);
      wgmma_wait<0>();
      fence_accumulators(o);
      fence_accumulators(next);
      if (t + STAGES < num_tiles) keep_ahead();
      __syncthreads();   // every warp's products of tile t are done: refill its stage
      if (t + STAGES < num_tiles) {
        issue(kv_begin + (t + STAGES) * KV_TILE, t % STAGES, true);
      } else {
        cp_async_commit();
      }
    };
#pragma unroll
    for (int st = 0; st < STAGES; ++st) {
      if (st < num_tiles) {
        issue(kv_begin + st * KV_TILE, st);
      } else {
        cp_async_commit();
      }
    }
    float sa[S_TILES][4], sb[S_TILES][4];
    if (num_tiles > 0) {
      cp_async_wait<STAGES - 1>();
      fence_async_shared();
      __syncthreads();
      scores(sa, 0);
      wgmma_wait<0>();
      fence_accumulators(sa);
    }
    for (int t = 0; t < num_tiles; t += 2) {
      step(sa, sb, t);
      if (t + 1 < num_tiles) step(sb, sa, t + 1);
    }
  } else {
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
      if (st < num_tiles) {
        issue(kv_begin + st * KV_TILE, st);
      } else {
        cp_async_commit();
      }
    }
    for (int t = 0; t < num_tiles; ++t) {
      const int stage = t % STAGES;
      // Refill the stage read in iteration t - 1 once every warp is done with it.
      __syncthreads();
      const int ahead = t + STAGES - 1;
      if (ahead < num_tiles) {
        issue(kv_begin + ahead * KV_TILE, ahead % STAGES);
      } else {
        cp_async_commit();
      }
      cp_async_wait<STAGES - 1>();
      __syncthreads();   // every thread's copies of tile t have landed
      if (!warp_active) continue;   // uniform over the warp; the block's barriers are above

      const unsigned k_tile = smem_base + stage * STAGE_BYTES;
      const unsigned v_tile = k_tile + TILE_BYTES;
          // S = Q K^T: n-tile j holds prefix rows tile_start + 8j .. +7. ldmatrix.x4 of K rows
          // 8j + (lane % 8) at dims 32c + 8 (lane / 8): b0, b1 of k-steps 2c and 2c + 1.
          float s[S_TILES][4];
      #pragma unroll
          for (int j = 0; j < S_TILES; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
          const unsigned k_lane = k_tile + (lane & 7) * Tile::ROW_BYTES + 16 * (lane >> 3);
          static_for<HEAD_DIM / 32>([&](auto ci) {
            constexpr int c = decltype(ci)::value;
            unsigned a[2][4];
      #pragma unroll
            for (int h = 0; h < 2; ++h) {
      #pragma unroll
              for (int r = 0; r < 4; ++r) a[h][r] = q_frag(2 * c + h, r);
            }
            static_for<S_TILES>([&](auto ji) {
              constexpr int j = decltype(ji)::value;
              unsigned kb[4];
              ldmatrix_x4_at<8 * j * Tile::ROW_BYTES + 64 * c>(kb, k_lane);
              mma_16816_full<T>(s[j], a[0][0], a[0][1], a[0][2], a[0][3], kb[0], kb[1]);
              mma_16816_full<T>(s[j], a[1][0], a[1][1], a[1][2], a[1][3], kb[2], kb[3]);
            });
          });
      unsigned pa[PV_STEPS][4];
      softmax(s, kv_begin + t * KV_TILE, pa);
      // O += P V with mma.sync: ldmatrix.x4.trans of V rows 16kv + (lane % 16) at dims
      // 8 (2jj + lane / 16): b0, b1 of O's n-tiles 2jj and 2jj + 1.
      const unsigned v_lane = v_tile + (lane & 15) * Tile::ROW_BYTES + 16 * (lane >> 4);
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
  }
  cp_async_wait<0>();

  write_row_states(rows_softmax, o, row_state, part_out, part_lse, tig);
}

// ---------------------------------------------------------------------------------------------
// The prefix pass on Hopper for launches of more than 64 query rows a KV head, its warps
// specialised: 128 query rows a block (PP_QUERY_ROWS) in two consumer warpgroups of 64, one block
// an SM, KV tiles of 128 rows (PP_KV_TILE: the scores one m64n128 product a k-step) copied once
// for both consumers by a producer warpgroup's one thread (TMA) through STAGES stages: a stage's
// copies complete on its `full` mbarrier, its refill waits on its `empty` mbarrier for both
// consumers' last product from it. The query tiles wait in shared memory (both products read
// their operands from there but P, which the softmax leaves in registers). The consumers take
// turns on the tensor cores (named barriers 1 and 2): in its turn a consumer issues tile t's
// scores and then tile t - 1's P V; it waits for the scores alone and takes their softmax while
// its P V and the other consumer's products run, then waits for the P V, rescales the output and
// packs this tile's P. The producer gives up registers (setmaxnreg) so that each consumer thread
// has 240. The tiles arrive with the 128-byte swizzle the products read (tensor maps over
// k_prefix and v_prefix as [rows, num_kv_heads, HEAD_DIM] in boxes of 64 dims x 1 head x 128 rows:
// gpukernels.shared_prefix); rows past the prefix arrive as zeros, and rows past the chunk's end
// (the next chunk's) are masked by the softmax. Against blocks of two warpgroups that copied their
// tiles themselves (cp.async) and took their softmax after both products: 32/8 x 128 sequences,
// 32768 prefix tokens 142.7 -> 119.0 us (482 -> 578 TFLOP/s; scripts/explore/prefix_specialized.py).
// Head_dim 64 and 128, 16-bit inputs (wgmma, sm_90a).
constexpr int PP_WARPGROUPS = 2;
constexpr int PP_QUERY_ROWS = PP_WARPGROUPS * QUERY_ROWS;
constexpr int PP_KV_TILE = 128;
constexpr int WS_THREADS = (PP_WARPGROUPS + 1) * SP_THREADS;
constexpr int WS_CONSUMER_REGISTERS = 240;
constexpr int WS_PRODUCER_REGISTERS = 24;

// The shared memory of the pass: STAGES stages of K and V tiles, then the query tiles, all
// swizzled (wgmma.cuh), from the first 1024-byte boundary (gpukernels.shared_prefix:
// pingpong_shared_bytes adds that alignment's 1024).
template <int HEAD_DIM, int KV = PP_KV_TILE>
struct PingPongTile {
  static constexpr int PIECES = HEAD_DIM / 8;                       // 16-byte pieces per row
  static constexpr int TILE_BYTES = KV * HEAD_DIM * 2;              // K (or V) of one stage
  static constexpr int STAGE_BYTES = 2 * TILE_BYTES;                // K and V
  static constexpr int Q_BYTES = QUERY_ROWS * HEAD_DIM * 2;         // one warpgroup's query rows
  static constexpr int Q_COPIES = QUERY_ROWS * PIECES / SP_THREADS; // pieces a thread stores of Q
  static_assert(QUERY_ROWS * PIECES % SP_THREADS == 0, "whole copies");
};

// Keeps the compiler from reusing the registers of an A operand of a product still in flight: they
// stay live until this point (after the wgmma_wait that covers the product).
template <int STEPS>
__device__ __forceinline__ void keep_fragments(unsigned (&a)[STEPS][4]) {
#pragma unroll
  for (int k = 0; k < STEPS; ++k) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[k][e])::"memory");
  }
}

// The query rows of a lane of the prefix pass: rows row0 and row0 + 8 of KV head blockIdx.z's
// r = b * G + g (sequence b, query head kh * G + g), and their state rows (chunk blockIdx.x, b,
// head) of part_out [num_chunks, batch, num_qo_heads, HEAD_DIM]; -1 past the batch's rows.
__device__ __forceinline__ void prefix_rows(int row0, int batch, int num_qo_heads, int num_kv_heads,
                                            int (&row_b)[2], int (&row_h)[2], long long (&row_state)[2]) {
  const int group_size = num_qo_heads / num_kv_heads;
  const int kh = blockIdx.z;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = row0 + 8 * i;
    const bool ok = r < batch * group_size;
    row_b[i] = ok ? r / group_size : 0;
    row_h[i] = ok ? kh * group_size + r % group_size : 0;
    row_state[i] = ok ? (static_cast<long long>(blockIdx.x) * batch + row_b[i]) * num_qo_heads + row_h[i] : -1;
  }
}

// Hydragen's prefix pass. Grid: x over the prefix chunks, y over the tiles of 64 query rows
// (r = b * G + g), z over the KV heads. State row (chunk, b, head) of part_out [num_chunks, batch,
// num_qo_heads, HEAD_DIM].
template <typename T, int HEAD_DIM, int STAGES>
__global__ void __launch_bounds__(SP_THREADS, HEAD_DIM >= 256 ? 1 : 2)
shared_prefix_kernel(const T* __restrict__ q,          // [batch, num_qo_heads, HEAD_DIM]
                     const T* __restrict__ k_prefix,   // [prefix_len, num_kv_heads, HEAD_DIM]
                     const T* __restrict__ v_prefix,
                     float* __restrict__ part_out,     // [num_chunks, batch, num_qo_heads, HEAD_DIM]
                     float* __restrict__ part_lse,     // [num_chunks, batch, num_qo_heads]
                     int batch, int prefix_len, int num_qo_heads, int num_kv_heads, int chunk_size,
                     float scale_log2) {
  let_dependents_start();   // the suffix pass's first wave runs on the SMs this pass frees
  int row_b[2], row_h[2];
  long long row_state[2];
  prefix_rows(blockIdx.y * QUERY_ROWS + (threadIdx.x >> 5) * 16 + ((threadIdx.x & 31) >> 2), batch, num_qo_heads,
              num_kv_heads, row_b, row_h, row_state);
  const int kv_begin = blockIdx.x * chunk_size;
  attend_rows<T, HEAD_DIM, STAGES>(q, k_prefix, v_prefix, part_out, part_lse, num_qo_heads, num_kv_heads,
                                   blockIdx.z, kv_begin, min(prefix_len, kv_begin + chunk_size), row_b, row_h,
                                   row_state, scale_log2);
}

// The suffixes in the prefix pass (attend_rows_specialized with SUFFIX): each consumer also attends
// the suffix tokens of the sequences its 64 query rows belong to, in slots of SUFFIX_ROWS tokens
// (slots_per_seq a sequence), those slots spread evenly over the prefix chunks of the block's rows
// (chunk c of N takes slots [c n / N, (c + 1) n / N) of a consumer's n). Suffix tile k of a block
// holds both consumers' k-th slots, one half of the stage's 128 rows each (a consumer's S is then a
// 64 x 64 product of which only its sequence's rows count: the rest are masked); the block's P
// prefix tiles and U suffix tiles are interleaved evenly (tile i of L = P + U is a suffix tile when
// floor((i + 1) U / L) > floor(i U / L)), so that the suffixes' reads from memory run beside the
// prefix's arithmetic. The suffixes arrive through tensor maps over k_suffix and v_suffix [batch,
// suffix_len, num_kv_heads, HEAD_DIM] in boxes of 64 dims x 1 head x SUFFIX_ROWS rows x 1 sequence
// (rows past suffix_len arrive as zeros).
constexpr int SUFFIX_ROWS = 64;

struct SuffixArgs {
  const TensorMap* k_map;
  const TensorMap* v_map;
  const int* lens;   // [batch]; nullptr: every suffix suffix_len long
  int suffix_len;
};

// A consumer's suffix slots in this block: first_slot .. first_slot + count - 1 of the sequences
// from first_seq on.
struct SuffixSlots {
  int first_seq = 0, first_slot = 0, count = 0;
};

struct SuffixSchedule {
  const int* lens = nullptr;
  int suffix_len = 0, slots_per_seq = 0, suffix_tiles = 0, total = 0;

  SuffixSchedule() = default;
  // The block's tiles; `slots` of consumer w (w 0 and 1 for the producer, which loads both).
  __device__ __forceinline__ SuffixSchedule(const SuffixArgs& a, int block_row, int rows, int group_size,
                                            int prefix_tiles, SuffixSlots (&slots)[2])
      : lens(a.lens), suffix_len(a.suffix_len), slots_per_seq((a.suffix_len + SUFFIX_ROWS - 1) / SUFFIX_ROWS) {
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      const int r0 = block_row + w * QUERY_ROWS;
      slots[w] = SuffixSlots{};
      if (r0 >= rows) continue;
      const int r1 = min(r0 + QUERY_ROWS, rows) - 1;
      slots[w].first_seq = r0 / group_size;
      const long long n = static_cast<long long>(r1 / group_size - slots[w].first_seq + 1) * slots_per_seq;
      const long long lo = n * blockIdx.x / gridDim.x, hi = n * (blockIdx.x + 1) / gridDim.x;
      slots[w].first_slot = static_cast<int>(lo);
      slots[w].count = static_cast<int>(hi - lo);
    }
    suffix_tiles = max(slots[0].count, slots[1].count);
    total = prefix_tiles + suffix_tiles;
  }
  // Suffix tiles among the block's first i tiles (total * suffix_tiles < 2^31: the plan's limit).
  __device__ __forceinline__ int suffixes_before(int i) const {
    return static_cast<int>(static_cast<unsigned>(i) * static_cast<unsigned>(suffix_tiles) /
                            static_cast<unsigned>(max(total, 1)));
  }
  __device__ __forceinline__ bool is_suffix(int i) const { return suffixes_before(i + 1) > suffixes_before(i); }
  // A length outside [0, suffix_len] reads nothing (and gives the sequence NaN: `bad_length`).
  __device__ __forceinline__ int length(int b) const {
    if (lens == nullptr) return suffix_len;
    const int n = __ldg(lens + b);
    return n < 0 || n > suffix_len ? 0 : n;
  }
  __device__ __forceinline__ bool bad_length(int b) const {
    if (lens == nullptr) return false;
    const int n = __ldg(lens + b);
    return n < 0 || n > suffix_len;
  }
  // A consumer's half of suffix tile k: its sequence b, first token and the sequence's length;
  // false for a half with no tokens.
  __device__ __forceinline__ bool half(const SuffixSlots& sl, int k, int& b, int& start, int& len) const {
    b = start = len = 0;
    if (k >= sl.count) return false;
    const int slot = sl.first_slot + k;
    b = sl.first_seq + slot / slots_per_seq;
    start = (slot % slots_per_seq) * SUFFIX_ROWS;
    len = length(b);
    return start < len;
  }
};

// The block's work: KV head kh's prefix rows kv_begin .. kv_end - 1 (through k_map, v_map) against
// its 128 query rows from row block_row of the head (r = b * G + g); each consumer's 64 rows a
// state each (prefix_rows). SUFFIX: and the block's share of the suffixes (SuffixSchedule).
template <typename T, int HEAD_DIM, int STAGES, int KV = PP_KV_TILE, bool SUFFIX = false>
__device__ __forceinline__ void attend_rows_specialized(const TensorMap& k_map, const TensorMap& v_map,
                                                        const T* __restrict__ q, float* __restrict__ part_out,
                                                        float* __restrict__ part_lse, int batch, int num_qo_heads,
                                                        int num_kv_heads, int kh, int kv_begin, int kv_end,
                                                        int block_row, float scale_log2,
                                                        const SuffixArgs* suffix_args = nullptr) {
  using Tile = PingPongTile<HEAD_DIM, KV>;
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "one or two swizzled columns of 64 dims");
  static_assert(STAGES >= 2, "a tile in flight while one is read");
  static_assert(!SUFFIX || KV == 2 * SUFFIX_ROWS, "a suffix tile: both consumers' halves");
  constexpr int K_STEPS = HEAD_DIM / 16;
  constexpr int S_TILES = KV / 8;
  constexpr int PV_STEPS = KV / 16;
  constexpr int O_TILES = HEAD_DIM / 8;
  constexpr int COLUMNS = HEAD_DIM / 64;                        // boxes of 64 dims a tile
  constexpr unsigned COLUMN_BYTES = KV * 128;           // one box: KV rows of 128 bytes
  constexpr unsigned HALF_OFFSET = SUFFIX_ROWS * 128;   // a consumer's half of a suffix tile, in a column
  constexpr unsigned HALF_BYTES = 2 * SUFFIX_ROWS * HEAD_DIM * 2;   // its K and V
  extern __shared__ __align__(16) unsigned char smem[];   // [STAGES][K tile, V tile], [2][Q tile]
  __shared__ __align__(8) unsigned long long bars[2 * STAGES];   // full[STAGES], empty[STAGES]
  // SUFFIX: per consumer, the dims of a suffix tile's V with a non-finite value (a bit a dim).
  __shared__ unsigned suffix_poison[SUFFIX ? 2 : 1][SUFFIX ? HEAD_DIM / 32 : 1];
  const int wg = static_cast<int>(threadIdx.x) / SP_THREADS;     // 0: the producer; 1, 2: consumers
  const int cw = wg - 1, wt = static_cast<int>(threadIdx.x) % SP_THREADS;
  const int tig = threadIdx.x & 3;
  const int group_size = num_qo_heads / num_kv_heads;
  const int rows = batch * group_size;
  const unsigned smem_base = (static_cast<unsigned>(__cvta_generic_to_shared(smem)) + 1023u) & ~1023u;
  const unsigned full0 = static_cast<unsigned>(__cvta_generic_to_shared(bars));
  const unsigned empty0 = full0 + 8 * STAGES;
  const int first_row = block_row + cw * QUERY_ROWS;   // a consumer's first query row of the head
  const unsigned q_tile = smem_base + STAGES * Tile::STAGE_BYTES + cw * Tile::Q_BYTES;

  if (wg > 0) {
    // The warpgroup's query rows into its tile (zero past the rows); a negative scale: q's signs
    // flipped (exact) and the scale made positive, as attend_rows.
    const unsigned flip = scale_log2 < 0.0f ? 0x80008000u : 0u;
#pragma unroll
    for (int c = 0; c < Tile::Q_COPIES; ++c) {
      const int piece = wt + c * SP_THREADS;
      const int row = piece / Tile::PIECES, col = piece % Tile::PIECES;
      const int r = first_row + row;
      uint4 x = make_uint4(0u, 0u, 0u, 0u);
      if (r < rows) {
        const long long at = (static_cast<long long>(r / group_size) * num_qo_heads + kh * group_size + r % group_size) *
                             HEAD_DIM + col * 8;
        x = __ldg(reinterpret_cast<const uint4*>(q + at));
      }
      x.x ^= flip, x.y ^= flip, x.z ^= flip, x.w ^= flip;
      asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(q_tile + swizzled_offset<QUERY_ROWS>(row, col)),
                   "r"(x.x), "r"(x.y), "r"(x.z), "r"(x.w) : "memory");
    }
    if constexpr (SUFFIX) {
      if (wt < HEAD_DIM / 32) suffix_poison[cw][wt] = 0u;
    }
    fence_async_shared();
  } else if (threadIdx.x == 0) {
#pragma unroll
    for (int st = 0; st < STAGES; ++st) {
      mbarrier_init(full0 + 8 * st, 1);
      mbarrier_init(empty0 + 8 * st, 2 * SP_THREADS);
    }
    mbarrier_init_fence();
  }
  __syncthreads();   // the barriers and the query tiles
  const int num_prefix_tiles = kv_end > kv_begin ? (kv_end - kv_begin + KV - 1) / KV : 0;
  // Without suffixes every tile is a prefix tile (the schedule's methods are not called).
  SuffixSlots slots[2];
  const SuffixSchedule sched = SUFFIX ? SuffixSchedule(*suffix_args, block_row, rows, group_size, num_prefix_tiles,
                                                       slots)
                                      : SuffixSchedule{};
  const int num_tiles = SUFFIX ? sched.total : num_prefix_tiles;
  auto suffix_tile = [&](int t) { return SUFFIX && sched.is_suffix(t); };
  auto prefix_index = [&](int t) { return SUFFIX ? t - sched.suffixes_before(t) : t; };

  if (wg == 0) {
    registers_lower<WS_PRODUCER_REGISTERS>();
    if (threadIdx.x == 0) {
      // Tile u into stage u % STAGES once both consumers are done with the tile it held.
      for (int u = 0; u < num_tiles; ++u) {
        const int stage = u % STAGES;
        if (u >= STAGES) mbarrier_wait(empty0 + 8 * stage, (u / STAGES - 1) & 1);
        const unsigned full = full0 + 8 * stage;
        const unsigned k_tile = smem_base + stage * Tile::STAGE_BYTES;
        if (suffix_tile(u)) {
          if constexpr (SUFFIX) {
            const int k = sched.suffixes_before(u);
            int b[2], start[2], len[2];
            const bool on0 = sched.half(slots[0], k, b[0], start[0], len[0]);
            const bool on1 = sched.half(slots[1], k, b[1], start[1], len[1]);
            // A half with no tokens gets zeros (a box past suffix_len: no reads), so that the
            // consumer's products, made whether or not its half has tokens, read no stale values.
            mbarrier_expect_bytes(full, 2 * HALF_BYTES);
#pragma unroll
            for (int w = 0; w < 2; ++w) {
              const bool on = w == 0 ? on0 : on1;
              const int row = on ? start[w] : sched.suffix_len, seq = on ? b[w] : 0;
#pragma unroll
              for (int c = 0; c < COLUMNS; ++c) {
                const unsigned at = k_tile + c * COLUMN_BYTES + w * HALF_OFFSET;
                tma_load_4d(at, suffix_args->k_map, full, 64 * c, kh, row, seq);
                tma_load_4d(at + Tile::TILE_BYTES, suffix_args->v_map, full, 64 * c, kh, row, seq);
              }
            }
          }
          continue;
        }
        mbarrier_expect_bytes(full, Tile::STAGE_BYTES);
        const int row = kv_begin + prefix_index(u) * KV;
#pragma unroll
        for (int c = 0; c < COLUMNS; ++c) {
          tma_load_3d(k_tile + c * COLUMN_BYTES, &k_map, full, 64 * c, kh, row);
          tma_load_3d(k_tile + Tile::TILE_BYTES + c * COLUMN_BYTES, &v_map, full, 64 * c, kh, row);
        }
      }
    }
    return;
  }
  registers_raise<WS_CONSUMER_REGISTERS>();
  scale_log2 = fabsf(scale_log2);
  const int row0 = first_row + (wt >> 5) * 16 + ((wt & 31) >> 2);   // this lane's rows row0, row0 + 8

  auto scores = [&](float (&s)[S_TILES][4], int t, unsigned first_row_offset = 0) {
    const unsigned k_tile = smem_base + (t % STAGES) * Tile::STAGE_BYTES + first_row_offset;
    fence_accumulators(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < K_STEPS; ++kk) {
      const unsigned step = (kk & 3) * 32;   // k-step kk: 32 bytes into its column of 64 dims
      wgmma_ss<T, KV>(s, sw128_descriptor(q_tile + (kk >> 2) * (QUERY_ROWS * 128) + step, 16, 1024),
                      sw128_descriptor(k_tile + (kk >> 2) * COLUMN_BYTES + step, 16, 1024), kk > 0);
    }
    wgmma_commit();
  };
  float o[O_TILES][4];
#pragma unroll
  for (int j = 0; j < O_TILES; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  auto values = [&](const unsigned (&pa)[PV_STEPS][4], int t) {
    values_product<T, HEAD_DIM, KV>(o, pa, smem_base + (t % STAGES) * Tile::STAGE_BYTES + Tile::TILE_BYTES);
  };

  RowsSoftmax<T, S_TILES> rows_softmax;
  // SUFFIX: the sequence of each of this lane's rows (-1: padding), and this consumer's half of a
  // suffix tile: its sequence b and its tokens `end` (none: end <= 0). The rows of a sequence
  // whose length cannot be read are NaN in the first chunk's states (the merge makes the whole
  // row NaN).
  struct Half {
    bool suffix = false;   // a suffix tile
    int end = 0;           // its tokens in this consumer's half
    unsigned own = 0u;     // bit i: the lane's row i is of the half's sequence
  };
  int seq[2] = {-1, -1};
  if constexpr (SUFFIX) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      seq[i] = row0 + 8 * i < rows ? (row0 + 8 * i) / group_size : -1;
      if (blockIdx.x == 0 && seq[i] >= 0 && sched.bad_length(seq[i])) rows_softmax.check[i] = quiet_nan();
    }
  }
  const SuffixSlots mine = cw == 0 ? slots[0] : slots[1];
  auto half_of = [&](int t) {
    Half h;
    if constexpr (SUFFIX) {
      h.suffix = suffix_tile(t);
      int b, start, len;
      if (h.suffix && sched.half(mine, sched.suffixes_before(t), b, start, len)) {
        h.end = len - start;
        h.own = static_cast<unsigned>(seq[0] == b) | static_cast<unsigned>(seq[1] == b) << 1;
      }
    }
    return h;
  };
  // The scores of tile t. A suffix tile: the tile's rows from this consumer's half on, of which
  // the first SUFFIX_ROWS (its half) are used (the product of 64 columns alone left the compiler
  // short of registers for the products in flight); zeros if the half has no tokens.
  auto tile_scores = [&](float (&s)[S_TILES][4], int t, const Half& h) {
    scores(s, t, h.suffix ? cw * HALF_OFFSET : 0u);
  };
  auto tile_values = [&](const unsigned (&pa)[PV_STEPS][4], int t, const Half& h) {
    if (!h.suffix) {
      values(pa, t);
      return;
    }
    if constexpr (SUFFIX) {
      const unsigned v_half = smem_base + (t % STAGES) * Tile::STAGE_BYTES + Tile::TILE_BYTES + cw * HALF_OFFSET;
      values_product<T, HEAD_DIM, SUFFIX_ROWS, KV>(o, reinterpret_cast<const unsigned (&)[PV_STEPS / 2][4]>(pa),
                                                   v_half);
    }
  };
  // The softmax of tile t's scores, in place (a suffix tile: only this consumer's sequence's rows,
  // up to its length).
  auto tile_exps = [&](float (&s)[S_TILES][4], int t, const Half& h, float (&alpha)[2]) {
    if (!h.suffix) {
      rows_softmax.exps(s, kv_begin + prefix_index(t) * KV, kv_end, tig, scale_log2, alpha);
      return;
    }
    if constexpr (SUFFIX) {
      const int limit[2] = {h.own & 1u ? h.end - 2 * tig : 0, h.own & 2u ? h.end - 2 * tig : 0};
      rows_softmax.exps_masked(reinterpret_cast<float (&)[S_TILES / 2][4]>(s),
                               [&](int i, int j, int e) { return 8 * j + (e & 1) >= limit[i]; }, scale_log2, alpha);
    }
  };
  auto tile_pack = [&](const float (&s)[S_TILES][4], const Half& h, unsigned (&pa)[PV_STEPS][4]) {
    if (h.suffix) {
      RowsSoftmax<T, S_TILES>::template pack<S_TILES / 2>(reinterpret_cast<const float (&)[S_TILES / 2][4]>(s), pa);
    } else {
      RowsSoftmax<T, S_TILES>::pack(s, pa);
    }
  };
  // Before its P V, with no product into o in flight: this consumer's half of suffix tile t with
  // its rows past the sequence's length zeroed (whatever lies there), and any non-finite V value
  // of the sequence zeroed too, its dim made NaN in the output of the sequence's rows instead (in
  // the product it would reach the other sequences' rows through their zero probabilities).
  auto clean_values = [&](int t, const Half& h) {
    if constexpr (SUFFIX) {
      if (h.end <= 0) return;
      const unsigned v_half = smem_base + (t % STAGES) * Tile::STAGE_BYTES + Tile::TILE_BYTES + cw * HALF_OFFSET;
      constexpr unsigned EXP = IsBf16<T>::value ? 0x7f80u : 0x7c00u;   // the exponent's bits
      bool found = false, wrote = false;
#pragma unroll 2
      for (int c = 0; c < SUFFIX_ROWS * Tile::PIECES / SP_THREADS; ++c) {
        const int piece = wt + c * SP_THREADS;
        const int row = piece / Tile::PIECES, col = piece % Tile::PIECES;
        const unsigned at = v_half + swizzled_offset<KV>(row, col);
        unsigned x[4];
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3]) : "r"(at) : "memory");
        if (row >= h.end) {
          asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(at), "r"(0u) : "memory");
          wrote = true;
          continue;
        }
        // Non-finite halves: all exponent bits set (two halves a word at once).
        constexpr unsigned EXP2 = EXP | EXP << 16;
        const unsigned bad = __vcmpeq2(x[0] & EXP2, EXP2) | __vcmpeq2(x[1] & EXP2, EXP2) |
                             __vcmpeq2(x[2] & EXP2, EXP2) | __vcmpeq2(x[3] & EXP2, EXP2);
        if (bad == 0u) continue;
        for (int e = 0; e < 8; ++e) {
          const unsigned bits = (x[e >> 1] >> (16 * (e & 1))) & 0xffffu;
          if ((bits & EXP) == EXP) {
            atomicOr(&suffix_poison[cw][(col * 8 + e) >> 5], 1u << ((col * 8 + e) & 31));
            x[e >> 1] &= ~(0xffffu << (16 * (e & 1)));
          }
        }
        asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(at), "r"(x[0]), "r"(x[1]), "r"(x[2]),
                     "r"(x[3]) : "memory");
        found = wrote = true;
      }
      if (wrote) fence_async_shared();   // only a writer's stores need it (and it is not free)
      const int barrier = 3 + cw;
      if (named_barrier_or(barrier, SP_THREADS, found)) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          if (!(h.own >> i & 1u)) continue;
#pragma unroll
          for (int j = 0; j < O_TILES; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int d = 8 * j + 2 * tig + e;
              if (suffix_poison[cw][d >> 5] >> (d & 31) & 1u) o[j][2 * i + e] = quiet_nan();
            }
          }
        }
        named_barrier_sync(barrier, SP_THREADS);
        if (wt < HEAD_DIM / 32) suffix_poison[cw][wt] = 0u;
      }
    }
  };

  if (num_tiles > 0) {
    // Turns: consumer w waits on barrier 1 + w before issuing its products, then lets the other go
    // (256 threads: the one that waits and the one that arrives); consumer 0 goes first. Both take
    // num_tiles + 1 turns; consumer 1's last would open no turn, and does not arrive.
    const int my_turn = 1 + cw, their_turn = 2 - cw;
    if (cw == 1) named_barrier_arrive(1, 2 * SP_THREADS);
    float s[S_TILES][4];
    unsigned pa[PV_STEPS][4];   // P of the tile before, read by its P V in flight
    float alpha[2];
    // Tile 0: its scores alone (the loop below has the same groups in flight at every tile).
    Half cur = half_of(0);
    mbarrier_wait(full0, 0);
    named_barrier_sync(my_turn, 2 * SP_THREADS);
    tile_scores(s, 0, cur);
    named_barrier_arrive(their_turn, 2 * SP_THREADS);
    wgmma_wait<0>();
    fence_accumulators(s);
    tile_exps(s, 0, cur, alpha);
    clean_values(0, cur);
    tile_pack(s, cur, pa);
    for (int t = 1; t < num_tiles; ++t) {
      const Half prev = cur;
      cur = half_of(t);
      mbarrier_wait(full0 + 8 * (t % STAGES), (t / STAGES) & 1);
      named_barrier_sync(my_turn, 2 * SP_THREADS);
      tile_scores(s, t, cur);
      tile_values(pa, t - 1, prev);
      named_barrier_arrive(their_turn, 2 * SP_THREADS);
      wgmma_wait<1>();   // the scores (the older group)
      fence_accumulators(s);
      tile_exps(s, t, cur, alpha);
      wgmma_wait<0>();
      fence_accumulators(o);
      keep_fragments(pa);
      mbarrier_arrive(empty0 + 8 * ((t - 1) % STAGES));   // this thread is done with tile t - 1
      clean_values(t, cur);
      rescale_rows(o, alpha);
      tile_pack(s, cur, pa);
    }
    named_barrier_sync(my_turn, 2 * SP_THREADS);
    tile_values(pa, num_tiles - 1, cur);
    if (cw == 0) named_barrier_arrive(their_turn, 2 * SP_THREADS);
    wgmma_wait<0>();
    fence_accumulators(o);
    keep_fragments(pa);
  }
  int row_b[2], row_h[2];
  long long row_state[2];
  prefix_rows(row0, batch, num_qo_heads, num_kv_heads, row_b, row_h, row_state);
  write_row_states(rows_softmax, o, row_state, part_out, part_lse, tig);
}

// Hydragen's prefix pass in blocks of 128 query rows (attend_rows_specialized): grid as
// shared_prefix_kernel's but y over tiles of 128 rows; 384 threads; k_map and v_map over k_prefix
// and v_prefix. Hopper (sm_90a), head_dim 64 and 128.
template <typename T, int HEAD_DIM, int STAGES, int KV = PP_KV_TILE>
__global__ void __launch_bounds__(WS_THREADS, 1)
shared_prefix_specialized_kernel(const __grid_constant__ TensorMap k_map, const __grid_constant__ TensorMap v_map,
                                 const T* __restrict__ q, float* __restrict__ part_out, float* __restrict__ part_lse,
                                 int batch, int prefix_len, int num_qo_heads, int num_kv_heads, int chunk_size,
                                 float scale_log2) {
  let_dependents_start();
  if constexpr (HAS_WGMMA) {
    const int kv_begin = blockIdx.x * chunk_size;
    attend_rows_specialized<T, HEAD_DIM, STAGES, KV>(k_map, v_map, q, part_out, part_lse, batch, num_qo_heads,
                                                 num_kv_heads, blockIdx.z, kv_begin,
                                                 min(prefix_len, kv_begin + chunk_size), blockIdx.y * PP_QUERY_ROWS,
                                                 scale_log2);
  } else {
    __trap();   // launched only on Hopper
  }
}

// Hydragen in one pass: the prefix pass in blocks of 128 query rows (attend_rows_specialized) with
// every sequence's suffix attended in it too (SuffixSchedule); each state row (chunk, b, head) of
// part_out then holds the chunk's prefix tokens and the suffix slots that chunk took, and
// `merge_prefix_chunks_kernel` merges them. Grid and k_map, v_map as
// shared_prefix_specialized_kernel's; ks_map, vs_map over k_suffix, v_suffix [batch, suffix_len,
// num_kv_heads, HEAD_DIM] (boxes of 64 dims x 1 head x SUFFIX_ROWS rows x 1 sequence).
template <typename T, int HEAD_DIM, int STAGES>
__global__ void __launch_bounds__(WS_THREADS, 1)
shared_prefix_fused_kernel(const __grid_constant__ TensorMap k_map, const __grid_constant__ TensorMap v_map,
                           const __grid_constant__ TensorMap ks_map, const __grid_constant__ TensorMap vs_map,
                           const T* __restrict__ q, float* __restrict__ part_out, float* __restrict__ part_lse,
                           const int* __restrict__ suffix_lens,   // [batch] or nullptr
                           int batch, int prefix_len, int suffix_len, int num_qo_heads, int num_kv_heads,
                           int chunk_size, float scale_log2) {
  let_dependents_start();   // the merge's blocks wait for this pass's end
  if constexpr (HAS_WGMMA) {
    const SuffixArgs suffix{&ks_map, &vs_map, suffix_lens, suffix_len};
    const int kv_begin = blockIdx.x * chunk_size;
    attend_rows_specialized<T, HEAD_DIM, STAGES, PP_KV_TILE, true>(
        k_map, v_map, q, part_out, part_lse, batch, num_qo_heads, num_kv_heads, blockIdx.z, kv_begin,
        min(prefix_len, kv_begin + chunk_size), blockIdx.y * PP_QUERY_ROWS, scale_log2, &suffix);
  } else {
    __trap();   // launched only on Hopper
  }
}

// Tree-shaped sharing in one launch: every (segment, chunk, tile of 64 query rows) is a work item
// (grid x; grid y over the KV heads). The rows of a segment are its sharers' query heads of KV
// head kh: row r = i * G + g for sharer i = sharers[sharer_offset + r / G]. Sharer i's state for
// chunk c of the segment is state first_state[sharer_offset + r / G] + c * state_stride of
// part_out [num_states, num_qo_heads, HEAD_DIM]. A work item is six ints: the chunk's first and
// end token (rows of k_segs), sharer_offset, the segment's number of sharers, its first query row,
// and c.
// PAGED: the token rows of the work list are rows of pages (RowPages over page_table, pages of
// page_size rows of k_segs, v_segs [pages, page_size, num_kv_heads, HEAD_DIM]).
template <typename T, int HEAD_DIM, int STAGES, bool PAGED = false>
__global__ void __launch_bounds__(SP_THREADS, HEAD_DIM >= 256 ? 1 : 2)
tree_segments_kernel(const T* __restrict__ q,            // [batch, num_qo_heads, HEAD_DIM]
                     const T* __restrict__ k_segs,       // [total_tokens, num_kv_heads, HEAD_DIM]
                     const T* __restrict__ v_segs,
                     const int* __restrict__ work,       // [num_items, 6]
                     const int* __restrict__ sharers,    // sequences, segment by segment
                     const int* __restrict__ first_state,  // parallel to sharers
                     float* __restrict__ part_out,       // [num_states, num_qo_heads, HEAD_DIM]
                     float* __restrict__ part_lse,       // [num_states, num_qo_heads]
                     int num_qo_heads, int num_kv_heads, int state_stride, float scale_log2,
                     const int* __restrict__ page_table, int page_size) {
  let_dependents_start();   // the launch after it (the sequences' own tokens) may start
  const int* item = work + 6 * static_cast<long long>(blockIdx.x);
  const int kv_begin = item[0], kv_end = item[1], sharer_offset = item[2], num_sharers = item[3];
  const int first_row = item[4], c = item[5];
  const int kh = blockIdx.y;
  const int group_size = num_qo_heads / num_kv_heads;
  const int rows = num_sharers * group_size;
  const int row0 = first_row + (threadIdx.x >> 5) * 16 + ((threadIdx.x & 31) >> 2);
  int row_b[2], row_h[2];
  long long row_state[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = row0 + 8 * i;
    const bool ok = r < first_row + QUERY_ROWS && r < rows;
    const int sharer = ok ? sharer_offset + r / group_size : 0;
    row_b[i] = ok ? sharers[sharer] : 0;
    row_h[i] = ok ? kh * group_size + r % group_size : 0;
    row_state[i] = ok ? (first_state[sharer] + static_cast<long long>(c) * state_stride) * num_qo_heads + row_h[i]
                      : -1;
  }
  if constexpr (PAGED) {
    const RowPages pages(page_table, page_size);
    attend_rows<T, HEAD_DIM, STAGES, true>(q, k_segs, v_segs, part_out, part_lse, num_qo_heads, num_kv_heads, kh,
                                           kv_begin, kv_end, row_b, row_h, row_state, scale_log2, &pages);
  } else {
    (void)page_table, (void)page_size;
    attend_rows<T, HEAD_DIM, STAGES>(q, k_segs, v_segs, part_out, part_lse, num_qo_heads, num_kv_heads, kh,
                                     kv_begin, kv_end, row_b, row_h, row_state, scale_log2);
  }
}

constexpr int MERGE_THREADS = 128;   // threads of a merge block

// The merge kernels' threads: each takes 4 adjacent dims of one (sequence, query head) row, a block
// MERGE_THREADS / (head_dim / 4) rows, and merges the row's states by LSE (RunningMerge: the rules
// of merge_states.cu), loading 8 states at once. (One block per row, a thread per dim and one state
// after another, took 22 us for 33 states of 512 rows.) Returns false for a thread past the rows.
__device__ __forceinline__ bool merge_thread(long long rows, int head_dim, long long& row, int& d) {
  const int per_row = head_dim / 4;
  const long long t = static_cast<long long>(blockIdx.x) * MERGE_THREADS + threadIdx.x;
  row = t / per_row;
  d = static_cast<int>(t % per_row) * 4;
  return row < rows;
}

// Merge, per (sequence, query head), the states part_indptr[b] .. part_indptr[b + 1] - 1 of
// part_out [num_states, num_qo_heads, head_dim] (a sequence's chunks of all its segments) by LSE.
// Grid: rows * head_dim / 4 threads.
template <typename T>
__global__ void __launch_bounds__(MERGE_THREADS)
merge_parts_kernel(const float* __restrict__ part_out, const float* __restrict__ part_lse,
                   const int* __restrict__ part_indptr,   // [batch + 1]
                   T* __restrict__ out,                   // [batch, num_qo_heads, head_dim]
                   float* __restrict__ lse,               // [batch, num_qo_heads]
                   long long rows, int num_qo_heads, int head_dim) {
  long long row;
  int d;
  if (!merge_thread(rows, head_dim, row, d)) return;
  const long long b = row / num_qo_heads, h = row % num_qo_heads;
  const int first = part_indptr[b];
  RunningMerge r;
  merge_states_into(r, part_out, part_lse, part_indptr[b + 1] - first, num_qo_heads,
                    static_cast<long long>(first) * num_qo_heads + h, d, head_dim);
  write_merged<T>(r, out + row * head_dim + d, lse + row, d);
}

// Merge, per (sequence, query head), the prefix chunks' float32 states (Hydragen with no suffix
// tokens). SUFFIX: with the state already in out and lse (the suffixes', written by a launch of
// their own), merged in place; that launch launched dependent on the suffixes' (whose blocks end
// after the prefix pass), so that its own start passes behind their end. Grid: rows * head_dim / 4
// threads.
template <typename T, bool SUFFIX = false>
__global__ void __launch_bounds__(MERGE_THREADS)
merge_prefix_chunks_kernel(const float* __restrict__ part_out,   // [num_chunks, rows, head_dim]
                           const float* __restrict__ part_lse,   // [num_chunks, rows]
                           T* __restrict__ out,                  // [rows, head_dim]
                           float* __restrict__ lse,              // [rows]
                           int num_chunks, long long rows, int head_dim) {
  long long row;
  int d;
  if (!merge_thread(rows, head_dim, row, d)) return;
  wait_for_previous_grid();   // launched dependent (SUFFIX): the states are now written
  RunningMerge r;
  if constexpr (SUFFIX) {
    const T* o = out + row * head_dim + d;
    const float ls[1] = {lse[row]};
    const float4 os[1] = {make_float4(static_cast<float>(o[0]), static_cast<float>(o[1]), static_cast<float>(o[2]),
                                      static_cast<float>(o[3]))};
    fold_states<1>(r, ls, os);
  }
  merge_states_into(r, part_out, part_lse, num_chunks, rows, row, d, head_dim);
  write_merged<T>(r, out + row * head_dim + d, lse + row, d);
}

}  // namespace decode_attention
