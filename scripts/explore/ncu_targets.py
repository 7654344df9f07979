"""The kernels of four rows that miss their targets, run a few times each so that Nsight Compute
can profile them (this script times nothing and writes nothing).

  coverage   bfloat16, 64 sequences x 16/16 heads x head_dim 64, 1000 tokens: split_kv's planned
             run, PyTorch SDPA (cuDNN) and the read-only kernel on the same tensors
  finish     the bifurcated method on 16 sequences x 32/8 heads, prefix 8192 + suffix 256
  summary    the span grid's summarisation row (spans read by windows)
  packed     the same row's attended tokens packed into a contiguous cache, run by split_kv
  prefix     Hydragen on 128 sequences x 32/8 heads, prefix 32768 + suffix 256 (its prefix pass)

A second argument "one" runs split_kv one block per item instead of its persistent kernel.
Run under ncu, e.g.:
  ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section Occupancy \
      --section MemoryWorkloadAnalysis -k regex:split_kv --launch-skip 2 --launch-count 1 \
      python3 scripts/explore/ncu_targets.py coverage
"""
import importlib
import sys

import cupy as cp
import numpy as np
import torch

import gpukernels
from gpukernels.bench import (HEAD_DIM, NUM_QO_HEADS, SPAN_BATCH, SPAN_GRID, SPAN_KV_HEADS, SPAN_KV_LEN,
                              _randn16, span_case_spans, span_token_mask, stream_read)

CALLS = 4


def coverage() -> None:
    rng = np.random.default_rng(0)
    q, k, v = (torch.from_numpy(rng.standard_normal(s, dtype=np.float32)).to("cuda", torch.bfloat16)
               for s in ((64, 16, 64), (64, 1000, 16, 64), (64, 1000, 16, 64)))
    plan = gpukernels.plan_split_kv(64, 16, 16, 64, 1000, dtype="bfloat16")
    runner = gpukernels.SplitKV(plan)
    out = torch.empty_like(q)
    lse = torch.empty((64, 16), dtype=torch.float32, device="cuda")
    for _ in range(CALLS):
        runner.run(q, k, v, out=out, lse=lse)
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
    qs, ks, vs = q[:, :, None], k.transpose(1, 2), v.transpose(1, 2)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        for _ in range(CALLS):
            torch.nn.functional.scaled_dot_product_attention(qs, ks, vs)
    k16, v16 = (cp.asarray(x.view(torch.int16)) for x in (k, v))
    stream = stream_read()
    for _ in range(CALLS):
        stream(k16, v16)
    torch.cuda.synchronize()


def _shared_prefix_calls(B: int, hkv: int, P: int, S: int, method: str) -> None:
    q = _randn16((B, NUM_QO_HEADS, HEAD_DIM))
    kp, vp = _randn16((P, hkv, HEAD_DIM)), _randn16((P, hkv, HEAD_DIM))
    ks, vs = _randn16((B, S, hkv, HEAD_DIM)), _randn16((B, S, hkv, HEAD_DIM))
    for _ in range(CALLS):
        gpukernels.shared_prefix(q, kp, vp, ks, vs, method=method)
    cp.cuda.Device().synchronize()


def finish() -> None:
    _shared_prefix_calls(16, 8, 8192, 256, "bifurcated")


def prefix() -> None:
    _shared_prefix_calls(128, 8, 32768, 256, "hydragen")


def summary() -> None:
    span_mod = importlib.import_module("gpukernels.span")
    case = next(c for c in SPAN_GRID if "summar" in str(c))
    indptr, spans = span_case_spans(case)
    q = _randn16((SPAN_BATCH, NUM_QO_HEADS, HEAD_DIM))
    k = _randn16((SPAN_BATCH, SPAN_KV_LEN, SPAN_KV_HEADS, HEAD_DIM))
    v = _randn16((SPAN_BATCH, SPAN_KV_LEN, SPAN_KV_HEADS, HEAD_DIM))
    plan = span_mod.plan_span(indptr, spans, batch=SPAN_BATCH, kv_len=SPAN_KV_LEN, num_qo_heads=NUM_QO_HEADS,
                              num_kv_heads=SPAN_KV_HEADS, head_dim=HEAD_DIM)
    runner = span_mod.Span(plan)
    for _ in range(CALLS):
        runner.run(q, k, v)
    cp.cuda.Device().synchronize()


def packed() -> None:
    case = next(c for c in SPAN_GRID if "summar" in str(c))
    indptr, spans = span_case_spans(case)
    mask = span_token_mask(indptr, spans, SPAN_BATCH, SPAN_KV_LEN)
    per_seq = int(mask.sum(axis=1)[0])
    q = _randn16((SPAN_BATCH, NUM_QO_HEADS, HEAD_DIM))
    k = _randn16((SPAN_BATCH, per_seq, SPAN_KV_HEADS, HEAD_DIM))
    v = _randn16((SPAN_BATCH, per_seq, SPAN_KV_HEADS, HEAD_DIM))
    plan = gpukernels.plan_split_kv(SPAN_BATCH, NUM_QO_HEADS, SPAN_KV_HEADS, HEAD_DIM, per_seq)
    runner = gpukernels.SplitKV(plan)
    for _ in range(CALLS):
        runner.run(q, k, v)
    cp.cuda.Device().synchronize()


if len(sys.argv) > 2:   # "one": one block per item instead of the persistent kernel
    importlib.import_module("gpukernels.split_kv").PERSISTENT = sys.argv[2] != "one"
{"coverage": coverage, "finish": finish, "summary": summary, "packed": packed, "prefix": prefix}[sys.argv[1]]()
