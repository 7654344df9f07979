"""`explain` ranks the variants and says why; `papers` reproduces the published claims' trends."""

import re

import pytest

import costmodel
from costmodel import papers
from costmodel.explain import BASELINE, Workload, builtin_workloads, explain, format_explanation


def test_builtin_example_winners_and_reasons():
    shared, sparse = (explain(w, "H100") for w in builtin_workloads())
    assert shared.winner in ("shared_prefix:hydragen", "tree")
    assert "shared prefix once" in shared.why and "8192-token" in shared.why
    assert {r.variant for r in shared.rows} == {"decode", "split_kv", "paged_decode", "shared_prefix:hydragen",
                                                "shared_prefix:bifurcated", "tree"}
    assert shared.row("shared_prefix:hydragen").speedup > 3
    assert sparse.winner == "span" and "attended 12.5%" in sparse.why
    assert "shared_prefix:hydragen" not in {r.variant for r in sparse.rows}


def test_rows_are_fastest_first_with_speedups_over_the_baseline():
    e = explain(Workload(batch=4, prefix_len=2048, suffix_len=100, density=0.5), "H200")
    times = [r.prediction.time_s for r in e.rows]
    assert times == sorted(times)
    base = e.row(BASELINE).prediction.time_s
    for r in e.rows:
        assert r.speedup == pytest.approx(base / r.prediction.time_s)
    assert e.row(BASELINE).speedup == 1.0
    assert {"span", "tree"} <= {r.variant for r in e.rows}


def test_split_kv_wins_a_long_single_sequence():
    e = explain(Workload(batch=1, prefix_len=0, suffix_len=65536), "H100")
    assert e.winner == "split_kv"
    assert "blocks where decode has 8" in e.why


def test_nothing_to_gain_says_so():
    e = explain(Workload(batch=64, prefix_len=0, suffix_len=16384), "H100")
    assert e.winner == BASELINE and "already the fastest" in e.why


def test_table_lists_every_variant_and_measured_column():
    e = explain(builtin_workloads()[0], "H100")
    text = format_explanation(e, measured_s={"decode": 1e-4})
    for r in e.rows:
        assert r.variant in text
    assert "measured" in text and "100.00 us" in text and e.why in text


DATACLASS_DUMP = re.compile(r"\b(Explanation|VariantRow|Prediction|GPUSpec|Workload)\(")


def test_an_explanation_prints_as_a_short_table_with_units():
    e = explain(builtin_workloads()[0], "H100")
    text = str(e)
    assert repr(e) == text == format_explanation(e)
    assert not DATACLASS_DUMP.search(text)
    lines = text.splitlines()
    assert len(lines) == 2 + 2 + len(e.rows) + 1                  # workload, GPU; head, rule; rows; why
    assert lines[-1] == e.why
    assert "3.00 TB/s" in lines[1] and "132 SMs" in lines[1]
    for r in e.rows:
        row = next(line for line in lines if line.startswith(r.variant + " "))
        assert f"{r.prediction.time_us:.2f} us" in row and f"{r.speedup:.2f}x" in row
        assert re.search(r"\d MB|\d GB", row) and re.search(r"\d (GB|TB)/s", row) and r.plan in row
    assert "e+" not in text and "e-" not in text                   # no bare seconds or bytes


def test_an_explanation_renders_as_html_in_a_notebook():
    e = explain(builtin_workloads()[1], "H200")
    page = e._repr_html_()
    assert page.count("<table>") == 1 and page.count("<tr>") == 1 + len(e.rows)
    for r in e.rows:
        assert f"<td>{r.variant}</td>" in page
    assert " us</td>" in page and "/s</td>" in page and "<p>" in page
    assert costmodel.display.explanation_html(e, {"span": 2e-5}).count("20.00 us") == 1


def test_a_prediction_prints_its_terms_with_units():
    from costmodel import split_kv

    p = split_kv.predict(costmodel.plan_split_kv(1, 32, 8, 128, 32768), gpu="H100")
    text = str(p)
    assert repr(p) == text == costmodel.format_prediction(p)
    assert not DATACLASS_DUMP.search(text)
    first = text.splitlines()[0]
    assert first.startswith("split_kv: ") and f"{p.time_us:.2f} us" in first and p.bound in first
    assert "MB" in text and "TB/s" in text and "FLOP" in text
    for tensor, n in p.bytes_by_tensor.items():
        assert tensor in text                                      # every tensor named, idle ones too
    for term, seconds in p.terms.items():
        assert re.search(rf"^{term} +{re.escape(costmodel.display.format_seconds(seconds))}$", text, re.M)
    page = p._repr_html_()
    assert page.count("<table>") == 2 and "<td>k</td>" in page and "<td>schedule_s</td>" in page


def test_a_multi_launch_prediction_stays_short():
    e = explain(builtin_workloads()[0], "H100")
    p = e.row("shared_prefix:bifurcated").prediction
    assert p.launches == 5
    text = str(p)
    assert "prefix_logits.time_s" not in text and "'<launch>.<term>'" in text
    assert len(text.splitlines()) < 40
    assert repr(e.row("tree")).startswith("<VariantRow tree: ")


def test_formatters_at_the_top_level():
    assert costmodel.format_explanation is format_explanation
    assert costmodel.format_prediction is costmodel.display.format_prediction
    assert isinstance(explain(Workload(), "H100"), costmodel.Explanation)
    assert {"format_explanation", "format_prediction", "Explanation", "gpu_names"} <= set(costmodel.__all__)
    from costmodel.explain import format_bytes  # the old home of the helpers still works

    assert format_bytes(1.5e6) == "1.50 MB"


@pytest.mark.parametrize("value, text", [(2.34e-5, "23.40 us"), (1.5e-3, "1.50 ms"), (0.0, "0 us"),
                                         (4.2e-9, "4.20 ns"), (2.5, "2.50 s")])
def test_seconds_take_a_readable_unit(value, text):
    assert costmodel.display.format_seconds(value) == text


def test_workload_is_checked():
    with pytest.raises(ValueError, match="density"):
        Workload(density=0.0)
    with pytest.raises(ValueError, match="multiple"):
        Workload(num_qo_heads=30, num_kv_heads=8)


def test_flash_decoding_reproduction():
    r = papers.flash_decoding()
    assert r.setting.startswith("CodeLlama-34B / TP4: 16 query heads, 2 KV heads")
    split, unsplit = r.column("split_kv_us"), r.column("decode_us")
    assert unsplit[-1] / unsplit[0] > 50            # unsplit time grows with the context
    assert split[-1] / split[0] < 6                 # split_kv stays nearly flat
    speedups = r.column("speedup")
    assert speedups == sorted(speedups) and speedups[-1] > 10


def test_bifurcated_reproduction():
    r = papers.bifurcated()
    by = {row["samples"]: row for row in r.rows}
    assert by[32]["step_speedup"] > by[16]["step_speedup"] > 1.5
    assert by[1]["attn_speedup"] < 1.2               # nothing to share with one sample
    assert "16" in r.predicted and "32" in r.predicted


def test_hydragen_reproduction():
    r = papers.hydragen()
    hyd, naive = r.column("hydragen_tok_s"), r.column("naive_tok_s")
    # published: under 15%. The kernels' prefix pass waits on shared memory (ldmatrix for every
    # 16 query rows), so its time grows with the prefix: about a third fewer tokens/s at 16k.
    assert 1 - hyd[-1] / hyd[0] < 0.45
    assert 1 - hyd[-1] / hyd[0] < (1 - naive[-1] / naive[0]) / 2
    assert 1 - naive[-1] / naive[0] > 0.9            # published: over 90%
    assert r.rows[-1]["speedup"] > 10


def test_sparse_spans_reproduction():
    r = papers.sparse_spans()
    assert all(x < 1.5 for x in r.column("vs_density_x_dense"))   # the launch does not shrink
    speedups = r.column("attn_speedup")[:3]                         # 12.5%, 25%, 50%
    assert speedups == sorted(speedups, reverse=True)
    assert all(x > 1.0 for x in r.column("step_speedup"))


def test_reports_render():
    for r in papers.all_reproductions(gpu="H100"):
        text = r.report()
        assert r.title in text and r.published in text and r.predicted in text
        assert len(text.splitlines()) >= 5 + len(r.rows)


def test_a_workload_on_several_gpus_adds_the_sharded_row_and_the_crossover():
    from costmodel import sharded

    w = Workload(batch=1, prefix_len=0, suffix_len=1 << 20, num_gpus=2)
    e = explain(w, "H200")
    row = e.row("sharded:2_gpus")
    assert row.prediction.time_s == sharded.predict(sharded.plan_sharded(1, 32, 8, 128, 1 << 20, num_gpus=2,
                                                                        gpu="H200")).time_s
    assert e.crossover_kv_len == sharded.crossover_kv_len(1, 32, 8, 128, num_gpus=2, gpu="H200")
    assert e.winner == "sharded:2_gpus" and "reads only its shard" in e.why
    assert f"from a context of {e.crossover_kv_len:,} tokens up" in e.why
    text = str(e)
    assert len(text.splitlines()) == 2 + 2 + len(e.rows) + 1 and "up to 2 GPUs" in text
    assert "sharded:2_gpus " in text and "all-gather of 16.51 kB per GPU" in text


def test_a_short_context_keeps_one_gpu_and_says_so():
    e = explain(Workload(batch=1, prefix_len=0, suffix_len=4096, num_gpus=8), "H200")
    assert e.winner == "split_kv" and e.rows[-1].variant == "sharded:8_gpus"
    assert e.row("sharded:8_gpus").prediction.bound == "collective"
    assert "the time of one GPU's split_kv" in e.why and e.crossover_kv_len > 4096


def test_one_gpu_adds_nothing():
    e = explain(Workload(), "H100")
    assert e.crossover_kv_len is None and not any(r.variant.startswith("sharded") for r in e.rows)
    assert "GPUs" not in e.workload.describe()


def test_num_gpus_is_checked():
    with pytest.raises(ValueError, match="num_gpus"):
        Workload(num_gpus=9)
    with pytest.raises(ValueError, match="num_gpus"):
        Workload(num_gpus=0)
    with pytest.raises(TypeError, match="num_gpus"):
        Workload(num_gpus=2.0)
    with pytest.raises(ValueError, match="no collective model"):
        explain(Workload(num_gpus=2), "A100")
