"""Each launch of a planned shared-prefix call on its own, beside the cost model's time for it: on
the shared-prefix grid, for Hydragen and for bifurcated attention, every kernel launch of the call
is timed by CUDA events around it inside whole calls (so a launch that would start beside the one
before it runs after it here), the median over the calls, with the L2 flushed before each call;
then the whole call as the benchmark times it, and the model's time of each launch and of the call.

An exploration, not a benchmark: lines of text (us), no result file.
Run: PYTHONPATH=. python3 scripts/explore/launch_parts.py [ROW,ROW...]   (indices into the grid)
"""
import importlib
import sys

import cupy as cp
import numpy as np

from _inputs import shared_prefix_inputs
from costmodel.shared_prefix import SharedPrefixShape, predict
from gpukernels import _runtime as rt
from gpukernels.bench import FLUSH_BYTES, SHARED_PREFIX_GRID, Timer

sp = importlib.import_module("gpukernels.shared_prefix")   # the module (the package exports its function)

HQ, D, CALLS = 32, 128, 20
timer = Timer(CALLS)
flush = cp.empty(FLUSH_BYTES, dtype=cp.uint8)
original_call = rt.Kernel.__call__
events: list = []


def recorded_call(self, grid, block, args, *, stream_ptr, device_id, programmatic=False):
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    original_call(self, grid, block, args, stream_ptr=stream_ptr, device_id=device_id, programmatic=False)
    end.record()
    name = self.name.split("::")[-1].split("<")[0].removesuffix("_kernel")
    events.append((name, start, end))


def parts(call) -> dict:
    """Median time (us) of each launch of `call`, by its kernel's name (a name launched twice in a
    call numbered), over CALLS calls, the L2 flushed before each."""
    rt.Kernel.__call__ = recorded_call
    times: dict = {}
    try:
        for _ in range(CALLS + 2):
            flush.fill(1)
            events.clear()
            call()
            cp.cuda.Device().synchronize()
            seen: dict = {}
            for name, a, b in events:
                seen[name] = seen.get(name, 0) + 1
                key = name if seen[name] == 1 else f"{name}#{seen[name]}"
                times.setdefault(key, []).append(cp.cuda.get_elapsed_time(a, b) * 1e3)
    finally:
        rt.Kernel.__call__ = original_call
    return {k: float(np.median(v[2:])) for k, v in times.items()}


rows = SHARED_PREFIX_GRID if len(sys.argv) < 2 else [SHARED_PREFIX_GRID[int(i)] for i in sys.argv[1].split(",")]
for hkv, B, P, S in rows:
    q, kp, vp, ks, vs, out, lse = shared_prefix_inputs(hkv, B, P, S)
    shape = SharedPrefixShape(B, HQ, hkv, D, P, S)
    for method in ("hydragen", "bifurcated"):
        plan = sp.plan_shared_prefix(B, HQ, hkv, D, P, S, method=method, gpu="H200")
        runner = sp.SharedPrefix(plan)
        call = lambda: runner.run(q, kp, vp, ks, vs, out=out, lse=lse)  # noqa: E731
        call()
        whole = timer(call) * 1e3
        measured = parts(call)
        model = predict(shape, method=method, gpu="H200")
        launches = {k.removesuffix(".time_s"): v * 1e6 for k, v in model.terms.items()
                    if k.endswith(".time_s") and k != "time_s"}
        form = (f"chunk {plan.prefix_chunk_size}, {plan.prefix_block_rows} rows, "
                f"{'three launches' if plan.merge_launch else 'two launches'}" if method == "hydragen"
                else f"chunk {plan.prefix_chunk_size}")
        print(f"32/{hkv} x {B} x {P} + {S} {method} ({form}): call {whole:.1f} (model {model.time_s * 1e6:.1f}, "
              f"sum of launches {sum(measured.values()):.1f})", flush=True)
        print("  measured: " + ", ".join(f"{k} {v:.1f}" for k, v in measured.items()), flush=True)
        print("  model:    " + ", ".join(f"{k} {v:.1f}" for k, v in launches.items()), flush=True)
        del runner
    del q, kp, vp, ks, vs, out, lse
    cp.get_default_memory_pool().free_all_blocks()
