"""The sharded decode step on several GPUs, one process a GPU, started by torchrun:

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 2 tests/sharded_gpu_worker.py

Every rank builds the same whole cache (seeded), keeps its shard as ShardPlacement cuts it, runs
the real kernels and the NCCL all-gather (torch.distributed; CuPy's communicator too when it
loads), and compares the merged result with refattn.decode over the whole cache: ragged lengths,
sequences with no token on a rank, ranks with no token at all, a paged shard, the planned step
captured in a CUDA graph and replayed with new contents, and ranks that disagree (every rank must
raise); and spans in global token positions over the shards (sharded_span) against refattn.span,
sink logits included. Prints one line per check; exits 1 on any mismatch, 2 on an error. Teardown has a timeout
(destroy_process_group has hung at exit on such machines): the process exits regardless.
Run by tests/test_sharded_gpu.py and scripts/sharded-check.sh.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import traceback

os.environ["NCCL_NVLS_ENABLE"] = "0"               # NVLink multicast stays off on these machines
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import refattn  # noqa: E402
from decode_attention.tolerances import LSE_ATOL, OUT_RTOL, lse_error, rel_error  # noqa: E402
from gpukernels import (CupyNcclCollective, ShardedDecode, ShardPlacement, TorchCollective,  # noqa: E402
                        plan_split_kv, sharded_paged_decode, sharded_split_kv)
from gpukernels.sharded import sharded_span  # noqa: E402
from gpukernels.split_kv import device_gpu, num_sms  # noqa: E402

TEARDOWN_TIMEOUT_S = 30.0
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)   # covers the first kernel compilations
JUNK = 5.0   # fills shard slots past their lengths: any read of them would show in the output


class Run:
    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.failures: list[str] = []

    def say(self, line: str) -> None:
        print(f"[rank {self.rank}] {line}", flush=True)

    def check(self, name: str, out, lse, want, dtype: str) -> None:
        """out, lse on the GPU (torch or CuPy) against the float64 reference, and the same bits
        on every rank."""
        o, l = _host64(out), _host64(lse)
        err, lerr = rel_error(o, want[0]), lse_error(l, want[1])
        ok = err <= OUT_RTOL[dtype] and lerr <= 4 * LSE_ATOL[dtype]
        same = self.same_on_every_rank(o) and self.same_on_every_rank(l)
        verdict = "ok" if ok and same else "MISMATCH"
        self.say(f"{name}: {verdict} (out rel error {err:.3g}, lse error {lerr:.3g}, "
                 f"{'same' if same else 'DIFFERENT'} on every rank)")
        if not (ok and same):
            self.failures.append(name)

    def expect(self, name: str, ok: bool, detail: str) -> None:
        self.say(f"{name}: {'ok' if ok else 'MISMATCH'} ({detail})")
        if not ok:
            self.failures.append(name)

    def same_on_every_rank(self, x: np.ndarray) -> bool:
        mine = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(self.device).view(-1)
        every = torch.empty(self.world * mine.numel(), dtype=mine.dtype, device=self.device)
        dist.all_gather_into_tensor(every, mine)
        every = every.view(self.world, -1).cpu().numpy()
        return all(np.array_equal(row, every[0], equal_nan=True) for row in every)

    def to_device(self, x: np.ndarray, dtype: str) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(x))
        return host.to(device=self.device, dtype=getattr(torch, dtype))


def _host64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy().astype(np.float64)
    import cupy as cp  # noqa: PLC0415

    return cp.asnumpy(x).astype(np.float64)


class Problem:
    """A whole cache in `dtype` (the same on every rank), its float64 values and reference."""

    def __init__(self, run: Run, seed: int, dtype: str, batch: int, hq: int, hkv: int, head_dim: int,
                 kv_lens, block_tokens: int = 32, kv_len: int | None = None):
        rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.kv_lens = np.asarray(kv_lens, dtype=np.int64)
        kv_len = int(self.kv_lens.max(initial=0)) if kv_len is None else kv_len
        # Values rounded to dtype on the GPU, then read back: the reference sees exactly them.
        self.q = run.to_device(rng.standard_normal((batch, hq, head_dim)).astype(np.float32), dtype)
        k = run.to_device(rng.standard_normal((batch, kv_len, hkv, head_dim)).astype(np.float32), dtype)
        v = run.to_device(rng.standard_normal((batch, kv_len, hkv, head_dim)).astype(np.float32), dtype)
        self.q64, self.k64, self.v64 = _host64(self.q), _host64(k), _host64(v)
        self.want = refattn.decode(self.q64, self.k64, self.v64, self.kv_lens)
        self.placement = ShardPlacement(run.world, block_tokens)

    def shard(self, run: Run, capacity=None):
        """This rank's shard: host float64 k, v [batch, capacity, hkv, head_dim] and lengths."""
        k_shards, lens = self.placement.split(self.k64, self.kv_lens, capacity=capacity, fill=JUNK)
        v_shards, _ = self.placement.split(self.v64, self.kv_lens, capacity=capacity, fill=JUNK)
        return k_shards[run.rank], v_shards[run.rank], lens[run.rank]


def check_one_shot(run: Run, collective) -> None:
    cases = [
        # name, dtype, batch, hq, hkv, head_dim, kv_lens, block, lengths on the GPU
        ("float16 GQA 28/4, ragged, an empty sequence", "float16", 3, 28, 4, 128, [1000, 37, 0], 32,
         False),
        ("bfloat16 GQA 32/8, lengths on the GPU", "bfloat16", 2, 32, 8, 128, [4097, 339], 16, True),
        ("float32 MQA, every token on rank 0", "float32", 2, 8, 1, 64, [20, 5], 32, True),
    ]
    for seed, (name, dtype, batch, hq, hkv, head_dim, kv_lens, block, on_gpu) in enumerate(cases):
        p = Problem(run, seed, dtype, batch, hq, hkv, head_dim, kv_lens, block)
        k, v, lens = p.shard(run)
        lens_arg = torch.as_tensor(lens, dtype=torch.int32, device=run.device) if on_gpu else lens
        out, lse = sharded_split_kv(p.q, run.to_device(k, dtype), run.to_device(v, dtype), lens_arg,
                                    collective=collective)
        run.check(f"one-shot {name} (shard {k.shape[1]} slots, lens {lens.tolist()})", out, lse,
                  p.want, dtype)


def check_paged(run: Run, collective) -> None:
    dtype = "float16"
    p = Problem(run, 10, dtype, 3, 32, 8, 128, [777, 64, 1])
    k, v, lens = p.shard(run)
    k_cache, v_cache, indptr, indices, last = refattn.paged_from_contiguous(
        k, v, lens, page_size=16, shuffle=run.rank, extra_pages=2)
    tables = [torch.as_tensor(t, dtype=torch.int32, device=run.device) for t in (indptr, indices, last)]
    out, lse = sharded_paged_decode(p.q, run.to_device(k_cache, dtype), run.to_device(v_cache, dtype),
                                    *tables, collective=collective)
    run.check(f"paged, pages of 16 (lens {lens.tolist()})", out, lse, p.want, dtype)


def check_graph(run: Run, collective) -> None:
    """The planned step (kernels + all-gather + merge) captured in a CUDA graph, replayed with new
    contents and lengths."""
    dtype, batch, hq, hkv, head_dim, max_len = "bfloat16", 4, 32, 8, 128, 2048
    placement = ShardPlacement(run.world, 32)
    capacity = int(placement.shard_lens(max_len).max())
    problems = [
        Problem(run, 20, dtype, batch, hq, hkv, head_dim, [2048, 100, 0, 1500], kv_len=max_len),
        Problem(run, 21, dtype, batch, hq, hkv, head_dim, [1, 2048, 700, 0], kv_len=max_len),
    ]
    dev = run.device.index
    plan = plan_split_kv(batch, hq, hkv, head_dim, capacity, dtype=dtype, num_sms=num_sms(dev),
                         gpu=device_gpu(dev))
    dec = ShardedDecode(plan, collective)
    q_s = torch.empty((batch, hq, head_dim), dtype=getattr(torch, dtype), device=run.device)
    k_s = torch.empty((batch, capacity, hkv, head_dim), dtype=q_s.dtype, device=run.device)
    v_s = torch.empty_like(k_s)
    lens_s = torch.empty(batch, dtype=torch.int32, device=run.device)
    out_s = torch.empty((batch, hq, head_dim), dtype=q_s.dtype, device=run.device)
    lse_s = torch.empty((batch, hq), dtype=torch.float32, device=run.device)

    def load(p: Problem) -> None:
        k, v, lens = p.shard(run, capacity=capacity)
        q_s.copy_(p.q)
        k_s.copy_(run.to_device(k, dtype))
        v_s.copy_(run.to_device(v, dtype))
        lens_s.copy_(torch.as_tensor(lens, dtype=torch.int32))
        out_s.fill_(float("nan"))
        lse_s.fill_(float("nan"))

    side = torch.cuda.Stream(device=run.device)
    load(problems[0])
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):          # warm-up on the capture stream: buffers, modules, NCCL
        for _ in range(2):
            dec.run(q_s, k_s, v_s, lens_s, out=out_s, lse=lse_s)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    run.check("planned, eager on the capture stream", out_s, lse_s, problems[0].want, dtype)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
        dec.run(q_s, k_s, v_s, lens_s, out=out_s, lse=lse_s)
    torch.cuda.synchronize()
    for i in (1, 0, 1):
        load(problems[i])
        graph.replay()
        torch.cuda.synchronize()
        run.check(f"CUDA graph replay, lens {problems[i].kv_lens.tolist()}", out_s, lse_s,
                  problems[i].want, dtype)


def check_disagreement(run: Run, collective) -> None:
    """Ranks that disagree, or one rank with bad input: every rank raises, nobody hangs."""
    p = Problem(run, 30, "float16", 2, 8, 2, 128, [100, 50])
    k, v, lens = p.shard(run)
    kd, vd = run.to_device(k, "float16"), run.to_device(v, "float16")
    q_other = p.q[:1] if run.rank == 0 else p.q                 # rank 0: batch 1, the others 2
    try:
        sharded_split_kv(q_other, kd[: q_other.shape[0]], vd[: q_other.shape[0]],
                         lens[: q_other.shape[0]], collective=collective)
        run.expect("ranks that disagree on batch", False, "no error raised")
    except ValueError as exc:
        run.expect("ranks that disagree on batch", "disagree" in str(exc), str(exc)[:120])
    bad = run.world - 1
    try:
        k_bad = kd.float() if run.rank == bad else kd          # a dtype unlike q's on one rank
        sharded_split_kv(p.q, k_bad, vd, lens, collective=collective)
        run.expect("one rank with bad input", False, "no error raised")
    except (TypeError, ValueError) as exc:
        want = TypeError if run.rank == bad else ValueError
        run.expect("one rank with bad input", type(exc) is want,
                   f"{type(exc).__name__}: {str(exc)[:100]}")
    # and the group still works
    out, lse = sharded_split_kv(p.q, kd, vd, lens, collective=collective)
    run.check("a step after the refused ones", out, lse, p.want, "float16")


def check_span(run: Run, collective) -> None:
    """sharded_span: spans in global token positions, each rank attending to its slots of them,
    against refattn.span over the whole cache; tokens outside the spans are NaN in the shards."""
    cases = [
        # name, dtype, batch, hq, hkv, head_dim, kv_lens, block, span_indptr, spans, sinks
        ("float16 GQA 32/8, sinks + window, a sequence without spans", "float16", 3, 32, 8, 128,
         [3000, 517, 64], 32, [0, 2, 5, 5], [[0, 4], [2000, 3000], [1, 2], [40, 300], [333, 517]], False),
        ("bfloat16 GQA 28/4, learned sink logits, blocks of 64", "bfloat16", 2, 28, 4, 128,
         [4097, 100], 64, [0, 3, 4], [[0, 64], [1000, 1001], [3000, 4097], [0, 100]], True),
        ("float16 MQA, one span inside rank 0's first block", "float16", 2, 8, 1, 64,
         [1000, 20], 32, [0, 1, 2], [[3, 29], [0, 20]], False),
        ("float32, every token on rank 0 (rank 1 holds no slot)", "float32", 1, 8, 2, 128,
         [20], 32, [0, 2], [[0, 5], [9, 20]], True),
    ]
    for seed, (name, dtype, batch, hq, hkv, head_dim, kv_lens, block, indptr, spans, with_sinks) in enumerate(cases):
        p = Problem(run, 50 + seed, dtype, batch, hq, hkv, head_dim, kv_lens, block)
        spans = np.asarray(spans, dtype=np.int64)
        indptr = np.asarray(indptr, dtype=np.int64)
        attended = np.zeros(p.k64.shape[:2], dtype=bool)
        for b in range(batch):
            for start, end in spans[indptr[b]:indptr[b + 1]]:
                attended[b, start:end] = True
        sinks = np.random.default_rng(seed).standard_normal(hq) if with_sinks else None
        want = refattn.span(p.q64, p.k64, p.v64, indptr, spans, sinks=sinks)
        poisoned = [np.where(attended[:, :, None, None], x, np.nan) for x in (p.k64, p.v64)]
        k_shards, _ = p.placement.split(poisoned[0], p.kv_lens, fill=JUNK)
        v_shards, _ = p.placement.split(poisoned[1], p.kv_lens, fill=JUNK)
        k, v = k_shards[run.rank], v_shards[run.rank]
        local = p.placement.local_spans(run.rank, indptr, spans)[1]
        sinks_arg = None if sinks is None else torch.as_tensor(sinks, dtype=torch.float32, device=run.device)
        out, lse = sharded_span(p.q, run.to_device(k, dtype), run.to_device(v, dtype), indptr, spans,
                                placement=p.placement, kv_len=p.k64.shape[1], collective=collective,
                                sinks=sinks_arg)
        run.check(f"span: {name} (shard {k.shape[1]} slots, {len(local)} local spans)", out, lse, want, dtype)
    # ranks with different span lists: every rank raises, nobody hangs
    p = Problem(run, 60, "float16", 1, 8, 2, 128, [256])
    k, v, _ = p.shard(run)
    spans = [[0, 100]] if run.rank == 0 else [[0, 101]]
    try:
        sharded_span(p.q, run.to_device(k, "float16"), run.to_device(v, "float16"), [0, 1], spans,
                     placement=p.placement, kv_len=256, collective=collective)
        run.expect("span: ranks with different spans", False, "no error raised")
    except ValueError as exc:
        run.expect("span: ranks with different spans", "spans and placement" in str(exc), str(exc)[:120])


def cupy_communicator(run: Run):
    """CuPy's NCCL communicator over the same ranks, or None (with the reason) when it is missing."""
    try:
        import cupy as cp  # noqa: PLC0415
        from cupy.cuda import nccl  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001
        run.say(f"CuPy NCCL: skipped ({type(exc).__name__}: {exc})")
        return None
    if not getattr(nccl, "available", True):
        run.say("CuPy NCCL: skipped (cupy.cuda.nccl is not available)")
        return None
    uid = [nccl.get_unique_id() if run.rank == 0 else None]
    dist.broadcast_object_list(uid, src=0)
    cp.cuda.Device(run.device.index).use()
    uid = uid[0]
    if not isinstance(uid, (bytes, bytearray)):   # older CuPy: a tuple of signed chars
        try:
            return nccl.NcclCommunicator(run.world, tuple(uid), run.rank)
        except TypeError:                          # CuPy 14 takes the id as bytes
            uid = bytes(c & 0xFF for c in uid)
    return nccl.NcclCommunicator(run.world, bytes(uid), run.rank)


def check_cupy(run: Run, comm) -> None:
    import cupy as cp  # noqa: PLC0415

    dtype = "float16"
    p = Problem(run, 40, dtype, 3, 32, 8, 128, [513, 1, 0], block_tokens=32)
    k, v, lens = p.shard(run)
    with cp.cuda.Device(run.device.index):
        q = cp.asarray(p.q64.astype(np.float16))
        kd, vd = cp.asarray(k.astype(np.float16)), cp.asarray(v.astype(np.float16))
        out, lse = sharded_split_kv(q, kd, vd, cp.asarray(lens.astype(np.int32)),
                                    collective=CupyNcclCollective(comm))
        cp.cuda.get_current_stream().synchronize()
    run.check("CuPy arrays, CuPy's NCCL communicator", out, lse, p.want, dtype)


def teardown(run: "Run | None", comm) -> None:
    """Destroy the communicators, giving up after TEARDOWN_TIMEOUT_S."""
    def body():
        if comm is not None:
            comm.destroy()
        dist.destroy_process_group()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(TEARDOWN_TIMEOUT_S)
    if thread.is_alive():
        print(f"[rank {run.rank if run else '?'}] teardown did not return within "
              f"{TEARDOWN_TIMEOUT_S} s; exiting anyway", flush=True)


def main() -> int:
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
    run, comm, status = None, None, 2
    try:
        run = Run(dist.get_rank(), dist.get_world_size(), device)
        run.say(f"{torch.cuda.get_device_name(device)}, world {run.world}, torch {torch.__version__}")
        collective = TorchCollective()
        check_one_shot(run, collective)
        check_paged(run, collective)
        check_disagreement(run, collective)
        check_graph(run, collective)
        check_span(run, collective)
        comm = cupy_communicator(run)
        if comm is not None:
            check_cupy(run, comm)
        status = 1 if run.failures else 0
        if run.failures:
            run.say(f"FAILED: {', '.join(run.failures)}")
        else:
            run.say("sharded worker: all checks passed")
    except Exception:  # noqa: BLE001 - reported, then the exit status says so
        traceback.print_exc()
        sys.stderr.flush()
    teardown(run, comm)
    return status


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # never wait on NCCL's or CUDA's exit handlers
