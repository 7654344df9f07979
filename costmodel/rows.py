"""Predict one benchmark result row, whatever its suite.

A row (docs/benchmarks.md, "Result files") names the variant in `impl` and carries the workload: `dtype`, `batch`,
`num_qo_heads`, `num_kv_heads`, `head_dim`, and per variant:

| impl | workload keys |
|---|---|
| `decode` | `kv_len`; optional `kv_lens` (list), `page_size` |
| `split_kv` | `kv_len`; `num_splits` and `chunk_size` as run (else the plan's own choice); optional `kv_lens` |
| `paged_decode` | `kv_len`, `page_size`; `num_splits`, `chunk_size` as run; optional `kv_lens` |
| `merge_states` | `num_states` (`num_qo_heads` heads) |
| `shared_prefix:<method>` | `prefix_len`, `suffix_len`; optional `suffix_lens`, `fused`, `prefix_chunk_size`, `merge_launch`, `suffix_chunk_size` |
| `tree` | `levels` ([[num_segments, seg_len], ...] from the root), or `prefix_len`, `num_groups`, `group_len`, `suffix_len` |
| `span[:<kind>]` | `kv_len` and one of: `span_lens` (list); `density` and `num_spans`; `num_sinks` and `window` |
| `sharded` | `kv_len`, `num_gpus`; optional `placement_block`, `graph` (the `distributed` suite: `costmodel.sharded`) |
| `model:<attention>[:<pattern>]` | a decode step of a whole decoder (the `end_to_end` suite): `model`, `num_layers`, `prompt_len`, `context_len`, span settings; predicted by `costmodel.end_to_end.predict_result_row` |

Peers (`peer:...`) are not predicted. A row this module cannot read raises `UnsupportedRow`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from . import decode, end_to_end, merge_states, paged_decode, sharded, shared_prefix, span, split_kv, tree
from .calibration import Calibration
from .gpus import GPUSpec, get_gpu
from .prediction import Prediction, calibration_for

__all__ = ["predict_row", "UnsupportedRow", "is_ours"]


class UnsupportedRow(ValueError):
    """A result row whose variant or workload keys the model does not know."""


def is_ours(row: dict) -> bool:
    """Whether a row measures one of this project's variants (not a peer)."""
    return not str(row.get("impl", "")).startswith("peer:")


def _need(row: dict, *keys: str):
    missing = [k for k in keys if row.get(k) is None]
    if missing:
        raise UnsupportedRow(f"{row.get('impl')!r} row lacks {', '.join(missing)}")
    values = tuple(row[k] for k in keys)
    return values if len(values) > 1 else values[0]


def _common(row: dict) -> dict:
    batch, hq, hkv, d = _need(row, "batch", "num_qo_heads", "num_kv_heads", "head_dim")
    return {"batch": int(batch), "num_qo_heads": int(hq), "num_kv_heads": int(hkv),
            "head_dim": int(d), "dtype": str(row.get("dtype", "float16"))}


def _split_plan(row: dict, gpu: GPUSpec, *, page_size: int, force_unsplit: bool) -> split_kv.SplitKVPlan:
    c = _common(row)
    kv_len = int(_need(row, "kv_len"))
    num_splits = 1 if force_unsplit else row.get("num_splits")
    plan = split_kv.plan_split_kv(
        c["batch"], c["num_qo_heads"], c["num_kv_heads"], c["head_dim"], kv_len, dtype=c["dtype"],
        num_splits=None if num_splits is None else int(num_splits), num_sms=gpu.num_sms,
        page_size=page_size, gpu=gpu)
    chunk = row.get("chunk_size")
    if chunk is not None and not force_unsplit and int(chunk) != plan.chunk_size:
        chunk = int(chunk)
        plan = dataclasses.replace(plan, chunk_size=chunk, num_splits=max(1, -(-kv_len // chunk)))
    return plan


def _span_page(row: dict, default: int) -> int:
    """The page a span row's kernel read through: WINDOWS for the windows layout, else the row's
    `page_size` (`default` where the row does not say)."""
    if row.get("layout") == "windows":
        return span.WINDOWS
    return int(row.get("page_size", default))


def _span_shape(row: dict) -> span.SpanShape:
    c = _common(row)
    kv_len = int(_need(row, "kv_len"))
    args = (c["batch"], c["num_qo_heads"], c["num_kv_heads"], c["head_dim"], kv_len)
    if row.get("span_lens") is not None:
        return span.SpanShape(*args, tuple(int(n) for n in row["span_lens"]), c["dtype"],
                              _span_page(row, span.WINDOW_ROWS))
    if row.get("num_sinks") is not None or row.get("window") is not None:
        sinks, window = _need(row, "num_sinks", "window")
        shape = span.SpanShape.sinks_window(*args, num_sinks=int(sinks), window=int(window), dtype=c["dtype"])
        return dataclasses.replace(shape, page_size=_span_page(row, shape.page_size))
    density, num_spans = _need(row, "density", "num_spans")
    return span.SpanShape.from_density(*args, density=float(density), num_spans=int(num_spans),
                                       dtype=c["dtype"], page_size=_span_page(row, span.WINDOW_ROWS))


def _tree_shape(row: dict) -> tree.TreeShape:
    c = _common(row)
    if row.get("levels") is not None:
        levels = tuple((int(n), int(length)) for n, length in row["levels"])
    else:
        prefix, groups, group_len, suffix = _need(row, "prefix_len", "num_groups", "group_len", "suffix_len")
        levels = ((1, int(prefix)), (int(groups), int(group_len)), (c["batch"], int(suffix)))
    return tree.TreeShape(c["batch"], c["num_qo_heads"], c["num_kv_heads"], c["head_dim"], levels, c["dtype"])


def predict_row(row: dict, gpu: "GPUSpec | str", *,
                calibration: Calibration | None = None) -> "Prediction | end_to_end.StepPrediction":
    """The prediction for the call a result row measured, on `gpu` (pass the run's measured
    ceilings with `get_gpu(meta["gpu"]).with_measured(...)`); for a `model:` row, the whole
    decode step's (`time_s` like any prediction)."""
    if not isinstance(row, Mapping):
        raise TypeError(f"row must be a mapping (a result row), got {type(row).__name__}")
    impl = str(row.get("impl", ""))
    if not is_ours(row):
        raise UnsupportedRow(f"peer rows are not predicted: {impl!r}")
    gpu = get_gpu(gpu)
    cal = calibration_for(gpu, calibration)
    variant, _, method = impl.partition(":")
    if variant == "model":
        try:
            return end_to_end.predict_result_row(row, gpu, calibration=cal)
        except (KeyError, TypeError, ValueError) as e:
            raise UnsupportedRow(f"{impl!r} row: {e}") from None
    kv_lens = row.get("kv_lens")
    if variant in ("decode", "split_kv", "paged_decode"):
        page_size = int(row.get("page_size") or 0)
        if variant == "paged_decode" and page_size < 1:
            raise UnsupportedRow("paged_decode row lacks page_size")
        plan = _split_plan(row, gpu, page_size=page_size, force_unsplit=variant == "decode")
        if variant == "decode":
            return decode.predict(plan, kv_lens=kv_lens, gpu=gpu, calibration=cal)
        if variant == "paged_decode":
            return paged_decode.predict(plan, kv_lens=kv_lens, gpu=gpu, calibration=cal)
        return split_kv.predict(plan, kv_lens=kv_lens, gpu=gpu, calibration=cal)
    if variant == "merge_states":
        c = _common(row)
        shape = merge_states.MergeStatesShape(int(_need(row, "num_states")), c["batch"],
                                              c["num_qo_heads"], c["head_dim"], c["dtype"])
        return merge_states.predict(shape, gpu=gpu, calibration=cal)
    if variant == "shared_prefix":
        c = _common(row)
        prefix_len, suffix_len = _need(row, "prefix_len", "suffix_len")
        lens = row.get("suffix_lens")
        shape = shared_prefix.SharedPrefixShape(
            c["batch"], c["num_qo_heads"], c["num_kv_heads"], c["head_dim"], int(prefix_len),
            int(suffix_len), c["dtype"], None if lens is None else tuple(int(n) for n in lens))
        method = (method or "hydragen").removesuffix(":oneshot")   # the one-shot call runs the same plan
        if method not in shared_prefix.METHODS:
            raise UnsupportedRow(f"unknown shared_prefix method {method!r}")
        plan = None
        if method == "hydragen" or row.get("fused"):
            given = (row.get("prefix_chunk_size"), row.get("suffix_chunk_size"))
            # A row that names its prefix chunk ran the launches it names (two without "merge_launch").
            merge = None if given[0] is None else bool(row.get("merge_launch", False))
            plan = shared_prefix.plan_hydragen(
                shape, num_sms=gpu.num_sms, gpu=gpu, calibration=cal,
                prefix_chunk_size=None if given[0] is None else int(given[0]),
                suffix_chunk_size=None if given[1] is None else int(given[1]), merge_launch=merge)
        return shared_prefix.predict(shape, method=method, gpu=gpu, calibration=cal, plan=plan,
                                     fused=bool(row.get("fused", False)))
    if variant == "tree":
        if method == "naive":   # every path copied into a contiguous cache, then split-KV
            return split_kv.predict(_split_plan({**row, "kv_len": _need(row, "context_len")}, gpu, page_size=0,
                                                force_unsplit=False), gpu=gpu, calibration=cal)
        shape = _tree_shape(row)
        plan = None
        if row.get("chunk_size") is not None:   # the form and chunk the run took
            plan = tree.TreePlan(shape, int(row["chunk_size"]), num_sms=gpu.num_sms, form=row.get("form", "merge"),
                                 page_size=int(row.get("page_size", 0)))
        return tree.predict(shape, gpu=gpu, calibration=cal, plan=plan)
    if variant == "span":
        shape = _span_shape(row)
        splits = row.get("num_splits")
        plan = span.plan_span(shape, gpu=gpu, num_splits=None if splits is None else int(splits))
        return span.predict(shape, gpu=gpu, calibration=cal, plan=plan)
    if variant == "sharded":   # one sequence's cache over num_gpus GPUs (the distributed suite)
        c = _common(row)
        plan = sharded.plan_sharded(c["batch"], c["num_qo_heads"], c["num_kv_heads"], c["head_dim"],
                                    int(_need(row, "kv_len")), num_gpus=int(_need(row, "num_gpus")),
                                    dtype=c["dtype"], gpu=gpu,
                                    placement_block=int(row.get("placement_block", sharded.DEFAULT_PLACEMENT_BLOCK)),
                                    graph=bool(row.get("graph", True)))
        return sharded.predict(plan, gpu=gpu, calibration=cal)
    raise UnsupportedRow(f"unknown variant {impl!r}")
