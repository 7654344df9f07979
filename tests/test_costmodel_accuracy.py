"""Calibration and the accuracy report: the machinery on synthetic result files written here (every
time in them is made up: the model's own prediction under chosen constants, times noise), and the
targets on the committed results/ when there are any."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from costmodel import accuracy as acc
from costmodel.calibrate import fit_calibration, fit_results, nelder_mead
from costmodel.calibration import Calibration, load_calibration, save_calibration
from costmodel.gpus import get_gpu
from costmodel.rows import UnsupportedRow, predict_row
from costmodel.split_kv import plan_split_kv

REPO = Path(__file__).resolve().parent.parent
H100 = get_gpu("H100")
# The constants the synthetic "measurements" are made with: deliberately not the defaults.
SYNTHETIC_TRUTH = Calibration(launch_s=4.5e-6, block_round_trip_s=2.0e-6, block_bytes_per_s=2.2e10,
                              bw_fraction=1.03, blocks_per_sm=4, source="synthetic")
META = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "synthetic", "cuda": "synthetic", "cupy": "synthetic",
        "commit": "synthetic", "date": "synthetic", "command": "written by tests/test_costmodel_accuracy.py",
        "copy_bytes_per_s": 3.0e12, "read_bytes_per_s": 3.1e12, "matmul_flops_per_s": 7.35e14}
COMMON = {"dtype": "float16", "num_qo_heads": 32, "head_dim": 128}


def decode_rows():
    rows = []
    for batch, hkv, n in [(1, 8, 4096), (1, 8, 32768), (1, 8, 131072), (1, 32, 32768), (8, 8, 32768),
                          (64, 8, 16384), (16, 32, 8192)]:
        plan = plan_split_kv(batch, 32, hkv, 128, n)
        rows.append({"suite": "decode", "impl": "split_kv", "batch": batch, "num_kv_heads": hkv,
                     "kv_len": n, "num_splits": plan.num_splits, "chunk_size": plan.chunk_size, **COMMON})
        rows.append({"suite": "decode", "impl": "decode", "batch": batch, "num_kv_heads": hkv,
                     "kv_len": n, "num_splits": 1, "chunk_size": plan_split_kv(batch, 32, hkv, 128, n, num_splits=1).chunk_size,
                     **COMMON})
        rows.append({"suite": "decode", "impl": "peer:cudnn", "batch": batch, "num_kv_heads": hkv,
                     "kv_len": n, **COMMON})
    return rows


def other_rows():
    return [
        {"suite": "shared_prefix", "impl": "shared_prefix:hydragen", "batch": 16, "num_kv_heads": 32,
         "prefix_len": 8192, "suffix_len": 256, **COMMON},
        {"suite": "shared_prefix", "impl": "shared_prefix:bifurcated", "batch": 32, "num_kv_heads": 32,
         "prefix_len": 8192, "suffix_len": 256, **COMMON},
        {"suite": "tree", "impl": "tree", "batch": 64, "num_kv_heads": 32,
         "levels": [[1, 4096], [8, 2048], [64, 256]], **COMMON},
        {"suite": "span", "impl": "span", "batch": 8, "num_kv_heads": 8, "kv_len": 32768,
         "density": 0.25, "num_spans": 16, **COMMON},
        {"suite": "span", "impl": "span:sinks_window", "batch": 8, "num_kv_heads": 8, "kv_len": 32768,
         "num_sinks": 4, "window": 4096, **COMMON},
        {"suite": "paged", "impl": "paged_decode", "batch": 8, "num_kv_heads": 8, "kv_len": 8000,
         "page_size": 16, **COMMON},
    ]


def measure_synthetically(rows, *, noise=0.02, bias=1.0, seed=0):
    rng = np.random.default_rng(seed)
    gpu = acc.gpu_for_meta(META)
    out = []
    for row in rows:
        row = dict(row)
        t = (SYNTHETIC_TRUTH.launch_s * 10 if row["impl"].startswith("peer:")
             else predict_row(row, gpu, calibration=SYNTHETIC_TRUTH).time_s)
        row["time_ms"] = t * 1e3 * bias * float(np.exp(rng.normal(0.0, noise)))
        out.append(row)
    return out


def write_results(root: Path, suite: str, rows, meta=META) -> Path:
    path = root / "h100" / f"{suite}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return path


def test_nelder_mead_finds_a_quadratic_minimum():
    x, f = nelder_mead(lambda x: float(np.sum((x - np.array([1.0, -2.0, 0.5])) ** 2)), [0, 0, 0], max_evals=600)
    assert f < 1e-6 and np.allclose(x, [1.0, -2.0, 0.5], atol=1e-3)


def test_fit_on_decode_then_validate_on_the_other_suites(tmp_path):
    write_results(tmp_path, "decode", measure_synthetically(decode_rows(), seed=1))
    for suite in ("shared_prefix", "tree", "span", "paged"):
        rows = [r for r in other_rows() if r["suite"] == suite]
        write_results(tmp_path, suite, measure_synthetically(rows, seed=2))
    files = acc.load_results(tmp_path)
    assert {f.suite for f in files} == {"decode", "shared_prefix", "tree", "span", "paged"}

    before, _ = acc.row_errors(files, calibration=dataclasses.replace(SYNTHETIC_TRUTH, launch_s=1.5e-5))
    (fitted,) = fit_results(tmp_path, max_evals=120).values()
    assert "fitted on 14 decode rows" in fitted.source
    errors, unsupported = acc.row_errors(files, calibration=fitted)
    assert not unsupported
    assert all(not e.impl.startswith("peer:") for e in errors) and len(errors) == 14 + 6
    summary = {s.suite: s for s in acc.summarize(errors)}
    assert set(summary) == {"decode", "shared_prefix", "tree", "span", "paged", "all"}
    assert summary["all"].meets_target, summary
    assert summary["all"].median < np.median([e.rel_error for e in before])
    speedups = acc.speedup_errors(errors)
    assert {(e.impl, e.baseline) for e in speedups} == {("split_kv", "decode")}
    assert len(speedups) == 7 and all(e.rel_error < acc.SPEEDUP_TARGET for e in speedups)
    text = acc.format_report(list(summary.values()), unsupported, speedups=speedups)
    assert "decode" in text and "median" in text and "7 of 7" in text and "MISSED" not in text


def test_a_wrong_model_misses_the_target(tmp_path):
    write_results(tmp_path, "span", measure_synthetically(other_rows()[3:5], bias=1.5))
    errors, _ = acc.row_errors(acc.load_results(tmp_path), calibration=SYNTHETIC_TRUTH)
    (span, overall) = acc.summarize(errors)
    assert not span.meets_target and span.median == pytest.approx(0.5 / 1.5, rel=0.1)
    assert "MISSED" in acc.format_report([span, overall])


def test_rows_the_model_cannot_read_are_reported(tmp_path):
    rows = [{"suite": "decode", "impl": "split_kv", "batch": 1, **COMMON, "time_ms": 0.1},   # no kv_len
            {"suite": "decode", "impl": "warp_decode", "batch": 1, "num_kv_heads": 8, "kv_len": 10,
             **COMMON, "time_ms": 0.1}]
    write_results(tmp_path, "decode", rows)
    errors, unsupported = acc.row_errors(acc.load_results(tmp_path))
    assert errors == [] and len(unsupported) == 2
    assert "lacks num_kv_heads" in unsupported[0][2] and "unknown variant" in unsupported[1][2]


def test_predict_row_rejects_peers():
    with pytest.raises(UnsupportedRow, match="peer"):
        predict_row({"impl": "peer:flashinfer", **COMMON}, H100)


def test_predict_row_runs_the_plan_the_row_names():
    row = {"impl": "split_kv", "batch": 1, "num_kv_heads": 8, "kv_len": 32768, "num_splits": 5,
           "chunk_size": 6592, **COMMON}
    p = predict_row(row, H100)
    assert p.num_blocks == 5 * 8
    odd = predict_row({**row, "chunk_size": 4096}, H100)     # a chunk size the plan would not pick
    assert odd.num_blocks == 8 * 8


def test_save_calibration_keeps_other_entries(tmp_path):
    path = tmp_path / "calibration.json"
    save_calibration("h100_sxm", SYNTHETIC_TRUTH, path=path)
    save_calibration("h200", dataclasses.replace(SYNTHETIC_TRUTH, launch_s=1e-6), path=path)
    assert load_calibration("h100_sxm", path=path) == SYNTHETIC_TRUTH
    assert load_calibration("h200", path=path).launch_s == 1e-6
    assert load_calibration("a100_80gb", path=path) == Calibration()


def test_fit_recovers_the_constants_that_made_the_data():
    gpu = acc.gpu_for_meta(META)
    samples = [(r, gpu, r["time_ms"] * 1e-3) for r in measure_synthetically(decode_rows(), noise=0.0)
               if not r["impl"].startswith("peer:")]
    start = dataclasses.replace(SYNTHETIC_TRUTH, block_bytes_per_s=4e10, bw_fraction=0.9, launch_s=3e-6)
    cal, loss = fit_calibration(samples, start=start, blocks_per_sm_choices=(4,), max_evals=300)
    assert loss < 1e-4
    assert cal.bw_fraction == pytest.approx(SYNTHETIC_TRUTH.bw_fraction, rel=0.03)
    assert cal.block_bytes_per_s == pytest.approx(SYNTHETIC_TRUTH.block_bytes_per_s, rel=0.1)


def test_empty_results_directory(tmp_path):
    assert acc.load_results(tmp_path) == []
    assert acc.load_results(tmp_path / "missing") == []
    (tmp_path / "h100").mkdir()
    (tmp_path / "h100" / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a result file"):
        acc.load_results(tmp_path)


# Suites whose predictions the project claims to meet the targets (README, docs/benchmarks.md). The
# shared-prefix, span and tree suites are predicted as the fused launches of the cost model, which
# the kernels do not yet match; their accuracy is reported, not held.
TARGET_SUITES = ("decode", "coverage")


# Speedups the model is known to miss, each with what was measured. A known gap must still miss
# (once the model predicts it, this test fails until the entry is removed), and nothing else may.
# paged_decode over decode at 1 x 32/8 heads x 32k on H200: the model puts the plan's 32 splits
# (and every count from 16 up, contiguous too) 11-15% fast, where 1-8 splits, 4k and 128k tokens
# are within 3%; measured 7.10x and 7.21x in two runs (`results/h200/decode.json`).
KNOWN_SPEEDUP_GAPS = {
    ("decode", "paged_decode", "decode", ("h200", ("dtype", "float16"), ("batch", 1), ("num_qo_heads", 32),
                                         ("num_kv_heads", 8), ("head_dim", 128), ("kv_len", 32768))),
}


def test_committed_results_meet_the_targets():
    files = acc.load_results(REPO / "results")
    errors, unsupported = acc.row_errors(files)
    if not errors and not unsupported:
        pytest.skip("no committed results of this project's variants under results/ yet")
    assert not unsupported, f"rows the model cannot predict: {unsupported}"
    held = [e for e in errors if e.suite in TARGET_SUITES]
    summary, speedups = acc.summarize(held), acc.speedup_errors(held)
    missed = [s for s in summary if not s.meets_target]
    gaps = {e for e in speedups if (e.suite, e.impl, e.baseline, e.workload) in KNOWN_SPEEDUP_GAPS}
    missed += [e for e in speedups if e.rel_error > acc.SPEEDUP_TARGET and e not in gaps]
    assert not missed, "\n" + acc.format_report(summary, speedups=speedups)
    still = {(e.suite, e.impl, e.baseline, e.workload) for e in gaps if e.rel_error > acc.SPEEDUP_TARGET}
    assert still == KNOWN_SPEEDUP_GAPS, f"known gaps no longer missed (remove them): {KNOWN_SPEEDUP_GAPS - still}"
    assert {s.suite for s in summary} >= set(TARGET_SUITES)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a result file (not JSON: "),
    ("[1, 2]", "got a JSON list"),
    ('{"meta": {}, "rows": {"impl": "decode"}}', "got an object with keys ['meta', 'rows']"),
    ('{"meta": [], "rows": []}', "meta is a list, expected an object"),
    ('{"rows": [{"impl": "decode"}, "x"]}', "rows[1] is 'x', not an object"),
])
def test_read_result_file_says_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "decode.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="not a result file") as exc:
        acc.read_result_file(path)
    assert str(path) in str(exc.value) and message in str(exc.value)
    with pytest.raises(FileNotFoundError):
        acc.read_result_file(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="is a directory, not a result file"):
        acc.read_result_file(tmp_path)


def test_read_result_file_reads_a_committed_result():
    f = acc.read_result_file(REPO / "results" / "h200" / "decode.json")
    assert (f.gpu_slug, f.suite) == ("h200", "decode") and f.rows and "gpu" in f.meta


def test_fitted_calibration_never_falls_back_to_the_defaults(tmp_path):
    path = tmp_path / "calibration.json"
    save_calibration("h100_sxm", SYNTHETIC_TRUTH, path=path)
    assert acc.fitted_calibration("H100", path=path) == SYNTHETIC_TRUTH
    assert acc.fitted_calibration(H100, path=path) == SYNTHETIC_TRUTH
    with pytest.raises(ValueError, match="no constants fitted for h200 .*fitted: h100_sxm"):
        acc.fitted_calibration("h200", path=path)
    with pytest.raises(ValueError, match="unknown GPU"):
        acc.fitted_calibration("B300", path=path)


def test_another_gpus_constants_on_synthetic_results(tmp_path):
    """Results of a second GPU made with other constants: the first GPU's constants predict them
    worse than their own, and only the second GPU's files are scored."""
    h200_meta = {**META, "gpu": "NVIDIA H200", "copy_bytes_per_s": 4.3e12, "read_bytes_per_s": 4.4e12}
    write_results(tmp_path, "decode", measure_synthetically(decode_rows(), noise=0.0))
    other = dataclasses.replace(SYNTHETIC_TRUTH, launch_s=9e-6, bw_fraction=0.9)
    gpu = acc.gpu_for_meta(h200_meta)
    rows = []
    for row in decode_rows():
        if not row["impl"].startswith("peer:"):
            rows.append({**row, "time_ms": predict_row(row, gpu, calibration=other).time_s * 1e3})
    (tmp_path / "h200").mkdir()
    (tmp_path / "h200" / "decode.json").write_text(json.dumps({"meta": h200_meta, "rows": rows}))
    files = acc.load_results(tmp_path)
    others = acc.results_of_other_gpus(files, "H100")
    assert [f.gpu_slug for f in others] == ["h200"]
    assert [f.gpu_slug for f in acc.results_of_other_gpus(files, "h200")] == ["h100"]
    own, _ = acc.row_errors(others, calibration=other)
    transferred, _ = acc.row_errors(others, calibration=SYNTHETIC_TRUTH)
    assert max(e.rel_error for e in own) < 1e-9
    assert acc.summarize(transferred)[-1].median > 0.01
