"""Fit the model's constants on the decode suite alone, then write them to
`costmodel/data/calibration.json` (one entry per GPU).

    python -m costmodel.calibrate [--results DIR] [--dry-run]

Fitted in two stages. First, on the contiguous rows (FITTED_FIELDS): the launch overhead, a
block's round-trip latency, what one block streams on its own, the fraction of the measured
stream ceiling reached and how sharply the blocks' streams saturate it; the resident blocks per
SM are chosen among BLOCKS_PER_SM_CHOICES. Then, the others held, on the paged rows of the same
suite (PAGED_FITTED_FIELDS): a page lookup's latency and its traffic-equivalent, and a paged block's
stream rate relative to a contiguous one's. The loss is the
mean squared log ratio of predicted to measured time over the decode rows of this project's
variants; the search is Nelder-Mead on the logarithms of the constants, kept inside BOUNDS. Every
other suite is then a validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np

from .accuracy import format_report, gpu_for_meta, load_results, row_errors, summarize
from .calibration import (DEFAULT_CALIBRATION, FITTED_FIELDS, PAGED_FITTED_FIELDS, Calibration,
                          load_calibration, save_calibration)
from .gpus import GPUSpec
from .rows import UnsupportedRow, is_ours, predict_row

__all__ = ["FIT_SUITE", "BOUNDS", "fit_calibration", "fit_samples", "fit_results", "nelder_mead", "main"]

FIT_SUITE = "decode"
BOUNDS = {
    "launch_s": (3e-7, 3e-5),
    "block_round_trip_s": (5e-8, 2e-5),
    "block_bytes_per_s": (3e9, 1e12),
    "bw_fraction": (0.5, 1.1),
    "contention_exponent": (1.0, 30.0),
    "page_lookup_s": (1e-9, 5e-6),
    "page_lookup_bytes": (1.0, 2e4),
    "paged_stream_fraction": (0.05, 20.0),
}
BLOCKS_PER_SM_CHOICES = (1, 2, 4, 8)
# Simplex steps per fit. 400 stopped short on the H200's decode suite of 2026-11-30, at
# blocks_per_sm = 2 with paged blocks streaming 1.6x a contiguous one's rate; 1500 steps reach a lower
# loss at blocks_per_sm = 1. bw_fraction is held to 1.1 of the measured read ceiling: with 1.3 allowed
# the fit traded it against a soft contention curve and put weight reads of the end-to-end suite
# 30% above what HBM delivers.
FIT_MAX_EVALS = 1500


def nelder_mead(f, x0, *, step: float = 0.3, max_evals: int = 400, tol: float = 1e-7):
    """Minimise f over R^n from x0 (the plain simplex method: reflect, expand, contract, shrink)."""
    n = len(x0)
    simplex = [np.asarray(x0, dtype=np.float64)]
    for i in range(n):
        x = simplex[0].copy()
        x[i] += step
        simplex.append(x)
    values = [f(x) for x in simplex]
    evals = n + 1
    while evals < max_evals:
        order = np.argsort(values)
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        if abs(values[-1] - values[0]) <= tol * (abs(values[0]) + tol):
            break
        centroid = np.mean(simplex[:-1], axis=0)
        reflected = centroid + (centroid - simplex[-1])
        fr = f(reflected)
        evals += 1
        if fr < values[0]:
            expanded = centroid + 2.0 * (centroid - simplex[-1])
            fe = f(expanded)
            evals += 1
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = centroid + 0.5 * (simplex[-1] - centroid)
            fc = f(contracted)
            evals += 1
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                for i in range(1, n + 1):
                    simplex[i] = simplex[0] + 0.5 * (simplex[i] - simplex[0])
                    values[i] = f(simplex[i])
                evals += n
    best = int(np.argmin(values))
    return simplex[best], values[best]


def _loss(cal: Calibration, samples) -> float:
    logs = []
    for row, gpu, measured_s in samples:
        predicted = predict_row(row, gpu, calibration=cal).time_s
        logs.append(math.log(predicted / measured_s))
    return float(np.mean(np.square(logs)))


def fit_calibration(
    samples: "list[tuple[dict, GPUSpec, float]]",
    *,
    start: Calibration = DEFAULT_CALIBRATION,
    fields: tuple[str, ...] = FITTED_FIELDS,
    blocks_per_sm_choices: tuple[int, ...] = BLOCKS_PER_SM_CHOICES,
    max_evals: int = FIT_MAX_EVALS,
    source: str = "",
) -> tuple[Calibration, float]:
    """Constants minimising the loss over (row, gpu, measured seconds) samples; returns them and
    the loss. Rows are predicted with `predict_row`, so they must describe the plan that ran."""
    if not samples:
        raise ValueError("no samples to fit on")
    lo = np.log([BOUNDS[f][0] for f in fields])
    hi = np.log([BOUNDS[f][1] for f in fields])

    def constants(x, blocks_per_sm):
        x = np.clip(x, lo, hi)
        values = {f: float(np.exp(v)) for f, v in zip(fields, x)}
        return dataclasses.replace(start, blocks_per_sm=blocks_per_sm, **values)

    best = None
    x0 = np.clip(np.log([getattr(start, f) for f in fields]), lo, hi)
    for blocks_per_sm in blocks_per_sm_choices:
        x, loss = nelder_mead(lambda x: _loss(constants(x, blocks_per_sm), samples), x0,
                              max_evals=max_evals)
        if best is None or loss < best[1]:
            best = (constants(x, blocks_per_sm), loss)
    cal, loss = best
    return dataclasses.replace(cal, source=source or f"fitted on {len(samples)} {FIT_SUITE} rows"), loss


def _samples(files) -> dict[str, list]:
    """Decode-suite samples of our variants, by GPU key."""
    out: dict[str, list] = {}
    for f in files:
        if f.suite != FIT_SUITE:
            continue
        gpu = gpu_for_meta(f.meta, fallback=f.gpu_slug)
        for row in f.rows:
            if not is_ours(row) or not (row.get("time_ms") or 0) > 0:
                continue
            try:
                predict_row(row, gpu)
            except UnsupportedRow:
                continue
            out.setdefault(gpu.key, []).append((row, gpu, row["time_ms"] * 1e-3))
    return out


def _is_paged(row: dict) -> bool:
    return int(row.get("page_size") or 0) > 0


def fit_samples(samples, *, start: Calibration | None = None, max_evals: int = FIT_MAX_EVALS,
                source: str = "") -> Calibration:
    """The two-stage fit: contiguous rows first, then the paged rows with the rest held."""
    start = start or load_calibration(None)
    contiguous = [s for s in samples if not _is_paged(s[0])]
    paged = [s for s in samples if _is_paged(s[0])]
    cal = start
    if contiguous:
        cal, _ = fit_calibration(contiguous, start=start, max_evals=max_evals)
    if paged:
        cal, _ = fit_calibration(paged, start=cal, fields=PAGED_FITTED_FIELDS,
                                 blocks_per_sm_choices=(cal.blocks_per_sm,), max_evals=max_evals)
    return dataclasses.replace(cal, source=source or f"fitted on {len(samples)} {FIT_SUITE} rows")


def fit_results(root: "str | Path | None" = None, *, max_evals: int = FIT_MAX_EVALS) -> dict[str, Calibration]:
    """One fitted Calibration per GPU that has a decode suite under `root`."""
    files = load_results(root)
    fitted = {}
    for key, samples in _samples(files).items():
        runs = sorted({f"{f.meta.get('date', '?')} {f.meta.get('commit') or 'no commit'}" for f in files
                       if f.suite == FIT_SUITE and gpu_for_meta(f.meta, f.gpu_slug).key == key})
        fitted[key] = fit_samples(samples, max_evals=max_evals,
                                  source=f"fitted on {len(samples)} {FIT_SUITE} rows of results/ "
                                         f"(run {', '.join(runs)})")
    return fitted


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m costmodel.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=None, help="results directory (default: the checkout's results/)")
    parser.add_argument("--dry-run", action="store_true", help="fit and report, write nothing")
    args = parser.parse_args(argv)
    files = load_results(args.results)
    fitted = fit_results(args.results)
    if not fitted:
        print(f"no {FIT_SUITE} results of this project's variants found"
              f"{' under ' + args.results if args.results else ''}: nothing to fit; "
              "the model keeps its datasheet-derived defaults")
        return 0
    for key, cal in fitted.items():
        print(f"{key}: " + ", ".join(f"{f} = {getattr(cal, f):.4g}"
                                     for f in (*FITTED_FIELDS, *PAGED_FITTED_FIELDS, "blocks_per_sm")))
        if not args.dry_run:
            print(f"  written to {save_calibration(key, cal)}")
    errors, unsupported = row_errors(files, calibration=fitted)
    print(format_report(summarize(errors), unsupported, title="accuracy with the fitted constants:"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
