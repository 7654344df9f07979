"""Decode sharded over the GPUs of one host against one GPU: times, the collective's share, the crossover.

One process a GPU under torchrun, started by scripts/sharded-bench.sh; the grid and targets of
docs/benchmarks.md, "Several GPUs".

What it measures, for batch 1 and 8, 32 query / 8 KV heads, head_dim 128, float16:

* the grid: contexts from 32k tokens, doubling up to the largest whose K and V fit one GPU
  (ONE_GPU_MEMORY_FRACTION of its memory), each timed as `split_kv` on rank 0 alone (a world of
  one: the planned `SplitKV.run`) and as the sharded step on every rank (`ShardedDecode.run`:
  split_kv on the rank's shard, the NCCL all-gather of the partial states, the merge); beside
  each sharded time the all-gather of the same payload alone (the collective's share) and the
  shard's split_kv alone (`shard_ms`);
* the crossover: the same pair at contexts around the cost model's predicted crossover (CROSSOVER_
  OCTAVES octaves either side, CROSSOVER_STEPS_PER_OCTAVE points an octave), and the context at
  which the measured times cross (`measured_crossover`), against the prediction;
* a cache larger than one GPU's memory (LARGE_KV_LEN tokens at batch 1, 160 GiB of K and V), on
  the two GPUs only, checked against the exact answer: every rank computes the float64 softmax
  state of its shard chunk by chunk on its GPU (`exact_state_chunked`: the math of
  refattn.split_kv, in PyTorch, float64), the ranks exchange those states and merge them by LSE;
  the host could not hold a float64 copy of the cache.

Timing: every step is captured in a CUDA graph and replayed (a decode step runs so), first for at
least WARMUP_MS as a warm-up; CUDA events around each replay, the L2 flushed before each (a 256 MB
write), then a 1 ms GPU wait (on the GPU's own nanosecond timer) that hides the host's launch and a
device barrier (an NCCL all-reduce of one element: both GPUs leave it together, with the start
event and the step already queued behind it); the median over repetitions of each repetition's
slowest rank. The crossover rows
replay the step SWEEP_REPLAYS times back to back inside each repetition and take the mean, on one
GPU and on N alike. One-GPU rows time rank 0 alone. Every row carries the cost model's prediction (`costmodel.sharded`, collective
inside a CUDA graph) with the ceilings measured in the same run, `stream_ms` (a kernel that only
reads the row's K and V once: on two GPUs each rank its shard, at the same time), the floor and
frac, like the single-GPU suites (gpukernels/bench.py). Only rank 0 writes the result file,
`<out>/<gpu>x<N>/distributed.json`, and prints the table.

    torchrun --standalone --nproc-per-node 2 -m gpukernels.bench_sharded [--out results] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from gpukernels.bench import FLUSH_BYTES, HEAD_DIM, NUM_QO_HEADS, _floor_and_ceiling, gpu_slug, host_us

NUM_KV_HEADS = 8
DTYPE = "float16"
ELEM_BYTES = 2
BATCHES = (1, 8)
FIRST_KV_LEN = 32768
ONE_GPU_MEMORY_FRACTION = 0.8      # the grid's K and V take at most this share of one GPU's memory
LARGE_BATCH = 1
LARGE_KV_LEN = 40 << 20            # 41,943,040 tokens: 160 GiB of K and V, 80 GiB a rank on two
CHECK_CHUNK_TOKENS = 1 << 18       # tokens of one float64 chunk of the exact answer (2 GiB of K)
CROSSOVER_OCTAVES = 3              # the sweep spans predicted / 2^3 .. predicted x 2^3
CROSSOVER_STEPS_PER_OCTAVE = 4
CROSSOVER_TARGET = 0.15            # |measured - predicted| / measured
LONG_KV_LEN = 1 << 20              # from here on two GPUs must take ...
LONG_TIME_RATIO_TARGET = 0.55      # ... at most this share of one GPU's time
# GPU wait before the barrier: long enough that every rank's host has queued the barrier, the start
# event and its replay before its GPU reaches the barrier, so the GPUs leave the barrier together
# and go straight into the step. With the wait after the barrier instead, a rank whose host queued
# the wait only after the barrier had let its GPU go began late by that host time, and the other
# rank waited it out in the step's collective: single replays read 10-135 us above their shard plus
# all-gather on a third of the rows (with a 0.05 ms wait there, 70-320 us).
LEAD_MS = 1.0
SWEEP_REPS_FACTOR = 2              # crossover rows: small and noisy, so twice the repetitions
# Crossover rows time this many replays of the step back to back in each repetition (the time of
# one: their mean), as a decode loop runs its steps, on one GPU and on N alike. Timed one replay
# after a barrier each, with the GPU wait then counted in clock cycles and placed after the
# barrier (see LEAD_MS and gpukernels.bench.gpu_wait), the batch-8 sweep's two-GPU steps read
# 50-240 us above their shard plus all-gather on a third of its rows, which put the measured
# crossover at 17k and at 266k tokens in two runs.
SWEEP_REPLAYS = 8
# Before each measurement the timed function runs WARMUP_CALLS times, then more until WARMUP_MS
# have passed (at most WARMUP_MAX_CALLS more). After three calls alone, the first repetitions of a
# two-GPU step on a freshly filled 34 GB shard still read up to 1.1 ms above the later ones
# (8.8 against 7.7 ms: scripts/explore/sharded_large_rows.py), which on the largest rows put the
# median 1 ms high.
WARMUP_CALLS = 3
WARMUP_MS = 250.0
WARMUP_MAX_CALLS = 200
TEARDOWN_TIMEOUT_S = 30.0
SEED = 0


# ---------------------------------------------------------------------------------------------
# The rows to run and what they say (pure Python: tested on the CPU)
# ---------------------------------------------------------------------------------------------

def kv_cache_bytes(batch: int, kv_len: int) -> int:
    """K and V of the whole batch: 2 x batch x kv_len x NUM_KV_HEADS x HEAD_DIM x 2 bytes."""
    return 2 * batch * kv_len * NUM_KV_HEADS * HEAD_DIM * ELEM_BYTES


def context_grid(batch: int, gpu_memory_bytes: int, *, quick: bool = False) -> list[int]:
    """FIRST_KV_LEN, doubling, up to the largest whose K and V take at most ONE_GPU_MEMORY_FRACTION
    of one GPU's memory (`quick`: the first three)."""
    lens = []
    kv_len = FIRST_KV_LEN
    while kv_cache_bytes(batch, kv_len) <= ONE_GPU_MEMORY_FRACTION * gpu_memory_bytes:
        lens.append(kv_len)
        kv_len *= 2
    return lens[:3] if quick else lens


def crossover_sweep(predicted_kv_len: int, *, num_gpus: int = 2, placement_block: int = 32,
                    octaves: int = CROSSOVER_OCTAVES, steps: int = CROSSOVER_STEPS_PER_OCTAVE) -> list[int]:
    """Contexts around a predicted crossover, geometric (`steps` an octave, `octaves` either
    side), each a whole number of placement rounds (num_gpus x placement_block tokens) so that
    the shards are equal."""
    unit = num_gpus * placement_block
    lens = {max(unit, unit * round(predicted_kv_len * 2 ** (i / steps) / unit))
            for i in range(-octaves * steps, octaves * steps + 1)}
    return sorted(lens)


def measured_crossover(kv_lens, one_gpu_ms, many_gpus_ms) -> "float | None":
    """The context from which N GPUs stay faster than one, from timings at increasing contexts:
    with d = many - one, the first point from which d <= 0 at every larger context, and the
    crossing interpolated linearly between it and the point before. None when N GPUs never stay
    ahead, or are ahead at every point (the crossover lies below the sweep)."""
    kv_lens, one, many = (np.asarray(x, dtype=np.float64) for x in (kv_lens, one_gpu_ms, many_gpus_ms))
    if kv_lens.ndim != 1 or kv_lens.size == 0 or not kv_lens.shape == one.shape == many.shape \
            or np.any(np.diff(kv_lens) <= 0):
        raise ValueError("kv_lens must increase, with one time each on one GPU and on N")
    d = many - one
    ahead = d <= 0
    if not ahead[-1] or ahead.all():
        return None
    first = int(np.flatnonzero(~ahead)[-1]) + 1            # from here on N GPUs are ahead
    lo, hi = kv_lens[first - 1], kv_lens[first]
    return float(lo + (hi - lo) * d[first - 1] / (d[first - 1] - d[first]))


def crossover_verdict(batch: int, predicted: "int | None", measured: "float | None", sweep: list[int]) -> dict:
    """One crossover entry of the result file: predicted and measured contexts, their relative
    error and whether it is within CROSSOVER_TARGET."""
    entry = {"batch": batch, "num_gpus": 2, "predicted_kv_len": predicted,
             "measured_kv_len": None if measured is None else round(measured),
             "sweep_kv_lens": [int(n) for n in sweep], "target": CROSSOVER_TARGET}
    if predicted is None or measured is None:
        entry.update(error=None, met=False)
    else:
        entry["error"] = abs(predicted - measured) / measured
        entry["met"] = entry["error"] <= CROSSOVER_TARGET
    return entry


def row_base(batch: int, kv_len: int, num_gpus: int, impl: str, ceilings: dict) -> dict:
    """The keys every row of this suite shares (those of gpukernels/bench.py's rows), with the
    floor of reading K and V once on num_gpus GPUs at once."""
    unique = kv_cache_bytes(batch, kv_len) + 2 * batch * NUM_QO_HEADS * HEAD_DIM * ELEM_BYTES
    base = {"suite": "distributed", "impl": impl, "dtype": DTYPE, "batch": batch,
            "num_qo_heads": NUM_QO_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
            "kv_len": kv_len, "num_gpus": num_gpus, "unique_bytes": unique,
            "flops": 4 * batch * NUM_QO_HEADS * kv_len * HEAD_DIM}
    # num_gpus GPUs read in parallel: the floor of one GPU reading its share
    per_gpu = {**base, "unique_bytes": -(-unique // num_gpus), "flops": -(-base["flops"] // num_gpus)}
    base["floor_ms"] = _floor_and_ceiling(per_gpu, ceilings)["floor_ms"]
    return base


def finish_row(row: dict) -> dict:
    row["frac"] = row["floor_ms"] / row["time_ms"]
    return row


def targets(rows: list[dict], crossovers: list[dict]) -> dict:
    """The suite's targets, each with what was measured: two GPUs at most LONG_TIME_RATIO_TARGET
    of one GPU's time from LONG_KV_LEN tokens; the crossover predicted within CROSSOVER_TARGET;
    the cache larger than one GPU run and matching the exact answer."""
    pairs = _pairs(rows, sweep=False)
    long = [{"batch": b, "kv_len": n, "ratio": many["time_ms"] / one["time_ms"]}
            for (b, n), (one, many) in sorted(pairs.items()) if n >= LONG_KV_LEN]
    large = [r for r in rows if r.get("larger_than_one_gpu")]
    return {
        "long_context": {"from_kv_len": LONG_KV_LEN, "max_ratio": LONG_TIME_RATIO_TARGET, "rows": long,
                         "met": bool(long) and all(x["ratio"] <= LONG_TIME_RATIO_TARGET for x in long)},
        "crossover": {"max_error": CROSSOVER_TARGET, "met": bool(crossovers) and all(c["met"] for c in crossovers)},
        "larger_than_one_gpu": {"met": bool(large) and all(r["check"]["passed"] for r in large)},
    }


def _pairs(rows: list[dict], *, sweep: bool) -> dict:
    """(batch, kv_len) -> (one-GPU row, sharded row), for the grid or the crossover sweep."""
    by_key: dict = {}
    for r in rows:
        if bool(r.get("sweep")) == sweep and not r.get("larger_than_one_gpu"):
            by_key.setdefault((r["batch"], r["kv_len"]), {})[r["num_gpus"]] = r
    return {k: (v[1], v[max(v)]) for k, v in by_key.items() if 1 in v and len(v) > 1}


def _tokens(n: int) -> str:
    for unit, scale in (("M", 1 << 20), ("k", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n:,}"


def format_table(rows: list[dict], crossovers: list[dict], goals: dict) -> str:
    """The grid as a readable table, then the crossovers, the large cache and the targets."""
    head = ("batch", "context", "KV GB", "1 GPU us", "pred", "2 GPUs us", "pred", "2/1", "collective us",
            "share", "shard us", "read us (1 / 2)")
    lines = ["  ".join(f"{h:>{12 if i > 1 else 7}}" for i, h in enumerate(head))]
    for (b, n), (one, many) in sorted(_pairs(rows, sweep=False).items()):
        cells = (b, _tokens(n), f"{kv_cache_bytes(b, n) / 1e9:.2f}", f"{one['time_ms'] * 1e3:.1f}",
                 f"{one.get('predicted_ms', math.nan) * 1e3:.1f}", f"{many['time_ms'] * 1e3:.1f}",
                 f"{many.get('predicted_ms', math.nan) * 1e3:.1f}", f"{many['time_ms'] / one['time_ms']:.3f}",
                 f"{many['collective_ms'] * 1e3:.1f}", f"{many['collective_share']:.0%}",
                 f"{many['shard_ms'] * 1e3:.1f}", f"{one['stream_ms'] * 1e3:.1f} / {many['stream_ms'] * 1e3:.1f}")
        lines.append("  ".join(f"{c!s:>{12 if i > 1 else 7}}" for i, c in enumerate(cells)))
    for c in crossovers:
        measured = "not bracketed by the sweep" if c["measured_kv_len"] is None else f"{c['measured_kv_len']:,}"
        err = "" if c["error"] is None else f", error {c['error']:.1%}"
        lines.append(f"crossover, batch {c['batch']}: predicted {c['predicted_kv_len']:,} tokens, measured "
                     f"{measured}{err} ({'ok' if c['met'] else 'MISSED'}: target {c['target']:.0%})")
    for r in rows:
        if r.get("larger_than_one_gpu"):
            ch = r["check"]
            lines.append(f"batch {r['batch']} x {r['kv_len']:,} tokens ({kv_cache_bytes(r['batch'], r['kv_len']) / 2**30:.0f}"
                         f" GiB of K and V, one GPU has {r['one_gpu_memory_bytes'] / 2**30:.0f} GiB) on {r['num_gpus']} "
                         f"GPUs: {r['time_ms'] * 1e3:.1f} us (predicted {r['predicted_ms'] * 1e3:.1f}); against the "
                         f"exact answer: out rel error {ch['out_rel_error']:.3g}, lse error {ch['lse_error']:.3g} "
                         f"({'ok' if ch['passed'] else 'MISMATCH'})")
    lc = goals["long_context"]
    worst = max((x["ratio"] for x in lc["rows"]), default=math.nan)
    lines.append(f"targets: 2 GPUs / 1 GPU from {_tokens(LONG_KV_LEN)} tokens <= {LONG_TIME_RATIO_TARGET} "
                 f"(worst {worst:.3f}): {'ok' if lc['met'] else 'MISSED'}; crossover within "
                 f"{CROSSOVER_TARGET:.0%}: {'ok' if goals['crossover']['met'] else 'MISSED'}; larger than one "
                 f"GPU, exact: {'ok' if goals['larger_than_one_gpu']['met'] else 'MISSED'}")
    return "\n".join(lines)


def write_result(path: "str | Path", meta: dict, rows: list[dict], crossovers: list[dict], goals: dict) -> Path:
    """The result file: gpukernels/bench.py's {"meta", "rows"} plus "crossover" and "targets"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows, "crossover": crossovers, "targets": goals},
                               indent=1) + "\n")
    return path


def exact_state_chunked(q, k, v, *, sm_scale: float, chunk_tokens: int = CHECK_CHUNK_TOKENS):
    """The float64 softmax state (out [B, Hq, D], lse [B, Hq]) of q [B, Hq, D] over k, v
    [B, S, Hkv, D] (PyTorch tensors, any device and float dtype), chunk by chunk as
    refattn.split_kv computes it: each chunk's state in float64, merged into the running one by
    LSE. Only one chunk is ever held in float64."""
    import torch  # noqa: PLC0415

    B, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    q64 = q.to(torch.float64).reshape(B, Hkv, G, D)                       # [B, Hkv, G, D]
    out = torch.zeros((B, Hkv, G, D), dtype=torch.float64, device=q.device)
    lse = torch.full((B, Hkv, G), -math.inf, dtype=torch.float64, device=q.device)
    for start in range(0, S, chunk_tokens):
        kc = k[:, start:start + chunk_tokens].to(torch.float64)             # [B, C, Hkv, D]
        vc = v[:, start:start + chunk_tokens].to(torch.float64)
        s = torch.einsum("bhgd,bchd->bhgc", q64, kc) * sm_scale              # [B, Hkv, G, C]
        m = s.amax(dim=-1)                                                  # [B, Hkv, G]
        p = torch.exp(s - m[..., None])
        total = p.sum(dim=-1)
        chunk_out = torch.einsum("bhgc,bchd->bhgd", p, vc) / total[..., None]
        chunk_lse = m + torch.log(total)
        merged = torch.logaddexp(lse, chunk_lse)
        out = out * torch.exp(lse - merged)[..., None] + chunk_out * torch.exp(chunk_lse - merged)[..., None]
        lse = merged
        del kc, vc, s, p
    return out.reshape(B, Hq, D), lse.reshape(B, Hq)


def merge_exact_states(outs, lses):
    """LSE merge of float64 states [N, B, H, D] and [N, B, H] (PyTorch) -> (out, lse)."""
    import torch  # noqa: PLC0415

    lse = torch.logsumexp(lses, dim=0)
    return (outs * torch.exp(lses - lse)[..., None]).sum(dim=0), lse


# ---------------------------------------------------------------------------------------------
# On the GPUs
# ---------------------------------------------------------------------------------------------

class Run:
    """This rank's side of the benchmark: the process group, the flush buffer, the timer."""

    def __init__(self, reps: int):
        import cupy as cp  # noqa: PLC0415
        import torch  # noqa: PLC0415
        import torch.distributed as dist  # noqa: PLC0415

        self.cp, self.torch, self.dist = cp, torch, dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device())
        cp.cuda.Device(self.device.index).use()
        self.reps = reps
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=self.device)
        self.token = torch.zeros(1, dtype=torch.float32, device=self.device)
        self.memory_bytes = torch.cuda.get_device_properties(self.device).total_memory

    def say(self, line: str) -> None:
        if self.rank == 0:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    def barrier(self) -> None:
        """Host and device barrier: every rank's queued work done, all leave together."""
        self.dist.all_reduce(self.token)
        self.torch.cuda.synchronize()

    def _lead(self) -> None:
        from gpukernels.bench import gpu_wait  # noqa: PLC0415

        with self.cp.cuda.ExternalStream(self.torch.cuda.current_stream().cuda_stream):
            gpu_wait(LEAD_MS)

    def _warm_up(self, fn, together: bool) -> None:
        """fn run WARMUP_CALLS times, then more until WARMUP_MS have passed (at most
        WARMUP_MAX_CALLS calls); together, every rank runs the largest count any rank asks for, so
        a step with a collective never waits for a rank that stopped."""
        torch = self.torch
        begin = time.perf_counter()
        for _ in range(WARMUP_CALLS):
            fn()
        torch.cuda.synchronize()
        per_call_ms = (time.perf_counter() - begin) * 1e3 / WARMUP_CALLS
        more = torch.tensor([min(WARMUP_MAX_CALLS, math.ceil(WARMUP_MS / max(per_call_ms, 1e-3)))], device=self.device)
        if together:
            self.dist.all_reduce(more, op=self.dist.ReduceOp.MAX)
        for _ in range(int(more.item())):
            fn()
        torch.cuda.synchronize()

    def time_ms(self, fn, *, together: bool, reps: int | None = None, replays: int = 1) -> float:
        """Median over repetitions of `fn`'s time in ms (CUDA events, L2 flushed, a GPU wait first).
        together: every rank runs fn at once, after a device barrier; the repetition's time is
        its slowest rank's (every rank gets the same number). Else this rank alone. `replays`: fn
        runs that many times back to back inside each repetition, which times their mean."""
        torch = self.torch
        reps = reps or self.reps
        self._warm_up(fn, together)
        times = []
        for _ in range(reps):
            self.flush.fill_(1)
            self._lead()
            if together:
                self.dist.all_reduce(self.token)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / replays)
        mine = torch.tensor(times, dtype=torch.float64, device=self.device)
        if together:
            every = torch.empty(self.world * reps, dtype=torch.float64, device=self.device)
            self.dist.all_gather_into_tensor(every, mine)
            mine = every.view(self.world, reps).amax(dim=0)
        return float(np.median(mine.cpu().numpy()))

    def graph(self, step):
        """`step` captured in a CUDA graph (after two eager runs on the capture stream)."""
        torch = self.torch
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=side, capture_error_mode="thread_local"):
            step()
        torch.cuda.synchronize()
        return g

    def randn(self, shape, seed: int):
        torch = self.torch
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        return torch.empty(shape, dtype=torch.float16, device=self.device).normal_(generator=gen)

    def query(self, batch: int, seed: int):
        """q, the same on every rank (drawn on the host)."""
        q = np.random.default_rng(seed).standard_normal((batch, NUM_QO_HEADS, HEAD_DIM)).astype(np.float16)
        return self.torch.from_numpy(q).to(self.device)

    def free(self) -> None:
        import gc  # noqa: PLC0415

        gc.collect()
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()
        self.cp.get_default_memory_pool().free_all_blocks()


def _stream_fn(run: Run, k, v):
    """A kernel that only reads k and v once (gpukernels/bench.py's), on PyTorch's stream."""
    from gpukernels.bench import stream_read  # noqa: PLC0415

    cp = run.cp
    kc, vc = cp.asarray(k), cp.asarray(v)
    stream = stream_read()

    def read():
        with cp.cuda.ExternalStream(run.torch.cuda.current_stream().cuda_stream):
            stream(kc, vc)

    return read


def _plan(run: Run, batch: int, kv_len: int):
    from gpukernels import plan_split_kv  # noqa: PLC0415
    from gpukernels.split_kv import device_gpu, num_sms  # noqa: PLC0415

    dev = run.device.index
    return plan_split_kv(batch, NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM, kv_len, dtype=DTYPE, num_sms=num_sms(dev),
                         gpu=device_gpu(dev))


def one_gpu_row(run: Run, batch: int, kv_len: int, ceilings: dict, gpu, *, reps: int, sweep: bool) -> "dict | None":
    """split_kv on rank 0 alone, graph-replayed; None on the other ranks."""
    from costmodel import split_kv as model  # noqa: PLC0415
    from gpukernels import SplitKV  # noqa: PLC0415

    row = None
    if run.rank == 0:
        torch = run.torch
        q = run.query(batch, SEED + batch)
        k = run.randn((batch, kv_len, NUM_KV_HEADS, HEAD_DIM), SEED + 1)
        v = run.randn((batch, kv_len, NUM_KV_HEADS, HEAD_DIM), SEED + 2)
        out = torch.empty((batch, NUM_QO_HEADS, HEAD_DIM), dtype=torch.float16, device=run.device)
        lse = torch.empty((batch, NUM_QO_HEADS), dtype=torch.float32, device=run.device)
        plan = _plan(run, batch, kv_len)
        runner = SplitKV(plan)
        g = run.graph(lambda: runner.run(q, k, v, out=out, lse=lse))
        row = row_base(batch, kv_len, 1, "split_kv", ceilings)
        row.update(num_splits=plan.num_splits, chunk_size=plan.chunk_size, plan="auto", graph=True,
                   time_ms=run.time_ms(g.replay, together=False, reps=reps, replays=SWEEP_REPLAYS if sweep else 1),
                   stream_ms=run.time_ms(_stream_fn(run, k, v), together=False, reps=reps),
                   predicted_ms=model.predict(model.plan_split_kv(batch, NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM,
                                                                  kv_len, dtype=DTYPE, gpu=gpu),
                                              gpu=gpu).time_s * 1e3)
        if sweep:
            row.update(sweep="crossover", replays_per_rep=SWEEP_REPLAYS)
        else:
            row["host_us"] = host_us(g.replay)
        finish_row(row)
    return row


class ShardInputs(NamedTuple):
    """One rank's side of a sharded row: the placement's shard lengths (`lens`, this rank's `mine`),
    q (the same on every rank), this rank's K and V shard [batch, capacity, ...], its lengths on
    the device, the outputs and the split-KV plan of the shard's capacity."""
    lens: np.ndarray
    mine: int
    q: object
    k: object
    v: object
    shard_lens: object
    out: object
    lse: object
    plan: object


def shard_inputs(run: Run, batch: int, kv_len: int) -> ShardInputs:
    """The inputs of the sharded step on this rank for `kv_len` tokens placed round-robin in blocks."""
    from gpukernels import ShardPlacement  # noqa: PLC0415

    torch = run.torch
    lens = ShardPlacement(run.world).shard_lens(kv_len)
    capacity = int(lens.max())
    mine = int(lens[run.rank])
    return ShardInputs(
        lens=lens, mine=mine, q=run.query(batch, SEED + batch),
        k=run.randn((batch, capacity, NUM_KV_HEADS, HEAD_DIM), SEED + 10 + 2 * run.rank),
        v=run.randn((batch, capacity, NUM_KV_HEADS, HEAD_DIM), SEED + 11 + 2 * run.rank),
        shard_lens=torch.full((batch,), mine, dtype=torch.int32, device=run.device),
        out=torch.empty((batch, NUM_QO_HEADS, HEAD_DIM), dtype=torch.float16, device=run.device),
        lse=torch.empty((batch, NUM_QO_HEADS), dtype=torch.float32, device=run.device),
        plan=_plan(run, batch, capacity))


def sharded_row(run: Run, batch: int, kv_len: int, ceilings: dict, gpu, *, reps: int, sweep: bool = False,
                check: bool = False) -> "dict | None":
    """The sharded step on every rank, graph-replayed; beside it the all-gather alone and the
    shard's split_kv alone; with `check`, also its result against the exact answer. The row on
    rank 0, None elsewhere."""
    from costmodel import sharded as model  # noqa: PLC0415
    from gpukernels import ShardedDecode, SplitKV, TorchCollective  # noqa: PLC0415

    torch = run.torch
    lens, mine, q, k, v, shard_lens, out, lse, plan = shard_inputs(run, batch, kv_len)
    collective = TorchCollective()
    dec = ShardedDecode(plan, collective)
    step_graph = run.graph(lambda: dec.run(q, k, v, shard_lens, out=out, lse=lse))
    time_ms = run.time_ms(step_graph.replay, together=True, reps=reps, replays=SWEEP_REPLAYS if sweep else 1)
    step_host_us = None if sweep or check else host_us(step_graph.replay)   # every rank the same calls
    send = torch.zeros((batch, NUM_QO_HEADS, HEAD_DIM + 1), dtype=torch.float32, device=run.device)
    gathered = torch.empty((run.world, *send.shape), dtype=torch.float32, device=run.device)
    gather_graph = run.graph(lambda: collective.all_gather(send, out=gathered))
    collective_ms = run.time_ms(gather_graph.replay, together=True, reps=reps)
    runner = SplitKV(plan)
    local_out, local_lse = torch.empty_like(out), torch.empty_like(lse)
    shard_graph = run.graph(lambda: runner.run(q, k, v, shard_lens, out=local_out, lse=local_lse))
    shard_ms = run.time_ms(shard_graph.replay, together=True, reps=reps)
    stream_ms = run.time_ms(_stream_fn(run, k, v), together=True, reps=reps)
    result = _check_exact(run, dec, q, k, v, shard_lens, mine) if check else None
    if run.rank != 0:
        return None
    p = model.predict(model.plan_sharded(batch, NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM, kv_len, num_gpus=run.world,
                                         dtype=DTYPE, gpu=gpu, graph=True), gpu=gpu)
    row = row_base(batch, kv_len, run.world, "sharded", ceilings)
    row.update(num_splits=plan.num_splits, chunk_size=plan.chunk_size, plan="auto", graph=True,
               shard_lens=[int(n) for n in lens], time_ms=time_ms, stream_ms=stream_ms, shard_ms=shard_ms,
               collective_ms=collective_ms, collective_share=collective_ms / time_ms,
               predicted_ms=p.time_s * 1e3, predicted_shard_ms=p.shard_s * 1e3,
               predicted_collective_ms=p.collective_s * 1e3, predicted_merge_ms=p.merge_s * 1e3,
               collective="torch.distributed all_gather_into_tensor (NCCL)")
    if step_host_us is not None:
        row["host_us"] = step_host_us
    if sweep:
        row.update(sweep="crossover", replays_per_rep=SWEEP_REPLAYS)
    if check:
        row.update(larger_than_one_gpu=kv_cache_bytes(batch, kv_len) > run.memory_bytes,
                   one_gpu_memory_bytes=run.memory_bytes, check=result)
    return finish_row(row)


def _check_exact(run: Run, dec, q, k, v, shard_lens, mine: int) -> dict:
    """The sharded step once more, eagerly, against the exact answer: each rank's float64 state of
    its shard (exact_state_chunked), all-gathered and merged by LSE."""
    from decode_attention.tolerances import LSE_ATOL, OUT_RTOL, lse_error, rel_error  # noqa: PLC0415

    torch = run.torch
    out, lse = dec.run(q, k, v, shard_lens)
    torch.cuda.synchronize()
    o64, l64 = exact_state_chunked(q, k[:, :mine], v[:, :mine], sm_scale=dec.sm_scale)
    packed = torch.cat([o64, l64[..., None]], dim=-1).contiguous()              # [B, H, D + 1]
    every = torch.empty((run.world, *packed.shape), dtype=torch.float64, device=run.device)
    run.dist.all_gather_into_tensor(every, packed)
    want_out, want_lse = merge_exact_states(every[..., :-1], every[..., -1])
    got_out, got_lse = out.double().cpu().numpy(), lse.double().cpu().numpy()
    err = rel_error(got_out, want_out.cpu().numpy())
    lerr = lse_error(got_lse, want_lse.cpu().numpy())
    passed = err <= OUT_RTOL[DTYPE] and lerr <= 4 * LSE_ATOL[DTYPE]
    return {"out_rel_error": err, "lse_error": lerr, "out_rtol": OUT_RTOL[DTYPE], "lse_atol": 4 * LSE_ATOL[DTYPE],
            "passed": bool(passed),
            "how": ("exact answer computed on the GPUs: each rank's shard (seeded normals generated on its GPU) "
                    f"attended in float64 chunks of {CHECK_CHUNK_TOKENS} tokens, the chunk states merged by LSE "
                    "(the math of refattn.split_kv), the ranks' float64 states all-gathered and merged by LSE")}


def measured_row(run: Run, make_row, *args, **kwargs) -> "dict | None":
    """make_row(run, *args, **kwargs), then its GPU memory freed on every rank and the ranks in
    step again (its arrays and graphs are gone once it returns)."""
    row = make_row(run, *args, **kwargs)
    run.free()
    run.barrier()
    return row


def _crossover_rows(run: Run, batch: int, ceilings: dict, gpu, reps: int, quick: bool):
    from costmodel import sharded as model  # noqa: PLC0415

    predicted = model.crossover_kv_len(batch, NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM, num_gpus=run.world,
                                       dtype=DTYPE, gpu=gpu, graph=True)
    sweep = crossover_sweep(predicted or FIRST_KV_LEN, num_gpus=run.world,
                            octaves=1 if quick else CROSSOVER_OCTAVES, steps=2 if quick else CROSSOVER_STEPS_PER_OCTAVE)
    rows = []
    for i, n in enumerate(sweep, 1):
        run.say(f"crossover sweep, batch {batch}: {i}/{len(sweep)}, {n:,} tokens")
        rows += [measured_row(run, one_gpu_row, batch, n, ceilings, gpu, reps=reps, sweep=True),
                 measured_row(run, sharded_row, batch, n, ceilings, gpu, reps=reps, sweep=True)]
    if run.rank != 0:
        return [], None
    pairs = _pairs(rows, sweep=True)
    lens = sorted(n for (_, n) in pairs)
    measured = measured_crossover(lens, [pairs[(batch, n)][0]["time_ms"] for n in lens],
                                  [pairs[(batch, n)][1]["time_ms"] for n in lens])
    return rows, crossover_verdict(batch, predicted, measured, sweep)


def _meta_for(run: Run, ceilings: dict, command: str) -> dict:
    from gpukernels.bench import _meta  # noqa: PLC0415

    meta = _meta(ceilings, command)
    meta.update(num_gpus=run.world, torch=run.torch.__version__,
                nccl=".".join(map(str, run.torch.cuda.nccl.version())),
                nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"),
                one_gpu_memory_bytes=run.memory_bytes)
    return meta


def bench(run: Run, args) -> int:
    from costmodel.gpus import get_gpu  # noqa: PLC0415
    from gpukernels.bench import Timer, measure_ceilings  # noqa: PLC0415

    ceilings = {}
    if run.rank == 0:
        run.say("measuring ceilings (copy, read, fp16 matmul) on rank 0")
        ceilings = measure_ceilings(Timer(args.reps))
        run.free()
    box = [ceilings]
    run.dist.broadcast_object_list(box, src=0)
    ceilings = box[0]
    run.barrier()
    command = "torchrun -m gpukernels.bench_sharded " + " ".join(sys.argv[1:])
    meta = _meta_for(run, ceilings, command.strip()) if run.rank == 0 else {}
    box = [meta.get("gpu", "")]
    run.dist.broadcast_object_list(box, src=0)
    gpu = get_gpu(box[0]).with_measured(copy_bytes_per_s=ceilings["copy_bytes_per_s"],
                                       matmul_flops_per_s=ceilings["matmul_flops_per_s"])
    rows, crossovers = [], []
    path = Path(args.out) / f"{gpu_slug(meta.get('gpu', ''))}x{run.world}" / "distributed.json"

    def write_so_far(stage: str) -> None:
        # A run stopped by its time limit still leaves the rows measured so far (meta "partial").
        if run.rank == 0 and not args.quick:
            done = [r for r in rows if r is not None]
            write_result(path, {**meta, "partial": stage}, done, crossovers, targets(done, crossovers))

    for batch in BATCHES:
        grid = context_grid(batch, run.memory_bytes, quick=args.quick)
        for i, n in enumerate(grid, 1):
            run.say(f"batch {batch}: {i}/{len(grid)}, {n:,} tokens ({kv_cache_bytes(batch, n) / 2**30:.2f} GiB)")
            rows += [measured_row(run, one_gpu_row, batch, n, ceilings, gpu, reps=args.reps, sweep=False),
                     measured_row(run, sharded_row, batch, n, ceilings, gpu, reps=args.reps)]
        sweep_rows, verdict = _crossover_rows(run, batch, ceilings, gpu, SWEEP_REPS_FACTOR * args.reps, args.quick)
        rows += sweep_rows
        if verdict is not None:
            crossovers.append(verdict)
        write_so_far(f"measured up to batch {batch}, without the larger-than-one-GPU row")
    large = LARGE_KV_LEN if not args.quick else 1 << 22
    run.say(f"batch {LARGE_BATCH} x {large:,} tokens on {run.world} GPUs, checked against the exact answer")
    rows.append(measured_row(run, sharded_row, LARGE_BATCH, large, ceilings, gpu, reps=args.reps, check=True))
    if run.rank != 0:
        return 0
    rows = [r for r in rows if r is not None]
    goals = targets(rows, crossovers)
    if not args.quick:
        write_result(path, meta, rows, crossovers, goals)
        run.say(f"wrote {path}")
    print(format_table(rows, crossovers, goals), flush=True)
    large_rows = [r for r in rows if r.get("check")]
    return 0 if all(r["check"]["passed"] for r in large_rows) else 1


def _teardown(run: "Run | None") -> None:
    import torch.distributed as dist  # noqa: PLC0415

    thread = threading.Thread(target=dist.destroy_process_group, daemon=True)
    thread.start()
    thread.join(TEARDOWN_TIMEOUT_S)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpukernels.bench_sharded", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30,
                        help="timed repetitions per measurement, the median is kept; the crossover sweep "
                             f"takes {SWEEP_REPS_FACTOR}x as many (default: %(default)s)")
    parser.add_argument("--out", default="results",
                        help="results folder; the file goes to <out>/<gpu>x<N>/distributed.json (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="three grid rows a batch, a short sweep, a 4M-token checked row; nothing written "
                             "(default: off)")
    args = parser.parse_args(argv)
    os.environ["NCCL_NVLS_ENABLE"] = "0"            # NVLink multicast stays off on these machines
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=600),
                            device_id=torch.device("cuda", local_rank))
    run, status = None, 2
    try:
        run = Run(args.reps)
        status = bench(run, args)
    except Exception:  # noqa: BLE001 - reported, then the exit status says so
        import traceback  # noqa: PLC0415

        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    _teardown(run)
    return status


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # never wait on NCCL's or CUDA's exit handlers
