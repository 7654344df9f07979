"""The benchmark's host-side pieces, on a machine with no GPU: the source digest and the table."""

import re

from gpukernels import bench


def test_source_digest_is_stable_hex():
    first = bench.source_digest()
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert bench.source_digest() == first


def test_source_digest_follows_the_sources(tmp_path, monkeypatch):
    # A copy of one package with one byte changed must give another digest.
    import shutil
    from pathlib import Path

    root = Path(bench.__file__).resolve().parent.parent
    for pkg in ("decode_attention", "refattn", "costmodel", "gpukernels"):
        shutil.copytree(root / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "gpukernels" / "bench.py"))
    same = bench.source_digest()
    assert same == bench.source_digest()
    kernel = tmp_path / "gpukernels" / "cuda" / "split_kv.cu"
    kernel.write_text(kernel.read_text() + "\n")
    assert bench.source_digest() != same


def test_table_compares_each_row_with_the_best_peer():
    base = {"batch": 1, "num_kv_heads": 8, "kv_len": 4096, "floor_ms": 0.005, "stream_ms": 0.012}
    rows = [
        {**base, "impl": "split_kv", "num_splits": 8, "plan": "auto", "time_ms": 0.015, "frac": 0.33,
         "predicted_ms": 0.016, "host_us": 40.0},
        {**base, "impl": "peer:cudnn", "time_ms": 0.018, "frac": 0.28, "host_us": 42.0},
        {**base, "impl": "peer:naive", "time_ms": 0.170, "frac": 0.03, "host_us": 250.0},
    ]
    table = bench.format_table(rows).splitlines()
    assert "read us" in table[0]
    ours = next(line for line in table if "split_kv /8 *" in line)
    assert "1.20x" in ours and "12.0" in ours
    assert "1.00x" in next(line for line in table if "peer:cudnn" in line)


def test_coverage_grid_covers_what_it_claims():
    grid = bench.COVERAGE_GRID
    assert {row[0] for row in grid} == {"float16", "bfloat16"}
    assert {row[4] for row in grid} == {64, 128, 256}
    assert {row[2] // row[3] for row in grid} >= {1, 4, 5, 7, 8}
    kv_heads = {row[3] for row in grid}
    assert 1 in kv_heads and 32 in kv_heads
    assert min(row[1] for row in grid) == 1 and max(row[1] for row in grid) == 128
    assert max(row[5] for row in grid) >= 300_000
    assert sum(row[5] % 2 for row in grid) >= 5, "odd lengths"


def _coverage_rows():
    base = {"suite": "coverage", "dtype": "bfloat16", "batch": 2, "num_qo_heads": 16, "num_kv_heads": 2,
            "head_dim": 256, "kv_len": 333333, "floor_ms": 0.1, "stream_ms": 0.163}
    return [
        {**base, "impl": "split_kv", "plan": "auto", "num_splits": 66, "time_ms": 0.1834, "host_us": 17.0},
        {**base, "impl": "split_kv:oneshot", "num_splits": 66, "time_ms": 0.1840, "host_us": 36.0},
        {**base, "impl": "peer:cudnn", "time_ms": 0.2162, "host_us": 48.0},
        {**base, "impl": "peer:flash", "time_ms": 0.2154, "host_us": 47.0},
    ]


def test_coverage_report_compares_planned_and_one_shot_with_the_best_peer():
    table = bench.format_markdown(_coverage_rows()).splitlines()
    assert "one-shot" in table[0] and "host us" in table[0]
    row = table[2]
    assert "| bfloat16 | 2 | 16/2 | 256 | 333333 |" in row
    assert "215.4 (flash)" in row and "1.17x" in row and "36 / 47" in row


def test_report_of_a_missing_or_malformed_file_is_one_line(tmp_path, capsys):
    assert bench.main(["--report", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert bench.main(["--report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not a result file" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# Shared-prefix and span suites: their grids, span lists, row keys and tables (no GPU needed)

import json
from pathlib import Path

import numpy as np
import pytest

DOCS = Path(bench.__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def _docs_section(title: str) -> str:
    text = DOCS.read_text()
    start = text.index(f"### {title}\n")
    end = text.find("\n### ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_shared_prefix_grid_is_the_documented_one():
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", _docs_section("Shared prefix"), re.M)
    assert [tuple(map(int, r)) for r in rows] == bench.SHARED_PREFIX_GRID
    assert len(bench.SHARED_PREFIX_GRID) == 8


def test_span_grid_holds_every_documented_row():
    section = _docs_section("Span")
    intervals = {(float(p) / 100, int(n)) for p, n in re.findall(r"(\d+(?:\.\d+)?)% .*?in (\d+) intervals", section)}
    assert len(intervals) == 4
    grid = bench.SPAN_GRID
    ours = {(c["density"], c["num_spans"]) for c in grid if c["pattern"] == "intervals"}
    assert intervals == ours
    sinks, window = map(int, re.search(r"(\d+) sinks \+ a (\d+)-token window", section).groups())
    assert {"pattern": "sinks_window", "num_sinks": sinks, "window": window} in grid
    assert {"pattern": "arithmetic", "density": 0.1} in grid
    assert {"pattern": "summarization", "density": 0.1} in grid
    assert "Batch 8, 8 KV heads, kv_len 32768" in section
    assert (bench.SPAN_BATCH, bench.SPAN_KV_HEADS, bench.SPAN_KV_LEN) == (8, 8, 32768)


@pytest.mark.parametrize("density, num_spans", [(0.125, 8), (0.25, 16), (0.5, 64), (0.75, 96)])
def test_interval_spans_are_exact_aligned_apart_and_seeded(density, num_spans):
    from decode_attention.contract import check_spans

    batch, kv_len = 8, 32768
    indptr, spans = bench.interval_spans(batch, kv_len, density, num_spans)
    assert indptr.dtype == np.int32 and spans.dtype == np.int32
    check_spans(indptr, spans, batch, kv_len)
    assert np.array_equal(indptr, np.arange(batch + 1) * num_spans)
    lens = spans[:, 1] - spans[:, 0]
    assert np.all(lens == density * kv_len / num_spans)
    assert np.all(spans % bench.SPAN_ALIGN == 0)
    per_seq = spans.reshape(batch, num_spans, 2)
    assert np.all(per_seq[:, 1:, 0] > per_seq[:, :-1, 1]), "spans of a sequence never touch"
    mask = bench.span_token_mask(indptr, spans, batch, kv_len)
    assert np.all(mask.sum(axis=1) == density * kv_len)
    again = bench.interval_spans(batch, kv_len, density, num_spans)
    assert np.array_equal(spans, again[1]), "the same seed gives the same spans"
    assert not np.array_equal(per_seq[0], per_seq[1]), "each sequence its own places"
    other = bench.interval_spans(batch, kv_len, density, num_spans, seed=1)[1]
    assert not np.array_equal(spans, other)


def test_interval_spans_refuse_what_does_not_fit():
    with pytest.raises(ValueError):
        bench.interval_spans(1, 1000, 0.1, 3)          # 100 tokens in 3 spans of whole blocks
    with pytest.raises(ValueError):
        bench.interval_spans(1, 64, 0.75, 3)           # 3 spans of 16 cannot stay apart in 64


def test_every_span_case_is_a_valid_seeded_list_with_its_density():
    from decode_attention.contract import check_spans

    for case in bench.SPAN_GRID:
        indptr, spans = bench.span_case_spans(case)
        check_spans(indptr, spans, bench.SPAN_BATCH, bench.SPAN_KV_LEN)
        again = bench.span_case_spans(case)
        assert np.array_equal(indptr, again[0]) and np.array_equal(spans, again[1])
        base = bench.span_base(case, indptr, spans)
        mask = bench.span_token_mask(indptr, spans, bench.SPAN_BATCH, bench.SPAN_KV_LEN)
        attended = int(mask.sum())
        assert base["density"] == pytest.approx(attended / (8 * 32768))
        assert base["unique_bytes"] == 2 * attended * 8 * 128 * 2 + 2 * 8 * 32 * 128 * 2
        assert base["flops"] == 4 * 32 * attended * 128
        if case["pattern"] != "sinks_window":
            assert base["density"] == pytest.approx(case["density"], abs=1e-4)
    indptr, spans = bench.span_case_spans({"pattern": "sinks_window", "num_sinks": 4, "window": 4096})
    assert spans.reshape(8, 2, 2).tolist() == [[[0, 4], [28672, 32768]]] * 8


def test_block_coverage_and_the_block_sparse_matrix():
    mask = np.zeros((2, 40), dtype=bool)
    mask[0, 3:5] = True        # block 0 (of 16)
    mask[0, 33:35] = True      # block 2 (the short last one)
    mask[1, 16:32] = True      # block 1 exactly
    blocks = bench.covered_blocks(mask, 16)
    assert blocks.tolist() == [[True, False, True], [False, True, False]]
    assert bench.covered_tokens(mask, 16) == 16 + 8 + 16
    indptr, indices = bench.bsr_from_blocks(blocks)
    assert indptr.tolist() == [0, 2, 3] and indices.tolist() == [0, 2, 4]
    assert indptr.dtype == np.int32 and indices.dtype == np.int32


def test_shared_prefix_sizes_count_the_prefix_once():
    unique, kv, flops = bench.shared_prefix_sizes(8, 16, 8192, 256)
    assert kv == 2 * (8192 + 16 * 256) * 8 * 128 * 2
    assert unique == kv + 2 * 16 * 32 * 128 * 2
    assert flops == 4 * 16 * 32 * (8192 + 256) * 128


def test_the_cost_model_reads_the_rows_the_suites_write():
    from costmodel.gpus import get_gpu
    from costmodel.rows import predict_row

    gpu = get_gpu("h200")
    for grid_row in bench.SHARED_PREFIX_GRID:
        base = bench.shared_prefix_base(*grid_row)
        for impl in ("shared_prefix:hydragen", "shared_prefix:naive"):
            assert predict_row({**base, "impl": impl}, gpu).time_s > 0
        assert predict_row({**base, "impl": "shared_prefix:hydragen", "prefix_chunk_size": 512}, gpu).time_s > 0
    for case in bench.SPAN_GRID:
        base = bench.span_base(case, *bench.span_case_spans(case))
        for impl in ("span", "span:table", "split_kv"):
            assert predict_row({**base, "impl": impl}, gpu).time_s > 0


def _shared_prefix_rows():
    base = {**bench.shared_prefix_base(32, 16, 8192, 256), "floor_ms": 0.04, "stream_ms": 0.060,
            "ceiling_ms": 0.062}
    rows = [
        {**base, "impl": "shared_prefix:hydragen", "time_ms": 0.070, "frac": 0.57, "host_us": 30.0,
         "predicted_ms": 0.065, "prefix_chunk_size": 512},
        {**base, "impl": "shared_prefix:hydragen:oneshot", "time_ms": 0.072, "frac": 0.55, "host_us": 45.0},
        {**base, "impl": "shared_prefix:naive", "time_ms": 0.500, "frac": 0.08, "host_us": 20.0},
        {**base, "impl": "peer:flashinfer_cascade", "time_ms": 0.180, "frac": 0.22, "host_us": 60.0},
        {**base, "impl": "peer:flashinfer_decode_prefix_pages", "time_ms": 0.263, "frac": 0.15, "host_us": 25.0},
    ]
    gqa = {**bench.shared_prefix_base(8, 16, 8192, 256), "floor_ms": 0.02, "stream_ms": 0.03}
    rows += [   # no Hydragen row (it failed): the peers' line still shows
        {**gqa, "impl": "peer:flashinfer_cascade", "time_ms": 0.199, "frac": 0.1, "host_us": 61.0},
        {**gqa, "impl": "peer:flashinfer_decode_prefix_pages", "time_ms": 0.073, "frac": 0.27, "host_us": 26.0},
    ]
    return rows


def test_shared_prefix_report_compares_hydragen_with_its_ceiling_and_flashinfer():
    table = bench.format_markdown(_shared_prefix_rows()).splitlines()
    assert "hydragen us" in table[0] and "vs cascade" in table[0] and "host us" in table[0]
    assert table[0].count("|") == table[1].count("|") == table[2].count("|") == table[3].count("|")
    mha = table[2]
    assert mha.startswith("| 32 | 16 | 8192 | 256 | 60.0 | 62.0 | 70.0 | 1.13x | 0.570 | 72.0 | - | 500.0 | 180.0 | 263.0 |")
    assert "180.0 (FlashInfer cascade)" in mha and "| 2.57x | 2.57x |" in mha and "30 / 45 / 60 / 25 |" in mha
    gqa = table[3]
    assert gqa.startswith("| 8 | 16 | 8192 | 256 |") and "73.0 (FlashInfer decode, prefix pages)" in gqa
    assert "| - | - |" in gqa


def _span_rows():
    case = bench.SPAN_GRID[0]
    base = {**bench.span_base(case, *bench.span_case_spans(case)), "floor_ms": 0.03, "stream_ms": 0.040,
            "ceiling_ms": 0.040}
    return [
        {**base, "impl": "span", "page_size": 16, "time_ms": 0.044, "frac": 0.68, "host_us": 80.0,
         "predicted_ms": 0.042},
        {**base, "impl": "span:oneshot", "page_size": 16, "time_ms": 0.046, "frac": 0.65, "host_us": 95.0},
        {**base, "impl": "span:table", "page_size": 16, "time_ms": 0.043, "frac": 0.70, "host_us": 20.0},
        {**base, "impl": "split_kv", "dense": True, "plan": "auto", "num_splits": 8, "time_ms": 0.245,
         "frac": 0.12, "host_us": 18.0},
        {**base, "impl": "peer:cudnn", "dense": True, "time_ms": 0.255, "frac": 0.12, "host_us": 40.0},
        {**base, "impl": "peer:flex_block_mask", "block_size": 128, "q_rows": 1, "time_ms": 0.284,
         "frac": 0.1, "host_us": 70.0},
        {**base, "impl": "peer:flashinfer_block_sparse", "block_size": 16, "time_ms": 0.148, "frac": 0.2,
         "host_us": 35.0},
    ]


def test_span_report_compares_span_with_read_only_sparse_peers_and_dense():
    table = bench.format_markdown(_span_rows()).splitlines()
    assert "vs read-only" in table[0] and "dense cuDNN us" in table[0] and "host us" in table[0]
    assert table[0].count("|") == table[1].count("|") == table[2].count("|")
    row = table[2]
    assert row.startswith("| 12.5% in 8 | 0.125 | 40.0 | 44.0 | 1.10x | 46.0 | 43.0 | 148.0 | 284.0 | 245.0 | 255.0 |")
    assert "148.0 (FlashInfer block-sparse)" in row
    assert "| 3.36x | 3.36x / 6.45x | 5.57x |" in row
    assert row.endswith("| 80 / 95 / 35 / 70 / 40 |")


def test_span_labels():
    assert bench.span_label({"pattern": "intervals", "density": 0.25, "num_spans": 16}) == "25% in 16"
    assert bench.span_label({"pattern": "sinks_window", "num_sinks": 4, "window": 4096,
                             "density": 0.125}) == "4 sinks + 4096 window"
    assert bench.span_label({"pattern": "summarization", "density": 0.100006}) == "summarization 10%"


def test_printed_table_of_the_new_suites_names_each_workload():
    lines = bench.format_table(_shared_prefix_rows()).splitlines()
    assert "workload" in lines[0] and "read us" in lines[0]
    ours = next(line for line in lines if "shared_prefix:hydragen " in line)
    assert "8192+256" in ours and "2.57x" in ours and "65.0" in ours
    lines = bench.format_table(_span_rows()).splitlines()
    assert any("12.5% in 8" in line and "split_kv (dense)" in line for line in lines)
    assert "3.36x" in next(line for line in lines if " span " in line)


@pytest.mark.parametrize("suite, rows", [("shared_prefix", _shared_prefix_rows), ("span", _span_rows)])
def test_report_of_a_new_suite_file(tmp_path, capsys, suite, rows):
    path = tmp_path / "h200" / f"{suite}.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"meta": {"gpu": "NVIDIA H200"}, "rows": rows()}))
    assert bench.main(["--report", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| ") and len(out) == len(bench._by_workload(rows())) + 2


def test_suite_choices_include_the_new_suites(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = capsys.readouterr().out
    assert "shared_prefix" in text and "span" in text
