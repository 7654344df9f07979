"""costmodel.sharded: decode over a KV cache sharded along its tokens over several GPUs (CPU only).

The model's numbers are predictions; what the GPUs measure (BENCHMARKS targets such as "2 GPUs at
1M tokens take at most 0.55x the time of one") is checked against result files, not here.
"""

import dataclasses
import doctest
import importlib
import json
import re
from importlib import resources

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import costmodel
from costmodel import merge_states, sharded, split_kv
from costmodel.calibration import load_calibration
from costmodel.end_to_end import GRAPH_KERNEL_S
from costmodel.sharded import (MAX_NUM_GPUS, STEP_KERNELS, crossover_kv_len, plan_sharded, predict, shard_lens,
                               sharding_table, speedup)

SHAPE = (1, 32, 8, 128)          # batch, query heads, KV heads, head_dim (Llama-3-8B-like)


def _placed(kv_len: int, num_gpus: int, block: int) -> list[int]:
    """Tokens per rank, placing token t on rank (t // block) % num_gpus, one by one."""
    counts = [0] * num_gpus
    for t in range(kv_len):
        counts[(t // block) % num_gpus] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------

@given(st.integers(0, 5000), st.integers(1, MAX_NUM_GPUS), st.integers(1, 300))
@example(0, 8, 32)
@example(40, 4, 32)      # fewer blocks than ranks: empty shards
@example(339, 3, 32)
def test_shards_are_a_round_robin_placement(kv_len, num_gpus, block):
    lens = shard_lens(kv_len, num_gpus, block)
    assert len(lens) == num_gpus and sum(lens) == kv_len
    assert max(lens) - min(lens) <= block
    assert list(lens) == _placed(kv_len, num_gpus, block)


def test_empty_shards_are_allowed():
    plan = plan_sharded(*SHAPE, 40, num_gpus=4, placement_block=32)
    assert plan.shard_lens == (32, 8, 0, 0)
    assert [p.max_kv_len for p in plan.rank_plans] == [32, 8, 0, 0]
    p = predict(plan)
    assert len(p.shards) == 4 and all(s.time_s > 0 for s in p.shards)
    assert p.slowest_rank == 0 and p.shard_s == p.shards[0].time_s
    assert predict(plan_sharded(*SHAPE, 0, num_gpus=8)).plan.shard_lens == (0,) * 8


def test_the_plan_holds_every_rank_and_the_collective():
    plan = plan_sharded(8, 32, 8, 128, 100003, num_gpus=4, gpu="H200")
    assert plan.payload_bytes == 8 * 32 * (128 + 1) * 4
    assert plan.collective == sharded.AllGather("nvlink4", 4, plan.payload_bytes, True)
    assert plan.collective.gathered_bytes == 4 * plan.payload_bytes
    for n, rp in zip(plan.shard_lens, plan.rank_plans):
        assert rp == split_kv.plan_split_kv(8, 32, 8, 128, n, gpu="H200")
    assert plan.gpu == "h200" and plan.rank_plans[0].num_sms == 132
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.num_gpus = 2
    assert not plan_sharded(*SHAPE, 1000, num_gpus=2, graph=False).collective.graph


# ---------------------------------------------------------------------------------------------
# prediction
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_gpus, kv_len, graph", [(2, 1 << 20, True), (3, 100001, False), (8, 4097, True)])
def test_the_terms_add_up(num_gpus, kv_len, graph):
    plan = plan_sharded(8, 32, 8, 128, kv_len, num_gpus=num_gpus, graph=graph)
    p = predict(plan)
    t = p.terms
    parts = ("shard_s", "pack_s", "collective_s", "unpack_s", "merge_s")
    assert t["time_s"] == pytest.approx(sum(t[k] for k in parts), rel=1e-12)
    assert {k for k, _ in STEP_KERNELS} == set(parts)
    assert t["collective_s"] == pytest.approx(
        t["collective.call_s"] + t["collective.latency_s"] + t["collective.transfer_s"]
        + t["collective.eager_call_s"], rel=1e-12)
    assert (t["collective.eager_call_s"] > 0) == (not graph)
    assert p.shard_s == max(s.time_s for s in p.shards)
    assert p.exchange_s == pytest.approx(p.time_s - p.shard_s, rel=1e-12)
    for n, s in zip(plan.shard_lens, p.shards):
        own = split_kv.predict(split_kv.plan_split_kv(8, 32, 8, 128, n, gpu="H200"), gpu="H200")
        assert s.time_s == own.time_s
    # the kernels behind the shard's start as kernels inside a CUDA graph do, or as lone launches
    cal = load_calibration("h200")
    behind = dataclasses.replace(cal, launch_s=GRAPH_KERNEL_S if graph else cal.launch_s)
    assert p.kernel_launch_s == behind.launch_s
    merge = merge_states.predict(merge_states.MergeStatesShape(num_gpus, 8, 32, 128, "float16"), gpu="H200",
                                 calibration=behind)
    assert p.merge_s == merge.time_s == p.merge.time_s
    assert p.pack.launches == p.unpack.launches == 2 and p.merge.launches == 1
    for part in (p.pack, p.unpack, p.merge):
        assert part.terms["launch_s"] == part.launches * behind.launch_s
    assert p.time_us == pytest.approx(p.time_s * 1e6) and p.launches == len(STEP_KERNELS) == 7


def test_the_step_launches_what_the_code_launches():
    """STEP_KERNELS against gpukernels.sharded's step: run it with every launch counted (the
    attention, each copy, the collective, the merge kernel) and compare, in order."""
    gs = pytest.importorskip("gpukernels.sharded")
    B, H, D, world = 2, 4, 8, 3
    problem = gs._Problem(B, H, 2, D, "float16", "float32", 0.3)
    launched = []

    class Counting(gs._Arrays):
        def copy(self, dst, src):
            launched.append("copy")
            dst[...] = src

    class Gather:
        def all_gather(self, packed, out=None):
            launched.append("all_gather")
            out[...] = packed
            return out

    def attend():
        launched.append("split_kv")
        return np.zeros((B, H, D), np.float16), np.zeros((B, H), np.float32)

    arrays = Counting("numpy", -1)
    bufs = gs._Buffers(arrays, world, problem, local=True)
    out, lse = np.empty((B, H, D), np.float16), np.empty((B, H), np.float32)
    original = gs._merge_into
    gs._merge_into = lambda *args: launched.append("merge_states")
    try:
        gs._step(arrays, Gather(), problem, bufs, attend, None, out, lse)   # merge None: the GPU merge kernel
    finally:
        gs._merge_into = original
    # the model's kernels in order; split_kv is one launch (the last block of a split merges)
    kinds = {"shard_s": "split_kv", "pack_s": "copy", "collective_s": "all_gather", "unpack_s": "copy",
             "merge_s": "merge_states"}
    assert launched == [kinds[term] for term, _ in STEP_KERNELS]
    p = predict(plan_sharded(B, H, 2, D, 4096, num_gpus=world))
    assert p.shards[0].launches == 1
    assert 1 + p.pack.launches + 1 + p.unpack.launches + p.merge.launches == len(launched) == p.launches
    # the copies move what the buffers hold: out into the float32 send buffer, the gathered states
    # out of it into q's dtype
    pack, unpack = sharded.step_copy_launches(p.plan)
    assert [sum(x.bytes_by_tensor.values()) for x in pack] == [
        bufs.local_out.nbytes + bufs.send_out.size * 4, bufs.local_lse.nbytes + bufs.send_lse.size * 4]
    assert [sum(x.bytes_by_tensor.values()) for x in unpack] == [
        bufs.gathered_out.size * 4 + bufs.outs.nbytes, bufs.gathered_lse.size * 4 + bufs.lses.nbytes]
    assert bufs.outs.dtype == np.float16 and p.merge.bytes_by_tensor["states_out"] == bufs.outs.nbytes
    assert sharded.step_copy_launches(plan_sharded(B, H, 2, D, 4096, num_gpus=1)) == ((), ())


def test_one_gpu_is_the_split_kv_prediction():
    for kv_len in (1, 4096, 1 << 20):
        plan = plan_sharded(*SHAPE, kv_len, num_gpus=1, gpu="H200")
        assert plan.collective is None and plan.payload_bytes == 0 and plan.shard_lens == (kv_len,)
        p = predict(plan)
        one = split_kv.predict(split_kv.plan_split_kv(*SHAPE, kv_len, gpu="H200"), gpu="H200")
        assert p.time_s == one.time_s and p.shards == (one,)
        assert p.merge is None and p.collective_s == p.merge_s == 0.0 and p.launches == 1
    # one GPU needs no collective model: a GPU without one plans a single-GPU call
    assert predict(plan_sharded(*SHAPE, 4096, num_gpus=1, gpu="A100")).time_s > 0


def test_speedup_approaches_the_gpu_count_at_long_context_and_loses_at_short():
    for batch in (1, 8):
        for n in (2, 4, 8):
            long = speedup(batch, 32, 8, 128, 1 << 26, num_gpus=n)
            assert 0.97 * n < long < 1.02 * n, (batch, n, long)
            assert speedup(batch, 32, 8, 128, 1024, num_gpus=n) < 1
    assert speedup(*SHAPE, 1 << 20, num_gpus=1) == 1.0


@pytest.mark.parametrize("batch, num_gpus", [(1, 2), (1, 8), (8, 2), (8, 4), (3, 5)])
def test_the_crossover_is_where_the_predictions_cross(batch, num_gpus):
    shape = (batch, 32, 8, 128)
    c = crossover_kv_len(*shape, num_gpus=num_gpus, gpu="H200")
    assert c is not None and c > 1

    def times(kv_len):
        one = split_kv.predict(split_kv.plan_split_kv(*shape, kv_len, gpu="H200"), gpu="H200").time_s
        many = predict(plan_sharded(*shape, kv_len, num_gpus=num_gpus, gpu="H200")).time_s
        return one, many

    one, many = times(c - 1)
    assert one < many                     # one GPU faster just below
    one, many = times(c)
    assert many <= one                    # the sharded call no slower from there
    assert speedup(*shape, c, num_gpus=num_gpus) >= 1 > speedup(*shape, c - 1, num_gpus=num_gpus)


def test_crossover_grows_with_the_collective():
    eager = crossover_kv_len(*SHAPE, num_gpus=2, graph=False)
    graph = crossover_kv_len(*SHAPE, num_gpus=2, graph=True)
    assert eager > graph                  # 21.7 us more per call and 5 lone launches to win back
    assert crossover_kv_len(*SHAPE, num_gpus=2, max_kv_len=1024) is None


# ---------------------------------------------------------------------------------------------
# the collective's data
# ---------------------------------------------------------------------------------------------

def _collectives_data() -> dict:
    return json.loads(resources.files("costmodel").joinpath("data/collectives.json").read_text())


def test_the_collective_model_reproduces_its_measurements():
    data = _collectives_data()
    for key, entry in data["interconnects"].items():
        net = sharded.get_interconnect(key)
        assert entry["measurements"] and "extrapolated" in net.source
        assert set(entry["timings"]) == {m["timing"] for m in entry["measurements"]}
        for m in entry["measurements"]:
            graph = m["graph"] is not False
            t = net.all_gather_terms(m["bytes_per_rank"], m["ranks"], graph=graph)
            if m["timing"] == "single replay":
                # one call as the step makes it: the call latency serves every size, so each size's
                # median is met within 15% where the rows it is the median of agree (quartiles less
                # than 1.5x apart), else within their scatter
                lo, hi = m["quartiles_s"]
                if hi < 1.5 * lo:
                    assert t["time_s"] == pytest.approx(m["time_s"], rel=0.15), m
                else:
                    assert lo < t["time_s"] < hi, m
            else:
                # the earlier series did not see a lone call's start and wait
                assert t["time_s"] - t["call_s"] == pytest.approx(m["time_s"], rel=0.01), m
        assert entry["eager_call_overhead_s"] > 0 and entry["call_latency_s"] > 0
        for seg in entry["segments"]:
            assert {"step_latency_s", "link_bytes_per_s"} <= set(seg)


def test_the_call_latency_is_the_benchmark_s_all_gather_alone():
    """call_latency_s: the median over the 2-GPU rows of the committed benchmark run it names
    (call_latency_source) of the all-gather measured alone (collective_ms), less one
    small-message step, never the sharded step's time."""
    entry = _collectives_data()["interconnects"]["nvlink4"]
    accuracy = importlib.import_module("costmodel.accuracy")
    root = accuracy.find_results_dir()
    source = entry["call_latency_source"]
    assert source.startswith("results/")
    path = None if root is None else root / source.removeprefix("results/")
    if path is None or not path.exists():
        pytest.skip(f"no committed {source}")
    result = json.loads(path.read_text())
    assert result["meta"]["date"] in entry["timings"]["single replay"]
    net = sharded.get_interconnect("nvlink4")
    rows = [r for r in result["rows"] if r["num_gpus"] == 2]
    extra = []
    for r in rows:
        payload = plan_sharded(r["batch"], r["num_qo_heads"], r["num_kv_heads"], r["head_dim"], r["kv_len"],
                               num_gpus=2).payload_bytes
        t = net.all_gather_terms(payload, 2)
        extra.append(r["collective_ms"] * 1e-3 - (t["latency_s"] + t["transfer_s"]))
    assert len(extra) == 68
    assert net.call_latency_s == pytest.approx(float(np.median(extra)), rel=1e-3)
    for m in (m for m in entry["measurements"] if m["timing"] == "single replay"):
        times = [r["collective_ms"] * 1e-3 for r in rows
                 if r["batch"] * r["num_qo_heads"] * (r["head_dim"] + 1) * 4 == m["bytes_per_rank"]]
        assert len(times) == m["rows"] and float(np.median(times)) == pytest.approx(m["time_s"], rel=1e-3)


def test_the_collective_term_is_the_data_file_s(monkeypatch):
    """The prediction's collective term is computed from the data file's constants alone."""
    entry = _collectives_data()["interconnects"]["nvlink4"]
    plan = plan_sharded(1, 32, 8, 128, 1 << 16, num_gpus=2, gpu="H200")
    p = predict(plan)
    small = entry["segments"][0]
    want = entry["call_latency_s"] + small["step_latency_s"] + plan.payload_bytes / small["link_bytes_per_s"]
    assert p.terms["collective.call_s"] == entry["call_latency_s"]
    assert p.collective_s == pytest.approx(want, rel=1e-12)
    # another call latency in the file moves the prediction by exactly the difference
    changed = json.loads(json.dumps(_collectives_data()))
    changed["interconnects"]["nvlink4"]["call_latency_s"] = entry["call_latency_s"] + 1e-5
    monkeypatch.setattr(sharded, "_collectives_data", lambda: changed)
    sharded.get_interconnect.cache_clear()
    try:
        q = predict(plan)
    finally:
        monkeypatch.undo()
        sharded.get_interconnect.cache_clear()
    assert q.collective_s - p.collective_s == pytest.approx(1e-5, rel=1e-9)
    assert q.time_s - p.time_s == pytest.approx(1e-5, rel=1e-9)


def test_more_ranks_follow_the_ring():
    net = sharded.get_interconnect("nvlink4")
    b = 16512
    two = net.all_gather_terms(b, 2)
    for n in range(3, MAX_NUM_GPUS + 1):
        t = net.all_gather_terms(b, n)
        assert t["call_s"] == two["call_s"] == net.call_latency_s        # once a call
        assert t["latency_s"] == pytest.approx((n - 1) * two["latency_s"])
        assert t["transfer_s"] == pytest.approx((n - 1) * two["transfer_s"])
    assert net.all_gather_s(b, 1) == 0.0
    assert net.all_gather_s(b, 2, graph=False) - net.all_gather_s(b, 2) == pytest.approx(net.eager_call_overhead_s)
    assert net.caveats("h200", 2) == []
    assert any("extrapolated" in c for c in net.caveats("h200", 4))
    assert any("not measured" in c for c in net.caveats("h100_sxm", 2))


def test_interconnects_by_gpu():
    assert sharded.interconnect_for("H200").key == "nvlink4"
    assert sharded.interconnect_for("NVIDIA H100 80GB HBM3").key == "nvlink4"
    with pytest.raises(ValueError, match="no collective model for NVIDIA A100"):
        sharded.interconnect_for("A100")
    assert sharded.interconnect_names() == ["nvlink4"]


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, error, name", [
    ({"num_gpus": 0}, ValueError, "num_gpus"),
    ({"num_gpus": 9}, ValueError, "num_gpus"),
    ({"num_gpus": 2.0}, TypeError, "num_gpus"),
    ({"num_gpus": True}, TypeError, "num_gpus"),
    ({"kv_len": -1}, ValueError, "kv_len"),
    ({"kv_len": 1.5}, TypeError, "kv_len"),
    ({"batch": 0}, ValueError, "batch"),
    ({"num_qo_heads": 30}, ValueError, "num_qo_heads"),
    ({"head_dim": "128"}, TypeError, "head_dim"),
    ({"dtype": "int8"}, ValueError, "dtype"),
    ({"dtype": np.float16}, TypeError, "dtype"),
    ({"placement_block": 0}, ValueError, "placement_block"),
    ({"placement_block": "32"}, TypeError, "placement_block"),
    ({"graph": "yes"}, TypeError, "graph"),
    ({"graph": 1}, TypeError, "graph"),
    ({"gpu": "B300"}, ValueError, "B300"),
    ({"gpu": 7}, TypeError, "gpu"),
    ({"gpu": "A100"}, ValueError, "no collective model"),
    ({"interconnect": "pcie5"}, ValueError, "interconnect"),
    ({"interconnect": 4}, TypeError, "interconnect"),
])
def test_bad_arguments_raise_naming_the_argument(change, error, name):
    args = {"batch": 1, "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "kv_len": 4096, "num_gpus": 2}
    args.update(change)
    with pytest.raises(error, match=name):
        plan_sharded(args.pop("batch"), args.pop("num_qo_heads"), args.pop("num_kv_heads"),
                     args.pop("head_dim"), args.pop("kv_len"), **args)


def test_bad_arguments_of_the_queries():
    with pytest.raises(TypeError, match="plan"):
        predict(split_kv.plan_split_kv(*SHAPE, 4096))
    with pytest.raises(ValueError, match="num_gpus must be >= 2"):
        crossover_kv_len(*SHAPE, num_gpus=1)
    with pytest.raises(ValueError, match="num_gpus"):
        crossover_kv_len(*SHAPE, num_gpus=9)
    with pytest.raises(TypeError, match="max_kv_len"):
        crossover_kv_len(*SHAPE, num_gpus=2, max_kv_len=1e6)
    with pytest.raises(ValueError, match="num_gpus must be >= 2"):
        sharding_table(*SHAPE, num_gpus=1)
    with pytest.raises(TypeError, match="kv_lens"):
        sharding_table(*SHAPE, num_gpus=2, kv_lens=4096)
    with pytest.raises(ValueError, match=r"kv_lens\[1\]"):
        sharding_table(*SHAPE, num_gpus=2, kv_lens=(4096, 0))
    with pytest.raises(TypeError, match="kv_len"):
        speedup(*SHAPE, "4096", num_gpus=2)
    with pytest.raises(ValueError, match="132 SMs"):
        predict(plan_sharded(*SHAPE, 4096, num_gpus=2, gpu="H200"), gpu="A100")


# ---------------------------------------------------------------------------------------------
# display
# ---------------------------------------------------------------------------------------------

DATACLASS_DUMP = re.compile(r"\b(ShardedPlan|ShardedPrediction|SplitKVPlan|Prediction|AllGather|GPUSpec)\(")


def test_a_prediction_prints_as_a_short_table_with_units():
    p = predict(plan_sharded(*SHAPE, 1 << 20, num_gpus=2, gpu="H200"))
    text = str(p)
    assert repr(p) == text and not DATACLASS_DUMP.search(text) and len(text.splitlines()) < 12
    first = text.splitlines()[0]
    assert first.startswith("sharded: split_kv on 2 GPUs") and f"{p.time_us:.2f} us" in first
    for term in ("shard_s", "pack_s", "collective_s", "unpack_s", "merge_s", "time_s"):
        assert re.search(rf"^{term} +{re.escape(costmodel.display.format_seconds(p.terms[term]))} ", text, re.M)
    assert "7 kernels a GPU" in text and "in the graph" in text
    assert "kB per rank" in text and "GB/s" in text and "e-0" not in text
    assert "extrapolated" not in text                       # 2 ranks on H200: measured
    eight = str(predict(plan_sharded(*SHAPE, 1 << 20, num_gpus=8, gpu="H100", graph=False)))
    assert "extrapolated from 2 ranks" in eight and "not measured on this GPU" in eight and "eager" in eight
    page = p._repr_html_()
    assert page.count("<table>") == 1 and "<td>collective_s</td>" in page


def test_the_sharding_table():
    t = sharding_table(*SHAPE, num_gpus=2, gpu="H200")
    assert t.kv_lens == (32768, 131072, 1 << 20, 1 << 22)
    assert t.crossover_kv_len == crossover_kv_len(*SHAPE, num_gpus=2, gpu="H200")
    for L, s in zip(t.kv_lens, t.speedups):
        assert s == pytest.approx(speedup(*SHAPE, L, num_gpus=2, gpu="H200"))
    text = str(t)
    lines = text.splitlines()
    for label in ("32k", "128k", "1M", "4M"):
        assert any(line.startswith(label + " ") for line in lines)
    assert "1 GPU" in lines[1] and "2 GPUs" in lines[1] and f"{t.crossover_kv_len:,} tokens" in text
    assert not DATACLASS_DUMP.search(text) and t._repr_html_().count("<tr>") == 1 + 4
    assert "exceeds one GPU's" not in text                  # 17 GB at 4M tokens fits one H200
    big = sharding_table(16, 32, 8, 128, num_gpus=4, kv_lens=(1 << 20, 1 << 22), gpu="H200")
    assert big.kv_cache_bytes(1 << 22) == 2 * 16 * (1 << 22) * 8 * 128 * 2 > big.gpu.hbm_capacity_bytes
    assert "from 4M tokens the KV cache exceeds one GPU's 151.40 GB" in str(big)


def test_top_level_names_and_docstring():
    assert costmodel.plan_sharded is plan_sharded and costmodel.crossover_kv_len is crossover_kv_len
    assert {"ShardedPlan", "ShardedPrediction", "ShardingTable", "plan_sharded", "crossover_kv_len",
            "sharding_table"} <= set(costmodel.__all__)
    module = importlib.import_module("costmodel.sharded")
    assert doctest.testmod(module, raise_on_error=True).attempted > 0


# ---------------------------------------------------------------------------------------------
# the crossover for every GPU count
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch, graph", [(1, True), (8, True), (8, False)])
def test_the_crossover_table_holds_the_crossover_of_every_gpu_count(batch, graph):
    t = sharded.crossover_table(batch, 32, 8, 128, gpu="H200", graph=graph)
    assert t.num_gpus == tuple(range(2, MAX_NUM_GPUS + 1))
    for n, c, s in zip(t.num_gpus, t.crossover_kv_lens, t.speedups_at):
        assert c == crossover_kv_len(batch, 32, 8, 128, num_gpus=n, gpu="H200", graph=graph)
        assert s == pytest.approx(speedup(batch, 32, 8, 128, 1 << 20, num_gpus=n, gpu="H200", graph=graph))
        assert 1 < s <= n
    text = str(t)
    assert repr(t) == text and not DATACLASS_DUMP.search(text)
    for n, c in zip(t.num_gpus, t.crossover_kv_lens):
        assert re.search(rf"^ +{n} +{c:,} tokens +[0-9.]+x$", text, re.M), text
    assert "extrapolated from 2 ranks by the ring formula for 3, 4, 5, 6, 7, 8 GPUs" in text
    assert t._repr_html_().count("<tr>") == 1 + 7


def test_the_crossover_table_of_a_measured_gpu_count_has_no_caveat():
    t = sharded.crossover_table(*SHAPE, num_gpus=[2], gpu="H200")
    assert t.caveats == () and t.crossover_kv_lens == (crossover_kv_len(*SHAPE, num_gpus=2, gpu="H200"),)
    h100 = sharded.crossover_table(*SHAPE, num_gpus=[2, 4], gpu="H100")
    assert any("not measured on this GPU" in c for c in h100.caveats)
    assert "no crossover" not in str(h100)
    with pytest.raises(ValueError, match="at least 2"):
        sharded.crossover_table(*SHAPE, num_gpus=[1, 2])
    with pytest.raises(ValueError, match="num_gpus"):
        sharded.crossover_table(*SHAPE, num_gpus=[2, 9])
    with pytest.raises(ValueError, match="at least 2"):
        sharded.crossover_table(*SHAPE, num_gpus=[])


def test_explain_prints_the_crossover_of_every_gpu_count(capsys):
    cli = importlib.import_module("decode_attention.cli")
    assert cli.main(["explain", "--gpus", "4", "--gpu", "H200", "--no-reference", "--no-gpu"]) == 0
    text = capsys.readouterr().out
    assert "predicted crossover by GPU count" in text
    for n in range(2, MAX_NUM_GPUS + 1):
        c = crossover_kv_len(16, 32, 8, 128, num_gpus=n, gpu="H200")
        assert re.search(rf"^ +{n} +{c:,} tokens", text, re.M), (n, c)


# ---------------------------------------------------------------------------------------------
# the benchmark's arithmetic (gpukernels/bench_sharded.py; its GPU part runs on two GPUs)
# ---------------------------------------------------------------------------------------------

bench_sharded = pytest.importorskip("gpukernels.bench_sharded")
H200_MEMORY_BYTES = 150_011_707_392      # what PyTorch reports for one H200


def test_the_grid_runs_from_32k_to_the_largest_context_one_gpu_holds():
    for batch, last in ((1, 16 << 20), (8, 2 << 20)):
        grid = bench_sharded.context_grid(batch, H200_MEMORY_BYTES)
        assert grid[0] == 32768 and grid[-1] == last
        assert all(b == 2 * a for a, b in zip(grid, grid[1:]))
        limit = bench_sharded.ONE_GPU_MEMORY_FRACTION * H200_MEMORY_BYTES
        assert bench_sharded.kv_cache_bytes(batch, grid[-1]) <= limit < bench_sharded.kv_cache_bytes(batch, 2 * last)
    assert bench_sharded.kv_cache_bytes(1, 1) == 4096       # 8 KV heads x 128 x fp16, K and V
    large = bench_sharded.kv_cache_bytes(bench_sharded.LARGE_BATCH, bench_sharded.LARGE_KV_LEN)
    assert large > H200_MEMORY_BYTES and large / 2 < 0.6 * H200_MEMORY_BYTES    # fits on two


def test_the_crossover_sweep_brackets_the_prediction_with_equal_shards():
    sweep = bench_sharded.crossover_sweep(33793)
    assert sweep == sorted(set(sweep)) and all(n % 64 == 0 for n in sweep)
    assert len(sweep) == 2 * bench_sharded.CROSSOVER_OCTAVES * bench_sharded.CROSSOVER_STEPS_PER_OCTAVE + 1
    assert sweep[0] < 33793 / 7 and sweep[-1] > 33793 * 7
    ratios = np.diff(np.log2(sweep))
    assert np.allclose(ratios, 1 / bench_sharded.CROSSOVER_STEPS_PER_OCTAVE, atol=0.02)
    assert bench_sharded.crossover_sweep(10, num_gpus=4)[0] == 128


def _linear_times(kv_lens, *, one_fixed_us=12.0, many_fixed_us=30.0, us_per_token=1e-3, noise=None):
    """One GPU: fixed + a per-token cost; two GPUs: a larger fixed cost + half the per-token cost."""
    lens = np.asarray(kv_lens, dtype=np.float64)
    one = (one_fixed_us + us_per_token * lens) * 1e-3
    many = (many_fixed_us + us_per_token * lens / 2) * 1e-3
    if noise is not None:
        many = many + noise
    return one, many


def test_the_measured_crossover_is_where_linear_times_cross():
    sweep = bench_sharded.crossover_sweep(30000)
    one, many = _linear_times(sweep)
    exact = 2 * (30.0 - 12.0) / 1e-3                   # 36,000 tokens
    got = bench_sharded.measured_crossover(sweep, one, many)
    assert got == pytest.approx(exact, rel=1e-9)      # linear differences interpolate exactly
    # a point below the crossing where two GPUs happen to win does not count: they must stay ahead
    noise = np.zeros(len(sweep))
    noise[2] = -1.0
    assert bench_sharded.measured_crossover(sweep, one, many + noise) == pytest.approx(exact, rel=1e-9)
    # a point above it where one GPU wins moves the crossing past that point
    late = int(np.searchsorted(sweep, 2 * exact))
    noise[late] = 1.0
    assert bench_sharded.measured_crossover(sweep, one, many + noise) > sweep[late]


def test_a_crossover_outside_the_sweep_is_none():
    sweep = bench_sharded.crossover_sweep(30000)
    one, many = _linear_times(sweep, many_fixed_us=1e6)          # two GPUs never win
    assert bench_sharded.measured_crossover(sweep, one, many) is None
    one, many = _linear_times(sweep, many_fixed_us=0.0)          # two GPUs win everywhere
    assert bench_sharded.measured_crossover(sweep, one, many) is None
    with pytest.raises(ValueError, match="increase"):
        bench_sharded.measured_crossover([2, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="increase"):
        bench_sharded.measured_crossover([1, 2], [1, 1], [1])


def test_the_crossover_verdict():
    v = bench_sharded.crossover_verdict(1, 33793, 36000.4, [1, 2])
    assert v["measured_kv_len"] == 36000 and v["error"] == pytest.approx(abs(33793 - 36000.4) / 36000.4)
    assert v["met"]
    assert not bench_sharded.crossover_verdict(1, 20000, 36000.0, [1])["met"]
    none = bench_sharded.crossover_verdict(8, 4937, None, [1])
    assert none["error"] is None and not none["met"]


CEILINGS = {"copy_bytes_per_s": 4.24e12, "read_bytes_per_s": 4.5e12, "matmul_flops_per_s": 7.7e14}


def _fake_rows(ratio_at_1m=0.52, passed=True):
    """Rows as the GPU run makes them, with made-up times."""
    rows = []
    for n in (32768, 1 << 20):
        one = bench_sharded.row_base(1, n, 1, "split_kv", CEILINGS)
        one.update(time_ms=n * 1e-6, stream_ms=n * 0.9e-6, predicted_ms=n * 1.1e-6, host_us=9.0)
        many = bench_sharded.row_base(1, n, 2, "sharded", CEILINGS)
        ratio = ratio_at_1m if n >= 1 << 20 else 0.8
        many.update(time_ms=ratio * n * 1e-6, stream_ms=n * 0.45e-6, predicted_ms=ratio * n * 1e-6,
                    shard_ms=0.5 * n * 1e-6, collective_ms=0.009, host_us=11.0)
        many["collective_share"] = many["collective_ms"] / many["time_ms"]
        rows += [bench_sharded.finish_row(one), bench_sharded.finish_row(many)]
    large = bench_sharded.row_base(1, bench_sharded.LARGE_KV_LEN, 2, "sharded", CEILINGS)
    large.update(time_ms=21.0, stream_ms=20.0, predicted_ms=20.5, shard_ms=20.9, collective_ms=0.009,
                 collective_share=0.0004, larger_than_one_gpu=True, one_gpu_memory_bytes=H200_MEMORY_BYTES,
                 check={"out_rel_error": 4e-4, "lse_error": 1e-6, "passed": passed})
    rows.append(bench_sharded.finish_row(large))
    return rows


def test_rows_carry_the_result_file_keys_and_the_floor_of_n_gpus():
    rows = _fake_rows()
    keys = {"suite", "impl", "dtype", "batch", "num_qo_heads", "num_kv_heads", "head_dim", "kv_len", "num_gpus",
            "unique_bytes", "flops", "time_ms", "stream_ms", "floor_ms", "frac", "predicted_ms"}
    for r in rows:
        assert keys <= set(r), keys - set(r)
        assert r["frac"] == pytest.approx(r["floor_ms"] / r["time_ms"])
    one, two = rows[2], rows[3]                        # 1M tokens on one GPU and on two
    assert two["unique_bytes"] == one["unique_bytes"] == 4096 * (1 << 20) + 2 * 32 * 128 * 2
    assert two["floor_ms"] == pytest.approx(one["floor_ms"] / 2, rel=1e-6)


def test_targets_and_the_printed_table():
    crossovers = [bench_sharded.crossover_verdict(1, 33793, 36000.0, [1])]
    goals = bench_sharded.targets(_fake_rows(), crossovers)
    assert goals["long_context"]["met"] and goals["crossover"]["met"] and goals["larger_than_one_gpu"]["met"]
    assert [x["kv_len"] for x in goals["long_context"]["rows"]] == [1 << 20]
    assert not bench_sharded.targets(_fake_rows(ratio_at_1m=0.56), crossovers)["long_context"]["met"]
    assert not bench_sharded.targets(_fake_rows(passed=False), crossovers)["larger_than_one_gpu"]["met"]
    assert not bench_sharded.targets(_fake_rows(), [])["crossover"]["met"]
    text = bench_sharded.format_table(_fake_rows(), crossovers, goals)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["batch", "context"] and any(line.split()[:2] == ["1", "1M"] for line in lines)
    assert "crossover, batch 1: predicted 33,793 tokens, measured 36,000" in text
    assert "41,943,040 tokens (160 GiB of K and V" in text and "(ok)" in text
    assert "MISSED" not in text


def test_the_result_file_reads_as_one(tmp_path):
    accuracy = importlib.import_module("costmodel.accuracy")
    rows = _fake_rows()
    crossovers = [bench_sharded.crossover_verdict(1, 33793, 36000.0, [1])]
    meta = {"gpu": "NVIDIA H200", "commit": "abc", "source_digest": "0" * 16, "date": "2026-11-30", **CEILINGS}
    path = bench_sharded.write_result(tmp_path / "h200x2" / "distributed.json", meta, rows, crossovers,
                                      bench_sharded.targets(rows, crossovers))
    result = accuracy.read_result_file(path)
    assert result.gpu_slug == "h200x2" and result.suite == "distributed" and result.rows == rows
    data = json.loads(path.read_text())
    assert data["crossover"] == crossovers and data["targets"]["crossover"]["met"]


def test_the_exact_answer_chunk_by_chunk_equals_the_reference():
    torch = pytest.importorskip("torch")
    refattn = importlib.import_module("refattn")
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 6, 16))
    k, v = rng.standard_normal((2, 2, 45, 3, 16))
    want = refattn.decode(q, k, v, sm_scale=0.3)
    for chunk in (1, 7, 45, 64):
        out, lse = bench_sharded.exact_state_chunked(*(torch.from_numpy(x) for x in (q, k, v)), sm_scale=0.3,
                                                     chunk_tokens=chunk)
        assert out.dtype == torch.float64
        assert np.abs(out.numpy() - want[0]).max() < 1e-12 and np.abs(lse.numpy() - want[1]).max() < 1e-12
    # float16 inputs are attended exactly as their float64 values
    q16, k16, v16 = (torch.from_numpy(x.astype(np.float16)) for x in (q, k, v))
    want16 = refattn.decode(*(x.numpy().astype(np.float64) for x in (q16, k16, v16)), sm_scale=0.3)
    got16 = bench_sharded.exact_state_chunked(q16, k16, v16, sm_scale=0.3, chunk_tokens=10)
    assert np.abs(got16[0].numpy() - want16[0]).max() < 1e-12
    # two halves' states merged are the whole
    halves = [bench_sharded.exact_state_chunked(*(torch.from_numpy(x) for x in (q, k[:, s], v[:, s])),
                                                sm_scale=0.3, chunk_tokens=8)
              for s in (slice(0, 20), slice(20, 45))]
    out, lse = bench_sharded.merge_exact_states(torch.stack([h[0] for h in halves]),
                                                torch.stack([h[1] for h in halves]))
    assert np.abs(out.numpy() - want[0]).max() < 1e-12 and np.abs(lse.numpy() - want[1]).max() < 1e-12
