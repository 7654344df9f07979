"""Hydragen's whole call on the shared-prefix grid with the prefix cut into chunks of several
sizes: the plan's chunk (marked *) against shorter and longer ones. The suffix launch merges one
state per chunk, so fewer, longer chunks trade prefix-pass parallelism for a shorter merge.

An exploration, not a benchmark: lines of text (us), no result file.
Run: PYTHONPATH=. python3 scripts/explore/prefix_chunk_sweep.py
     (with `row HKV BATCH PREFIX SUFFIX`: that row alone, every chunk from 256 to 4096 in blocks of
     64 rows and of 128, in two launches and three)
"""
import dataclasses
import importlib
import sys

from _inputs import shared_prefix_inputs
from gpukernels.bench import SHARED_PREFIX_GRID, Timer

sp = importlib.import_module("gpukernels.shared_prefix")
timer = Timer(30)
HQ, D = 32, 128

if sys.argv[1:2] == ["row"]:
    hkv, B, P, S = map(int, sys.argv[2:6])
    q, kp, vp, ks, vs, out, lse = shared_prefix_inputs(hkv, B, P, S, num_qo_heads=HQ, head_dim=D)
    plan0 = sp.plan_shared_prefix(B, HQ, hkv, D, P, S)
    print(f"{HQ}/{hkv} B={B} {P}+{S}: the plan: chunk {plan0.prefix_chunk_size}, {plan0.prefix_block_rows} rows, "
          f"{'three' if plan0.merge_launch else 'two'} launches", flush=True)
    for rows in (64, 128):
        for merge_launch in (False, True):
            text = []
            for chunk in (256, 512, 1024, 2048, 4096):
                if chunk > P:
                    continue
                plan = dataclasses.replace(sp.plan_shared_prefix(B, HQ, hkv, D, P, S, prefix_chunk_size=chunk),
                                           prefix_block_rows=rows, merge_launch=merge_launch)
                runner = sp.SharedPrefix(plan)
                t = timer(lambda: runner.run(q, kp, vp, ks, vs, out=out, lse=lse))  # noqa: B023
                text.append(f"c{chunk} {t * 1e3:.1f}")
            print(f"  {rows} rows, {'three' if merge_launch else 'two'} launches: " + ", ".join(text), flush=True)
    sys.exit(0)

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
