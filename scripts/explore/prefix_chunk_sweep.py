"""Hydragen's whole call on the shared-prefix grid with the prefix cut into chunks of several
sizes: the plan's chunk (marked *) against shorter and longer ones. The suffix launch merges one
state per chunk, so fewer, longer chunks trade prefix-pass parallelism for a shorter merge.

An exploration, not a benchmark: lines of text (us), no result file.
Run: PYTHONPATH=. python3 scripts/explore/prefix_chunk_sweep.py
"""
import importlib

from _inputs import shared_prefix_inputs
from gpukernels.bench import SHARED_PREFIX_GRID, Timer

sp = importlib.import_module("gpukernels.shared_prefix")
timer = Timer(30)
HQ, D = 32, 128

for hkv, B, P, S in SHARED_PREFIX_GRID:
    q, kp, vp, ks, vs, out, lse = shared_prefix_inputs(hkv, B, P, S, num_qo_heads=HQ, head_dim=D)
    chunk0 = sp.plan_shared_prefix(B, HQ, hkv, D, P, S, num_sms=132).prefix_chunk_size
    res = {}
    for chunk in sorted({chunk0 // 4, chunk0 // 2, chunk0, chunk0 * 2, chunk0 * 4}):
        if chunk < 64 or chunk > P:
            continue
        runner = sp.SharedPrefix(sp.plan_shared_prefix(B, HQ, hkv, D, P, S, num_sms=132, prefix_chunk_size=chunk))
        res[f"c{chunk}x{-(-P // chunk)}{'*' if chunk == chunk0 else ''}"] = timer(
            lambda: runner.run(q, kp, vp, ks, vs, out=out, lse=lse))  # noqa: B023
    print(f"{HQ}/{hkv} B={B} {P}+{S}: " + ", ".join(f"{k}={v * 1e3:.1f}" for k, v in res.items()), flush=True)
