// Merge attention states (out, lse) along their first axis: the associative log-sum-exp merge.
//
//   lse = log(sum_s exp(lse_s)),   out = sum_s exp(lse_s - lse) * out_s
//
// States with lse = -inf are empty and contribute nothing; if every state is empty the result is
// out = 0, lse = -inf. One block per (sequence, head); threads run along head_dim.

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
  for (int s = 0; s < num_states; ++s) lse_max = fmaxf(lse_max, lses[s * rows + row]);
  for (int d = threadIdx.x; d < head_dim; d += MERGE_THREADS) {
    float w_sum = 0.0f, o_sum = 0.0f;
    for (int s = 0; s < num_states; ++s) {
      const float w = lse_max == neg_inf() ? 0.0f : __expf(lses[s * rows + row] - lse_max);
      w_sum += w;
      if (w != 0.0f) {
        float o_s;
        to_scalar_float(outs + (s * rows + row) * head_dim + d, &o_s);
        o_sum += w * o_s;
      }
    }
    out[row * head_dim + d] = from_float<T>(w_sum > 0.0f ? o_sum / w_sum : 0.0f);
    if (d == 0) lse[row] = w_sum > 0.0f ? lse_max + __logf(w_sum) : neg_inf();
  }
}

}  // namespace decode_attention
