"""Why the sharded step on the largest grid rows takes more than its shard plus the all-gather.

An exploration, not a benchmark: lines of text, no result file. For the rows whose K and V fill
most of one GPU (batch 1 x 16M and batch 8 x 2M tokens: 34 GB a rank on two GPUs) and one half
that size, it builds the step as gpukernels.bench_sharded does and times, in this order, the
step, the shard's split_kv alone, the step again and the shard again (each the median of REPS
repetitions, every rank at once after a barrier, the L2 flushed), printing each rank's median,
the slowest rank's and the slowest rank's time of each repetition. With PRELUDE=1 (the default),
as in the benchmark, rank 0 first runs the whole cache alone.
Run: NCCL_NVLS_ENABLE=0 PYTHONPATH=. torchrun --standalone --nproc-per-node 2 scripts/explore/sharded_large_rows.py
"""
import datetime
import os

import numpy as np
import torch
import torch.distributed as dist

from gpukernels import ShardedDecode, SplitKV, TorchCollective
from gpukernels.bench_sharded import HEAD_DIM, NUM_KV_HEADS, SEED, Run, _plan, shard_inputs

ROWS = [(1, 16 << 20), (8, 2 << 20), (1, 8 << 20)]
REPS = 10
PRELUDE = os.environ.get("PRELUDE", "1") == "1"   # run the one-GPU row on rank 0 before each row


def per_rank_ms(run: Run, fn) -> tuple[list[float], float, list[float]]:
    """Each rank's median time of fn (ms), the median of each repetition's slowest rank and the
    slowest rank's time of each repetition in order."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPS):
        run.flush.fill_(1)
        run.dist.all_reduce(run.token)
        run._lead()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    mine = torch.tensor(times, dtype=torch.float64, device=run.device)
    every = torch.empty(run.world * REPS, dtype=torch.float64, device=run.device)
    dist.all_gather_into_tensor(every, mine)
    every = every.view(run.world, REPS).cpu().numpy()
    return [float(np.median(r)) for r in every], float(np.median(every.max(axis=0))), list(every.max(axis=0))


def one_gpu_prelude(run: Run, batch: int, kv_len: int) -> None:
    """What the benchmark runs before a sharded row: the whole cache on rank 0 alone, split_kv
    replayed (timed and printed), then freed."""
    if run.rank == 0:
        k = run.randn((batch, kv_len, NUM_KV_HEADS, HEAD_DIM), SEED + 1)
        v = run.randn((batch, kv_len, NUM_KV_HEADS, HEAD_DIM), SEED + 2)
        q = run.query(batch, SEED + batch)
        runner = SplitKV(_plan(run, batch, kv_len))
        g = run.graph(lambda: runner.run(q, k, v))
        times = []
        for _ in range(REPS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        run.say(f"  one GPU first: {float(np.median(times)) * 1e3:.1f} us")
        del k, v, q, g, runner
    run.free()
    run.barrier()


def main() -> None:
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=300),
                            device_id=torch.device("cuda", local_rank))
    run = Run(REPS)
    for batch, kv_len in ROWS:
        if PRELUDE:
            one_gpu_prelude(run, batch, kv_len)
        _, _, q, k, v, shard_lens, out, lse, plan = shard_inputs(run, batch, kv_len)
        dec = ShardedDecode(plan, TorchCollective())
        step = run.graph(lambda: dec.run(q, k, v, shard_lens, out=out, lse=lse))  # noqa: B023
        runner = SplitKV(plan)
        lo, ll = torch.empty_like(out), torch.empty_like(lse)
        shard = run.graph(lambda: runner.run(q, k, v, shard_lens, out=lo, lse=ll))  # noqa: B023
        lines = []
        for name, g in (("step", step), ("shard", shard), ("step again", step), ("shard again", shard)):
            ranks, slowest, each = per_rank_ms(run, g.replay)
            lines.append(f"{name} {slowest * 1e3:.1f} (ranks {', '.join(f'{t * 1e3:.1f}' for t in ranks)}; "
                         f"in order {', '.join(f'{t * 1e3:.0f}' for t in each)})")
        run.say(f"batch {batch} x {kv_len:,} tokens, {plan.num_splits} splits: " + "; ".join(lines) + " us")
        del q, k, v, step, shard, dec, runner
        run.free()
        run.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
