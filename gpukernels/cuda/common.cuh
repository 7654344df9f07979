// Shared device helpers: 16-byte vector loads and their conversion to float32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace decode_attention {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;
// -inf, the lse of an empty state.
// Programmatic dependent launch (sm_90): a kernel launched with programmatic stream serialization
// may start while the kernel before it in the stream still runs; this waits until that kernel has
// finished and its writes are visible. Without that launch attribute it returns at once.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The other side: once every block of this kernel has called it (or exited), the kernel launched
// after it with programmatic stream serialization may start (its blocks still wait in
// wait_for_previous_grid for this kernel's end). Called at a block's start, the next kernel's blocks
// take the SMs this kernel's blocks leave free, and its first wave overlaps this kernel's tail.
__device__ __forceinline__ void let_dependents_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }
// By the bits, so that fast-math compilation cannot fold them away.
__device__ __forceinline__ bool is_finite(float x) {
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}
__device__ __forceinline__ bool is_nan(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }
// c, or NaN when x is NaN or infinite: x * 0 + c, as an instruction the compiler cannot simplify.
__device__ __forceinline__ float nan_if_nonfinite(float x, float c) {
  float r;
  asm("fma.rn.f32 %0, %1, 0f00000000, %2;" : "=f"(r) : "f"(x), "f"(c));
  return r;
}
// Non-finite values never hide: an infinity that reaches an output becomes NaN.
__device__ __forceinline__ float finite_or_nan(float x) { return is_finite(x) ? x : quiet_nan(); }

template <int I>
struct Index {
  static constexpr int value = I;
};
// f(Index<0>{}), ..., f(Index<N-1>{}): a loop whose index is a compile-time constant.
template <int N, int I = 0, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  if constexpr (I < N) {
    f(Index<I>{});
    static_for<N, I + 1>(f);
  }
}

// Elements of T in one 16-byte load.
template <typename T>
struct VecTraits {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
};

// 16 bytes of T -> kElems float32 values.
template <typename T>
__device__ __forceinline__ void to_float(const uint4& raw, float* out);

template <>
__device__ __forceinline__ void to_float<__half>(const uint4& raw, float* out) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <>
__device__ __forceinline__ void to_float<__nv_bfloat16>(const uint4& raw, float* out) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <>
__device__ __forceinline__ void to_float<float>(const uint4& raw, float* out) {
  out[0] = __uint_as_float(raw.x);
  out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z);
  out[3] = __uint_as_float(raw.w);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }

// A streaming 16-byte load: the cache rows are read once, so they should not displace L2 lines
// that are reused (the shared query, the split partials).
__device__ __forceinline__ uint4 load_stream(const void* p) {
  return __ldcs(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ uint4 zero_vec() { return make_uint4(0u, 0u, 0u, 0u); }

// exp2 of a difference of running maxima, with the empty state (-inf) as the identity.
__device__ __forceinline__ float rescale(float m_old, float m_new) {
  return m_new == neg_inf() ? 0.0f : exp2f(m_old - m_new);
}

}  // namespace decode_attention

namespace decode_attention {

__device__ __forceinline__ void to_scalar_float(const __half* p, float* out) { *out = __half2float(*p); }
__device__ __forceinline__ void to_scalar_float(const __nv_bfloat16* p, float* out) {
  *out = __bfloat162float(*p);
}
__device__ __forceinline__ void to_scalar_float(const float* p, float* out) { *out = *p; }

// Two floats rounded into one 32-bit register of two 16-bit values (the A operand of a tensor-core
// product): low half first.
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi);
template <>
__device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&h);
}
template <>
__device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&h);
}

// cp.async groups: close this thread's group of copies; wait until at most N groups are in flight.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

}  // namespace decode_attention

namespace decode_attention {

// Tensor-core helpers of the shared-prefix, tree and bifurcated kernels.
// D += A B for one m16n8k16 tile: A row-major (a0..a3), B column-major (b0, b1), float32 D.
template <typename T>
__device__ __forceinline__ void mma_16816_full(float (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                               unsigned a3, unsigned b0, unsigned b1);

#define DECODE_ATTENTION_MMA_FULL(CTYPE, PTXTYPE)                                                   \
  template <>                                                                                      \
  __device__ __forceinline__ void mma_16816_full<CTYPE>(float (&d)[4], unsigned a0, unsigned a1,   \
                                                        unsigned a2, unsigned a3, unsigned b0,     \
                                                        unsigned b1) {                             \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTXTYPE "." PTXTYPE                      \
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                     \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                  \
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));                          \
  }
DECODE_ATTENTION_MMA_FULL(__half, "f16")
DECODE_ATTENTION_MMA_FULL(__nv_bfloat16, "bf16")
#undef DECODE_ATTENTION_MMA_FULL

// Fragment loads from shared address `base + OFFSET`, the offset an immediate of the instruction
// (computed addresses for every fragment of a tile would be kept in registers).
template <int OFFSET>
__device__ __forceinline__ void ldmatrix_x4_at(unsigned (&r)[4], unsigned base) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4+%5];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(base), "n"(OFFSET));
}
template <int OFFSET>
__device__ __forceinline__ void ldmatrix_x4_trans_at(unsigned (&r)[4], unsigned base) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4+%5];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(base), "n"(OFFSET));
}
__device__ __forceinline__ void cp_async_16_zfill(unsigned smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
               "r"(valid ? 16 : 0));
}

// A running LSE merge of float32 states (out normalised, lse in natural log) over 4 adjacent dims
// of one (sequence, query head) row, with the rules of merge_states.cu: an empty state (lse -inf)
// adds nothing, an lse of NaN or +inf makes the row NaN, a non-finite out element of a non-empty
// state makes that element NaN.
struct RunningMerge {
  float m = neg_inf();   // the largest lse so far
  float w = 0.0f;        // the states' weights, relative to m
  bool poisoned = false;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
};

// Fold N states (lse ls[u], out os[u] at 4 dims) into r, rescaling r once. SKIP_EMPTY: an empty
// state's out is not even multiplied by its zero weight (states from outside, whose empty out may
// be NaN); split-KV's own partials write 0 there and take the branch-free form.
template <int N, bool SKIP_EMPTY = true>
__device__ __forceinline__ void fold_states(RunningMerge& r, const float (&ls)[N], const float4 (&os)[N]) {
  float m_new = r.m;
#pragma unroll
  for (int u = 0; u < N; ++u) {
    m_new = fmaxf(m_new, ls[u]);
    r.poisoned = r.poisoned || is_nan(ls[u]) || ls[u] == -neg_inf();
  }
  if (m_new == neg_inf()) return;  // only empty states so far
  const float a = r.m == neg_inf() ? 0.0f : exp2f((r.m - m_new) * kLog2e);
  r.w *= a;
  r.acc.x *= a; r.acc.y *= a; r.acc.z *= a; r.acc.w *= a;
#pragma unroll
  for (int u = 0; u < N; ++u) {
    if (SKIP_EMPTY && ls[u] == neg_inf()) continue;   // empty: its out is never read
    const float w = ls[u] == neg_inf() ? 0.0f : exp2f((ls[u] - m_new) * kLog2e);
    r.w += w;
    r.acc.x = fmaf(w, os[u].x, r.acc.x);
    r.acc.y = fmaf(w, os[u].y, r.acc.y);
    r.acc.z = fmaf(w, os[u].z, r.acc.z);
    r.acc.w = fmaf(w, os[u].w, r.acc.w);
  }
  r.m = m_new;
}

// Merge states 0 .. count - 1 of (state_out [count, ...] with `stride` rows between states,
// state_lse) at row `base`, dims d .. d + 3, into r: BATCH states' loads at once, so that they
// arrive in one L2 round trip per batch (measured on H100: a two-pass merge with one value per load
// took 2.7-4.4 us after the last block's loop; this takes under 1 us). SKIP_EMPTY as for
// fold_states.
template <int BATCH = 8, bool SKIP_EMPTY = true>
__device__ __forceinline__ void merge_states_into(RunningMerge& r, const float* __restrict__ state_out,
                                                  const float* __restrict__ state_lse, int count,
                                                  long long stride, long long base, int d, int head_dim) {
  for (int s0 = 0; s0 < count; s0 += BATCH) {
    float ls[BATCH];
    float4 os[BATCH];
#pragma unroll
    for (int u = 0; u < BATCH; ++u) {
      const long long row = (s0 + u) * stride + base;
      const bool here = s0 + u < count;
      ls[u] = here ? __ldcg(state_lse + row) : neg_inf();
      os[u] = here ? __ldcg(reinterpret_cast<const float4*>(state_out + row * head_dim + d))
                   : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    fold_states<BATCH, SKIP_EMPTY>(r, ls, os);
  }
}

// Write a merged state: 4 dims of out at `o` (and the lse when d == 0).
template <typename T>
__device__ __forceinline__ void write_merged(const RunningMerge& r, T* __restrict__ o, float* __restrict__ lse_at,
                                             int d) {
  const float inv = r.poisoned ? quiet_nan() : r.w > 0.0f ? 1.0f / r.w : 0.0f;
  o[0] = from_float<T>(finite_or_nan(r.acc.x * inv));
  o[1] = from_float<T>(finite_or_nan(r.acc.y * inv));
  o[2] = from_float<T>(finite_or_nan(r.acc.z * inv));
  o[3] = from_float<T>(finite_or_nan(r.acc.w * inv));
  if (d == 0) *lse_at = r.poisoned ? quiet_nan() : r.w > 0.0f ? r.m + log2f(r.w) * kLn2 : neg_inf();
}

}  // namespace decode_attention
