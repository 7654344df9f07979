"""The `decode-attention` command.

    decode-attention explain [workload options] [--gpu H100] [--gpus N]
        Predict every applicable variant for a workload (default: the built-in example), rank
        them, say why the winner wins; check with the NumPy references, at a reduced size, that
        the variants agree; on a machine with CuPy and a GPU, also time the kernels. --gpus N
        adds the KV cache sharded over N GPUs: its prediction, the context length from which it
        beats one GPU, and its time against one GPU's at 32k to 4M tokens (predicted only).
    decode-attention accuracy [--results DIR] [--fit] [--check] [--constants-from GPU]
        Median and 90th-percentile |predicted - measured| / measured per suite of the committed
        results; --fit first refits the constants on the decode suite; --check exits 1 on a miss;
        --constants-from GPU scores the other GPUs' results with that GPU's fitted constants.
    decode-attention generate [--model llama3-8b] [--samples 32] [--prompt-len 8192]
                              [--new-tokens 256] [--attention shared_prefix] [--json PATH]
        A Llama-shaped decoder with random weights on the GPU: the prompt prefilled once, then
        the samples decoded under CUDA graphs with the chosen attention; tokens per second,
        per-step latency, the share of the step spent in attention (against the same step with
        attention skipped) and the cost model's prediction of the step beside them.
    decode-attention bench ...     forwards to gpukernels.bench
    decode-attention verify ...    forwards to decode_attention.verify

Every option is checked as it is parsed: a size that is not a positive integer, a workload whose
KV cache would not fit in MAX_GPUS_PER_WORKLOAD of the largest known GPU, or an unknown GPU is one
error line and exit status 2. `explain` predicts any head_dim, but the kernels exist only for
`gpukernels._runtime.HEAD_DIMS` (64, 128, 256): for another head_dim it says so and times nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path

import numpy as np

from costmodel import accuracy as acc
from costmodel import get_gpu
from costmodel import sharded
from costmodel.explain import Workload, builtin_workloads, explain, format_explanation, sharded_variant
from costmodel.gpus import GPUSpec, gpu_names

__all__ = ["main", "reference_check", "reduced_workload"]

FORWARDED = {"bench": "gpukernels.bench", "verify": "decode_attention.verify"}
AGREEMENT_ATOL = 1e-10   # float64 references of one computation agree to rounding
MAX_GPUS_PER_WORKLOAD = 8   # a KV cache larger than this many of the largest known GPU is refused
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
WORKLOAD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Workload)}


# ---------------------------------------------------------------------------------------------
# option types: each turns one command-line word into a value or an argparse error line
# ---------------------------------------------------------------------------------------------

def _int_at_least(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (a size or a count)."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (a length that may be empty)."""
    return _int_at_least(text, 0, "an integer >= 0")


def density_fraction(text: str) -> float:
    """A fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def gpu_count(text: str) -> int:
    """GPUs to shard over: an integer from 2 to sharded.MAX_NUM_GPUS (one host's)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 2 to {sharded.MAX_NUM_GPUS}, "
                                         f"got {text!r}") from None
    if not 2 <= value <= sharded.MAX_NUM_GPUS:
        raise argparse.ArgumentTypeError(f"must be from 2 to {sharded.MAX_NUM_GPUS} (the GPUs of one host; "
                                         f"without --gpus, one GPU), got {value}")
    return value


def known_gpu(text: str) -> GPUSpec:
    """A GPU of the cost model's table, by key, short name or device name."""
    try:
        return get_gpu(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def results_dir(text: str) -> str:
    """An existing directory (of `<gpu>/<suite>.json` result files)."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return text


def kernel_head_dims() -> tuple[int, ...]:
    """The head dims the CUDA kernels are compiled for (gpukernels/_runtime.py; imports no CuPy)."""
    from gpukernels._runtime import HEAD_DIMS

    return tuple(HEAD_DIMS)


def _size_text(n_bytes: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes:.0f} B"


def kv_cache_bytes(w: Workload) -> int:
    """K and V of the baseline's concatenated cache: what `decode` reads and a GPU run allocates."""
    return 2 * w.batch * w.context_len * w.num_kv_heads * w.head_dim * ITEMSIZE[w.dtype]


def check_kv_cache_size(w: Workload) -> None:
    """ValueError if the workload's KV cache exceeds MAX_GPUS_PER_WORKLOAD of the largest known GPU."""
    largest = max((get_gpu(k) for k in gpu_names()), key=lambda g: g.hbm_capacity_bytes)
    limit = MAX_GPUS_PER_WORKLOAD * largest.hbm_capacity_bytes
    need = kv_cache_bytes(w)
    if need > limit:
        raise ValueError(
            f"the KV cache of this workload is {_size_text(need)} (K and V: {w.batch} sequences x "
            f"{w.context_len} tokens x {w.num_kv_heads} KV heads x head_dim {w.head_dim} x "
            f"{ITEMSIZE[w.dtype]} bytes), more than {MAX_GPUS_PER_WORKLOAD} x the "
            f"{_size_text(largest.hbm_capacity_bytes)} of the largest known GPU ({largest.name}) = "
            f"{_size_text(limit)}")


# ---------------------------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------------------------

def _workloads_from_args(args) -> list[Workload]:
    """The workloads the options describe; ValueError (said as a usage error) if they conflict."""
    given = {k: getattr(args, k) for k in ("batch", "num_qo_heads", "num_kv_heads", "head_dim",
                                           "prefix_len", "suffix_len", "density", "num_spans",
                                           "page_size", "dtype")
             if getattr(args, k) is not None}
    if args.kv_len is None and not given:
        return builtin_workloads()
    if args.kv_len is not None:
        prefix = given.get("prefix_len", 0)
        suffix = args.kv_len - prefix
        if suffix < 0 or given.get("suffix_len", suffix) != suffix:
            raise ValueError(f"--kv-len must equal --prefix-len + --suffix-len, got --kv-len {args.kv_len}, "
                             f"--prefix-len {prefix}, --suffix-len {given.get('suffix_len', '(not given)')}")
        given.update(prefix_len=prefix, suffix_len=suffix)
    w = Workload(**given, title="workload")
    check_kv_cache_size(w)
    return [w]


def reduced_workload(w: Workload) -> Workload:
    """A small instance of the same structure for the float64 references: few sequences and
    heads (the GQA ratio kept, up to 4), head_dim 32, short odd lengths."""
    group = min(w.num_qo_heads // w.num_kv_heads, 4)
    kv_heads = min(w.num_kv_heads, 2)
    prefix = min(w.prefix_len, 192)
    suffix = min(w.suffix_len, 37 if prefix else 229)
    return Workload(batch=min(w.batch, 4), num_qo_heads=kv_heads * group, num_kv_heads=kv_heads,
                    head_dim=32, prefix_len=prefix, suffix_len=suffix, density=w.density,
                    num_spans=min(w.num_spans, 4), page_size=16, dtype="float64", title=w.title)


def _max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    both_inf = np.isneginf(a) & np.isneginf(b)
    return float(np.max(np.abs(np.where(both_inf, 0.0, a - b)), initial=0.0))


def reference_check(w: Workload, *, seed: int = 0) -> list[tuple[str, float, float]]:
    """Run the NumPy references of every applicable variant on `w` (use a reduced workload) and
    return (variant, max |out - decode|, max |lse - decode|), decode run on the equivalent
    concatenated cache (the prefix copied into every sequence, or the attended tokens gathered)."""
    import refattn

    rng = np.random.default_rng(seed)
    b, hq, hkv, d = w.batch, w.num_qo_heads, w.num_kv_heads, w.head_dim
    p, s = w.prefix_len, w.suffix_len
    q = rng.standard_normal((b, hq, d))                                   # [B, Hq, D]
    k_prefix = rng.standard_normal((p, hkv, d))                           # [P, Hkv, D]
    v_prefix = rng.standard_normal((p, hkv, d))
    k_suffix = rng.standard_normal((b, s, hkv, d))                        # [B, S, Hkv, D]
    v_suffix = rng.standard_normal((b, s, hkv, d))
    suffix_lens = rng.integers(max(s // 2, 1 if s else 0), s + 1, size=b) if s else np.zeros(b, np.int64)
    k = np.concatenate([np.broadcast_to(k_prefix, (b, p, hkv, d)), k_suffix], axis=1)  # [B, P+S, Hkv, D]
    v = np.concatenate([np.broadcast_to(v_prefix, (b, p, hkv, d)), v_suffix], axis=1)
    kv_lens = p + suffix_lens                                             # [B]
    ref_out, ref_lse = refattn.decode(q, k, v, kv_lens)

    results = []

    def agree(name, out_lse, ref=(ref_out, ref_lse)):
        out, lse = out_lse
        results.append((name, _max_diff(out, ref[0]), _max_diff(lse, ref[1])))

    agree("split_kv", refattn.split_kv(q, k, v, kv_lens, num_splits=3))
    agree("paged_decode", refattn.paged_decode(
        q, *refattn.paged_from_contiguous(k, v, kv_lens, page_size=w.page_size, shuffle=seed)))
    if w.shares_prefix:
        for method in ("hydragen", "bifurcated"):
            agree(f"shared_prefix:{method}", refattn.shared_prefix(
                q, k_prefix, v_prefix, k_suffix, v_suffix, suffix_lens, method=method))
        segs_k = [k_prefix] + [k_suffix[i, :suffix_lens[i]] for i in range(b)]
        segs_v = [v_prefix] + [v_suffix[i, :suffix_lens[i]] for i in range(b)]
        agree("tree", refattn.tree(q, *refattn.tree_from_paths(segs_k, segs_v, [[0, 1 + i] for i in range(b)])))
    if w.density < 1.0:
        # every sequence attends to `num_spans` random disjoint intervals; decode sees them gathered
        mask = np.zeros((b, k.shape[1]), dtype=bool)
        for i in range(b):
            n = int(kv_lens[i])
            want = max(1, round(w.density * n))
            starts = np.sort(rng.choice(n, size=min(w.num_spans, n), replace=False))
            for j, start in enumerate(starts):
                mask[i, start:start + -(-want // len(starts))] = True
            mask[i, n:] = False
        span_indptr, spans = refattn.spans_from_mask(mask)
        gathered_lens = mask.sum(axis=1)
        order = np.argsort(~mask, axis=1, kind="stable")                  # attended tokens first
        k_g = np.take_along_axis(k, order[:, :, None, None], axis=1)
        v_g = np.take_along_axis(v, order[:, :, None, None], axis=1)
        gathered = refattn.decode(q, k_g, v_g, gathered_lens)
        agree("span", refattn.span(q, k, v, span_indptr, spans), ref=gathered)
    return results


def _gpu_present() -> bool:
    try:
        import gpukernels
    except Exception:
        return False
    try:
        return bool(gpukernels.gpu_available())
    except Exception:
        return False


def _detected_gpu_name() -> str | None:
    try:
        import cupy as cp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None


def _equal_spans(w: Workload) -> tuple[np.ndarray, np.ndarray]:
    """int32 (span_indptr, spans): `num_spans` equal spans per sequence, spread evenly over its
    context, covering `density` of it (the shape the span prediction assumes)."""
    n = w.context_len
    length = max(1, round(w.density * n) // w.num_spans)
    stride = n // w.num_spans
    starts = np.arange(w.num_spans) * stride
    one = np.stack([starts, np.minimum(starts + length, n)], axis=1)
    spans = np.tile(one, (w.batch, 1)).astype(np.int32)
    return np.arange(0, w.batch * w.num_spans + 1, w.num_spans, dtype=np.int32), spans


def measure_on_gpu(w: Workload, gpu, *, reps: int = 20) -> dict[str, float]:
    """Median seconds of the kernels gpukernels has for this workload, full size, timed like the
    benchmark (`gpukernels.bench.Timer`); each run on the plan its prediction describes."""
    import cupy as cp

    import gpukernels
    from gpukernels.bench import Timer

    from costmodel.split_kv import plan_split_kv

    timer = Timer(reps)
    rng = cp.random.default_rng(0)

    def normal(shape):
        return rng.standard_normal(shape, dtype=cp.float32).astype(w.dtype)

    b, hq, hkv, d, n = w.batch, w.num_qo_heads, w.num_kv_heads, w.head_dim, w.context_len
    q = normal((b, hq, d))
    k, v = normal((b, n, hkv, d)), normal((b, n, hkv, d))
    out, lse = cp.empty((b, hq, d), dtype=w.dtype), cp.empty((b, hq), dtype=cp.float32)
    seconds = {}
    for name, num_splits, page_size in (("decode", 1, 0), ("split_kv", None, 0), ("paged_decode", None, w.page_size)):
        plan = plan_split_kv(b, hq, hkv, d, n, dtype=w.dtype, num_splits=num_splits,
                             num_sms=gpu.num_sms, page_size=page_size, gpu=gpu)
        runner = gpukernels.SplitKV(plan)
        if not page_size:
            seconds[name] = 1e-3 * timer(lambda: runner.run(q, k, v, out=out, lse=lse))
            continue
        pages = -(-n // page_size)
        pad = ((0, 0), (0, pages * page_size - n), (0, 0), (0, 0))
        k_cache = cp.pad(k, pad).reshape(-1, page_size, hkv, d)
        v_cache = cp.pad(v, pad).reshape(-1, page_size, hkv, d)
        indptr = cp.arange(b + 1, dtype=cp.int32) * pages
        indices = cp.asarray(np.random.default_rng(0).permutation(b * pages).astype(np.int32))
        last = cp.full((b,), n - (pages - 1) * page_size, dtype=cp.int32)
        seconds[name] = 1e-3 * timer(lambda: runner.run_paged(q, k_cache, v_cache, indptr, indices, last,
                                                              out=out, lse=lse))
        del k_cache, v_cache
    # Variants the kernels may not have yet take the references' arguments (docs/design.md, "API contract").
    # (callable: the name of an unexported module of gpukernels is not a kernel)
    if w.shares_prefix and callable(getattr(gpukernels, "shared_prefix", None)):
        k_prefix, v_prefix = k[0, :w.prefix_len], v[0, :w.prefix_len]
        k_suffix, v_suffix = k[:, w.prefix_len:].copy(), v[:, w.prefix_len:].copy()
        k_prefix, v_prefix = k_prefix.copy(), v_prefix.copy()
        for method in ("hydragen", "bifurcated"):
            seconds[f"shared_prefix:{method}"] = 1e-3 * timer(lambda: gpukernels.shared_prefix(
                q, k_prefix, v_prefix, k_suffix, v_suffix, method=method))
    if w.density < 1.0 and callable(getattr(gpukernels, "span", None)):
        span_indptr, spans = (cp.asarray(a) for a in _equal_spans(w))
        seconds["span"] = 1e-3 * timer(lambda: gpukernels.span(q, k, v, span_indptr, spans))
    return seconds


def sharded_report(w: Workload, e, gpu: GPUSpec) -> str:
    """For a workload with num_gpus > 1: the sharded prediction at its context length, the
    table of one GPU against num_gpus at TABLE_KV_LENS tokens, with the crossover, and the
    crossover for every GPU count from 2 to sharded.MAX_NUM_GPUS."""
    shape = (w.batch, w.num_qo_heads, w.num_kv_heads, w.head_dim)
    table = sharded.sharding_table(*shape, num_gpus=w.num_gpus, dtype=w.dtype, gpu=gpu)
    crossovers = sharded.crossover_table(*shape, dtype=w.dtype, gpu=gpu)
    return f"{e.row(sharded_variant(w.num_gpus)).prediction}\n\n{table}\n\n{crossovers}"


def _cmd_explain(args) -> int:
    try:
        workloads = _workloads_from_args(args)
        if args.gpus is not None:
            workloads = [dataclasses.replace(w, num_gpus=args.gpus) for w in workloads]
    except ValueError as err:
        args.parser.error(str(err))
    has_gpu = not args.no_gpu and _gpu_present()
    try:
        gpu = args.gpu or get_gpu((_detected_gpu_name() if has_gpu else None) or "H100")
    except ValueError as err:
        raise SystemExit(f"explain: {err}") from None
    if args.gpus is not None:
        try:
            sharded.interconnect_for(gpu)
        except ValueError as err:
            args.parser.error(f"--gpus: {err}")
    head_dims = kernel_head_dims()
    for i, w in enumerate(workloads):
        if i:
            print()
        try:
            e = explain(w, gpu)
        except ValueError as err:
            raise SystemExit(f"explain: {err}") from None
        measured = None
        no_kernel = w.head_dim not in head_dims
        if no_kernel:
            print(f"note: no kernel exists for head_dim {w.head_dim} (the kernels have head_dim "
                  f"{', '.join(map(str, head_dims))}): the rows below are the cost model's predictions for "
                  "kernels that would run the same plans, and nothing is timed on a GPU")
        if has_gpu and not no_kernel:
            try:
                measured = measure_on_gpu(w, gpu, reps=args.reps)
            except Exception as err:   # a kernel that cannot run this shape: say so, keep going
                print(f"(GPU measurement failed: {type(err).__name__}: {err})")
        print(format_explanation(e, measured))
        if w.num_gpus > 1:
            print(f"\n{sharded_report(w, e, gpu)}")
        if not args.no_reference:
            r = reduced_workload(w)
            print(f"NumPy references at a reduced size ({r.batch} sequences, {r.num_qo_heads} query / "
                  f"{r.num_kv_heads} KV heads, head_dim {r.head_dim}, prefix {r.prefix_len} + up to "
                  f"{r.suffix_len} own tokens, float64), each against decode on the concatenated cache:")
            worst = 0.0
            for name, d_out, d_lse in reference_check(r):
                worst = max(worst, d_out, d_lse)
                print(f"  {name:<26} max |out - decode| = {d_out:.1e}   max |lse - decode| = {d_lse:.1e}")
            verdict = "agree" if worst <= AGREEMENT_ATOL else "DISAGREE"
            print(f"  the variants {verdict} with decode (tolerance {AGREEMENT_ATOL:.0e})")
            if worst > AGREEMENT_ATOL:
                return 1
    if not has_gpu:
        print("\nno GPU: predictions only")
    return 0


# ---------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------

def _cmd_accuracy(args) -> int:
    try:
        files = acc.load_results(args.results)
    except ValueError as err:
        args.parser.exit(2, f"decode-attention accuracy: {err}\n")
    where = args.results or acc.find_results_dir() or "results/"
    if not files:
        print(f"no committed results under {where}: nothing to score yet "
              "(result files arrive from benchmark runs on a GPU)")
        return 0
    fitted = {}
    if args.fit:
        from costmodel.calibrate import fit_results
        from costmodel.calibration import save_calibration

        fitted = fit_results(args.results)
        if not fitted:
            print("no decode-suite rows of our variants to fit on: constants unchanged")
        for key, cal in fitted.items():
            path = save_calibration(key, cal)
            print(f"fitted {key} on the decode suite: launch {cal.launch_s * 1e6:.2f} us, round trip "
                  f"{cal.block_round_trip_s * 1e6:.2f} us, block stream {cal.block_bytes_per_s / 1e9:.1f} GB/s, "
                  f"bandwidth fraction {cal.bw_fraction:.3f}, {cal.blocks_per_sm} blocks/SM -> {path}")
    calibration, own_errors, constants = None, None, ""
    if args.constants_from is not None:
        source = args.constants_from
        try:
            calibration = fitted.get(source.key) or acc.fitted_calibration(source)
        except ValueError as err:
            args.parser.exit(2, f"decode-attention accuracy: --constants-from: {err}\n")
        files = acc.results_of_other_gpus(files, source)
        if not files:
            print(f"no results under {where} of a GPU other than {source.key}: nothing to score its "
                  "constants on")
            return 0
        own_errors, _ = acc.row_errors(files)
        print(f"constants of {source.key} ({calibration.source}), applied unchanged to the other GPUs' results")
        constants = f" with the constants of {source.key}"
    errors, unsupported = acc.row_errors(files, calibration=calibration)
    if not errors:
        print(f"results under {where} hold no rows of this project's variants: nothing to score")
        return 1 if args.check and unsupported else 0
    gpus = sorted({e.gpu_slug for e in errors})
    summary, speedups = acc.summarize(errors), acc.speedup_errors(errors)
    print(acc.format_report(summary, unsupported, speedups=speedups,
                            title=f"cost model accuracy over {len(errors)} rows ({', '.join(gpus)}){constants}:"))
    if own_errors:
        own = acc.summarize(own_errors)[-1]
        print(f"for comparison, each GPU with its own constants: median {own.median:.1%}, "
              f"p90 {own.p90:.1%} over the same {own.count} rows")
    if args.check:
        missed = [s.suite for s in summary if not s.meets_target]
        missed += [e.impl for e in speedups if e.rel_error > acc.SPEEDUP_TARGET]
        if missed or unsupported:
            return 1
    return 0


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------

GENERATE_ATTENTIONS = ("split_kv", "paged_decode", "shared_prefix", "span", "peer:cudnn", "peer:flashinfer", "none")
SPAN_PATTERNS = ("sinks_window", "arithmetic", "summarization")


NONE_STEPS = 20   # graph replays timing the step without attention (the ceiling)


def _generate_cache_bytes(args, decoder) -> int:
    """Weights and KV cache of the run, in bytes, as the chosen attention lays the cache out."""
    itemsize = ITEMSIZE[args.dtype]
    per_token = decoder.kv_bytes_per_token(args.dtype)
    if args.attention == "shared_prefix":
        tokens = args.prompt_len + args.samples * args.new_tokens
    elif args.attention in ("paged_decode", "peer:flashinfer"):
        tokens = args.prompt_len + args.samples * (args.new_tokens + 16)
    elif args.attention == "none":
        tokens = 0
    else:
        tokens = args.samples * (args.prompt_len + args.new_tokens)
    return decoder.params * itemsize + tokens * per_token


def _check_generate_args(args):
    """The decoder the options describe (its layers cut as asked); a usage error if they conflict."""
    from costmodel.end_to_end import get_decoder

    decoder = get_decoder(args.model)
    if args.layers is not None:
        if args.layers > decoder.num_layers:
            args.parser.error(f"--layers: {decoder.name} has {decoder.num_layers} layers, so at most "
                              f"{decoder.num_layers}, got {args.layers}")
        decoder = decoder.with_layers(args.layers)
    largest = max((get_gpu(k) for k in gpu_names()), key=lambda g: g.hbm_capacity_bytes)
    need = _generate_cache_bytes(args, decoder)
    if need > largest.hbm_capacity_bytes:
        args.parser.error(f"the weights and KV cache of this run take {_size_text(need)} ({decoder.name}, "
                          f"{decoder.num_layers} layers, {args.samples} samples x {args.prompt_len} + "
                          f"{args.new_tokens} tokens, attention {args.attention}), which exceeds the "
                          f"{_size_text(largest.hbm_capacity_bytes)} of the largest known GPU ({largest.name})")
    return decoder


def _progress_printer():
    """(callback(done, total), close()) showing the decode's progress: rich when installed, else lines."""
    try:
        from rich.progress import Progress
    except ImportError:
        def plain(done, total):
            print(f"  decoded {done}/{total} steps", file=sys.stderr, flush=True)
        return plain, lambda: None
    bar = Progress(transient=True)
    bar.start()
    task = bar.add_task("decoding", total=None)

    def show(done, total):
        bar.update(task, completed=done, total=total)
    return show, bar.stop


def _span_pattern(args):
    from decode_attention.e2e.attention import SpanPattern, prompt_pattern

    if args.span_pattern == "sinks_window":
        return SpanPattern(num_sinks=args.sinks, window=args.window)
    return prompt_pattern(args.span_pattern, args.prompt_len, density=args.span_density,
                          window=args.new_tokens, seed=args.seed)


def _cmd_generate(args) -> int:
    decoder_shape = _check_generate_args(args)
    try:
        import torch
    except ImportError:
        return _fail("generate", "needs PyTorch: pip install -e '.[model]' (and a CUDA GPU)")
    if not torch.cuda.is_available():
        return _fail("generate", "needs a CUDA GPU (PyTorch with CUDA, and CuPy for this project's kernels); "
                                 "none found here")
    from costmodel.end_to_end import predict_step
    from decode_attention.e2e.generate import Generation, step_time_ms
    from decode_attention.e2e.model import random_decoder

    try:
        gpu = get_gpu(torch.cuda.get_device_name())
    except ValueError as err:
        return _fail("generate", f"the cost model does not know this GPU, so it cannot predict the step: {err}")
    dtype = getattr(torch, args.dtype)
    # the decode and the step of the 'none' ceiling (NONE_STEPS replays after one warm-up) both fit
    max_positions = args.prompt_len + max(args.new_tokens, NONE_STEPS + 1)
    print(f"{decoder_shape.name}: {decoder_shape.num_layers} layers, random weights ({args.dtype}) on the GPU; "
          f"{args.samples} samples of a {args.prompt_len}-token prompt, {args.new_tokens} new tokens, "
          f"attention {args.attention}", file=sys.stderr)
    decoder = random_decoder(decoder_shape, max_positions=max_positions, device="cuda", dtype=dtype, seed=args.seed)
    prompt = torch.randint(0, decoder_shape.vocab_size, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(args.seed))
    span = _span_pattern(args) if args.attention == "span" else None
    try:
        run = Generation(decoder, args.attention, samples=args.samples, prompt_len=args.prompt_len,
                         new_tokens=args.new_tokens, span=span, temperature=args.temperature)
    except (ImportError, ValueError) as err:
        return _fail("generate", f"{type(err).__name__}: {err}")
    show, close = _progress_printer()
    try:
        result = run.generate(prompt, progress=show)
    except RuntimeError as err:   # a peer refusing the shape, memory: one line, not a traceback
        return _fail("generate", f"{args.attention}: {type(err).__name__}: {str(err).splitlines()[0]}", status=1)
    finally:
        close()
    del run
    torch.cuda.empty_cache()
    none_ms, _ = step_time_ms(decoder, "none", samples=args.samples, context_len=args.prompt_len, steps=NONE_STEPS)
    middle = args.prompt_len + args.new_tokens // 2
    predicted = predict_step(decoder_shape, "split_kv" if args.attention.startswith("peer:") else args.attention,
                             batch=args.samples, context_len=middle, prompt_len=args.prompt_len, dtype=args.dtype,
                             num_sinks=span.num_sinks if span else 4, window=span.window if span else 4096,
                             span_lens=None if span is None or not span.fixed_spans else
                             [e - s for s, e in span.fixed_spans] + [min(span.window, args.new_tokens // 2)],
                             gpu=gpu)
    step_ms = result.step_ms_median
    share = max(0.0, 1.0 - none_ms / step_ms) if result.step_ms.size else float("nan")
    figures = {
        "model": decoder_shape.name, "num_layers": decoder_shape.num_layers, "attention": args.attention,
        "dtype": args.dtype, "samples": args.samples, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "gpu": gpu.name, "prefill_ms": result.prefill_ms,
        "tokens_per_s": result.tokens_per_s, "step_ms_median": step_ms,
        "step_ms_p90": float(np.percentile(result.step_ms, 90)) if result.step_ms.size else float("nan"),
        "none_step_ms": none_ms, "attention_share": share,
        "predicted": {**predicted.terms_ms(), "tokens_per_s": predicted.tokens_per_s,
                      "attention_share": predicted.attention_share, "weight_bytes": predicted.weight_bytes,
                      "kv_bytes": predicted.kv_bytes, "kernels": predicted.other_kernels + predicted.attention_launches,
                      "context_len": middle,
                      "attention_predicted_as": "split_kv" if args.attention.startswith("peer:") else args.attention},
        "first_tokens": result.tokens[:, :16].tolist(),
    }
    print(f"prefill {result.prefill_ms:.0f} ms; decode: {result.tokens_per_s:,.0f} tokens/s, step "
          f"{step_ms:.3f} ms median ({figures['step_ms_p90']:.3f} ms p90); attention {share:.0%} of the step "
          f"(the step without attention: {none_ms:.3f} ms)")
    print(f"predicted at {middle} tokens: step {predicted.time_s * 1e3:.3f} ms ({predicted.tokens_per_s:,.0f} tokens/s), "
          f"attention {predicted.attention_share:.0%}")
    print(predicted)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# bench / verify: forwarded
# ---------------------------------------------------------------------------------------------

def _report_file(argv: list[str]) -> "str | None":
    """The FILE of `bench --report FILE` (or `--report=FILE`, or an unambiguous prefix such as
    `--repo`, as bench's parser accepts), else None."""
    for i, word in enumerate(argv):
        if word == "--":
            break
        name, eq, value = word.partition("=")
        if len(name) > len("--rep") and "--report".startswith(name):   # "--rep" is also "--reps"
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _fail(command: str, message: str, *, status: int = 2) -> int:
    print(f"decode-attention {command}: {message}", file=sys.stderr)
    return status


def _forward(command: str, argv: list[str]) -> int:
    """Run `FORWARDED[command].main(argv)`; a `bench --report FILE` that is missing or is not a
    result file is one line on stderr and exit status 2, whatever bench itself would do with it."""
    module_name = FORWARDED[command]
    report = _report_file(argv) if command == "bench" else None
    if report is not None:
        try:
            acc.read_result_file(report)
        except FileNotFoundError:
            return _fail(command, f"--report: no such file: {report}")
        except (OSError, ValueError) as err:
            return _fail(command, f"--report: {err}")
    try:
        module = importlib.import_module(module_name)
        entry = module.main
    except (ImportError, AttributeError) as e:
        return _fail(command, f"cannot load {module_name}.main: {type(e).__name__}: {e}")
    try:
        result = entry(argv)
    except SystemExit as e:             # argparse's --help (0) and usage errors (2)
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        return _fail(command, str(e.code), status=1)
    except (KeyError, TypeError, ValueError) as err:
        if report is None:
            raise
        what = f"a row lacks {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        return _fail(command, f"--report: {report} is not a result file of the decode benchmark ({what}; "
                              "expected the rows `decode-attention bench` writes to results/<gpu>/decode.json)")
    return int(result or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decode-attention", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    d = WORKLOAD_DEFAULTS
    ex = sub.add_parser("explain", help="predict, rank and explain the variants for a workload",
                        description="Without workload options: the built-in example (a Llama-3-8B-like "
                                    "layer, 16 samples of one 8k prompt; and sparse spans over 32k tokens). "
                                    "With any of them, the options not given take the defaults shown. "
                                    f"A workload whose KV cache exceeds {MAX_GPUS_PER_WORKLOAD} x the memory "
                                    "of the largest known GPU is refused.")
    ex.set_defaults(func=_cmd_explain, parser=ex)
    w = ex.add_argument_group("workload (any of these replaces the built-in example)")
    w.add_argument("--batch", type=positive_int, metavar="N", help=f"sequences in the batch (default: {d['batch']})")
    w.add_argument("--num-qo-heads", type=positive_int, metavar="N",
                   help=f"query heads, a multiple of --num-kv-heads (default: {d['num_qo_heads']})")
    w.add_argument("--num-kv-heads", type=positive_int, metavar="N",
                   help=f"key/value heads (default: {d['num_kv_heads']})")
    w.add_argument("--head-dim", type=positive_int, metavar="D",
                   help=f"head dimension (default: {d['head_dim']}); the kernels exist for "
                        f"{', '.join(map(str, kernel_head_dims()))}: another value is predicted by the "
                        "cost model only, says so, and is not timed")
    w.add_argument("--kv-len", type=positive_int, metavar="TOKENS",
                   help="context tokens per sequence, --prefix-len + --suffix-len "
                        f"(default: {d['prefix_len']} + {d['suffix_len']}; given alone, all own tokens)")
    w.add_argument("--prefix-len", type=nonnegative_int, metavar="TOKENS",
                   help=f"tokens shared by every sequence (default: {d['prefix_len']}, 0 with --kv-len)")
    w.add_argument("--suffix-len", type=nonnegative_int, metavar="TOKENS",
                   help=f"each sequence's own tokens (default: {d['suffix_len']}; with --kv-len, "
                        "--kv-len minus --prefix-len)")
    w.add_argument("--density", type=density_fraction, metavar="FRACTION",
                   help="fraction of the context attended, in (0, 1]; below 1 adds the span variant "
                        f"(default: {d['density']}, dense)")
    w.add_argument("--num-spans", type=positive_int, metavar="N",
                   help=f"spans per sequence when --density < 1 (default: {d['num_spans']})")
    w.add_argument("--page-size", type=positive_int, metavar="TOKENS",
                   help=f"tokens per page for paged_decode (default: {d['page_size']})")
    w.add_argument("--dtype", choices=tuple(ITEMSIZE), help=f"element type of q, k, v (default: {d['dtype']})")
    ex.add_argument("--gpu", type=known_gpu, metavar="NAME",
                    help="GPU to predict for, e.g. H100, H200, A100 (default: the one present, else H100)")
    ex.add_argument("--gpus", type=gpu_count, metavar="N",
                    help=f"shard each sequence's KV cache along its tokens over N GPUs of one host, 2 to "
                         f"{sharded.MAX_NUM_GPUS}: adds that prediction (split_kv on every shard, one all-gather "
                         "of the partial states, a merge), the context length from which it beats one GPU, and "
                         "its time against one GPU's at 32k, 128k, 1M and 4M tokens, and the crossover context for "
                         f"every GPU count from 2 to {sharded.MAX_NUM_GPUS}; predicted only, never "
                         "timed (default: 1, no sharding)")
    ex.add_argument("--no-reference", action="store_true",
                    help="skip the NumPy reference check (default: run it, at a reduced size)")
    ex.add_argument("--no-gpu", action="store_true",
                    help="predictions only, even with a GPU (default: time the kernels when a GPU is present)")
    ex.add_argument("--reps", type=positive_int, default=20, metavar="N",
                    help="timed repetitions per kernel on a GPU (default: %(default)s)")

    ac = sub.add_parser("accuracy", help="score the model against the committed results",
                        description="Median and 90th-percentile |predicted - measured| / measured per suite "
                                    "of the committed results, against the targets (median <= "
                                    f"{acc.MEDIAN_TARGET:.0%}, p90 <= {acc.P90_TARGET:.0%}).")
    ac.set_defaults(func=_cmd_accuracy, parser=ac)
    ac.add_argument("--results", type=results_dir, metavar="DIR",
                    help="directory of <gpu>/<suite>.json result files (default: the checkout's results/)")
    ac.add_argument("--fit", action="store_true",
                    help="first refit each GPU's constants on its decode suite and store them in "
                         "costmodel/data/calibration.json (default: off, the stored constants)")
    ac.add_argument("--check", action="store_true",
                    help="exit 1 if a target is missed or a row cannot be predicted (default: off, exit 0)")
    ac.add_argument("--constants-from", type=known_gpu, metavar="GPU",
                    help="score the results of every other GPU with this GPU's fitted constants, e.g. "
                         "h100 (default: off, each GPU with its own)")

    ge = sub.add_parser("generate", help="decode with a Llama-shaped model end to end (needs a CUDA GPU)",
                        description="A Llama-shaped decoder with random weights made on the GPU: the prompt "
                                    "prefilled once, then every sample decoded one token a step under CUDA graphs "
                                    "with the chosen attention. Prints tokens per second, per-step latency, the "
                                    "share of the step spent in attention and the cost model's prediction.")
    ge.set_defaults(func=_cmd_generate, parser=ge)
    from costmodel.end_to_end import DECODERS

    ge.add_argument("--model", choices=tuple(DECODERS), default="llama3-8b",
                    help="the published shape of the decoder (llama2-7b: the 7B multi-head model) "
                         "(default: %(default)s)")
    ge.add_argument("--layers", type=positive_int, metavar="N",
                    help="run only the first N layers (every layer costs the same) (default: all)")
    ge.add_argument("--samples", type=positive_int, default=32, metavar="N",
                    help="sequences decoded from the one prompt (default: %(default)s)")
    ge.add_argument("--prompt-len", type=positive_int, default=8192, metavar="TOKENS",
                    help="tokens of the prompt, prefilled once (default: %(default)s)")
    ge.add_argument("--new-tokens", type=positive_int, default=256, metavar="N",
                    help="tokens generated per sample (default: %(default)s)")
    ge.add_argument("--attention", choices=GENERATE_ATTENTIONS, default="shared_prefix",
                    help="split_kv and paged_decode (the prompt copied into every sample's cache, or its pages "
                         "listed in every table), shared_prefix (the prompt's KV once), span (sinks + window, or "
                         "--span-pattern), the peers peer:cudnn (SDPA) and peer:flashinfer, or none (attention "
                         "skipped) (default: %(default)s)")
    ge.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16",
                    help="weights, activations and KV cache (default: %(default)s)")
    ge.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy; above 0: sample (Gumbel-max), each sample its own tokens (default: %(default)s)")
    ge.add_argument("--sinks", type=nonnegative_int, default=4, metavar="TOKENS",
                    help="span: the first tokens every step attends to (default: %(default)s)")
    ge.add_argument("--window", type=positive_int, default=4096, metavar="TOKENS",
                    help="span: the most recent tokens every step attends to (default: %(default)s)")
    ge.add_argument("--span-pattern", choices=SPAN_PATTERNS, default="sinks_window",
                    help="span: sinks + window, or spans of the prompt like a task's self-selected spans "
                         "(arithmetic, summarization) with every new token attended (default: %(default)s)")
    ge.add_argument("--span-density", type=density_fraction, default=0.1, metavar="FRACTION",
                    help="span: the fraction of the prompt an arithmetic or summarization pattern attends "
                         "to (default: %(default)s)")
    ge.add_argument("--seed", type=nonnegative_int, default=0,
                    help="seed of the weights, the prompt and the span pattern (default: %(default)s)")
    ge.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON (default: off)")

    for name in FORWARDED:
        sub.add_parser(name, help=f"run {FORWARDED[name]} (arguments forwarded; --help for its options)",
                       add_help=False)
    return parser


def main(argv: "list[str] | None" = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        return _forward(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
