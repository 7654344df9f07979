"""`explain` ranks the variants and says why; `papers` reproduces the published claims' trends."""

import pytest

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
    assert "measured" in text and "100.0us" in text and e.why in text


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
    assert 1 - hyd[-1] / hyd[0] < 0.25               # published: under 15%
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
