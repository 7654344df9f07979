"""Chunk sizes of the one-block-per-SM kernel (head_dim 256): power-of-two chunks against chunks that
fill the SMs in one wave, against SDPA, on one GPU.

An exploration, not a benchmark: one line per shape (us), no result file.
Run: PYTHONPATH=. python3 scripts/explore/one_wave_chunks.py
"""
import dataclasses, importlib
import torch, cupy as cp
sk = importlib.import_module("gpukernels.split_kv")
import gpukernels
from gpukernels.bench import Timer, stream_read, _sdpa_peers, host_us
timer = Timer(30); stream = stream_read()
for (dtype, B, hq, hkv, d, L, chunks) in [("bfloat16", 1, 16, 2, 256, 333333, [8192, 5056, 4096, 2560, 2048]),
                                           ("float16", 1, 16, 4, 256, 100000, [4096, 3072, 3136, 2048]),
                                           ("float16", 3, 24, 3, 256, 50000, [8192, 4096, 3392, 2048])]:
    t = getattr(torch, dtype)
    q = torch.randn(B, hq, d, device="cuda", dtype=t); k = torch.randn(B, L, hkv, d, device="cuda", dtype=t); v = torch.randn_like(k)
    k16, v16 = cp.asarray(k.view(torch.int16)), cp.asarray(v.view(torch.int16))
    res = {"read": timer(lambda: stream(k16, v16))}
    auto = gpukernels.plan_split_kv(B, hq, hkv, d, L, dtype=dtype, num_sms=132)
    out = torch.empty_like(q); lse = torch.empty(B, hq, device="cuda")
    for c in chunks:
        plan = dataclasses.replace(auto, chunk_size=c, num_splits=-(-L // c))
        r = gpukernels.SplitKV(plan)
        res[f"c{c}/s{plan.num_splits}{'*' if c == auto.chunk_size else ''}"] = timer(lambda: r.run(q, k, v, out=out, lse=lse))
    for lab, fn in _sdpa_peers(q, k, v).items():
        res[lab] = timer(fn)
    one = lambda: gpukernels.split_kv(q, k, v)
    res["oneshot"] = timer(one); res["host_oneshot"] = host_us(one) / 1e3
    print(f"{dtype} {B}x{hq}/{hkv}x{d} L={L} auto chunk {auto.chunk_size}: " + ", ".join(f"{a}={b*1e3:.1f}" for a, b in res.items()), flush=True)
