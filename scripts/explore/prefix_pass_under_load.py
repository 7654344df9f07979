"""Does Hydragen's prefix pass slow down while the suffixes stream beside it? On four shared-prefix
rows, at the plan's chunk: the prefix pass alone; a kernel that only reads the suffixes' K and V
alone (its blocks fill the SMs the pass leaves free and wait for the rest); both at once on two
streams, the pass launched first (its blocks take an SM each), with the pass's own time and the
pair's; and the planned call. Medians of 20 (us), the L2 flushed before each.
(logs/explore-prefix-pass-under-load-forms.log adds forms of the pass from a build not kept: tiles
prefetched into L2 4 or 8 tiles ahead of the copies, and the copies with an evict_last L2 policy;
its "STATES DIFFER" compared them with the planned call's states, made at another scale.)

An exploration, not a benchmark: lines of text, no result file.
Run: PYTHONPATH=. python3 scripts/explore/prefix_pass_under_load.py
     (with `clocks`: the SM clock and the power drawn while one row's pass runs alone, beside the
     read, and the read alone; with `tiles`: the pass with KV tiles of 64 rows on 6 stages against
     128 on 3, alone and beside the read)
"""
import importlib
import sys

import cupy as cp
import numpy as np

from _inputs import shared_prefix_inputs, states_difference
from gpukernels.bench import FLUSH_BYTES, Timer, stream_read

sp = importlib.import_module("gpukernels.shared_prefix")
sk = importlib.import_module("gpukernels.split_kv")
HQ, D, REPS = 32, 128, 20
timer = Timer(REPS)
stream = stream_read()
flush = cp.empty(FLUSH_BYTES, dtype=cp.uint8)


def prefix_pass(plan, q, kp, vp, part_out, part_lse, batch, hkv, prefix_len):
    """A function launching the plan's prefix pass on the current stream."""
    wide = plan.prefix_block_rows == sp.PINGPONG_ROWS
    tail = (part_out.data.ptr, part_lse.data.ptr, batch, prefix_len, HQ, hkv, plan.prefix_chunk_size, 0.127)
    if wide:
        args = tuple(sp.prefix_tensor_map(x.data.ptr, "float16", prefix_len, hkv, D) for x in (kp, vp))
        args += (q.data.ptr,) + tail
    else:
        args = (q.data.ptr, kp.data.ptr, vp.data.ptr) + tail
    kernel = (sp._specialized_kernel if wide else sp._prefix_kernel)("float16", D)
    grid = (plan.num_chunks, -(-batch * (HQ // hkv) // plan.prefix_block_rows), hkv)
    threads = sp.SPECIALIZED_THREADS if wide else sp.THREADS

    def launch():
        kernel(grid, (threads,), args, stream_ptr=cp.cuda.get_current_stream().ptr, device_id=0)
    return launch, grid[0] * grid[1] * grid[2]


def side_by_side(first, second):
    """Median (first's time, both's time) with first on one stream and second on another, started
    together after a flush."""
    a, b = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    firsts, boths = [], []
    for rep in range(REPS + 3):
        with a:
            flush.fill(1)
            start = cp.cuda.Event()
            start.record(a)
        b.wait_event(start)
        with a:
            first()
            end_a = cp.cuda.Event()
            end_a.record(a)
        with b:
            second()
            end_b = cp.cuda.Event()
            end_b.record(b)
        end_a.synchronize()
        end_b.synchronize()
        if rep >= 3:
            firsts.append(cp.cuda.get_elapsed_time(start, end_a))
            boths.append(max(firsts[-1], cp.cuda.get_elapsed_time(start, end_b)))
    return float(np.median(firsts)), float(np.median(boths))


def planned_row(hkv, batch, prefix_len, suffix_len):
    """A row's inputs, its planned runner (run once) and a function launching its prefix pass
    alone on the current stream, with the pass's number of blocks."""
    q, kp, vp, ks, vs, out, lse = shared_prefix_inputs(hkv, batch, prefix_len, suffix_len)
    plan = sp.plan_shared_prefix(batch, HQ, hkv, D, prefix_len, suffix_len, num_sms=sk.num_sms(0),
                                 gpu=sk.device_gpu(0))
    runner = sp.SharedPrefix(plan)
    runner.run(q, kp, vp, ks, vs, out=out, lse=lse)
    part_out, part_lse, _ = next(iter(runner._buffers.values()))
    launch, blocks = prefix_pass(plan, q, kp, vp, part_out, part_lse, batch, hkv, prefix_len)
    return (q, kp, vp, ks, vs, out, lse), plan, runner, launch, blocks


print(f"GPU: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}", flush=True)
ROWS = ((8, 256, 4096, 128), (8, 64, 16384, 256), (8, 128, 32768, 256), (32, 256, 4096, 128), (32, 64, 16384, 256))
for hkv, batch, prefix_len, suffix_len in ([] if sys.argv[1:] else ROWS):
    (q, kp, vp, ks, vs, out, lse), plan, runner, launch, blocks = planned_row(hkv, batch, prefix_len, suffix_len)
    alone = timer(launch) * 1e3
    read = timer(lambda: stream(ks, vs)) * 1e3  # noqa: B023
    pass_beside, both = side_by_side(launch, lambda: stream(ks, vs))  # noqa: B023
    call = timer(lambda: runner.run(q, kp, vp, ks, vs, out=out, lse=lse)) * 1e3  # noqa: B023
    print(f"{HQ}/{hkv} x {batch} x {prefix_len}+{suffix_len} (chunk {plan.prefix_chunk_size}, {blocks} blocks of "
          f"{plan.prefix_block_rows} rows{', merge launch' if plan.merge_launch else ''}): pass alone {alone:.1f}; "
          f"suffix read alone {read:.1f}; side by side: pass {pass_beside * 1e3:.1f}, both {both * 1e3:.1f}; "
          f"the planned call {call:.1f}", flush=True)


if sys.argv[1:] == ["clocks"]:
    # The SM clock and the power drawn (nvidia-smi, sampled every 100 ms) while the 32/8 x 256 x
    # 4096 row's prefix pass runs alone, beside the suffixes' read, and the read alone, each for 3 s.
    import subprocess
    import threading
    import time

    (_, _, _, ks, vs, _, _), _, _, launch, _ = planned_row(8, 256, 4096, 128)
    a, b = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)

    def sample(stop, into):
        while not stop.is_set():
            into.append(subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"],
                                       capture_output=True, text=True).stdout.strip())
            time.sleep(0.1)

    for label, on_a, on_b in (("pass alone", launch, None), ("pass beside the read", launch, lambda: stream(ks, vs)),
                              ("read alone", None, lambda: stream(ks, vs))):
        stop, samples = threading.Event(), []
        sampler = threading.Thread(target=sample, args=(stop, samples))
        sampler.start()
        end, n = time.time() + 3.0, 0
        while time.time() < end:
            for _ in range(50):
                if on_a:
                    with a:
                        on_a()
                if on_b:
                    with b:
                        on_b()
                n += 1
            a.synchronize()
            b.synchronize()
        stop.set()
        sampler.join()
        values = np.array([[float(x) for x in s.split(",")] for s in samples[3:] if s])
        print(f"{label}: {n} rounds; SM clock median {np.median(values[:, 0]):.0f} MHz (min {values[:, 0].min():.0f}), "
              f"power median {np.median(values[:, 1]):.0f} W", flush=True)


if sys.argv[1:] == ["tiles"]:
    # The pass in blocks of 128 rows with KV tiles of 64 rows on 6 stages (twice the tiles in
    # flight, the same bytes) against the library's 128 on 3: alone and beside the read.
    from gpukernels import _runtime as rt

    def tiles_pass(plan, q, kp, vp, part_out, part_lse, batch, hkv, prefix_len, kv, stages):
        name = f"decode_attention::shared_prefix_specialized_kernel<__half, {D}, {stages}, {kv}>"
        smem = stages * 2 * kv * D * 2 + sp.PINGPONG_ROWS * D * 2 + 1024
        kernel = rt.Kernel("shared_prefix", name, sp.SPECIALIZED_SIGNATURE, shared_mem=smem)
        maps = tuple(rt.tensor_map(x.data.ptr, "float16", (D, hkv, prefix_len), (64, 1, kv)) for x in (kp, vp))
        args = maps + (q.data.ptr, part_out.data.ptr, part_lse.data.ptr, batch, prefix_len, HQ, hkv,
                       plan.prefix_chunk_size, 0.127)
        grid = (plan.num_chunks, -(-batch * (HQ // hkv) // plan.prefix_block_rows), hkv)

        def launch():
            kernel(grid, (sp.SPECIALIZED_THREADS,), args, stream_ptr=cp.cuda.get_current_stream().ptr, device_id=0)
        return launch

    for hkv, batch, prefix_len, suffix_len in ROWS[:4]:
        q, kp, vp, ks, vs, out, lse = shared_prefix_inputs(hkv, batch, prefix_len, suffix_len)
        plan = sp.plan_shared_prefix(batch, HQ, hkv, D, prefix_len, suffix_len, num_sms=sk.num_sms(0),
                                     gpu=sk.device_gpu(0))
        n = plan.num_chunks
        text, first = [], None
        for kv, stages in ((128, 3), (64, 6)):
            part_out = cp.full((n, batch, HQ, D), np.nan, dtype=cp.float32)
            part_lse = cp.full((n, batch, HQ), np.nan, dtype=cp.float32)
            launch = tiles_pass(plan, q, kp, vp, part_out, part_lse, batch, hkv, prefix_len, kv, stages)
            launch()
            same = ""
            if first is None:
                first = (part_out, part_lse)
            else:
                same = " (difference {:.1e} / {:.1e})".format(*states_difference(first, (part_out, part_lse)))
            alone = timer(launch) * 1e3
            beside, both = side_by_side(launch, lambda: stream(ks, vs))  # noqa: B023
            text.append(f"tiles of {kv} on {stages} stages{same}: alone {alone:.1f}, beside {beside * 1e3:.1f}, "
                        f"both {both * 1e3:.1f}")
        print(f"{HQ}/{hkv} x {batch} x {prefix_len}+{suffix_len} (chunk {plan.prefix_chunk_size}): " + "; ".join(text),
              flush=True)
