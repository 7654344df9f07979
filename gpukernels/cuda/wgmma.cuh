// Hopper's warpgroup tensor-core products (wgmma, sm_90a): a warpgroup of 4 warps computes a 64 x N
// tile of D += A B with A (64 x 16) in registers, laid out per warp as mma.sync's m16n8k16 A
// fragment for its 16 rows, and B (16 x N) read by the tensor cores straight from shared memory
// through a matrix descriptor. D's fragment is mma.sync's m16n8 accumulator repeated over the N / 8
// n-tiles (d[j][0..1] row gid, d[j][2..3] row gid + 8, columns 8j + 2 tig + {0, 1}), so code
// written for mma.sync fragments reads it unchanged.
//
// Shared-memory operands here use the 128-byte swizzle: rows of 64 16-bit elements (128 bytes),
// 8 rows to a 1024-byte atom, the 16-byte piece c of row r stored at piece c ^ (r % 8); a matrix
// wider than 64 elements is stored as columns of 64, one after the other. Only compiled for
// sm_90a (`HAS_WGMMA`); other targets keep the mma.sync path of the kernels that use this.
#pragma once

#include "common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DECODE_ATTENTION_HAS_WGMMA 1
#else
#define DECODE_ATTENTION_HAS_WGMMA 0
#endif

namespace decode_attention {

constexpr bool HAS_WGMMA = DECODE_ATTENTION_HAS_WGMMA;

// Byte offset of 16-byte piece `piece` of row `row` in a swizzled tile of `rows` rows (columns of 64
// elements one after the other).
template <int ROWS>
__device__ __forceinline__ unsigned swizzled_offset(int row, int piece) {
  return (piece >> 3) * (ROWS * 128) + row * 128 + (((piece & 7) ^ (row & 7)) << 4);
}

// A shared-memory matrix descriptor with the 128-byte swizzle: start address, leading and stride
// byte offsets (the swizzle atoms must start at 1024-byte boundaries).
__device__ __forceinline__ unsigned long long sw128_descriptor(unsigned addr, unsigned leading, unsigned stride) {
  return static_cast<unsigned long long>((addr & 0x3ffff) >> 4) |
         (static_cast<unsigned long long>(leading >> 4) << 16) |
         (static_cast<unsigned long long>(stride >> 4) << 32) | (1ull << 62);
}

#if DECODE_ATTENTION_HAS_WGMMA
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared memory written by ordinary stores or cp.async becomes visible to the tensor cores' reads
// (the async proxy) after this fence, and a barrier.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Shared-memory barriers (mbarrier) at `bar` (a shared address of 8 bytes): initialised by one thread
// for `count` arrivals a phase; a thread waits for the phase of the given parity to complete (the
// first phase has parity 0).
__device__ __forceinline__ void mbarrier_init(unsigned bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarrier_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbarrier_arrive(unsigned bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(unsigned bar, unsigned parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
// Named barriers between warpgroups: `threads` threads take part in barrier `id` (0 is
// __syncthreads'); `arrive` counts this warp without waiting, `sync` counts it and waits.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// A named barrier that also tells every thread whether `pred` held for any of them.
__device__ __forceinline__ bool named_barrier_or(int id, int threads, bool pred) {
  unsigned r;
  asm volatile("{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbar.red.or.pred q, %2, %3, p;\nselp.u32 %0, 1, 0, q;\n}\n"
               : "=r"(r) : "r"(static_cast<unsigned>(pred)), "r"(id), "r"(threads) : "memory");
  return r != 0;
}
// The tensor memory accelerator (TMA): one thread copies a box of a tensor (described by a tensor
// map made on the host, a kernel parameter) into shared memory, stored with the map's swizzle; the
// copy's bytes complete the transaction count of the mbarrier `bar`, whose phase the thread expects
// with `mbarrier_expect_bytes` (its one arrival). Rows past the tensor's end arrive as zeros.
__device__ __forceinline__ void mbarrier_expect_bytes(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void tma_load_3d(unsigned dst, const void* map, unsigned bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n"
      ::"r"(dst), "l"(reinterpret_cast<unsigned long long>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2) : "memory");
}
__device__ __forceinline__ void tma_load_4d(unsigned dst, const void* map, unsigned bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];\n"
      ::"r"(dst), "l"(reinterpret_cast<unsigned long long>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// A warpgroup's share of the SM's registers, raised or lowered (every warp of the warpgroup runs it).
template <int REGISTERS>
__device__ __forceinline__ void registers_raise() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGISTERS));
}
template <int REGISTERS>
__device__ __forceinline__ void registers_lower() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGISTERS));
}
#else
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() {}
template <int N>
__device__ __forceinline__ void wgmma_wait() {}
__device__ __forceinline__ void fence_async_shared() {}
__device__ __forceinline__ void mbarrier_init(unsigned, int) {}
__device__ __forceinline__ void mbarrier_init_fence() {}
__device__ __forceinline__ void mbarrier_arrive(unsigned) {}
__device__ __forceinline__ void mbarrier_wait(unsigned, unsigned) {}
__device__ __forceinline__ void named_barrier_sync(int, int) {}
__device__ __forceinline__ void named_barrier_arrive(int, int) {}
__device__ __forceinline__ bool named_barrier_or(int, int, bool pred) { return pred; }
__device__ __forceinline__ void mbarrier_expect_bytes(unsigned, unsigned) {}
__device__ __forceinline__ void tma_load_3d(unsigned, const void*, unsigned, int, int, int) {}
__device__ __forceinline__ void tma_load_4d(unsigned, const void*, unsigned, int, int, int, int) {}
template <int REGISTERS>
__device__ __forceinline__ void registers_raise() {}
template <int REGISTERS>
__device__ __forceinline__ void registers_lower() {}
#endif

// A CUtensorMap (cuda.h), made on the host by cuTensorMapEncodeTiled and passed by value.
struct alignas(64) TensorMap {
  unsigned long long bits[16];
};

// Keeps the compiler from moving reads or writes of the accumulators across a wgmma or its wait
// (the instruction is asynchronous: its registers are only final after wgmma_wait).
template <int TILES>
__device__ __forceinline__ void fence_accumulators(float (&d)[TILES][4]) {
#pragma unroll
  for (int j = 0; j < TILES; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
  }
}

// The accumulator registers a lane of a 64 x N float32 D (d[N / 8][4]): their places %0.. in the
// instruction and their operands, each width's list extending the one before (N = 32, 64, 128; the
// m64n256k16 product adds its second half to the 128's).
#define DECODE_ATTENTION_D32_PLACES \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define DECODE_ATTENTION_D32_OPERANDS \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), \
  "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
  "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
  "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
#define DECODE_ATTENTION_D64_PLACES DECODE_ATTENTION_D32_PLACES "," \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define DECODE_ATTENTION_D64_OPERANDS DECODE_ATTENTION_D32_OPERANDS, \
  "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), \
  "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
  "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), \
  "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
#define DECODE_ATTENTION_D128_PLACES DECODE_ATTENTION_D64_PLACES "," \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47," \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define DECODE_ATTENTION_D128_OPERANDS DECODE_ATTENTION_D64_OPERANDS, \
  "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), \
  "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), \
  "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), \
  "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), \
  "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), \
  "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), \
  "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), \
  "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])

// The wgmma instructions with 32 to 256 columns of float32 D, A from registers (four 32-bit
// registers of two 16-bit values), B by descriptor; TRANS_B: B stored N-major (rows of N elements)
// instead of K-major; scale_d 0: D = A B (D's old values ignored).
#define DECODE_ATTENTION_WGMMA_N32(TYPE)                                                        \
  asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " {" DECODE_ATTENTION_D32_PLACES  \
      "}, {%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}\n"                         \
      : DECODE_ATTENTION_D32_OPERANDS \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TRANS_B))

#define DECODE_ATTENTION_WGMMA_N64(TYPE)                                                        \
  asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {" DECODE_ATTENTION_D64_PLACES  \
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"                         \
      : DECODE_ATTENTION_D64_OPERANDS \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TRANS_B))

#define DECODE_ATTENTION_WGMMA_N128(TYPE)                                                        \
  asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {" DECODE_ATTENTION_D128_PLACES  \
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"                         \
      : DECODE_ATTENTION_D128_OPERANDS \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TRANS_B))

#define DECODE_ATTENTION_WGMMA_N256(TYPE)                                                        \
  asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " {" DECODE_ATTENTION_D128_PLACES "," \
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79," \
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95," \
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111," \
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127" \
      "}, {%128, %129, %130, %131}, %132, p, 1, 1, %134;\n}\n"                         \
      : DECODE_ATTENTION_D128_OPERANDS, \
          "+f"(d[16][0]), "+f"(d[16][1]), "+f"(d[16][2]), "+f"(d[16][3]), \
          "+f"(d[17][0]), "+f"(d[17][1]), "+f"(d[17][2]), "+f"(d[17][3]), \
          "+f"(d[18][0]), "+f"(d[18][1]), "+f"(d[18][2]), "+f"(d[18][3]), \
          "+f"(d[19][0]), "+f"(d[19][1]), "+f"(d[19][2]), "+f"(d[19][3]), \
          "+f"(d[20][0]), "+f"(d[20][1]), "+f"(d[20][2]), "+f"(d[20][3]), \
          "+f"(d[21][0]), "+f"(d[21][1]), "+f"(d[21][2]), "+f"(d[21][3]), \
          "+f"(d[22][0]), "+f"(d[22][1]), "+f"(d[22][2]), "+f"(d[22][3]), \
          "+f"(d[23][0]), "+f"(d[23][1]), "+f"(d[23][2]), "+f"(d[23][3]), \
          "+f"(d[24][0]), "+f"(d[24][1]), "+f"(d[24][2]), "+f"(d[24][3]), \
          "+f"(d[25][0]), "+f"(d[25][1]), "+f"(d[25][2]), "+f"(d[25][3]), \
          "+f"(d[26][0]), "+f"(d[26][1]), "+f"(d[26][2]), "+f"(d[26][3]), \
          "+f"(d[27][0]), "+f"(d[27][1]), "+f"(d[27][2]), "+f"(d[27][3]), \
          "+f"(d[28][0]), "+f"(d[28][1]), "+f"(d[28][2]), "+f"(d[28][3]), \
          "+f"(d[29][0]), "+f"(d[29][1]), "+f"(d[29][2]), "+f"(d[29][3]), \
          "+f"(d[30][0]), "+f"(d[30][1]), "+f"(d[30][2]), "+f"(d[30][3]), \
          "+f"(d[31][0]), "+f"(d[31][1]), "+f"(d[31][2]), "+f"(d[31][3]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TRANS_B))

// The m64n128k16 product with A read from shared memory too (a descriptor, K-major), B K-major.
#define DECODE_ATTENTION_WGMMA_SS_N128(TYPE)                                                        \
  asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {" DECODE_ATTENTION_D128_PLACES  \
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                         \
      : DECODE_ATTENTION_D128_OPERANDS \
      : "l"(a), "l"(b), "r"(scale_d))

// The m64n64k16 product with A read from shared memory too.
#define DECODE_ATTENTION_WGMMA_SS_N64(TYPE)                                                        \
  asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {" DECODE_ATTENTION_D64_PLACES  \
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                         \
      : DECODE_ATTENTION_D64_OPERANDS \
      : "l"(a), "l"(b), "r"(scale_d))

template <typename T>
struct IsBf16 {
  static constexpr bool value = false;
};
template <>
struct IsBf16<__nv_bfloat16> {
  static constexpr bool value = true;
};

template <typename T, int N, int TRANS_B>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const unsigned (&a)[4], unsigned long long b,
                                         int scale_d = 1) {
#if DECODE_ATTENTION_HAS_WGMMA
  static_assert(sizeof(T) == 2, "16-bit inputs");
  constexpr bool kBf16 = IsBf16<T>::value;
  if constexpr (N == 32) {
    if constexpr (kBf16) DECODE_ATTENTION_WGMMA_N32("bf16"); else DECODE_ATTENTION_WGMMA_N32("f16");
  } else if constexpr (N == 64) {
    if constexpr (kBf16) DECODE_ATTENTION_WGMMA_N64("bf16"); else DECODE_ATTENTION_WGMMA_N64("f16");
  } else if constexpr (N == 128) {
    if constexpr (kBf16) DECODE_ATTENTION_WGMMA_N128("bf16"); else DECODE_ATTENTION_WGMMA_N128("f16");
  } else {
    static_assert(N == 256, "N of 32, 64, 128 or 256");
    if constexpr (kBf16) DECODE_ATTENTION_WGMMA_N256("bf16"); else DECODE_ATTENTION_WGMMA_N256("f16");
  }
#endif
}

// D (64 x N, N 64 or 128) += A B with A (64 x 16, K-major) and B (16 x N, K-major) both read from
// shared memory through descriptors.
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], unsigned long long a, unsigned long long b,
                                         int scale_d = 1) {
#if DECODE_ATTENTION_HAS_WGMMA
  static_assert(sizeof(T) == 2, "16-bit inputs");
  if constexpr (N == 64) {
    if constexpr (IsBf16<T>::value) DECODE_ATTENTION_WGMMA_SS_N64("bf16"); else DECODE_ATTENTION_WGMMA_SS_N64("f16");
  } else {
    static_assert(N == 128, "N of 64 or 128");
    if constexpr (IsBf16<T>::value) DECODE_ATTENTION_WGMMA_SS_N128("bf16"); else DECODE_ATTENTION_WGMMA_SS_N128("f16");
  }
#endif
}

}  // namespace decode_attention
