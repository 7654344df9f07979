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
from costmodel.sharded import (MAX_NUM_GPUS, crossover_kv_len, plan_sharded, predict, shard_lens,
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
    assert t["time_s"] == pytest.approx(t["shard_s"] + t["collective_s"] + t["merge_s"], rel=1e-12)
    assert t["collective_s"] == pytest.approx(
        t["collective.latency_s"] + t["collective.transfer_s"] + t["collective.eager_call_s"], rel=1e-12)
    assert (t["collective.eager_call_s"] > 0) == (not graph)
    assert p.shard_s == max(s.time_s for s in p.shards)
    for n, s in zip(plan.shard_lens, p.shards):
        own = split_kv.predict(split_kv.plan_split_kv(8, 32, 8, 128, n, gpu="H200"), gpu="H200")
        assert s.time_s == own.time_s
    merge = merge_states.predict(merge_states.MergeStatesShape(num_gpus, 8, 32, 128), gpu="H200")
    assert p.merge_s == merge.time_s == p.merge.time_s
    assert p.time_us == pytest.approx(p.time_s * 1e6) and p.launches == 3


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
    assert eager > graph                  # 21.7 us more per call to win back
    assert crossover_kv_len(*SHAPE, num_gpus=2, max_kv_len=1024) is None


# ---------------------------------------------------------------------------------------------
# the collective's data
# ---------------------------------------------------------------------------------------------

def test_the_collective_model_reproduces_its_measurements():
    data = json.loads(resources.files("costmodel").joinpath("data/collectives.json").read_text())
    for key, entry in data["interconnects"].items():
        net = sharded.get_interconnect(key)
        assert entry["measurements"] and "extrapolated" in net.source
        for m in entry["measurements"]:
            graph = m["graph"] is not False
            predicted = net.all_gather_s(m["bytes_per_rank"], m["ranks"], graph=graph)
            assert predicted == pytest.approx(m["time_s"], rel=0.01), m
        assert entry["eager_call_overhead_s"] > 0
        for seg in entry["segments"]:
            assert {"step_latency_s", "link_bytes_per_s"} <= set(seg)


def test_more_ranks_follow_the_ring():
    net = sharded.get_interconnect("nvlink4")
    b = 16512
    two = net.all_gather_terms(b, 2)
    for n in range(3, MAX_NUM_GPUS + 1):
        t = net.all_gather_terms(b, n)
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
    for term in ("shard_s", "collective_s", "merge_s", "time_s"):
        assert re.search(rf"^{term} +{re.escape(costmodel.display.format_seconds(p.terms[term]))} ", text, re.M)
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
