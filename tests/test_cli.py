"""The `decode-attention` command: explain, accuracy, and the forwarded bench and verify."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from decode_attention import cli

REPO = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


def test_explain_builtin_example(capsys):
    code, out = run(capsys, "explain", "--no-gpu")
    assert code == 0
    assert "16 samples of one 8k-token prompt" in out and "sparse spans over a 32k-token context" in out
    for variant in ("decode", "split_kv", "paged_decode", "shared_prefix:hydragen",
                    "shared_prefix:bifurcated", "tree", "span"):
        assert variant in out
    assert "wins" in out and "x faster than decode" in out
    assert "NumPy references at a reduced size" in out
    assert out.count("the variants agree with decode") == 2
    assert "no GPU: predictions only" in out


def test_explain_custom_workload(capsys):
    code, out = run(capsys, "explain", "--no-gpu", "--no-reference", "--batch", "1", "--kv-len", "65536",
                    "--gpu", "H200")
    assert code == 0
    assert "NVIDIA H200" in out and "split_kv wins" in out
    assert "shared_prefix" not in out and "NumPy references" not in out


def test_explain_shared_prefix_from_options(capsys):
    code, out = run(capsys, "explain", "--no-gpu", "--batch", "8", "--prefix-len", "1000",
                    "--suffix-len", "50", "--num-qo-heads", "28", "--num-kv-heads", "4", "--head-dim", "64",
                    "--density", "0.5")
    assert code == 0
    assert "28 query heads, 4 KV heads, head_dim 64" in out and "span" in out and "tree" in out
    assert "the variants agree with decode" in out


def test_explain_rejects_inconsistent_lengths(capsys):
    with pytest.raises(SystemExit, match="--kv-len must equal"):
        cli.main(["explain", "--kv-len", "100", "--prefix-len", "60", "--suffix-len", "10"])
    with pytest.raises(SystemExit, match="multiple"):
        cli.main(["explain", "--num-qo-heads", "30", "--num-kv-heads", "8"])


def test_reference_check_catches_nothing_on_agreeing_references():
    w = cli.reduced_workload(cli.builtin_workloads()[0])
    assert (w.batch, w.num_kv_heads, w.head_dim, w.prefix_len, w.suffix_len) == (4, 2, 32, 192, 37)
    diffs = cli.reference_check(w, seed=3)
    assert {name for name, *_ in diffs} == {"split_kv", "paged_decode", "shared_prefix:hydragen",
                                            "shared_prefix:bifurcated", "tree"}
    assert max(max(d_out, d_lse) for _, d_out, d_lse in diffs) < cli.AGREEMENT_ATOL


def test_equal_spans_cover_the_density():
    w = cli.Workload(batch=3, prefix_len=0, suffix_len=1000, density=0.25, num_spans=4)
    span_indptr, spans = cli._equal_spans(w)
    assert span_indptr.tolist() == [0, 4, 8, 12] and spans.dtype == np.int32
    lengths = spans[:, 1] - spans[:, 0]
    assert lengths.sum() == 3 * 248 and np.all(spans[1:4, 0] >= spans[0:3, 1])


def test_accuracy_without_results(capsys, tmp_path):
    code, out = run(capsys, "accuracy", "--results", str(tmp_path), "--check")
    assert code == 0 and "no committed results" in out


def test_accuracy_on_synthetic_results(capsys, tmp_path):
    from test_costmodel_accuracy import META, measure_synthetically, other_rows, write_results

    write_results(tmp_path, "span", measure_synthetically(other_rows()[3:5], bias=1.0, noise=0.0))
    code, out = run(capsys, "accuracy", "--results", str(tmp_path))
    assert code == 0 and "span" in out and "median" in out
    write_results(tmp_path, "span", measure_synthetically(other_rows()[3:5], bias=2.0))
    code, out = run(capsys, "accuracy", "--results", str(tmp_path), "--check")
    assert code == 1 and "MISSED" in out
    assert json.loads((tmp_path / "h100" / "span.json").read_text())["meta"] == META


def test_bench_and_verify_forward_their_arguments(monkeypatch):
    seen = {}
    for name in ("bench", "verify"):
        fake = types.ModuleType(f"gpukernels.{name}")
        fake.main = lambda argv, name=name: seen.setdefault(name, argv) and 0
        monkeypatch.setitem(sys.modules, f"gpukernels.{name}", fake)
    assert cli.main(["bench", "--suite", "decode", "--help"]) == 0
    assert cli.main(["verify", "-k", "split"]) == 0
    assert seen == {"bench": ["--suite", "decode", "--help"], "verify": ["-k", "split"]}


def test_forwarding_without_the_module_says_why(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gpukernels.bench", None)     # makes the import fail
    assert cli.main(["bench"]) == 2
    assert "cannot load gpukernels.bench.main" in capsys.readouterr().err


def test_python_dash_m_runs_the_command():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "decode_attention", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("explain", "accuracy", "bench", "verify"):
        assert command in done.stdout
