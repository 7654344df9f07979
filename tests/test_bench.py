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
