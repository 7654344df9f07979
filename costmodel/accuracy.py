"""How well the model predicts the committed measurements: |predicted - measured| / measured per
suite, median and 90th percentile, against the targets (median <= 7%, p90 <= 15%).

Result files live at `results/<gpu>/<suite>.json` (docs/benchmarks.md); only this project's variants
are scored, peers are not. Each file is predicted on its own GPU with the ceilings its run
measured (`meta`), with the calibration fitted for that GPU, or with another GPU's fitted
constants (`fitted_calibration`, `results_of_other_gpus`) to see how far they carry: the H100's
constants on the H200's results is `decode-attention accuracy --constants-from h100`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .calibration import Calibration, calibration_path, load_calibration
from .gpus import GPUSpec, get_gpu
from .rows import UnsupportedRow, is_ours, predict_row

__all__ = [
    "MEDIAN_TARGET", "P90_TARGET", "ResultFile", "RowError", "SuiteAccuracy", "find_results_dir",
    "read_result_file", "load_results", "gpu_for_meta", "row_errors", "summarize", "format_report",
    "SpeedupError", "speedup_errors", "fitted_calibration", "results_of_other_gpus",
]

MEDIAN_TARGET = 0.07
P90_TARGET = 0.15
SPEEDUP_TARGET = 0.15            # predicted speedup over the baseline, relative to the measured one
BASELINES = ("decode", "shared_prefix:naive")   # what a variant's speedup is measured against
WORKLOAD_KEYS = ("dtype", "batch", "num_qo_heads", "num_kv_heads", "head_dim", "kv_len", "prefix_len",
                 "suffix_len", "density", "num_spans", "num_sinks", "window", "levels", "num_states")


@dataclass(frozen=True)
class ResultFile:
    path: Path
    gpu_slug: str             # the directory under results/
    suite: str                # the file's stem
    meta: dict
    rows: list = field(default_factory=list)


@dataclass(frozen=True)
class RowError:
    gpu_slug: str
    suite: str
    impl: str
    measured_s: float
    predicted_s: float
    row: dict

    @property
    def rel_error(self) -> float:
        return abs(self.predicted_s - self.measured_s) / self.measured_s


@dataclass(frozen=True)
class SuiteAccuracy:
    suite: str                # suite name, or "all"
    count: int
    median: float
    p90: float

    @property
    def meets_target(self) -> bool:
        return self.median <= MEDIAN_TARGET and self.p90 <= P90_TARGET


def find_results_dir(start: "str | Path | None" = None) -> Path | None:
    """The `results/` directory of the checkout at or above `start` (default: the working
    directory), else the one beside this package's source; None if there is none."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "results").is_dir() and (d / "pyproject.toml").exists():
            return d / "results"
    beside = Path(__file__).resolve().parent.parent / "results"
    return beside if beside.is_dir() else None


RESULT_FILE_SHAPE = "{'meta': {...}, 'rows': [{'impl': ..., 'time_ms': ..., ...}, ...]}"


def read_result_file(path: "str | Path") -> ResultFile:
    """One result file, `<gpu>/<suite>.json`. A missing file raises FileNotFoundError; a file that
    is not JSON, or not a JSON object with a list of row objects, raises ValueError naming the
    path, what was expected and what came."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a result file (expected a JSON file {RESULT_FILE_SHAPE})")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a result file (not text; expected JSON {RESULT_FILE_SHAPE})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a result file (not JSON: {e}; expected {RESULT_FILE_SHAPE})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        got = f"an object with keys {sorted(data)}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise ValueError(f"{path}: not a result file (expected {RESULT_FILE_SHAPE}, got {got})")
    bad = next((i for i, row in enumerate(data["rows"]) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ValueError(f"{path}: not a result file (rows[{bad}] is {data['rows'][bad]!r:.40}, not an object; "
                         f"expected {RESULT_FILE_SHAPE})")
    meta = data.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a result file (meta is a {type(meta).__name__}, expected an object)")
    return ResultFile(path=path, gpu_slug=path.parent.name, suite=path.stem, meta=meta, rows=list(data["rows"]))


def load_results(root: "str | Path | None" = None) -> list[ResultFile]:
    """Every `<gpu>/<suite>.json` under `root` (default: `find_results_dir()`), sorted."""
    root = Path(root) if root is not None else find_results_dir()
    if root is None or not root.is_dir():
        return []
    return [read_result_file(path) for path in sorted(root.glob("*/*.json"))]


def gpu_for_meta(meta: dict, fallback: str | None = None) -> GPUSpec:
    """The GPU a run measured on, with the ceilings it measured."""
    name = meta.get("gpu") or fallback
    if not name:
        raise ValueError("result meta names no gpu")
    return get_gpu(name).with_measured(
        copy_bytes_per_s=meta.get("copy_bytes_per_s"),
        read_bytes_per_s=meta.get("read_bytes_per_s"),
        matmul_flops_per_s=meta.get("matmul_flops_per_s"),
    )


def row_errors(
    files: list[ResultFile],
    *,
    calibration: "Calibration | dict[str, Calibration] | None" = None,
    suites: "set[str] | None" = None,
) -> tuple[list[RowError], list[tuple[str, str, str]]]:
    """Predicted against measured for every row of our variants; also the rows that could not be
    predicted as (suite, impl, reason). Rows whose `status` says they were not measured (out of
    memory, failed) are not scored. `calibration`: one for every GPU, or one per GPU key (others
    load theirs), or None to load each GPU's."""
    errors, unsupported = [], []
    for f in files:
        if suites is not None and f.suite not in suites:
            continue
        gpu = gpu_for_meta(f.meta, fallback=f.gpu_slug)
        if isinstance(calibration, dict):
            cal = calibration.get(gpu.key) or load_calibration(gpu.key)
        else:
            cal = calibration or load_calibration(gpu.key)
        for row in f.rows:
            if not is_ours(row) or row.get("status", "ok") != "ok":
                continue
            suite = str(row.get("suite", f.suite))
            measured_ms = row.get("time_ms")
            if measured_ms is None or not measured_ms > 0:
                unsupported.append((suite, str(row.get("impl")), "no time_ms"))
                continue
            try:
                p = predict_row(row, gpu, calibration=cal)
            except UnsupportedRow as e:
                unsupported.append((suite, str(row.get("impl")), str(e)))
                continue
            errors.append(RowError(f.gpu_slug, suite, str(row["impl"]), measured_ms * 1e-3, p.time_s, row))
    return errors, unsupported


def fitted_calibration(gpu: "str | GPUSpec", *, path: "str | Path | None" = None) -> Calibration:
    """The constants fitted for `gpu` (a name or key), never the defaults in their place: a GPU
    with no fitted entry in `costmodel/data/calibration.json` (or `path`) is a ValueError."""
    key = get_gpu(gpu).key
    path = Path(path or calibration_path())
    entries = json.loads(path.read_text()).get("gpus", {}) if path.exists() else {}
    if key not in entries:
        fitted = sorted(k for k in entries if k != "default")
        raise ValueError(f"no constants fitted for {key} in {path} (fitted: {', '.join(fitted) or 'none'}); "
                         "fit them from that GPU's decode results with `decode-attention accuracy --fit`")
    return load_calibration(key, path=path)


def results_of_other_gpus(files: list[ResultFile], gpu: "str | GPUSpec") -> list[ResultFile]:
    """The result files measured on a GPU other than `gpu`: where its constants are a prediction
    made without any of that GPU's timings."""
    key = get_gpu(gpu).key
    return [f for f in files if gpu_for_meta(f.meta, fallback=f.gpu_slug).key != key]


def _stats(name: str, errs: list[float]) -> SuiteAccuracy:
    a = np.asarray(errs, dtype=np.float64)
    return SuiteAccuracy(name, int(a.size), float(np.median(a)), float(np.percentile(a, 90)))


def summarize(errors: list[RowError]) -> list[SuiteAccuracy]:
    """One line per suite (in first-seen order), then "all"; empty if there are no errors."""
    by_suite: dict[str, list[float]] = {}
    for e in errors:
        by_suite.setdefault(e.suite, []).append(e.rel_error)
    out = [_stats(s, errs) for s, errs in by_suite.items()]
    if errors:
        out.append(_stats("all", [e.rel_error for e in errors]))
    return out


@dataclass(frozen=True)
class SpeedupError:
    suite: str
    impl: str
    baseline: str
    measured: float           # baseline time / variant time, measured
    predicted: float
    workload: tuple = ()      # (gpu slug, then the row's WORKLOAD_KEYS values present in it)

    @property
    def rel_error(self) -> float:
        return abs(self.predicted - self.measured) / self.measured


def speedup_errors(errors: list[RowError]) -> list[SpeedupError]:
    """Predicted against measured speedup of every variant over the baseline measured on the same
    workload in the same file (BASELINES, the first present), each variant with its plan's own
    choices (rows with `"plan": "forced"` are left out)."""
    groups: dict[tuple, dict[str, RowError]] = {}
    for e in errors:
        if e.row.get("plan") == "forced":
            continue  # sweep rows of a forced split count: the speedup is the plan's own choice's
        key = (e.gpu_slug, e.suite, *(repr(e.row.get(k)) for k in WORKLOAD_KEYS))
        groups.setdefault(key, {})[e.impl] = e
    out = []
    for by_impl in groups.values():
        base = next((by_impl[b] for b in BASELINES if b in by_impl), None)
        if base is None:
            continue
        for impl, e in by_impl.items():
            if impl != base.impl:
                workload = (e.gpu_slug, *((k, e.row[k]) for k in WORKLOAD_KEYS if e.row.get(k) is not None))
                out.append(SpeedupError(e.suite, impl, base.impl, base.measured_s / e.measured_s,
                                        base.predicted_s / e.predicted_s, workload))
    return out


def _pct(x: float) -> str:
    return "nan" if math.isnan(x) else f"{100 * x:5.1f}%"


def format_report(summary: list[SuiteAccuracy], unsupported=(), *, title: str = "",
                  speedups: "list[SpeedupError]" = ()) -> str:
    lines = [title] if title else []
    lines.append(f"{'suite':<16} {'rows':>5} {'median':>8} {'p90':>8}   target: median <= "
                 f"{MEDIAN_TARGET:.0%}, p90 <= {P90_TARGET:.0%}")
    for s in summary:
        mark = "ok" if s.meets_target else "MISSED"
        lines.append(f"{s.suite:<16} {s.count:>5} {_pct(s.median):>8} {_pct(s.p90):>8}   {mark}")
    if speedups:
        worst = max(speedups, key=lambda e: e.rel_error)
        ok = sum(e.rel_error <= SPEEDUP_TARGET for e in speedups)
        lines.append(f"speedups over the baseline: {ok} of {len(speedups)} predicted within "
                     f"{SPEEDUP_TARGET:.0%} of measured; worst {worst.impl} over {worst.baseline} "
                     f"({worst.suite}): predicted {worst.predicted:.2f}x, measured {worst.measured:.2f}x"
                     f"   {'ok' if ok == len(speedups) else 'MISSED'}")
    if unsupported:
        lines.append(f"{len(unsupported)} row(s) of our variants could not be predicted:")
        for suite, impl, reason in unsupported[:10]:
            lines.append(f"  {suite} {impl}: {reason}")
    return "\n".join(lines)
