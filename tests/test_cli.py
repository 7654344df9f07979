"""The `decode-attention` command: explain, accuracy, and the forwarded bench and verify (the real
modules, run on this machine: without a GPU, verify says so and bench only reads result files)."""

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
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


def usage_error(capsys, *argv) -> str:
    """The one argparse error line a bad command line gets (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "error:" in ln]
    assert "Traceback" not in err
    return line


def test_explain_rejects_inconsistent_lengths(capsys):
    line = usage_error(capsys, "explain", "--kv-len", "100", "--prefix-len", "60", "--suffix-len", "10")
    assert "--kv-len must equal --prefix-len + --suffix-len" in line and "--kv-len 100" in line
    assert "multiple" in usage_error(capsys, "explain", "--num-qo-heads", "30", "--num-kv-heads", "8")


@pytest.mark.parametrize("argv, message", [
    (["--kv-len", "-5"], "argument --kv-len: must be a positive integer, got -5"),
    (["--kv-len", "0"], "argument --kv-len: must be a positive integer, got 0"),
    (["--batch", "2.5"], "argument --batch: expected a positive integer, got '2.5'"),
    (["--num-kv-heads", "0"], "argument --num-kv-heads: must be a positive integer"),
    (["--head-dim", "-64"], "argument --head-dim: must be a positive integer"),
    (["--prefix-len", "-1"], "argument --prefix-len: must be an integer >= 0, got -1"),
    (["--page-size", "0"], "argument --page-size: must be a positive integer"),
    (["--num-spans", "0"], "argument --num-spans: must be a positive integer"),
    (["--density", "0"], "argument --density: must lie in (0, 1], got 0"),
    (["--density", "nan"], "argument --density: must lie in (0, 1]"),
    (["--reps", "-1"], "argument --reps: must be a positive integer, got -1"),
    (["--gpu", "B300"], "argument --gpu: unknown GPU 'B300'"),
    (["--kv-len", "10000000000"], "the KV cache of this workload is 655.4 TB"),
    (["--batch", "1", "--kv-len", "1000000000", "--dtype", "float32"], "is 8.2 TB"),
    (["--prefix-len", "0", "--suffix-len", "0"], "at least one token"),
])
def test_explain_options_are_checked_as_they_are_parsed(capsys, argv, message):
    line = usage_error(capsys, "explain", "--no-gpu", "--no-reference", *argv)
    assert line.startswith("decode-attention explain: error: ") and message in line


def test_the_cache_bound_names_the_largest_gpu(capsys):
    line = usage_error(capsys, "explain", "--kv-len", "10000000000")
    largest = max((cli.get_gpu(k) for k in cli.gpu_names()), key=lambda g: g.hbm_capacity_bytes)
    assert largest.name in line and f"more than {cli.MAX_GPUS_PER_WORKLOAD} x" in line
    # the bound itself: 2 MB of K and V per token (1024 KV heads x 256 x float32), so few tokens
    shape = ["explain", "--no-gpu", "--no-reference", "--batch", "1", "--num-qo-heads", "1024",
             "--num-kv-heads", "1024", "--head-dim", "256", "--dtype", "float32"]
    tokens = cli.MAX_GPUS_PER_WORKLOAD * largest.hbm_capacity_bytes // (2 * 1024 * 256 * 4)
    code, out = run(capsys, *shape, "--kv-len", str(tokens))
    assert code == 0 and "split_kv" in out
    assert "the KV cache of this workload is" in usage_error(capsys, *shape, "--kv-len", str(tokens + 1))


def test_explain_predicts_a_head_dim_without_kernel_and_says_so(capsys):
    assert cli.kernel_head_dims() == (64, 128, 256)
    code, out = run(capsys, "explain", "--no-gpu", "--no-reference", "--batch", "1", "--kv-len", "4096",
                    "--head-dim", "96")
    assert code == 0 and "head_dim 96" in out and "split_kv" in out
    assert "no kernel exists for head_dim 96 (the kernels have head_dim 64, 128, 256)" in out
    code, out = run(capsys, "explain", "--no-gpu", "--no-reference", "--batch", "1", "--kv-len", "4096",
                    "--head-dim", "64")
    assert code == 0 and "no kernel exists" not in out


def _option_helps(parser):
    """{option: its help line as printed} for every option of `parser` but --help."""
    return {a.option_strings[-1]: (a.help or "") % {"default": a.default} for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)}


def test_every_option_says_what_it_means_and_its_default(capsys):
    from decode_attention import verify

    subparsers = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {name: p for name, p in subparsers.choices.items() if name not in cli.FORWARDED}
    parsers["verify"] = verify._parser()
    assert set(parsers) == {"explain", "accuracy", "verify", "generate"}
    for name, parser in parsers.items():
        helps = _option_helps(parser)
        assert helps, name
        for option, text in helps.items():
            assert text and "(default: " in text, f"{name} {option}: {text!r}"
    with pytest.raises(SystemExit) as exc:
        cli.main(["explain", "--help"])
    assert exc.value.code == 0
    out = "".join(capsys.readouterr().out.split())    # argparse wraps lines, at spaces and hyphens
    for option, text in _option_helps(parsers["explain"]).items():
        assert option in out and "".join(text.split()) in out
    assert "(default:20)" in out and "(default:16)" in out


def test_explain_on_several_gpus(capsys):
    code, out = run(capsys, "explain", "--no-gpu", "--no-reference", "--batch", "1", "--kv-len", "1048576",
                    "--gpu", "H200", "--gpus", "2")
    assert code == 0
    assert "sharded:2_gpus" in out and "sharded: split_kv on 2 GPUs" in out
    for term in ("shard_s", "collective_s", "merge_s"):
        assert term in out
    crossover = re.search(r"one GPU is faster below ([\d,]+) tokens of context", out)
    assert crossover and f"from a context of {crossover.group(1)} tokens up" in out
    table = out[out.index("split_kv on 1 GPU against 2 GPUs"):]
    for label in ("32k", "128k", "1M", "4M"):
        assert re.search(rf"^{label} +[\d.]+ [MG]B +[\d.]+ [um]s +[\d.]+ [um]s +[\d.]+x$", table, re.M)


def test_explain_on_several_gpus_with_the_builtin_example(capsys):
    code, out = run(capsys, "explain", "--no-gpu", "--no-reference", "--gpus", "4")
    assert code == 0
    assert out.count("sharded: split_kv on 4 GPUs") == 2 and out.count("against 4 GPUs") == 2
    assert "extrapolated from 2 ranks" in out        # 4 ranks are not measured


@pytest.mark.parametrize("value, message", [
    ("1", "argument --gpus: must be from 2 to 8"),
    ("9", "argument --gpus: must be from 2 to 8"),
    ("two", "argument --gpus: expected an integer from 2 to 8, got 'two'"),
])
def test_explain_gpus_is_checked(capsys, value, message):
    line = usage_error(capsys, "explain", "--no-gpu", "--no-reference", "--gpus", value)
    assert message in line


def test_explain_gpus_needs_a_collective_model(capsys):
    line = usage_error(capsys, "explain", "--no-gpu", "--no-reference", "--gpus", "2", "--gpu", "A100")
    assert "--gpus: no collective model for NVIDIA A100" in line


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


def test_verify_is_forwarded_to_the_real_module():
    from decode_attention import verify

    assert importlib.import_module(cli.FORWARDED["verify"]) is verify


def test_verify_help_through_the_command(capsys):
    assert cli.main(["verify", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: decode-attention verify" in out and "--seed SEED" in out and "(default: 0)" in out


def test_verify_runs_only_the_kinds_asked_for(monkeypatch, capsys):
    import gpukernels
    from decode_attention import verify

    monkeypatch.setattr(gpukernels, "gpu_available", lambda: True)   # the machine, not the code
    ran = []
    monkeypatch.setattr(verify, "run_case", lambda rng, dtype, d, hq, hkv, kind, splits: ran.append(kind) or 0.0)
    assert cli.main(["verify", "--only", "hydragen", "--only", "tree"]) == 0
    assert ran and all(k.startswith(("hydragen", "tree")) for k in ran)
    assert {"hydragen", "hydragen:wide", "tree"} <= set(ran)
    assert cli.main(["verify", "--only", "nothing"]) == 2
    assert "no case's kernel starts with nothing" in capsys.readouterr().err


def test_verify_without_a_gpu_says_so_in_one_line(monkeypatch, capsys):
    import gpukernels

    monkeypatch.setattr(gpukernels, "gpu_available", lambda: False)   # the machine, not the code
    assert cli.main(["verify"]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith("decode-attention verify: needs CuPy and a CUDA GPU") and captured.out == ""


def _run_module(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_verify_as_a_process():
    done = _run_module("decode_attention", "verify", "--help")
    assert done.returncode == 0 and "--seed" in done.stdout, done.stderr
    from gpukernels import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present: `decode-attention verify` would run the kernels")
    for module in (("decode_attention", "verify"), ("decode_attention.verify",)):
        done = _run_module(*module)
        assert done.returncode == 2 and done.stdout == ""
        (line,) = done.stderr.splitlines()
        assert "needs CuPy and a CUDA GPU" in line and ("CuPy is not installed" in line or "no CUDA GPU" in line)


def test_bench_is_forwarded_to_the_real_module(capsys):
    assert cli.main(["bench", "--help"]) == 0
    assert "usage: decode-attention bench" in capsys.readouterr().out
    assert cli.main(["bench", "--report", str(REPO / "results" / "h100" / "decode.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| batch |") and "| 1 | 8 | 4096 |" in out


@pytest.mark.parametrize("content, message", [
    (None, "--report: no such file: "),
    ("not json at all", "not a result file (not JSON: "),
    ("[1, 2]", "not a result file (expected {'meta'"),
    ('{"meta": {}}', "got an object with keys ['meta']"),
    ('{"meta": {}, "rows": [3]}', "rows[0] is 3, not an object"),
    ('{"meta": {}, "rows": [{"impl": "split_kv", "batch": 1}]}',
     "is not a result file of the decode benchmark (a row lacks"),
])
def test_bench_report_on_a_bad_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "decode.json"
    if content is not None:
        path.write_text(content)
    for argv in (["--report", str(path)], [f"--report={path}"], ["--repo", str(path)]):
        assert cli.main(["bench", *argv]) == 2
        captured = capsys.readouterr()
        (line,) = captured.err.splitlines()
        assert line.startswith("decode-attention bench: --report: ") and message in line, line
    assert cli.main(["bench", "--report", str(tmp_path)]) == 2
    assert "is a directory, not a result file" in capsys.readouterr().err


def test_forwarding_without_the_module_says_why(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gpukernels.bench", None)     # makes the import fail
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "cannot load gpukernels.bench.main: ModuleNotFoundError: import of gpukernels.bench halted" in err
    assert "CuPy" not in err


def test_accuracy_with_another_gpus_constants(capsys):
    """The README's H100-to-H200 figure, reproduced from the committed results and constants."""
    from costmodel import accuracy as acc

    code, out = run(capsys, "accuracy", "--constants-from", "h100")
    assert code == 0
    files = acc.results_of_other_gpus(acc.load_results(REPO / "results"), "h100")
    assert {f.gpu_slug for f in files} == {"h200", "h200x2"}
    errors, _ = acc.row_errors(files, calibration=acc.fitted_calibration("h100"))
    overall = acc.summarize(errors)[-1]
    slugs = ", ".join(sorted({f.gpu_slug for f in files}))
    assert f"cost model accuracy over {overall.count} rows ({slugs}) with the constants of h100_sxm:" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("all "))
    assert line.split()[2:4] == [f"{100 * overall.median:.1f}%", f"{100 * overall.p90:.1f}%"]
    assert "for comparison, each GPU with its own constants" in out
    decode = next(s for s in acc.summarize(errors) if s.suite == "decode")
    readme = (REPO / "README.md").read_text()
    cited = re.search(r"H100's constants applied to the H200's\s+decode suite unchanged give ([\d.]+)% / ([\d.]+)%",
                      readme)
    assert cited, "README cites the H100-to-H200 figure of the decode suite"
    assert cited.groups() == (f"{100 * decode.median:.1f}", f"{100 * decode.p90:.1f}"), \
        "README's H100-to-H200 figure differs from `decode-attention accuracy --constants-from h100`"


def test_accuracy_constants_from_a_gpu_without_fitted_constants(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["accuracy", "--constants-from", "a100"])
    assert exc.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "--constants-from: no constants fitted for a100_80gb" in line
    assert "argument --constants-from: unknown GPU" in usage_error(capsys, "accuracy", "--constants-from", "B300")


def test_accuracy_constants_from_with_only_that_gpus_results(capsys, tmp_path):
    from test_costmodel_accuracy import measure_synthetically, other_rows, write_results

    write_results(tmp_path, "span", measure_synthetically(other_rows()[3:5]))      # an H100 run only
    code, out = run(capsys, "accuracy", "--results", str(tmp_path), "--constants-from", "h100")
    assert code == 0 and "no results under" in out and "other than h100_sxm" in out


def test_accuracy_on_a_bad_results_directory(capsys, tmp_path):
    assert "argument --results: no such directory" in usage_error(capsys, "accuracy", "--results",
                                                                  str(tmp_path / "missing"))
    (tmp_path / "h100").mkdir()
    (tmp_path / "h100" / "decode.json").write_text("[1, 2]")
    with pytest.raises(SystemExit) as exc:
        cli.main(["accuracy", "--results", str(tmp_path)])
    assert exc.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "not a result file" in line


def test_python_dash_m_runs_the_command():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "decode_attention", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("explain", "accuracy", "bench", "verify"):
        assert command in done.stdout
