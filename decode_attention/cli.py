"""The `decode-attention` command.

    decode-attention explain [workload options] [--gpu H100]
        Predict every applicable variant for a workload (default: the built-in example), rank
        them, say why the winner wins; check with the NumPy references, at a reduced size, that
        the variants agree; on a machine with CuPy and a GPU, also time the kernels.
    decode-attention accuracy [--results DIR] [--fit] [--check]
        Median and 90th-percentile |predicted - measured| / measured per suite of the committed
        results; --fit first refits the constants on the decode suite; --check exits 1 on a miss.
    decode-attention bench ...     forwards to gpukernels.bench
    decode-attention verify ...    forwards to gpukernels.verify
"""

from __future__ import annotations

import argparse
import importlib
import sys

import numpy as np

from costmodel import accuracy as acc
from costmodel import get_gpu
from costmodel.explain import Workload, builtin_workloads, explain, format_explanation

__all__ = ["main", "reference_check", "reduced_workload"]

FORWARDED = {"bench": "gpukernels.bench", "verify": "gpukernels.verify"}
AGREEMENT_ATOL = 1e-10   # float64 references of one computation agree to rounding


# ---------------------------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------------------------

def _workloads_from_args(args) -> list[Workload]:
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
            raise SystemExit("explain: --kv-len must equal --prefix-len + --suffix-len")
        given.update(prefix_len=prefix, suffix_len=suffix)
    try:
        return [Workload(**given, title="workload")]
    except ValueError as e:
        raise SystemExit(f"explain: {e}") from None


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
    # Variants the kernels may not have yet take the references' arguments (DESIGN.md).
    if w.shares_prefix and hasattr(gpukernels, "shared_prefix"):
        k_prefix, v_prefix = k[0, :w.prefix_len], v[0, :w.prefix_len]
        k_suffix, v_suffix = k[:, w.prefix_len:].copy(), v[:, w.prefix_len:].copy()
        k_prefix, v_prefix = k_prefix.copy(), v_prefix.copy()
        for method in ("hydragen", "bifurcated"):
            seconds[f"shared_prefix:{method}"] = 1e-3 * timer(lambda: gpukernels.shared_prefix(
                q, k_prefix, v_prefix, k_suffix, v_suffix, method=method))
    if w.density < 1.0 and hasattr(gpukernels, "span"):
        span_indptr, spans = (cp.asarray(a) for a in _equal_spans(w))
        seconds["span"] = 1e-3 * timer(lambda: gpukernels.span(q, k, v, span_indptr, spans))
    return seconds


def _cmd_explain(args) -> int:
    workloads = _workloads_from_args(args)
    has_gpu = not args.no_gpu and _gpu_present()
    try:
        gpu = get_gpu(args.gpu or (_detected_gpu_name() if has_gpu else None) or "H100")
    except ValueError as err:
        raise SystemExit(f"explain: {err}") from None
    for i, w in enumerate(workloads):
        if i:
            print()
        try:
            e = explain(w, gpu)
        except ValueError as err:
            raise SystemExit(f"explain: {err}") from None
        measured = None
        if has_gpu:
            try:
                measured = measure_on_gpu(w, gpu, reps=args.reps)
            except Exception as err:   # a kernel that cannot run this shape: say so, keep going
                print(f"(GPU measurement failed: {type(err).__name__}: {err})")
        print(format_explanation(e, measured))
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
    files = acc.load_results(args.results)
    where = args.results or acc.find_results_dir() or "results/"
    if not files:
        print(f"no committed results under {where}: nothing to score yet "
              "(result files arrive from benchmark runs on a GPU)")
        return 0
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
    errors, unsupported = acc.row_errors(files)
    if not errors:
        print(f"results under {where} hold no rows of this project's variants: nothing to score")
        return 1 if args.check and unsupported else 0
    gpus = sorted({e.gpu_slug for e in errors})
    summary, speedups = acc.summarize(errors), acc.speedup_errors(errors)
    print(acc.format_report(summary, unsupported, speedups=speedups,
                            title=f"cost model accuracy over {len(errors)} rows ({', '.join(gpus)}):"))
    if args.check:
        missed = [s.suite for s in summary if not s.meets_target]
        missed += [e.impl for e in speedups if e.rel_error > acc.SPEEDUP_TARGET]
        if missed or unsupported:
            return 1
    return 0


# ---------------------------------------------------------------------------------------------
# bench / verify: forwarded
# ---------------------------------------------------------------------------------------------

def _forward(command: str, argv: list[str]) -> int:
    module_name = FORWARDED[command]
    try:
        module = importlib.import_module(module_name)
        entry = module.main
    except (ImportError, AttributeError) as e:
        print(f"decode-attention {command}: cannot load {module_name}.main ({e}); "
              "it needs the gpukernels package with CuPy installed", file=sys.stderr)
        return 2
    result = entry(argv)
    return int(result or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decode-attention", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("explain", help="predict, rank and explain the variants for a workload",
                        description="Without workload options: the built-in example (a Llama-3-8B-like "
                                    "layer, 16 samples of one 8k prompt; and sparse spans over 32k tokens).")
    w = ex.add_argument_group("workload (any of these replaces the built-in example)")
    w.add_argument("--batch", type=int)
    w.add_argument("--num-qo-heads", type=int)
    w.add_argument("--num-kv-heads", type=int)
    w.add_argument("--head-dim", type=int)
    w.add_argument("--kv-len", type=int, help="context tokens per sequence (prefix + suffix)")
    w.add_argument("--prefix-len", type=int, help="tokens shared by every sequence")
    w.add_argument("--suffix-len", type=int, help="each sequence's own tokens")
    w.add_argument("--density", type=float, help="fraction of the context attended, in spans")
    w.add_argument("--num-spans", type=int, help="spans per sequence when --density < 1")
    w.add_argument("--page-size", type=int, help="tokens per page for paged_decode")
    w.add_argument("--dtype", choices=("float16", "bfloat16", "float32"))
    ex.add_argument("--gpu", help="GPU to predict for (default: the one present, else H100)")
    ex.add_argument("--no-reference", action="store_true", help="skip the NumPy reference check")
    ex.add_argument("--no-gpu", action="store_true", help="predictions only, even with a GPU")
    ex.add_argument("--reps", type=int, default=20, help="timed repetitions per kernel on a GPU")
    ex.set_defaults(func=_cmd_explain)

    ac = sub.add_parser("accuracy", help="score the model against the committed results")
    ac.add_argument("--results", help="results directory (default: the checkout's results/)")
    ac.add_argument("--fit", action="store_true", help="refit the constants on the decode suite first")
    ac.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    ac.set_defaults(func=_cmd_accuracy)

    for name in FORWARDED:
        sub.add_parser(name, help=f"run {FORWARDED[name]} (arguments forwarded)", add_help=False)
    return parser


def main(argv: "list[str] | None" = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        return _forward(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
