"""Pipeline stages of the paged tensor-core kernel, on the paged rows of the decode grid and the
span grid, against the same tokens read from a contiguous cache, on one GPU.

An exploration, not a benchmark: it writes no result file. One line per shape (us): the read-only
time, the contiguous planned run, then the paged run with 2 and 3 stages for several split
counts ('*': the plan's own). The stage count is swapped by `_stages.use_stages`.
Run: PYTHONPATH=. python3 scripts/explore/paged_stages.py
"""
import importlib

import cupy as cp
import numpy as np

import gpukernels
from _inputs import span_grid_inputs
from _stages import use_stages
from gpukernels.bench import (HEAD_DIM, NUM_QO_HEADS, PAGE_SIZE, SPAN_BATCH, SPAN_GRID, SPAN_KV_HEADS,
                              SPAN_KV_LEN, Timer, _randn16, span_case_spans, stream_read)

sk = importlib.import_module("gpukernels.split_kv")
span_mod = importlib.import_module("gpukernels.span")
timer = Timer(30)
stream = stream_read()
sms = sk.num_sms(0)
gpu = sk.device_gpu(0)


def sweep(label, read_us, contiguous, make_paged_runner, auto_splits, splits=(1, 2, 3, 4, 8, 12, 16)):
    res = {"read": read_us, "contig": contiguous}
    for st in (2, 3):
        use_stages(st, paged_only=True)
        for s in sorted(set(splits) | {auto_splits}):
            run = make_paged_runner(s)
            res[f"st{st}/s{s}{'*' if s == auto_splits else ''}"] = timer(run)
    use_stages(None)
    print(f"{label}: " + ", ".join(f"{k}={v * 1e3:.1f}" for k, v in res.items()), flush=True)


# The decode grid's paged rows (pages of PAGE_SIZE, in order).
for batch, hkv, kv_len in [(1, 8, 131072), (1, 8, 32768), (8, 8, 32768), (64, 8, 16384)]:
    q = _randn16((batch, NUM_QO_HEADS, HEAD_DIM))
    k = _randn16((batch, kv_len, hkv, HEAD_DIM))
    v = _randn16((batch, kv_len, hkv, HEAD_DIM))
    out = cp.empty((batch, NUM_QO_HEADS, HEAD_DIM), dtype=cp.float16)
    lse = cp.empty((batch, NUM_QO_HEADS), dtype=cp.float32)
    read = timer(lambda: stream(k, v))
    plan = gpukernels.plan_split_kv(batch, NUM_QO_HEADS, hkv, HEAD_DIM, kv_len, num_sms=sms, gpu=gpu)
    r = gpukernels.SplitKV(plan)
    contig = timer(lambda: r.run(q, k, v, out=out, lse=lse))
    pages = kv_len // PAGE_SIZE
    kp, vp = k.reshape(-1, PAGE_SIZE, hkv, HEAD_DIM), v.reshape(-1, PAGE_SIZE, hkv, HEAD_DIM)
    indptr = cp.arange(batch + 1, dtype=cp.int32) * pages
    indices = cp.arange(batch * pages, dtype=cp.int32)
    last = cp.full((batch,), PAGE_SIZE, dtype=cp.int32)
    paged_auto = gpukernels.plan_split_kv(batch, NUM_QO_HEADS, hkv, HEAD_DIM, kv_len, num_sms=sms, gpu=gpu,
                                          page_size=PAGE_SIZE)

    def make(s):
        p = gpukernels.plan_split_kv(batch, NUM_QO_HEADS, hkv, HEAD_DIM, kv_len, num_sms=sms, num_splits=s,
                                     page_size=PAGE_SIZE)
        rr = gpukernels.SplitKV(p)
        return lambda: rr.run_paged(q, kp, vp, indptr, indices, last, out=out, lse=lse)

    sweep(f"decode {batch}x{hkv}x{kv_len} pages {PAGE_SIZE}", read, contig, make, paged_auto.num_splits,
          splits=(1, 2, 4, 8, 16, 32) if batch == 1 else (1, 2, 4))
    del q, k, v, kp, vp
    cp.get_default_memory_pool().free_all_blocks()

batch, hkv, kv_len = SPAN_BATCH, SPAN_KV_HEADS, SPAN_KV_LEN
q, k, v, out, lse = span_grid_inputs()
for i, case in enumerate(SPAN_GRID):
    indptr, spans = span_case_spans(case)
    s64 = np.asarray(spans, dtype=np.int64)
    tokens = np.concatenate([b * kv_len + np.arange(a, e) for b in range(batch)
                             for a, e in s64[indptr[b]:indptr[b + 1]]])
    k_att = k.reshape(batch * kv_len, hkv, HEAD_DIM)[cp.asarray(tokens)]
    v_att = v.reshape(batch * kv_len, hkv, HEAD_DIM)[cp.asarray(tokens)]
    read = timer(lambda: stream(k_att, v_att))
    per_seq = len(tokens) // batch
    if len(tokens) == per_seq * batch:
        kc, vc = k_att.reshape(batch, per_seq, hkv, HEAD_DIM), v_att.reshape(batch, per_seq, hkv, HEAD_DIM)
        dp = gpukernels.plan_split_kv(batch, NUM_QO_HEADS, hkv, HEAD_DIM, per_seq, num_sms=sms, gpu=gpu)
        dr = gpukernels.SplitKV(dp)
        contig = timer(lambda: dr.run(q, kc, vc, out=out, lse=lse))
    else:
        contig = float("nan")
    auto = span_mod.plan_span(indptr, spans, batch=batch, kv_len=kv_len, num_qo_heads=NUM_QO_HEADS,
                              num_kv_heads=hkv, head_dim=HEAD_DIM, num_sms=sms, gpu=gpu)

    def make(s):
        p = span_mod.plan_span(indptr, spans, batch=batch, kv_len=kv_len, num_qo_heads=NUM_QO_HEADS,
                               num_kv_heads=hkv, head_dim=HEAD_DIM, num_sms=sms, num_splits=s)
        rr = span_mod.Span(p)
        return lambda: rr.run(q, k, v, out=out, lse=lse)

    sweep(f"span row {i} {case} pages {auto.table.page_size}", read, contig, make, auto.split.num_splits)
    del k_att, v_att
