"""What reading a span row's attended tokens costs where they lie in the cache, against reading the
same bytes packed into one buffer (the benchmark's read-only time of a span row).

An exploration, not a benchmark: lines of text (us), no result file. For each row of the span grid:
the read-only kernel over the attended tokens gathered into contiguous buffers (`read packed`), a
read-only kernel over the attended rows in place (`read in place`: a warp reads each listed token's
K and V rows of all KV heads whole: `gpukernels.bench.ReadRows`, the benchmark's `stream_ms` of a
span row), and the planned span run.
Run: PYTHONPATH=. python3 scripts/explore/span_read_in_place.py
"""
import importlib

import cupy as cp
import numpy as np

from _inputs import span_grid_inputs
from gpukernels.bench import (HEAD_DIM, NUM_QO_HEADS, SPAN_BATCH, SPAN_GRID, SPAN_KV_HEADS, SPAN_KV_LEN, ReadRows,
                              Timer, span_case_spans, span_token_mask, stream_read)

span_mod = importlib.import_module("gpukernels.span")
sk = importlib.import_module("gpukernels.split_kv")

timer = Timer(30)
stream = stream_read()
sms = sk.num_sms(0)
batch, hkv, kv_len = SPAN_BATCH, SPAN_KV_HEADS, SPAN_KV_LEN
q, k, v, _, _ = span_grid_inputs()
read_rows = ReadRows(hkv * HEAD_DIM * 2)

for case in SPAN_GRID:
    indptr, spans = span_case_spans(case)
    mask = span_token_mask(indptr, spans, batch, kv_len)
    rows = np.flatnonzero(mask.reshape(-1))
    rows_d = cp.asarray(rows, dtype=cp.int32)
    k_att = k.reshape(batch * kv_len, hkv, HEAD_DIM)[cp.asarray(rows)]
    v_att = v.reshape(batch * kv_len, hkv, HEAD_DIM)[cp.asarray(rows)]
    packed = timer(lambda: stream(k_att, v_att)) * 1e3  # noqa: B023
    in_place = timer(lambda: read_rows(k, v, rows_d)) * 1e3  # noqa: B023
    plan = span_mod.plan_span(indptr, spans, batch=batch, kv_len=kv_len, num_qo_heads=NUM_QO_HEADS,
                              num_kv_heads=hkv, head_dim=HEAD_DIM, num_sms=sms, gpu=sk.device_gpu(0))
    runner = span_mod.Span(plan)
    run = timer(lambda: runner.run(q, k, v)) * 1e3  # noqa: B023
    print(f"{case}: {len(rows) // batch} tokens a sequence; read packed {packed:.1f}, read in place {in_place:.1f} "
          f"({in_place / packed:.3f}x), span ({plan.layout}, s{plan.split.num_splits}) {run:.1f} = "
          f"{run / packed:.3f}x packed, {run / in_place:.3f}x in place", flush=True)
    del k_att, v_att
