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
