"""The cost model: GPU data, the time equation, every variant's bytes and time, the split choice."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from costmodel import decode, merge_states, paged_decode, shared_prefix, span, split_kv, tree
from costmodel.calibration import DEFAULT_CALIBRATION, Calibration, load_calibration
from costmodel.gpus import GPUSpec, get_gpu, gpu_for_num_sms, gpu_names
from costmodel.prediction import Launch, calibration_for, makespan_s, predict_launches, stream_rate
from costmodel.split_kv import TILE_TOKENS, plan_split_kv

H100 = get_gpu("H100")


# ---------------------------------------------------------------------------------------------
# GPUs and calibration data
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, key", [
    ("H100", "h100_sxm"), ("NVIDIA H100 80GB HBM3", "h100_sxm"), ("h100_sxm", "h100_sxm"),
    ("H200", "h200"), ("NVIDIA H200", "h200"), ("A100", "a100_80gb"),
    ("NVIDIA A100-SXM4-80GB", "a100_80gb"),
    # the names CUDA reports (cudaDeviceProp.name) for each part, and separators read loosely
    ("NVIDIA A100-SXM4-40GB", "a100_40gb"), ("NVIDIA H100 PCIe", "h100_pcie"), ("H100 PCIe", "h100_pcie"),
    ("h100", "h100_sxm"), ("h100-sxm", "h100_sxm"), ("  nvidia   a100_sxm4-80GB ", "a100_80gb"),
    ("A100 40GB", "a100_40gb"), ("a100_40gb", "a100_40gb"), ("NVIDIA H100 SXM 80GB", "h100_sxm"),
])
def test_get_gpu_accepts_short_and_device_names(name, key):
    assert get_gpu(name).key == key


def test_get_gpu_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown GPU 'TPU v5'"):
        get_gpu("TPU v5")
    with pytest.raises(TypeError):
        get_gpu(132)


@pytest.mark.parametrize("name", [
    "", "   ", "-", "None", "null", "nvidia", "H", "H10", "100", "GH100",
    "NVIDIA H100 80GB HBM3 MIG 1g.10gb",     # a slice of an H100: 16 SMs, not 132
    "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-40GB",
    "H100 SXM 94GB", "A100X",
])
def test_get_gpu_never_guesses(name):
    """A name not in the table is an error, never the nearest GPU (the old matching read
    "H100 PCIe" as the SXM part, "A100-SXM4-40GB" as the 80 GB one and '' as the H100)."""
    with pytest.raises(ValueError, match="known: h100_sxm") as err:
        get_gpu(name)
    assert "NVIDIA H100 80GB HBM3" in str(err.value) and "a100_40gb" in str(err.value)


@pytest.mark.parametrize("junk", [None, b"H100", ["H100"], 1.0, True])
def test_get_gpu_rejects_what_is_not_a_name(junk):
    with pytest.raises(TypeError, match="gpu must be a GPU name"):
        get_gpu(junk)


def test_every_alias_names_one_gpu():
    from costmodel.gpus import gpu_aliases, normalize_gpu_name

    seen = {}
    for key, names in gpu_aliases().items():
        for name in names:
            assert seen.setdefault(normalize_gpu_name(name), key) == key, name
            assert get_gpu(name).key == key


def test_datasheet_figures_of_the_parts_the_table_separates():
    pcie, sxm = get_gpu("NVIDIA H100 PCIe"), get_gpu("NVIDIA H100 80GB HBM3")
    assert (pcie.num_sms, pcie.hbm_bytes_per_s) == (114, 2.0e12)
    assert (sxm.num_sms, sxm.hbm_bytes_per_s) == (132, 3.35e12)
    a40, a80 = get_gpu("NVIDIA A100-SXM4-40GB"), get_gpu("NVIDIA A100-SXM4-80GB")
    assert (a40.num_sms, a40.hbm_bytes_per_s, a40.hbm_capacity_bytes) == (108, 1.555e12, 40 * 2**30)
    assert (a80.num_sms, a80.hbm_bytes_per_s, a80.hbm_capacity_bytes) == (108, 2.039e12, 80 * 2**30)
    # ceilings not yet measured on these parts are the datasheet's, scaled (gpus.json)
    assert pcie.copy_bytes_per_s == pytest.approx(0.9 * 2.0e12)


def test_every_gpu_has_consistent_ceilings():
    for key in gpu_names():
        g = get_gpu(key)
        assert g.num_sms > 0 and g.l2_bytes > 0
        assert 0 < g.copy_bytes_per_s <= g.hbm_bytes_per_s
        assert 0 < g.matmul_flops_per_s <= g.datasheet_matmul_flops_per_s
        assert g.vector_flops_per_s < g.matmul_flops_per_s


def test_measured_ceilings_override_the_datasheet():
    g = H100.with_measured(copy_bytes_per_s=2.9e12, read_bytes_per_s=3.2e12, matmul_flops_per_s=7e14)
    assert (g.copy_bytes_per_s, g.stream_bytes_per_s, g.matmul_flops_per_s) == (2.9e12, 3.2e12, 7e14)
    assert H100.stream_bytes_per_s == H100.copy_bytes_per_s == 3.0e12   # the copy measured as docs/benchmarks.md says
    # a read-only measurement below the copy rate (a slow reduction) does not lower the ceiling
    assert H100.with_measured(read_bytes_per_s=1.6e12).stream_bytes_per_s == 3.0e12
    assert H100.with_measured() is H100
    with pytest.raises(ValueError):
        H100.with_measured(copy_bytes_per_s=0)


def test_gpu_for_num_sms():
    assert gpu_for_num_sms(108).key == "a100_80gb"
    assert gpu_for_num_sms(77).num_sms == 77


def test_calibration_data_loads_and_says_where_it_comes_from():
    cal = load_calibration("h100_sxm")
    assert isinstance(cal, Calibration) and cal.source
    assert load_calibration("no_such_gpu") == load_calibration(None)
    with pytest.raises(ValueError, match="unknown calibration constants"):
        Calibration.from_json({"launch_s": 1e-6, "warp_speed": 9})


# ---------------------------------------------------------------------------------------------
# The time equation
# ---------------------------------------------------------------------------------------------

def test_makespan_waves_and_bandwidth_sharing():
    # 10 blocks of 1 MB on 4 slots; each waits 1 ms, then streams at min(1 GB/s, 2 GB/s / active):
    # two full waves of 1 + 2 ms, then 2 blocks at 1 GB/s: 1 + 1 ms.
    t = makespan_s([(1e6, 1e-3, 10)], slots=4, block_bytes_per_s=1e9, total_bytes_per_s=2e9)
    assert t == pytest.approx(8e-3)
    # blocks that exit at once cost nothing
    assert makespan_s([(0, 0, 100)], slots=4, block_bytes_per_s=1e9, total_bytes_per_s=2e9) == 0.0
    # a rounded knee: never faster than the hard minimum, close to it far from the knee
    soft = makespan_s([(1e6, 1e-3, 10)], slots=4, block_bytes_per_s=1e9, total_bytes_per_s=2e9,
                      contention_exponent=2.5)
    assert soft > t
    assert stream_rate(1, block_bytes_per_s=1e9, total_bytes_per_s=1e12, contention_exponent=2.5) == \
        pytest.approx(1e9, rel=1e-3)
    assert stream_rate(1000, block_bytes_per_s=1e9, total_bytes_per_s=1e10, contention_exponent=2.5) == \
        pytest.approx(1e7, rel=1e-3)


def test_makespan_is_work_conserving_when_saturated():
    rng = np.random.default_rng(0)
    work = rng.integers(1, 10, size=300) * 1e5
    runs = [(w, 0, 1) for w in work]
    t = makespan_s(runs, slots=1000, block_bytes_per_s=1e12, total_bytes_per_s=1e9)
    assert t == pytest.approx(work.sum() / 1e9)


def test_prediction_terms_add_up():
    launch = Launch("x", {"a": 10**9}, ((10**9 // 1000, 1, 1000),), vector_flops=10**9)
    p = predict_launches("x", [launch], gpu=H100, calibration=DEFAULT_CALIBRATION)
    t = p.terms
    assert p.time_s == pytest.approx(t["launch_s"] + max(t["memory_s"], t["compute_s"], t["schedule_s"]))
    assert t["hbm_s"] == pytest.approx(1e9 / (DEFAULT_CALIBRATION.bw_fraction * H100.stream_bytes_per_s))
    assert p.bound == "memory" and p.launches == 1 and p.num_blocks == 1000
    two = predict_launches("y", [launch, launch], gpu=H100, calibration=DEFAULT_CALIBRATION)
    assert two.time_s == pytest.approx(2 * p.time_s) and two.launches == 2
    assert two.bytes_by_tensor["a"] == 2 * 10**9 and "x.time_s" in two.terms


# ---------------------------------------------------------------------------------------------
# split_kv, decode, paged_decode
# ---------------------------------------------------------------------------------------------

shapes = st.tuples(
    st.integers(1, 64),                                   # batch
    st.sampled_from([(32, 8), (32, 32), (28, 4), (8, 1), (64, 8), (16, 2)]),
    st.sampled_from([64, 128]),
    st.integers(0, 140_000),                              # max_kv_len
)


@settings(max_examples=40)
@given(shapes)
@example((1, (32, 8), 128, 1))
@example((1, (32, 8), 128, 339))
def test_plan_keeps_the_kernel_invariants(shape):
    batch, (hq, hkv), d, n = shape
    plan = plan_split_kv(batch, hq, hkv, d, n)
    assert plan.chunk_size % TILE_TOKENS == 0
    assert plan.num_splits == max(1, -(-n // plan.chunk_size))
    assert plan.num_splits * plan.chunk_size >= n
    assert plan.heads_per_block * plan.head_groups >= hq // hkv


@pytest.mark.parametrize("batch, hkv, want", [(1, 8, (8, 1)), (2047, 32, (65504, 1)),
                                              (2048, 32, (32768, 2)), (4100, 32, (43734, 3))])
def test_grid_rows_continue_in_z_past_65535(batch, hkv, want):
    plan = plan_split_kv(batch, 32, hkv, 64, 100, num_splits=1)
    rows = batch * hkv * plan.head_groups
    assert plan.grid == (1, *want)
    assert plan.grid[1] <= 65535 and 0 <= plan.grid[1] * plan.grid[2] - rows < plan.grid[2]


@pytest.mark.parametrize("args", [(1, 32, 8, 128, 4096), (1, 32, 8, 128, 32768), (8, 32, 8, 128, 32768),
                                  (64, 32, 8, 128, 16384), (2, 28, 4, 64, 5000)])
def test_split_choice_is_the_fastest_predicted(args):
    chosen = plan_split_kv(*args)
    best = chosen_time = split_kv.predict(chosen, gpu=H100).time_s
    cal = load_calibration(H100.key)
    base_blocks = plan_split_kv(*args, num_splits=1).num_blocks
    for s in split_kv.candidate_num_splits(base_blocks, args[-1], H100.num_sms, cal.blocks_per_sm):
        best = min(best, split_kv.predict(plan_split_kv(*args, num_splits=s), gpu=H100).time_s)
    assert chosen_time <= best * (1 + split_kv.SPLIT_TIE_TOLERANCE)


def test_split_choice_follows_the_gpu():
    # an A100 has fewer SMs and less bandwidth: never more blocks than an H100 would want
    h = plan_split_kv(1, 32, 8, 128, 32768, num_sms=132)
    a = plan_split_kv(1, 32, 8, 128, 32768, num_sms=108)
    assert a.num_sms == 108 and a.num_splits <= h.num_splits
    assert plan_split_kv(1, 32, 8, 128, 32768, gpu="H200").num_sms == 132


@pytest.mark.parametrize("gpu", ["A100", "NVIDIA A100-SXM4-80GB", get_gpu("A100"), "A100 40GB"])
def test_a_plan_for_a_gpu_takes_its_sm_count(gpu):
    by_name = plan_split_kv(1, 32, 8, 128, 32768, gpu=gpu)
    by_count = plan_split_kv(1, 32, 8, 128, 32768, num_sms=108)
    assert by_name.num_sms == 108
    assert by_name.num_splits == by_count.num_splits == 8            # 132 SMs would take 16
    assert plan_split_kv(1, 32, 8, 128, 32768, gpu=gpu, num_sms=108) == by_name
    assert split_kv.choose_num_splits(1, 32, 8, 128, 32768, gpu=gpu) == 8
    assert plan_split_kv(1, 32, 8, 128, 32768, gpu="H100 PCIe").num_sms == 114
    assert plan_split_kv(1, 32, 8, 128, 32768).num_sms == split_kv.DEFAULT_NUM_SMS   # no GPU named


def test_every_planner_takes_the_gpus_sm_count():
    a100 = get_gpu("A100")
    sp = shared_prefix.SharedPrefixShape(16, 32, 8, 128, 4096, 256)
    tr = tree.TreeShape(16, 32, 8, 128, ((1, 4096), (16, 256)))
    sn = span.SpanShape.from_density(4, 32, 8, 128, 8192, density=0.25, num_spans=4)
    plans = {
        "decode": decode.plan_decode(1, 32, 8, 128, 4096, gpu="A100"),
        "paged_decode": paged_decode.plan_paged_decode(1, 32, 8, 128, 4096, page_size=16, gpu="A100"),
        "hydragen": shared_prefix.plan_hydragen(sp, gpu="A100"),
        "tree": tree.plan_tree(tr, gpu="A100"),
        "span": span.plan_span(sn, gpu="A100"),
    }
    for name, plan in plans.items():
        assert plan.num_sms == a100.num_sms == 108, name
    # a GPUSpec whose SM count was replaced is taken at its word
    small = dataclasses.replace(a100, num_sms=20)
    assert shared_prefix.plan_hydragen(sp, gpu=small).num_sms == 20
    assert plan_split_kv(1, 32, 8, 128, 32768, gpu=small).num_sms == 20


@pytest.mark.parametrize("make", [
    lambda **kw: plan_split_kv(1, 32, 8, 128, 32768, **kw),
    lambda **kw: split_kv.choose_num_splits(1, 32, 8, 128, 32768, **kw),
    lambda **kw: decode.plan_decode(1, 32, 8, 128, 4096, **kw),
    lambda **kw: paged_decode.plan_paged_decode(1, 32, 8, 128, 4096, page_size=16, **kw),
    lambda **kw: shared_prefix.plan_hydragen(shared_prefix.SharedPrefixShape(4, 32, 8, 128, 1024, 64), **kw),
    lambda **kw: tree.plan_tree(tree.TreeShape(4, 32, 8, 128, ((1, 1024), (4, 64))), **kw),
    lambda **kw: span.plan_span(span.SpanShape(4, 32, 8, 128, 1024, (64, 64)), **kw),
], ids=["split_kv", "choose_num_splits", "decode", "paged_decode", "hydragen", "tree", "span"])
def test_a_gpu_and_a_different_sm_count_is_an_error(make):
    with pytest.raises(ValueError, match=r"num_sms = 132 disagrees with gpu = 'NVIDIA A100 SXM 80GB'.* 108 SMs"):
        make(gpu="A100", num_sms=132)
    assert make(gpu="A100", num_sms=108) == make(gpu="A100")


def test_splitting_pays_at_batch_one_and_not_at_large_batch():
    long = plan_split_kv(1, 32, 8, 128, 32768)
    assert long.num_splits > 4
    fast = split_kv.predict(long, gpu=H100)
    slow = decode.predict(decode.plan_decode(1, 32, 8, 128, 32768), gpu=H100)
    assert slow.time_s > 5 * fast.time_s
    assert slow.bound == "latency" and fast.bound == "memory"
    assert plan_split_kv(64, 32, 8, 128, 16384).num_splits == 1


def test_large_decode_is_near_its_bandwidth_floor():
    p = split_kv.predict(plan_split_kv(64, 32, 8, 128, 16384), gpu=H100)
    floor = p.hbm_bytes / H100.stream_bytes_per_s
    assert p.bound == "memory"
    assert floor < p.time_s < 1.15 * floor


def test_split_kv_bytes_itemised():
    plan = plan_split_kv(2, 32, 8, 128, 4096, num_splits=4)
    p = split_kv.predict(plan, gpu=H100)
    b = p.bytes_by_tensor
    assert b["k"] == b["v"] == 2 * 4096 * 8 * 128 * 2
    assert b["q"] == 4 * 2 * 32 * 128 * 2                       # each split's block reads q
    assert b["out"] == 2 * 32 * 128 * 2 and b["lse"] == 2 * 32 * 4
    assert b["partial_out_write"] == b["partial_out_read"] == 4 * 2 * 32 * 128 * 4
    assert b["partial_lse_write"] == b["partial_lse_read"] == 4 * 2 * 32 * 4
    assert p.hbm_bytes == sum(b.values()) and p.num_blocks == plan.num_blocks == 64
    unsplit = decode.predict(plan_split_kv(2, 32, 8, 128, 4096, num_splits=1), gpu=H100).bytes_by_tensor
    assert unsplit["partial_out_write"] == unsplit["counters"] == 0


def test_bytes_match_the_schedule_the_simulator_walks():
    simulate = pytest.importorskip("costmodel.simulate")
    rng = np.random.default_rng(1)
    for args, kw in [((3, 28, 4, 64, 339), {}), ((2, 32, 8, 128, 5000), {"num_splits": 7}),
                     ((4, 32, 2, 128, 1000), {"num_splits": 3, "page_size": 5}),
                     ((3, 12, 1, 64, 700), {"num_splits": 4, "page_size": 16})]:
        plan = plan_split_kv(*args, **kw)
        lens = rng.integers(0, plan.max_kv_len + 1, plan.batch)
        walked = simulate.traffic(plan, lens)
        predicted = split_kv.predict(plan, kv_lens=lens, gpu=H100).bytes_by_tensor
        for key, value in walked.items():
            if key not in ("blocks", "tiles"):
                assert predicted[key] == value, (args, kw, key)


def test_head_groups_reread_from_l2():
    plan = plan_split_kv(1, 32, 1, 128, 8192, num_splits=1)       # MQA: 32 heads, 4 groups of 8
    assert plan.head_groups == 4
    p = decode.predict(plan, gpu=H100)
    kv = p.bytes_by_tensor["k"] + p.bytes_by_tensor["v"]
    assert p.l2_hit_bytes == kv * 3 // 4 and p.hbm_bytes == sum(p.bytes_by_tensor.values()) - p.l2_hit_bytes


def test_ragged_lengths_cost_what_they_read():
    plan = plan_split_kv(4, 32, 8, 128, 8192, num_splits=4)
    full = split_kv.predict(plan, gpu=H100)
    short = split_kv.predict(plan, kv_lens=np.array([8192, 100, 0, 4000]), gpu=H100)
    assert short.bytes_by_tensor["k"] == (8192 + 100 + 4000) * 8 * 128 * 2
    assert short.time_s < full.time_s
    with pytest.raises(ValueError, match="kv_lens"):
        split_kv.predict(plan, kv_lens=[1, 2, 3], gpu=H100)


def test_decode_needs_an_unsplit_plan():
    with pytest.raises(ValueError, match="num_splits = 4"):
        decode.predict(plan_split_kv(1, 32, 8, 128, 4096, num_splits=4), gpu=H100)


def test_small_pages_cost_more():
    def t(page_size):
        plan = paged_decode.plan_paged_decode(8, 32, 8, 128, 8192, page_size=page_size, num_splits=2)
        return paged_decode.predict(plan, gpu=H100)
    p1, p16, p128 = t(1), t(16), t(128)
    assert p1.bytes_by_tensor["page_table"] > p16.bytes_by_tensor["page_table"] > 0
    assert p1.time_s > p16.time_s >= p128.time_s
    contiguous = split_kv.predict(plan_split_kv(8, 32, 8, 128, 8192, num_splits=2), gpu=H100)
    assert p128.time_s >= contiguous.time_s
    assert paged_decode.kv_lens_from_pages([0, 3, 3, 5], [7, 0, 16], 16).tolist() == [39, 0, 32]


def test_merge_states_bytes():
    p = merge_states.predict(merge_states.MergeStatesShape(4, 2, 8, 64, "float16"), gpu=H100)
    assert p.bytes_by_tensor == {"states_out": 4 * 16 * 64 * 2, "states_lse": 4 * 16 * 4,
                                 "out": 16 * 64 * 2, "lse": 16 * 4}
    assert p.num_blocks == 16 and p.bound == "latency"


# ---------------------------------------------------------------------------------------------
# shared_prefix, tree, span
# ---------------------------------------------------------------------------------------------

def test_shared_prefix_reads_the_prefix_once():
    b, hkv, d, P, S = 16, 32, 128, 8192, 256
    shape = shared_prefix.SharedPrefixShape(b, 32, hkv, d, P, S)
    h = shared_prefix.predict(shape, method="hydragen", gpu=H100)
    n = shared_prefix.predict(shape, method="naive", gpu=H100)
    f = shared_prefix.predict(shape, method="bifurcated", gpu=H100)
    kv_elems = 2 * hkv * d
    assert h.bytes_by_tensor["k_prefix"] == P * hkv * d * 2                 # once (16 rows: one tile)
    assert h.bytes_by_tensor["k_suffix"] == b * S * hkv * d * 2
    # the bifurcated paper's Eq. 5/6: g*k*b*(m_c + m_d) without sharing, g*k*(m_c + b*m_d) with it
    assert n.bytes_by_tensor["k"] + n.bytes_by_tensor["v"] == kv_elems * b * (P + S) * 2
    assert (h.bytes_by_tensor["k_prefix"] + h.bytes_by_tensor["v_prefix"] + h.bytes_by_tensor["k_suffix"]
            + h.bytes_by_tensor["v_suffix"]) == kv_elems * (P + b * S) * 2
    prefix, suffixes = shared_prefix.hydragen_launches(shape, gpu=H100)   # the suffixes' blocks merge
    assert prefix.flops + suffixes.flops == n.flops == 4 * b * 32 * (P + S) * d
    assert h.flops == n.flops
    chunks = shared_prefix.plan_hydragen(shape, gpu=H100).num_chunks
    assert suffixes.bytes_by_tensor["prefix_states"] == chunks * b * 32 * (d + 1) * 4
    assert h.launches == 2 and f.launches == 5
    # Without suffixes, a merge launch of the chunks' states.
    alone = shared_prefix.hydragen_launches(shared_prefix.SharedPrefixShape(b, 32, hkv, d, P, 0), gpu=H100)
    assert [launch.name for launch in alone] == ["prefix_pass", "merge"]
    assert h.time_s < f.time_s < n.time_s
    assert n.time_s > 5 * h.time_s
    fused = shared_prefix.predict(shape, method="bifurcated", fused=True, gpu=H100)
    hydragen_fused = shared_prefix.predict(shape, method="hydragen", fused=True, gpu=H100)
    assert fused.launches == 1 and fused.time_s == pytest.approx(hydragen_fused.time_s)


def test_shared_prefix_checks_its_shape():
    with pytest.raises(ValueError, match="suffix_lens"):
        shared_prefix.SharedPrefixShape(2, 8, 2, 64, 100, 10, suffix_lens=(5, 11))
    with pytest.raises(ValueError, match="method"):
        shared_prefix.predict(shared_prefix.SharedPrefixShape(2, 8, 2, 64, 100, 10), method="cascade", gpu=H100)


def test_gqa_prefix_is_a_tensor_core_product():
    shape = shared_prefix.SharedPrefixShape(128, 32, 8, 128, 32768, 256)
    plan = shared_prefix.plan_hydragen(shape, gpu=H100)
    (prefix, _), *_ = plan.launches(H100)
    assert prefix.matmul_flops > 0
    # 128 sequences x 4 heads = 512 query rows per KV head: on Hopper 4 blocks of 128 rows (two
    # warpgroups taking turns), the later ones read from L2
    assert plan.prefix_block_rows == 128 and plan.row_tiles == 4
    assert prefix.l2_hit_bytes == 3 * 2 * 32768 * 8 * 128 * 2
    assert plan.parts_per_sequence == -(-32768 // plan.prefix_chunk_size) + 1
    fused = shared_prefix.plan_hydragen(shape, gpu=H100, fused=True)
    assert fused.launch().l2_hit_bytes == 7 * 2 * 32768 * 8 * 128 * 2


def test_the_prefix_pass_takes_blocks_of_two_warpgroups_on_hopper_past_64_rows():
    from costmodel import segments

    h200, a100 = get_gpu("H200"), get_gpu("A100")
    assert segments.prefix_block_rows(h200, 128, "float16", 65) == 128
    assert segments.prefix_block_rows(h200, 64, "bfloat16", 1024) == 128
    assert segments.prefix_block_rows(h200, 128, "float16", 64) == 64      # one block of 64 holds them
    assert segments.prefix_block_rows(h200, 256, "float16", 1024) == 64    # head_dim 256: mma.sync
    assert segments.prefix_block_rows(a100, 128, "float16", 1024) == 64    # no wgmma
    # a pair of turns: both warpgroups' tensor clocks (1,024 each) and one softmax's exponentials
    # (512 SFU clocks), the rest of it behind the products
    tensor, softmax = segments.pingpong_tile_clocks(h200, 128, "float16")
    assert (tensor, softmax) == (1024, 512)
    assert segments.pingpong_flops_per_s(h200, 128, "float16") == pytest.approx(
        h200.matmul_flops_per_s * 2048 / 2560)
    items = [segments.WorkItem(1024, 128), segments.WorkItem(1024, 100, rereads=True)]
    launch, rate = segments.attend_rows_launch("p", items, num_kv_heads=8, head_dim=128, dtype="float16", gpu=h200,
                                               block_rows=128)
    assert launch.blocks_per_sm == 1 and launch.num_blocks == 2 * 8
    assert launch.matmul_flops == 8 * 2 * 4 * 128 * 1024 * 128          # padding rows computed too
    assert launch.useful_flops == 8 * 4 * 228 * 1024 * 128
    assert launch.l2_hit_bytes == 8 * 2 * 1024 * 128 * 2
    assert rate == pytest.approx(segments.pingpong_flops_per_s(h200, 128, "float16"))
    with pytest.raises(ValueError, match="block_rows"):
        segments.attend_rows_launch("p", items, num_kv_heads=8, head_dim=128, dtype="float16", gpu=h200, block_rows=96)
    with pytest.raises(ValueError, match="page_size"):
        segments.attend_rows_launch("p", items, num_kv_heads=8, head_dim=128, dtype="float16", gpu=h200,
                                    block_rows=128, page_size=16)


def test_a_tensor_core_block_streams_no_faster_than_it_computes():
    from costmodel import segments

    h200 = get_gpu("H200")
    own = [segments.WorkItem(256, 1)] * 64   # the tree's one-row segments: four 64-key tiles each
    launch, _ = segments.attend_rows_launch("s", own, num_kv_heads=32, head_dim=128, dtype="float16", gpu=h200)
    # 2048 blocks, two an SM: a tile's 32 KB of K and V over 2 x 976 clocks (512 tensor + 464
    # softmax), clocks at the measured matmul rate
    clock_s = 4096 * h200.num_sms / h200.matmul_flops_per_s
    assert launch.block_compute_bytes_per_s == pytest.approx(32768 / (2 * 976 * clock_s))
    # fewer blocks than SMs: each has an SM to itself
    few, _ = segments.attend_rows_launch("s", own[:2], num_kv_heads=1, head_dim=128, dtype="float16", gpu=h200)
    assert few.block_compute_bytes_per_s == pytest.approx(2 * launch.block_compute_bytes_per_s)
    # below the decode kernel's calibrated per-block rate, it is what holds the launch's schedule
    cal = calibration_for(h200, None)
    assert launch.block_compute_bytes_per_s < cal.block_bytes_per_s
    bound = predict_launches("s", [launch], gpu=h200, calibration=cal)
    free = predict_launches("s", [dataclasses.replace(launch, block_compute_bytes_per_s=None)], gpu=h200,
                            calibration=cal)
    assert bound.terms["schedule_s"] > free.terms["schedule_s"]


def test_hydragen_is_the_kernels_two_launches():
    """The prefix pass in the kernels' chunks (one wave of resident blocks), the suffixes by the
    kernels' split-KV plan, whose blocks merge every chunk's state into their rows (the plans of
    model and kernels agree on the chunk and on a merge launch)."""
    from gpukernels.shared_prefix import plan_shared_prefix

    for b, hq, hkv, d, P, S in [(64, 32, 8, 128, 16384, 256), (16, 32, 32, 128, 8192, 256),
                                (5, 28, 4, 256, 339, 17), (1024, 32, 8, 64, 1024, 128)]:
        shape = shared_prefix.SharedPrefixShape(b, hq, hkv, d, P, S)
        plan = shared_prefix.plan_hydragen(shape, gpu=H100)
        kernels = plan_shared_prefix(b, hq, hkv, d, P, S, gpu=H100)
        assert plan.prefix_chunk_size == kernels.prefix_chunk_size
        assert plan.num_chunks == kernels.num_chunks
        assert plan.suffix == kernels.suffix
        assert plan.merge_launch == kernels.merge_launch
        plan = dataclasses.replace(plan, merge_launch=False)   # the two launches (the plan's or not)
        (prefix, rate), (suffixes, _) = plan.launches(H100)
        assert [launch.name for launch in (prefix, suffixes)] == ["prefix_pass", "suffixes"]
        # grid: chunks x tiles of 64 query rows x KV heads, two resident blocks (one at head_dim 256);
        # more than 64 rows a KV head at head_dim 64 and 128: tiles of 128 rows, one block an SM
        wide = b * hq // hkv > 64 and d <= 128
        rows = 128 if wide else 64
        assert plan.prefix_block_rows == kernels.prefix_block_rows == rows
        assert prefix.num_blocks == plan.prefix_blocks == kernels.num_chunks * -(-b * hq // hkv // rows) * hkv
        assert prefix.blocks_per_sm == (1 if d >= 256 or wide else 2)
        # the unique bytes (prefix once, every suffix once) plus the re-reads of later row tiles (L2)
        # and the partial states written by the prefix pass and read by the suffixes' blocks
        kv_row = hkv * d * 2                      # one of K or V of one token, float16
        tiles = plan.row_tiles
        assert prefix.bytes_by_tensor["k_prefix"] == tiles * P * kv_row
        assert prefix.l2_hit_bytes == (tiles - 1) * 2 * P * kv_row
        assert suffixes.bytes_by_tensor["k_suffix"] == b * S * kv_row
        states = plan.num_chunks * b * hq
        assert prefix.bytes_by_tensor["partial_out_write"] == states * d * 4
        assert suffixes.bytes_by_tensor["prefix_states"] == states * (d + 1) * 4
        # loaded at a block's start (one round trip fewer) up to 8 states at head_dim 128, 2 at the others
        plain = split_kv.split_kv_launch(plan.suffix, [S] * b, name="suffixes")
        assert shared_prefix.prefetched_states(d) == (8 if d == 128 else 2)
        extra_trips = 0 if plan.num_chunks <= shared_prefix.prefetched_states(d) else -(-plan.num_chunks // 8)
        if plan.suffix.num_splits == 1:
            assert [t for _, t, _ in suffixes.block_runs] == [t + extra_trips for _, t, _ in plain.block_runs]
        p = shared_prefix.predict(shape, gpu=H100, plan=plan)
        kv = sum(v for k, v in p.bytes_by_tensor.items() if k[:2] in ("k_", "v_"))
        assert kv - prefix.l2_hit_bytes - suffixes.l2_hit_bytes == 2 * (P + b * S) * kv_row
        assert p.launches == 2 and p.time_s == pytest.approx(sum(p.terms[f"{n}.time_s"] for n in
                                                                 ("prefix_pass", "suffixes")))
        # the prefix pass's tensor cores wait on shared memory: never faster than the GPU's rate
        assert rate <= H100.matmul_flops_per_s


def test_hydragen_with_a_merge_launch_overlaps_the_suffixes_with_the_prefix_pass():
    """Three launches: the suffixes merge nothing, a merge launch reads every chunk's state and the
    suffixes' (out in the dtype, lse) and writes out. When the two-warpgroup pass (one block an SM)
    leaves SMs free, the suffixes run there meanwhile: faster than the three one after another,
    never faster than the longer of pass and suffixes; a pass that fills the GPU gets no overlap.
    The plan takes three launches only where the model predicts them MERGE_LAUNCH_MARGIN faster."""
    b, hq, hkv, d, P, S = 256, 32, 8, 128, 4096, 128
    shape = shared_prefix.SharedPrefixShape(b, hq, hkv, d, P, S)
    for chunk, overlaps in ((4096, True), (1024, False)):   # 64 blocks of 128 rows, or 256
        plan = shared_prefix.plan_hydragen(shape, gpu="H200", prefix_chunk_size=chunk, merge_launch=True)
        (prefix, _), (suffixes, _), (merge, _) = plan.launches("H200")
        assert [x.name for x in (prefix, suffixes, merge)] == ["prefix_pass", "suffixes", "merge"]
        assert "prefix_states" not in suffixes.bytes_by_tensor
        rows = b * hq
        assert merge.bytes_by_tensor == {"prefix_states": plan.num_chunks * rows * (d + 1) * 4,
                                         "suffix_state": rows * (d * 2 + 4), "out": rows * (d * 2 + 4)}
        parts = shared_prefix.merge_launch_time_s(plan, get_gpu("H200"), calibration_for(get_gpu("H200"), None))
        sequential = parts["prefix_s"] + parts["suffixes_s"] + parts["merge_s"]
        p = shared_prefix.predict(shape, gpu="H200", plan=plan)
        assert p.launches == 3 and p.time_s == parts["time_s"] and p.terms["overlap_s"] == parts["overlap_s"]
        if overlaps:
            assert prefix.num_blocks == 64
            assert max(parts["prefix_s"], parts["suffixes_s"]) < p.time_s < sequential
        else:
            assert prefix.num_blocks == 256 and p.time_s == pytest.approx(sequential)
    best = shared_prefix.plan_hydragen(shape, gpu="H200")
    two = shared_prefix.plan_hydragen(shape, gpu="H200", merge_launch=False)
    t_best, t_two = (shared_prefix.predict(shape, gpu="H200", plan=x).time_s for x in (best, two))
    assert best.merge_launch and t_best < t_two * (1 - shared_prefix.MERGE_LAUNCH_MARGIN)
    # no suffixes: the merge launch of the chunks alone, whatever is asked
    none = shared_prefix.SharedPrefixShape(b, hq, hkv, d, P, 0)
    assert not shared_prefix.plan_hydragen(none, gpu="H200", merge_launch=True).merge_launch


def test_prefix_pass_rate_is_shared_memory_bound_on_mma_sync():
    """Per tile of 64 KV rows at head_dim 128, a block of 4 warps issues 256 ldmatrix.x4 (512 B
    each) and 512 mma.sync m16n8k16, and its copies write 32 KB: 163,840 bytes at 128 a clock is
    1,280 clocks against 1,024 for the tensor cores (2,048 FLOPs a clock per SM on Ampere)."""
    from costmodel import segments

    counts = segments.attend_rows_tile_counts(128, 4, "float16")
    assert counts == {"ldmatrix_x4": 256, "mma": 512, "smem_bytes": 163840}
    a100 = get_gpu("A100")
    assert not segments.attend_rows_uses_wgmma(a100, 128, "float16")
    assert segments.attend_rows_flops_per_s(a100, 128, "float16") == pytest.approx(0.8 * a100.matmul_flops_per_s)
    # a warp alone (16 query rows) pays the whole tile's copies: 128 mma (256 clocks) against 64
    # ldmatrix.x4 and 32 KB of copies (64 KB: 512 clocks), half the rate
    assert segments.attend_rows_flops_per_s(a100, 128, "float16", 1) == pytest.approx(0.5 * a100.matmul_flops_per_s)


def test_prefix_pass_rate_on_wgmma_is_bound_by_the_softmax():
    """On Hopper (wgmma) a tile of 64 KV rows at head_dim 128 is 512 tensor clocks; its softmax
    256 SFU clocks for 32 exponentials a lane, 144 other instructions and 64 for 16 copies; the
    rate is 512 / 976 of the GPU's, every warp computing (padding rows too)."""
    from costmodel import segments

    h200 = get_gpu("H200")
    assert segments.attend_rows_uses_wgmma(h200, 128, "bfloat16")
    assert not segments.attend_rows_uses_wgmma(h200, 256, "float16")   # head_dim 256 stays on mma.sync
    assert not segments.attend_rows_uses_wgmma(h200, 128, "float32")
    assert segments.attend_rows_wgmma_tile_clocks(h200, 128, "float16") == (512, 464)
    rate = 512 / 976 * h200.matmul_flops_per_s
    for warps in (1, 4):
        assert segments.attend_rows_flops_per_s(h200, 128, "float16", warps) == pytest.approx(rate)
    fused = shared_prefix.predict(shared_prefix.SharedPrefixShape(64, 32, 8, 128, 16384, 256), gpu=h200, fused=True)
    assert fused.launches == 1


def test_two_level_tree_fused_is_hydragen_fused():
    sp = shared_prefix.SharedPrefixShape(16, 32, 32, 128, 4096, 256)
    t = tree.TreeShape(16, 32, 32, 128, ((1, 4096), (16, 256)))
    assert tree.predict(t, gpu=H100, fused=True).time_s == pytest.approx(
        shared_prefix.predict(sp, method="hydragen", gpu=H100, fused=True).time_s)


def test_tree_is_the_kernels_two_launches():
    """The kernels' plan (gpukernels.tree.plan_tree: its form and chunk), one block per (segment,
    chunk, row tile) and KV head, then the own tokens' launch merging the shared states or the
    merge of each sequence's states; both forms predicted as the kernels run them."""
    from gpukernels.tree import plan_tree, plan_tree_work

    for levels, hq, hkv in [(((1, 4096), (8, 2048), (64, 256)), 32, 32), (((1, 339), (4, 17)), 28, 4),
                            (((1, 1024), (2, 300), (16, 64)), 32, 8)]:
        batch = levels[-1][0] if levels[-1][0] > 1 else 16
        t = tree.TreeShape(batch, hq, hkv, 128, levels)
        seg_lens, paths = [], [[] for _ in range(batch)]
        for n, length in levels:
            for j in range(n):
                for b in range(j * batch // n, (j + 1) * batch // n):
                    paths[b].append(len(seg_lens))
                seg_lens.append(length)
        seg_indptr = np.concatenate([[0], np.cumsum(seg_lens)])
        path_indptr = np.concatenate([[0], np.cumsum([len(p) for p in paths])])
        path_segs = np.concatenate(paths)
        kernels = plan_tree(seg_indptr, path_indptr, path_segs, num_qo_heads=hq, num_kv_heads=hkv, head_dim=128,
                            gpu=H100)
        plan = tree.plan_tree(t, gpu=H100)
        assert (plan.form, plan.chunk_size) == (kernels.form, kernels.chunk_size)
        assert tree.predict(t, gpu=H100).time_s == pytest.approx(kernels.predicted_s, rel=1e-9)
        for form in tree.FORMS:
            work = plan_tree_work(seg_indptr, path_indptr, path_segs, group_size=hq // hkv, chunk_size=plan.chunk_size,
                                  shared_only=form == "own")
            (segments, _), (second, _) = tree.TreePlan(t, plan.chunk_size, form=form).launches(H100)
            assert segments.num_blocks == len(work.work) * hkv
            if form == "merge":
                assert second.num_blocks == batch * hq
                assert second.bytes_by_tensor["states_lse"] == work.num_states * hq * 4
            else:   # every sequence's slots, read by the blocks that write its outputs
                assert second.bytes_by_tensor["shared_states"] == work.num_slots * batch * hq * (128 + 1) * 4
                own_rows = -(-levels[-1][1] // 16) * 16 if levels[-1][0] == batch else 0   # whole windows
                assert second.bytes_by_tensor["k_own"] == batch * own_rows * hkv * 128 * 2
            assert tree.predict(t, gpu=H100, plan=tree.TreePlan(t, plan.chunk_size, form=form)).launches == 2


def test_tree_levels_are_read_once_each():
    t = tree.TreeShape(64, 32, 32, 128, ((1, 4096), (8, 2048), (64, 256)))
    p = tree.predict(t, gpu=H100)
    row = 32 * 128 * 2
    assert p.bytes_by_tensor["k_level0"] == 4096 * row
    assert p.bytes_by_tensor["k_level1"] == 8 * 2048 * row
    assert p.bytes_by_tensor["k_level2"] == 64 * 256 * row
    assert t.context_len == 4096 + 2048 + 256
    with pytest.raises(ValueError, match="num_segments"):
        tree.TreeShape(64, 32, 32, 128, ((3, 10),))


def test_a_paged_tree_looks_up_the_pages_of_every_block():
    """Segments in pages of 16: every block of the segments launch looks up each page its chunk
    covers (a later row tile again), charged as split-KV's lookups are; contiguous, none."""
    t = tree.TreeShape(64, 32, 32, 128, ((1, 4096), (8, 2048), (64, 256)))
    for form in tree.FORMS:
        flat, paged = (tree.TreePlan(t, 1024, form=form, page_size=ps) for ps in (0, 16))
        (seg_flat, _), _ = flat.launches(H100)
        (seg_paged, _), _ = paged.launches(H100)
        tokens = sum(it.tokens for it in paged.items())
        assert seg_flat.page_lookups == 0 and "page_table" not in seg_flat.bytes_by_tensor
        assert seg_paged.page_lookups == 32 * tokens // 16
        assert seg_paged.bytes_by_tensor["page_table"] == 4 * seg_paged.page_lookups
        cal = calibration_for(H100, None)
        assert (tree.predict(t, gpu=H100, plan=paged).terms["segments.hbm_s"]
                - tree.predict(t, gpu=H100, plan=flat).terms["segments.hbm_s"]) == pytest.approx(
            seg_paged.page_lookups * (cal.page_lookup_bytes + 4) / (cal.bw_fraction * H100.stream_bytes_per_s))
    with pytest.raises(ValueError, match="page_size"):
        tree.TreePlan(t, 1024, page_size=-16)


@pytest.mark.parametrize("density, num_spans", [(0.125, 8), (0.25, 16), (0.5, 64)])
def test_spans_read_only_the_attended_tokens(density, num_spans):
    dense = split_kv.predict(plan_split_kv(8, 32, 8, 128, 32768), gpu=H100)
    shape = span.SpanShape.from_density(8, 32, 8, 128, 32768, density=density, num_spans=num_spans)
    p = span.predict(shape, gpu=H100)
    assert shape.attended_len == round(density * 32768) and len(shape.span_lens) == num_spans
    assert p.bytes_by_tensor["k"] == 8 * shape.attended_len * 8 * 128 * 2
    # what scales with the density is the time past the launch; short spans (64 of 256 tokens at
    # 50%) also pay each block's fixed round trip, so the bound leaves room for that
    launch_s = load_calibration(H100.key).launch_s
    assert p.time_s < dense.time_s
    assert p.time_s - launch_s < 1.5 * density * (dense.time_s - launch_s)


def test_sinks_and_window():
    shape = span.SpanShape.sinks_window(8, 32, 8, 128, 32768, num_sinks=4, window=4096)
    assert shape.span_lens == (4, 4096)
    assert span.SpanShape.sinks_window(1, 8, 8, 64, 100, num_sinks=4, window=4096).span_lens == (4, 96)
    with pytest.raises(ValueError, match="density"):
        span.SpanShape.from_density(1, 8, 8, 64, 100, density=1.5, num_spans=2)


def test_plans_are_checked_against_their_shape():
    a = span.SpanShape.from_density(1, 8, 8, 64, 1000, density=0.5, num_spans=2)
    b = dataclasses.replace(a, batch=2)
    with pytest.raises(ValueError, match="another shape"):
        span.predict(b, gpu=H100, plan=span.plan_span(a))


def test_predictions_scale_with_the_gpu():
    # Same constants on every GPU, so only the specs differ: a GPU-filling, memory-bound call
    # scales with bandwidth.
    plan = plan_split_kv(64, 32, 8, 128, 32768)
    cal = load_calibration("default")
    h100 = split_kv.predict(plan, gpu="H100", calibration=cal).time_s
    h200 = split_kv.predict(plan, gpu="H200", calibration=cal).time_s
    a100 = split_kv.predict(plan, gpu="A100", calibration=cal).time_s
    assert a100 > h100 > h200
    assert h100 / h200 == pytest.approx(4.3 / 3.0, rel=0.1)


def test_units_and_derived_quantities():
    p = split_kv.predict(plan_split_kv(1, 32, 8, 128, 4096), gpu=H100)
    assert p.time_us == pytest.approx(p.time_s * 1e6) and p.time_ms == pytest.approx(p.time_s * 1e3)
    assert p.intensity_flops_per_byte == pytest.approx(p.flops / p.hbm_bytes)
    assert math.isfinite(p.achieved_bytes_per_s) and p.waves > 0
    assert isinstance(H100, GPUSpec)


@pytest.mark.parametrize("dtype,head_dim,on_tensor_cores", [
    ("float16", 128, True), ("bfloat16", 64, True), ("float32", 128, False),
    # head_dim 256 takes the mma path where the kernel has it (TENSOR_CORE_HEAD_DIMS)
    ("float16", 256, 256 in split_kv.TENSOR_CORE_HEAD_DIMS)])
def test_split_kv_flops_land_on_the_units_that_run_them(dtype, head_dim, on_tensor_cores):
    from costmodel.split_kv import plan_split_kv, split_kv_launch

    plan = plan_split_kv(2, 32, 8, head_dim, 4096, dtype=dtype, num_sms=132)
    launch = split_kv_launch(plan)
    useful = 4 * 2 * 4096 * 32 * head_dim
    if on_tensor_cores:   # 4 query heads per block padded to the 16 rows of an mma tile
        assert (launch.matmul_flops, launch.vector_flops) == (4 * useful, 0)
    else:                 # float32 (and head dims without an mma kernel) run on the CUDA cores
        assert (launch.matmul_flops, launch.vector_flops) == (0, useful)


def test_the_persistent_kernel_runs_where_the_model_says():
    """The kernels' switches of the persistent split-KV kernel (gpukernels.split_kv) and the model's
    (costmodel.split_kv) agree, and the model counts its launch as its resident blocks."""
    import importlib

    sk = importlib.import_module("gpukernels.split_kv")
    from costmodel import split_kv as model

    assert sk.PERSISTENT_HEAD_DIMS == model.PERSISTENT_HEAD_DIMS
    assert sk.PERSISTENT_STAGES == model.PERSISTENT_STAGES
    assert sk.PERSISTENT_MAX_KV_LEN == model.PERSISTENT_MAX_KV_LEN
    short = model.plan_split_kv(256, 32, 32, 128, 128, gpu="H200")
    assert model.runs_persistent(short)
    assert not model.runs_persistent(short, lengths=True) and not model.runs_persistent(short, states=True)
    assert not model.runs_persistent(model.plan_split_kv(256, 32, 32, 128, 129, gpu="H200"))
    assert not model.runs_persistent(model.plan_split_kv(2, 32, 32, 128, 128, gpu="H200"))   # 64 items
    launch = model.persistent_launch(model.split_kv_launch(short), short)
    assert launch.num_blocks == 3 * 132 and launch.blocks_per_sm == 3
    # one round trip a block instead of one an item: predicted faster than one block per item
    one = model.predict(short, kv_lens=[128] * 256, gpu="H200").time_s
    assert model.predict(short, gpu="H200").time_s < one


def test_hydragen_runs_persistent_suffixes_only_where_they_outlast_the_prefix_pass():
    """In three launches the suffixes run the persistent kernel where the model has them outlast the
    prefix pass (32/32 heads x 256 x 4096 + 128), not where they end within it (32/8 heads), and never
    in two launches (their blocks merge the prefix states)."""
    from costmodel import shared_prefix

    mha = shared_prefix.plan_hydragen(shared_prefix.SharedPrefixShape(256, 32, 32, 128, 4096, 128), gpu="H200")
    gqa = shared_prefix.plan_hydragen(shared_prefix.SharedPrefixShape(256, 32, 8, 128, 4096, 128), gpu="H200")
    assert mha.three_launches and mha.suffix_runs_persistent
    assert gqa.three_launches and not gqa.suffix_persistent
    two = shared_prefix.plan_hydragen(shared_prefix.SharedPrefixShape(256, 32, 32, 128, 4096, 128), gpu="H200",
                                      merge_launch=False)
    assert not two.suffix_runs_persistent
    ragged = shared_prefix.SharedPrefixShape(256, 32, 32, 128, 4096, 128, suffix_lens=(128,) * 255 + (5,))
    assert not shared_prefix.plan_hydragen(ragged, gpu="H200").suffix_runs_persistent
