"""Where the span rows lose time against reading their attended bytes, and what one-shot calls cost
the host, on one GPU.

An exploration, not a benchmark: it writes no result file. For each row of the span grid it prints
(us): the read-only time of the attended bytes, the planned run with the plan's split count and
with others, and split_kv over the same tokens packed into a contiguous cache (what paging costs).
Then a profile of the host path of the one-shot calls (span, split_kv) and the planned run.
With STAGES=2,3,4 in the environment, rows read by windows are also timed at those pipeline depths
(`_stages.use_stages`).
Run: PYTHONPATH=. python3 scripts/explore/span_rows.py [rows, e.g. 3,5,6]
"""
import importlib
import os
import sys

import cupy as cp
import numpy as np
import torch

import gpukernels
from _profile import print_host_profile
from _inputs import span_grid_inputs
from _stages import use_stages
from gpukernels.bench import (HEAD_DIM, NUM_QO_HEADS, SPAN_BATCH, SPAN_GRID, SPAN_KV_HEADS, SPAN_KV_LEN, Timer,
                              _sdpa_peers, host_us, span_case_spans, span_token_mask, stream_read)

span_mod = importlib.import_module("gpukernels.span")
sk = importlib.import_module("gpukernels.split_kv")

timer = Timer(30)
SWEEP_STAGES = [int(x) for x in os.environ.get("STAGES", "").split(",") if x]
stream = stream_read()
sms = sk.num_sms(0)
gpu = sk.device_gpu(0)
batch, hkv, kv_len = SPAN_BATCH, SPAN_KV_HEADS, SPAN_KV_LEN
chosen = [int(x) for x in sys.argv[1].split(",")] if len(sys.argv) > 1 else range(len(SPAN_GRID))

q, k, v, out, lse = span_grid_inputs()

for i in chosen:
    case = SPAN_GRID[i]
    indptr, spans = span_case_spans(case)
    mask = span_token_mask(indptr, spans, batch, kv_len)
    tokens = np.flatnonzero(mask.reshape(-1))
    k_att = k.reshape(batch * kv_len, hkv, HEAD_DIM)[cp.asarray(tokens)]
    v_att = v.reshape(batch * kv_len, hkv, HEAD_DIM)[cp.asarray(tokens)]
    res = {"read": timer(lambda: stream(k_att, v_att))}
    plan = span_mod.plan_span(indptr, spans, batch=batch, kv_len=kv_len, num_qo_heads=NUM_QO_HEADS,
                              num_kv_heads=hkv, head_dim=HEAD_DIM, num_sms=sms, gpu=gpu)
    runner = span_mod.Span(plan)
    res[f"span p{plan.table.page_size} s{plan.split.num_splits}*"] = timer(lambda: runner.run(q, k, v, out=out, lse=lse))
    for s in (1, 2, 3, 4, 6, 8, 12, 16):
        if s == plan.split.num_splits:
            continue
        p2 = span_mod.plan_span(indptr, spans, batch=batch, kv_len=kv_len, num_qo_heads=NUM_QO_HEADS,
                                num_kv_heads=hkv, head_dim=HEAD_DIM, num_sms=sms, num_splits=s)
        r2 = span_mod.Span(p2)
        res[f"s{s}"] = timer(lambda: r2.run(q, k, v, out=out, lse=lse))
    if plan.layout == "windows":
        for st in SWEEP_STAGES:
            use_stages(st)
            for s in (2, 4, 8):
                p2 = span_mod.plan_span(indptr, spans, batch=batch, kv_len=kv_len, num_qo_heads=NUM_QO_HEADS,
                                        num_kv_heads=hkv, head_dim=HEAD_DIM, num_sms=sms, num_splits=s)
                r2 = span_mod.Span(p2)
                res[f"st{st}/s{s}"] = timer(lambda: r2.run(q, k, v, out=out, lse=lse))
        use_stages(None)
    per_seq = mask.sum(axis=1)
    if (per_seq == per_seq[0]).all():
        kp = k_att.reshape(batch, int(per_seq[0]), hkv, HEAD_DIM)
        vp = v_att.reshape(batch, int(per_seq[0]), hkv, HEAD_DIM)
        dp = gpukernels.plan_split_kv(batch, NUM_QO_HEADS, hkv, HEAD_DIM, int(per_seq[0]), num_sms=sms, gpu=gpu)
        dr = gpukernels.SplitKV(dp)
        res[f"packed s{dp.num_splits}*"] = timer(lambda: dr.run(q, kp, vp, out=out, lse=lse))
    one = lambda: gpukernels.span(q, k, v, indptr, spans)  # noqa: E731
    res["oneshot"] = timer(one)
    print(f"row {i} {case}: " + ", ".join(f"{k_}={v_ * 1e3:.1f}" for k_, v_ in res.items())
          + f" | host us: planned {host_us(lambda: runner.run(q, k, v, out=out, lse=lse)):.0f}, "
            f"one-shot {host_us(one):.0f}", flush=True)
    del k_att, v_att

# Host path: where a one-shot call's microseconds go.
qt = torch.randn(8, 32, 128, device="cuda", dtype=torch.float16)
kt = torch.randn(8, 4096, 8, 128, device="cuda", dtype=torch.float16)
vt = torch.randn(8, 4096, 8, 128, device="cuda", dtype=torch.float16)
plan = gpukernels.plan_split_kv(8, 32, 8, 128, 4096, num_sms=sms, gpu=gpu)
runner = gpukernels.SplitKV(plan)
ot, lt = torch.empty_like(qt), torch.empty(8, 32, device="cuda")
indptr, spans = span_case_spans(SPAN_GRID[0])
calls = {
    "split_kv one-shot (torch)": lambda: gpukernels.split_kv(qt, kt, vt),
    "SplitKV.run (torch, out given)": lambda: runner.run(qt, kt, vt, out=ot, lse=lt),
    "span one-shot (cupy)": lambda: gpukernels.span(q, k, v, indptr, spans),
    **{f"SDPA {label}": fn for label, fn in _sdpa_peers(qt, kt, vt, ("peer:cudnn",)).items()},
}
for label, fn in calls.items():
    print(f"{label}: host {host_us(fn):.1f} us")
    print_host_profile(fn)
