// Merge attention states (out, lse) along their first axis: the associative log-sum-exp merge.
//
//   lse = log(sum_s exp(lse_s)),   out = sum_s exp(lse_s - lse) * out_s
//
// States with lse = -inf are empty and contribute nothing (their out is never read); if every state
// is empty the result is out = 0, lse = -inf. Nothing non-finite hides: an lse of NaN or +inf makes
// the row's out and lse NaN, and a non-finite out element of a non-empty state makes that element
// NaN, even where its weight underflows to 0. One block per (sequence, head); threads run along
// head_dim.

#include "common.cuh"

namespace decode_attention {

constexpr int MERGE_THREADS = 128;

template <typename T>
__global__ void __launch_bounds__(MERGE_THREADS)
merge_states_kernel(const T* __restrict__ outs,       // [num_states, rows, head_dim]
                    const float* __restrict__ lses,   // [num_states, rows]
                    T* __restrict__ out,              // [rows, head_dim]
                    float* __restrict__ lse,          // [rows]
                    int num_states, long long rows, int head_dim) {
  const long long row = blockIdx.x;
  float lse_max = neg_inf();
  bool poisoned = false;
  for (int s = 0; s < num_states; ++s) {
    const float l = lses[s * rows + row];
    lse_max = fmaxf(lse_max, l);
    poisoned = poisoned || is_nan(l) || l == -neg_inf();
  }
  for (int d = threadIdx.x; d < head_dim; d += MERGE_THREADS) {
    float w_sum = 0.0f, o_sum = 0.0f;
    bool bad_out = false;
    for (int s = 0; s < num_states; ++s) {
      const float l = lses[s * rows + row];
      if (poisoned || l == neg_inf()) continue;   // empty: never read
      const float w = __expf(l - lse_max);
      float o_s;
      to_scalar_float(outs + (s * rows + row) * head_dim + d, &o_s);
      bad_out = bad_out || !is_finite(o_s);
      w_sum += w;
      o_sum += w * o_s;
    }
    const float o = poisoned || bad_out ? quiet_nan() : w_sum > 0.0f ? o_sum / w_sum : 0.0f;
    out[row * head_dim + d] = from_float<T>(finite_or_nan(o));
    if (d == 0) lse[row] = poisoned ? quiet_nan() : w_sum > 0.0f ? lse_max + __logf(w_sum) : neg_inf();
  }
}

}  // namespace decode_attention
