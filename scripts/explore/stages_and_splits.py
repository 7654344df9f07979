"""Pipeline stages and split counts of split_kv on the coverage grid, against SDPA, on one GPU.

An exploration, not a benchmark: it prints one line per shape (us: read-only time, the planned run
for each stage count and split count, SDPA peers, the one-shot call; host time of the one-shot call
and of the first peer, both in us) and writes no result file. The stage count is swapped by
`_stages.use_stages`. Run: PYTHONPATH=. python3 scripts/explore/stages_and_splits.py [rows, e.g.
7,13: only those rows of the grid, each followed by a profile of its one-shot call's host path]
"""
import importlib, sys, time
import numpy as np, torch, cupy as cp
sk = importlib.import_module("gpukernels.split_kv")
import gpukernels
from _profile import print_host_profile
from _stages import use_stages
from gpukernels.bench import Timer, stream_read, _sdpa_peers, COVERAGE_GRID, host_us
from costmodel.gpus import get_gpu

timer = Timer(30)
stream = stream_read()
sms = sk.num_sms(0)
gpu = sk.device_gpu(0)

def case(dtype, B, hq, hkv, d, L, stages_list, splits_list):
    t = getattr(torch, dtype)
    q = torch.randn(B, hq, d, device="cuda", dtype=t)
    k = torch.randn(B, L, hkv, d, device="cuda", dtype=t)
    v = torch.randn(B, L, hkv, d, device="cuda", dtype=t)
    k16, v16 = cp.asarray(k.view(torch.int16)), cp.asarray(v.view(torch.int16))
    ro = timer(lambda: stream(k16, v16))
    out = torch.empty_like(q); lse = torch.empty(B, hq, device="cuda")
    auto = gpukernels.plan_split_kv(B, hq, hkv, d, L, dtype=dtype, num_sms=sms, gpu=gpu)
    res = {"read": ro}
    for st in stages_list:
        use_stages(st)
        for s in splits_list:
            plan = auto if s == "auto" else gpukernels.plan_split_kv(B, hq, hkv, d, L, dtype=dtype, num_sms=sms, num_splits=s)
            r = gpukernels.SplitKV(plan)
            try:
                res[f"st{st}/s{plan.num_splits}{'*' if s=='auto' else ''}"] = timer(lambda: r.run(q, k, v, out=out, lse=lse))
            except Exception as e:
                print("fail", st, s, str(e)[:100])
    use_stages(None)
    for lab, fn in _sdpa_peers(q, k, v).items():
        res[lab] = timer(fn)
    one = lambda: gpukernels.split_kv(q, k, v)
    res["oneshot"] = timer(one)
    res["host_oneshot"] = host_us(one) / 1e3
    pk = [fn for l, fn in _sdpa_peers(q, k, v).items()]
    if pk: res["host_peer"] = host_us(pk[0]) / 1e3
    print(f"{dtype} {B}x{hq}/{hkv}x{d} L={L}: " + ", ".join(f"{k_}={v_*1e3:.1f}" for k_, v_ in res.items()), flush=True)
    if PROFILE:
        print_host_profile(one, top=14, lines=32)

PROFILE = len(sys.argv) > 1
rows = [int(x) for x in sys.argv[1].split(",")] if PROFILE else range(len(COVERAGE_GRID))
for (dtype, B, hq, hkv, d, L) in (COVERAGE_GRID[i] for i in rows):
    if d == 64:
        case(dtype, B, hq, hkv, d, L, [3, 4, 6], ["auto", 1, 2, 3, 4, 16, 32])
    elif d == 256:
        case(dtype, B, hq, hkv, d, L, [2, 3], ["auto", 1, 4, 16, 32])
    else:
        case(dtype, B, hq, hkv, d, L, [3], ["auto", 1, 4, 16])
