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


def test_paper_like_span_rows_carry_the_spans_of_the_sequence_with_the_most_windows():
    from costmodel.gpus import get_gpu
    from costmodel.rows import predict_row
    from costmodel.span import WINDOW_ROWS

    gpu = get_gpu("h200")
    for case in bench.SPAN_GRID:
        indptr, spans = bench.span_case_spans(case)
        base = bench.span_base(case, indptr, spans)
        if case["pattern"] in ("intervals", "sinks_window"):
            assert "span_lens" not in base
            continue
        lens = [np.diff(spans[indptr[b]:indptr[b + 1]], axis=1).ravel() for b in range(bench.SPAN_BATCH)]
        windows = [int(np.ceil(seq / WINDOW_ROWS).sum()) for seq in lens]
        b = int(np.argmax(windows))
        assert base["span_lens"] == lens[b].tolist() and sum(base["span_lens"]) > 0
        # the model reads them: the row's windows are those of that sequence, not of equal spans
        row = {**base, "impl": "span", "layout": "windows"}
        equal = {k: v for k, v in row.items() if k != "span_lens"}
        if max(windows) > sum(-(-int(n) // WINDOW_ROWS) for n in
                              np.full(base["num_spans"], sum(base["span_lens"]) // base["num_spans"])):
            assert predict_row(row, gpu).time_s > predict_row(equal, gpu).time_s


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
    assert row.startswith("| 12.5% in 8 | 0.125 | 40.0 | 44.0 | 1.10x | 46.0 | 148.0 | 284.0 | 245.0 | 255.0 |")
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


@pytest.mark.parametrize("suite, rows", [("shared_prefix", lambda: _shared_prefix_rows()),
                                         ("span", lambda: _span_rows()),
                                         ("shared_prefix_papers", lambda: _papers_rows()),
                                         ("tree", lambda: _tree_rows())])
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


# --------------------------------------------------------------------------------------------
# The published shared-prefix settings and the tree suite (no GPU needed)


def test_shared_prefix_papers_grid_is_the_documented_one():
    section = _docs_section("Shared prefix")
    cells = re.findall(r"^\| `(\w+)` \| (\d+) \| ([\d, ]+) \| ([\d, ]+) \| (\d+) \|$", section, re.M)
    documented = [(setting, int(hkv), int(b), int(p), int(s))
                  for setting, hkv, batches, prefixes, s in cells
                  for b in batches.split(", ") for p in prefixes.split(", ")]
    assert documented == bench.SHARED_PREFIX_PAPERS_GRID
    assert len(bench.SHARED_PREFIX_PAPERS_GRID) == 12
    assert bench.shared_prefix_papers_grid(quick=True) == [("bifurcated_7b", 32, 16, 8192, 256),
                                                           ("hydragen_sweep", 8, 256, 1024, 128)]


def test_naive_is_skipped_only_where_its_copy_passes_the_limit():
    assert bench.naive_copy_bytes(8, 1024, 16384, 128) == 2 * 1024 * 16512 * 8 * 128 * 2
    skipped = [row for row in bench.SHARED_PREFIX_PAPERS_GRID if bench.naive_skip_reason(*row[1:])]
    assert skipped == [("hydragen_sweep", 8, 1024, 16384, 128)]
    assert "69.3 GB" in bench.naive_skip_reason(8, 1024, 16384, 128)
    assert not any(bench.naive_skip_reason(*row) for row in bench.SHARED_PREFIX_GRID)


def test_both_shared_prefix_suites_run_the_same_workload_rows(monkeypatch):
    # Both suites hand each workload to the one function that measures its rows.
    seen = []
    monkeypatch.setattr(bench, "_shared_prefix_workload_rows",
                        lambda timer, ceilings, gpu, base, failed: seen.append(base) or [base])
    monkeypatch.setattr(bench, "_progress", lambda msg: None)
    rows = bench.run_shared_prefix_suite(None, {}, None, quick=False)
    assert [(r["num_kv_heads"], r["batch"], r["prefix_len"], r["suffix_len"]) for r in rows] == \
        bench.SHARED_PREFIX_GRID
    assert {r["suite"] for r in rows} == {"shared_prefix"} and not any("setting" in r for r in rows)
    rows = bench.run_shared_prefix_papers_suite(None, {}, None, quick=False)
    assert [(r["setting"], r["num_kv_heads"], r["batch"], r["prefix_len"], r["suffix_len"]) for r in rows] == \
        bench.SHARED_PREFIX_PAPERS_GRID
    assert {r["suite"] for r in rows} == {"shared_prefix_papers"}
    assert all(r["num_qo_heads"] == 32 and r["head_dim"] == 128 for r in rows)
    assert rows[0]["unique_bytes"] == bench.shared_prefix_base(32, 16, 8192, 256)["unique_bytes"]


def test_tree_constants_are_the_documented_tree():
    section = " ".join(_docs_section("Tree").split())
    assert "64 sequences, MHA with 32 heads: a 4096-token root shared by all, 8 groups of 8 sequences " \
           "sharing 2048 more tokens each, 256 own tokens per sequence" in section
    assert (bench.TREE_BATCH, bench.TREE_KV_HEADS) == (64, 32)
    assert bench.TREE_LEVELS == ((1, 4096), (8, 2048), (64, 256))


def test_tree_layout_is_the_one_of_tree_from_paths():
    from refattn import tree_from_paths

    seg, path_indptr, path_segs = bench.tree_layout(bench.TREE_LEVELS, 64)
    lens = np.diff(seg)
    segs = [np.zeros((n, 1, 1), dtype=np.float16) for n in lens]
    paths = [path_segs[path_indptr[b]:path_indptr[b + 1]].tolist() for b in range(64)]
    _, _, seg2, indptr2, segs2 = tree_from_paths(segs, segs, paths)
    for ours, theirs in ((seg, seg2), (path_indptr, indptr2), (path_segs, segs2)):
        assert ours.dtype == np.int32 and np.array_equal(ours, theirs)
    assert lens.tolist() == [4096] + [2048] * 8 + [256] * 64 and seg[-1] == 36864
    assert paths[0] == [0, 1, 9] and paths[9] == [0, 2, 18] and paths[63] == [0, 8, 72]
    with pytest.raises(ValueError):
        bench.tree_layout(((1, 16), (3, 16)), 8)


def _pages_to_tokens(pages):
    return (np.asarray(pages)[:, None] * bench.PAGE_SIZE + np.arange(bench.PAGE_SIZE)).reshape(-1)


@pytest.mark.parametrize("num_levels", [3, 2, 1])
def test_flashinfer_tables_give_every_sequence_its_path_once(num_levels):
    batch = 64
    seg, path_indptr, path_segs = bench.tree_layout(bench.TREE_LEVELS, batch)
    cascade = bench.tree_cascade_requests(bench.TREE_LEVELS, batch, num_levels)
    assert len(cascade) == num_levels
    seen = [[] for _ in range(batch)]
    for level in cascade:
        qo, kv, indices, last = bench.paged_level_tables(level, seg)
        assert all(a.dtype == np.int32 for a in (qo, kv, indices, last))
        assert qo[0] == 0 and qo[-1] == batch and len(qo) == len(kv) == len(level) + 1
        assert np.all(last == bench.PAGE_SIZE) and kv[-1] == indices.size
        for r in range(len(level)):
            tokens = _pages_to_tokens(indices[kv[r]:kv[r + 1]])
            for b in range(qo[r], qo[r + 1]):
                seen[b].append(tokens)
    for b in range(batch):
        path = path_segs[path_indptr[b]:path_indptr[b + 1]]
        want = np.concatenate([np.arange(seg[s], seg[s + 1]) for s in path])
        assert np.array_equal(np.concatenate(seen[b]), want), f"sequence {b}"
    if num_levels == 3:   # the root for all 64, each group for its 8, each sequence's own
        assert [len(level) for level in cascade] == [1, 8, 64]
        assert [n for n, _ in cascade[1]] == [8] * 8
    if num_levels == 2:
        assert cascade[1][9] == (1, [2, 18])
    if num_levels == 1:
        assert bench.paged_level_tables(cascade[0], seg)[1][1] == (4096 + 2048 + 256) // bench.PAGE_SIZE


def test_paged_tables_refuse_segments_off_page_boundaries():
    with pytest.raises(ValueError):
        bench.paged_level_tables([(1, [0])], [0, 24])


def test_tree_base_counts_every_segment_once():
    base = bench.tree_base()
    assert base["suite"] == "tree" and base["levels"] == [[1, 4096], [8, 2048], [64, 256]]
    assert base["context_len"] == 6400
    assert base["unique_bytes"] == 2 * 36864 * 32 * 128 * 2 + 2 * 64 * 32 * 128 * 2
    assert base["flops"] == 4 * 64 * 32 * 6400 * 128
    assert bench.tree_label(base) == "4096 + 8x2048 + 64x256"
    assert bench.workload_label(base) == "4096 + 8x2048 + 64x256"


def test_the_cost_model_reads_the_rows_of_the_new_suites():
    from costmodel.gpus import get_gpu
    from costmodel.rows import predict_row

    gpu = get_gpu("h200")
    for setting, *grid_row in bench.SHARED_PREFIX_PAPERS_GRID:
        base = bench.shared_prefix_base(*grid_row, suite="shared_prefix_papers", setting=setting)
        for impl in ("shared_prefix:hydragen", "shared_prefix:bifurcated", "shared_prefix:naive"):
            assert predict_row({**base, "impl": impl}, gpu).time_s > 0
    assert predict_row({**bench.tree_base(), "impl": "tree", "chunk_size": 8192}, gpu).time_s > 0


def _papers_rows():
    rows = []
    for setting, *grid_row in (bench.SHARED_PREFIX_PAPERS_GRID[0], bench.SHARED_PREFIX_PAPERS_GRID[-1]):
        base = {**bench.shared_prefix_base(*grid_row, suite="shared_prefix_papers", setting=setting),
                "floor_ms": 0.04, "stream_ms": 0.060, "ceiling_ms": 0.062}
        if bench.naive_skip_reason(*grid_row):
            base["naive_skipped"] = bench.naive_skip_reason(*grid_row)
        rows += [
            {**base, "impl": "shared_prefix:hydragen", "time_ms": 0.070, "frac": 0.57, "host_us": 30.0},
            {**base, "impl": "shared_prefix:hydragen:oneshot", "time_ms": 0.072, "frac": 0.55, "host_us": 45.0},
            {**base, "impl": "shared_prefix:bifurcated", "time_ms": 0.100, "frac": 0.4, "host_us": 50.0},
            {**base, "impl": "peer:flashinfer_cascade", "time_ms": 0.180, "frac": 0.22, "host_us": 60.0},
        ]
        if "naive_skipped" not in base:
            rows.append({**base, "impl": "shared_prefix:naive", "time_ms": 0.500, "frac": 0.08, "host_us": 20.0})
    return rows


def test_papers_report_names_the_setting_and_the_speedups_over_naive():
    table = bench.format_markdown(_papers_rows()).splitlines()
    assert table[0].startswith("| setting | KV heads |") and "vs naive: hydragen / bifurcated" in table[0]
    assert len(table) == 4
    assert table[0].count("|") == table[1].count("|") == table[2].count("|") == table[3].count("|")
    bif = table[2]
    assert bif.startswith("| bifurcated_7b | 32 | 16 | 8192 | 256 | 60.0 | 62.0 | 70.0 | 1.13x |")
    assert "| 100.0 | 500.0 | 180.0 | - |" in bif and "| 7.14x / 5.00x | 30 / 45 / 60 / - |" in bif
    hyd = table[3]
    assert hyd.startswith("| hydragen_sweep | 8 | 1024 | 16384 | 128 |")
    assert "| skipped |" in hyd and "| - / - |" in hyd


def _tree_rows():
    base = {**bench.tree_base(), "stream_ms": 0.130, "ceiling_ms": 0.130, "floor_ms": 0.12}
    return [
        {**base, "impl": "tree", "time_ms": 1.300, "kernel_ms": 0.156, "frac": 0.09, "host_us": 1250.0,
         "chunk_size": 8192, "predicted_ms": 0.168},
        {**base, "impl": "tree:oneshot", "time_ms": 1.320, "frac": 0.09, "host_us": 1270.0},
        {**base, "impl": "tree:paged", "page_size": 16, "time_ms": 1.400, "frac": 0.08, "host_us": 30.0},
        {**base, "impl": "tree:naive", "time_ms": 0.700, "frac": 0.17, "host_us": 25.0},
        {**base, "impl": "peer:flashinfer_cascade3", "page_size": 16, "time_ms": 0.312, "frac": 0.38,
         "host_us": 90.0},
        {**base, "impl": "peer:flashinfer_cascade2", "page_size": 16, "time_ms": 0.260, "frac": 0.46,
         "host_us": 60.0},
        {**base, "impl": "peer:flashinfer_decode", "page_size": 16, "time_ms": 0.650, "frac": 0.18,
         "host_us": 30.0},
    ]


def test_tree_report_compares_the_call_and_its_kernels_with_the_ceiling_and_the_cascade():
    table = bench.format_markdown(_tree_rows()).splitlines()
    assert len(table) == 3 and table[0].count("|") == table[1].count("|") == table[2].count("|")
    assert "vs cascade 3" in table[0] and "kernels us" in table[0] and "host us" in table[0]
    row = table[2]
    assert row.startswith("| 4096 + 8x2048 + 64x256 | 64 | 32/32 | 130.0 | 130.0 | 1300.0 | 10.00x | 0.090 "
                          "| 156.0 | 1.20x | 1320.0 | 1400.0 | 700.0 | 312.0 | 260.0 | 650.0 |")
    assert "260.0 (FlashInfer cascade, 2 levels)" in row
    assert "| 0.24x | 0.20x | 2.00x | 168.0 |" in row
    assert row.endswith("| 1250 / 1270 / 90 / 60 / 30 |")


def test_printed_table_of_the_tree_names_the_levels():
    lines = bench.format_table(_tree_rows()).splitlines()
    assert "workload" in lines[0]
    ours = next(line for line in lines if " tree " in line)
    assert "4096 + 8x2048 + 64x256" in ours and "32/32" in ours and "168.0" in ours
    assert any("peer:flashinfer_cascade3" in line and "0.83x" in line for line in lines)


def test_suite_choices_include_the_tree_and_the_published_settings(capsys):
    assert {"tree", "shared_prefix_papers"} <= set(bench.SUITES)
    assert set(bench._WORKLOAD_SUITES) <= set(bench.SUITES)
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = capsys.readouterr().out
    assert "shared_prefix_papers" in text and "tree" in text


def test_gpu_check_takes_the_new_steps_only_when_named(tmp_path):
    import subprocess

    script = Path(bench.__file__).resolve().parent.parent / "scripts" / "gpu-check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    accepted = re.search(r"^  case \$s in ([\w|]+)\) ;;$", text, re.M).group(1).split("|")
    assert {"tree", "shared_prefix_papers"} <= set(accepted)
    benches = re.search(r"^  ([\w|]+)\)\n    step \"\$s benchmark\"", text, re.M).group(1).split("|")
    assert set(benches) == set(bench.SUITES) | {"end_to_end"}   # the decoder steps' own benchmark too
    default = re.search(r"steps=\(tests sanitizer\)\n.*steps\+=\(([\w ]+)\)", text).group(1).split()
    assert default == ["decode", "coverage"]
    # An unknown step is refused before anything runs, naming the new steps.
    run = subprocess.run(["bash", str(script), "no_such_step"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")}, cwd=tmp_path)
    assert run.returncode == 2 and "shared_prefix_papers" in run.stderr and "tree" in run.stderr


def test_report_of_the_end_to_end_and_distributed_files(capsys):
    """--report prints the committed end-to-end and two-GPU files with their own tables."""
    repo = Path(__file__).resolve().parent.parent
    assert bench.main(["--report", str(repo / "results" / "h200" / "end_to_end.json")]) == 0
    out = capsys.readouterr().out
    assert "model:shared_prefix" in out and "tok/s" in out and "oom" in out
    assert bench.main(["--report", str(repo / "results" / "h200x2" / "distributed.json")]) == 0
    out = capsys.readouterr().out
    assert "crossover, batch 1" in out and "larger than one GPU" in out
