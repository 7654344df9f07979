"""Why split_kv is slower than cuDNN inside the CodeLlama-34B decode step at long context, while it
is ahead of cuDNN on the decode grid, on one GPU.

An exploration, not a benchmark: it writes no result file. For batch 1, 64 query / 8 KV heads,
head_dim 128, float16, contexts 32k and 128k, it prints (us per layer): the planned split_kv and
SDPA's cuDNN backend on one cache (as the decode grid runs them), the same with the lengths on the
GPU (as the decoder passes them) and an additive mask for cuDNN, and both over `LAYERS` distinct
caches one after another under a CUDA graph (as the decoder's step runs them).
Run: [HQ=32] PYTHONPATH=. python3 scripts/explore/model_attention.py
"""
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import gpukernels
from decode_attention.e2e.bench import graph_seconds
from gpukernels.bench import Timer

LAYERS = 16
HQ, HKV, D = int(os.environ.get("HQ", 64)), 8, 128   # HQ=32: the decode grid's group of 4
timer = Timer(30)


def cudnn(q, k, v, mask=None):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask, enable_gqa=True)


def graph_us(fn) -> float:
    """Median time of one replay of a CUDA graph of `fn`, in us."""
    return graph_seconds(fn) * 1e6


for kv_len in (32768, 131072):
    cap = kv_len + 21
    q = torch.randn(1, HQ, D, device="cuda", dtype=torch.float16)
    ks = torch.randn(LAYERS, 1, cap, HKV, D, device="cuda", dtype=torch.float16)
    vs = torch.randn(LAYERS, 1, cap, HKV, D, device="cuda", dtype=torch.float16)
    lens = torch.full((1,), kv_len, device="cuda", dtype=torch.int32)
    mask = torch.zeros(1, 1, 1, cap, device="cuda", dtype=torch.float16)
    mask[..., kv_len:] = float("-inf")
    plan = gpukernels.plan_split_kv(1, HQ, HKV, D, cap, dtype="float16", gpu="H200")
    runner = gpukernels.SplitKV(plan)
    out, lse = torch.empty_like(q), torch.empty(1, HQ, device="cuda")
    k0, v0 = ks[0, :, :kv_len].contiguous(), vs[0, :, :kv_len].contiguous()
    res = {
        "split_kv, one cache": timer(lambda: runner.run(q, k0, v0, out=out, lse=lse)) * 1e3,
        "cuDNN, one cache": timer(lambda: cudnn(q, k0, v0)) * 1e3,
        "split_kv, lengths on the GPU": timer(lambda: runner.run(q, ks[0], vs[0], lens, out=out, lse=lse)) * 1e3,
        "cuDNN, mask": timer(lambda: cudnn(q, ks[0], vs[0], mask)) * 1e3,
    }

    def ours_layers():
        for layer in range(LAYERS):
            runner.run(q, ks[layer], vs[layer], lens, out=out, lse=lse)

    def cudnn_layers():
        for layer in range(LAYERS):
            cudnn(q, ks[layer], vs[layer], mask)

    res[f"split_kv, {LAYERS} layers in a graph, per layer"] = graph_us(ours_layers) / LAYERS
    res[f"cuDNN, {LAYERS} layers in a graph, per layer"] = graph_us(cudnn_layers) / LAYERS
    print(f"1 x {HQ}/{HKV} x {kv_len} (plan: {plan.num_splits} splits of {plan.chunk_size}): "
          + ", ".join(f"{k} {v:.1f}" for k, v in res.items()), flush=True)
    del ks, vs
    torch.cuda.empty_cache()
