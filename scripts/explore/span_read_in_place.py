"""What reading a span row's attended tokens costs where they lie in the cache, against reading the
same bytes packed into one buffer (the benchmark's read-only time of a span row).

An exploration, not a benchmark: lines of text (us), no result file. For each row of the span grid:
the read-only kernel over the attended tokens gathered into contiguous buffers (`read packed`), a
read-only kernel of the same shape (16-byte loads, four in flight per thread, four blocks an SM)
over the attended rows in place, each K and V row of all KV heads read whole through a list of
row numbers (`read in place`), and the planned span run.
Run: PYTHONPATH=. python3 scripts/explore/span_read_in_place.py
"""
import importlib

import cupy as cp
import numpy as np

from gpukernels.bench import (HEAD_DIM, NUM_QO_HEADS, SPAN_BATCH, SPAN_GRID, SPAN_KV_HEADS, SPAN_KV_LEN, Timer,
                              _randn16, span_case_spans, span_token_mask, stream_read)

span_mod = importlib.import_module("gpukernels.span")
sk = importlib.import_module("gpukernels.split_kv")

_READ_ROWS = r"""
extern "C" __global__ void read_rows(const uint4* __restrict__ a, const uint4* __restrict__ b,
                                     const int* __restrict__ rows, long long n, int pieces, unsigned* sink) {
  // Element i: 16-byte piece i % pieces of row rows[i / pieces], of a for the first n, then of b.
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  unsigned acc = 0;
  long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  auto at = [&](long long j) -> uint4 {
    const long long e = j < n ? j : j - n;
    const long long r = __ldg(rows + e / pieces);
    return j < n ? a[r * pieces + e % pieces] : b[r * pieces + e % pieces];
  };
  for (; i + 3 * step < 2 * n; i += 4 * step) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = at(i + u * step);
#pragma unroll
    for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < 2 * n; i += step) {
    const uint4 v = at(i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}
"""
read_rows = cp.RawKernel(_READ_ROWS, "read_rows")
timer = Timer(30)
stream = stream_read()
sms = sk.num_sms(0)
batch, hkv, kv_len = SPAN_BATCH, SPAN_KV_HEADS, SPAN_KV_LEN
q = _randn16((batch, NUM_QO_HEADS, HEAD_DIM))
k = _randn16((batch, kv_len, hkv, HEAD_DIM))
v = _randn16((batch, kv_len, hkv, HEAD_DIM))
sink = cp.zeros(1, dtype=cp.uint32)
pieces = hkv * HEAD_DIM * 2 // 16   # 16-byte pieces of one token's K (all KV heads)
grid = 4 * sms

for case in SPAN_GRID:
    indptr, spans = span_case_spans(case)
    mask = span_token_mask(indptr, spans, batch, kv_len)
    rows = np.flatnonzero(mask.reshape(-1))
    rows_d = cp.asarray(rows, dtype=cp.int32)
    k_att = k.reshape(batch * kv_len, hkv, HEAD_DIM)[cp.asarray(rows)]
    v_att = v.reshape(batch * kv_len, hkv, HEAD_DIM)[cp.asarray(rows)]
    packed = timer(lambda: stream(k_att, v_att)) * 1e3  # noqa: B023
    n = cp.int64(len(rows) * pieces)
    in_place = timer(lambda: read_rows((grid,), (256,), (k, v, rows_d, n, cp.int32(pieces), sink))) * 1e3  # noqa: B023
    plan = span_mod.plan_span(indptr, spans, batch=batch, kv_len=kv_len, num_qo_heads=NUM_QO_HEADS,
                              num_kv_heads=hkv, head_dim=HEAD_DIM, num_sms=sms, gpu=sk.device_gpu(0))
    runner = span_mod.Span(plan)
    run = timer(lambda: runner.run(q, k, v)) * 1e3  # noqa: B023
    print(f"{case}: {len(rows) // batch} tokens a sequence; read packed {packed:.1f}, read in place {in_place:.1f} "
          f"({in_place / packed:.3f}x), span ({plan.layout}, s{plan.split.num_splits}) {run:.1f} = "
          f"{run / packed:.3f}x packed, {run / in_place:.3f}x in place", flush=True)
    del k_att, v_att
