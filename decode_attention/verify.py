"""Run a representative set of GPU kernel calls and compare each with the float64 reference.

Small enough to run under compute-sanitizer (memcheck, racecheck): every kernel family, every
dtype, head dims 64/128/256, GQA 28/4, ragged lengths, split and unsplit, page sizes 1 and 16 with
a shuffled page table, a page table on the GPU that points past its cache for one sequence (that
sequence must come out NaN, and nothing may be read out of bounds), and the first shared-prefix
(both methods, bifurcated attention in float32 too), tree and span kernels. Exits 1 if any output
is off by more than its dtype's tolerance.

    decode-attention verify
    python -m decode_attention.verify
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import numpy as np

from decode_attention.tolerances import OUT_RTOL, rel_error


def _cases():
    for dtype in ("float16", "bfloat16", "float32"):
        for head_dim in (64, 128, 256):
            yield dtype, head_dim, 28, 4, "split_kv", 3
            yield dtype, head_dim, 8, 8, "decode", 1
        yield dtype, 128, 32, 8, "paged1", None
        yield dtype, 128, 32, 8, "paged16", 2
        yield dtype, 128, 16, 16, "merge_states", None
        yield dtype, 128, 32, 8, "paged_bad_table", 2
        yield dtype, 128, 32, 8, "span", None
        yield dtype, 128, 32, 8, "bifurcated", None
        if dtype != "float32":
            yield dtype, 64, 16, 16, "persistent", 1
            yield dtype, 128, 32, 32, "persistent", 1   # sequences of at most 128 tokens there
            for head_dim in (64, 128, 256):
                yield dtype, head_dim, 32, 8, "hydragen", None
            for head_dim in (64, 128):   # 160 query rows a KV head: blocks of two warpgroups on Hopper
                yield dtype, head_dim, 32, 8, "hydragen:wide", None
            yield dtype, 128, 32, 8, "hydragen:merge", None   # three launches (a merge launch)
            yield dtype, 128, 32, 32, "hydragen:persistent", None   # its suffixes by the persistent kernel
            for head_dim in (64, 128):   # the suffixes inside the prefix pass (Hopper)
                yield dtype, head_dim, 32, 8, "hydragen:fused", None
            yield dtype, 128, 16, 4, "tree", None
            for form in ("own", "merge", "paged"):   # both forms of the tree plan, and segments in pages
                yield dtype, 64, 16, 4, f"tree:{form}", None
        else:
            yield dtype, 64, 16, 4, "tree", None   # the "paths" form


def _to_device(x, dtype):
    import cupy as cp

    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(x.astype(np.float32)).cuda().to(torch.bfloat16)
    return cp.asarray(x.astype(dtype))


def _ints_to_device(a, dtype):
    """An int32 index array on the GPU, of the same array library as `_to_device(x, dtype)`."""
    a = np.ascontiguousarray(a, dtype=np.int32)
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(a).cuda()
    import cupy as cp

    return cp.asarray(a)


def _to_host(x):
    if hasattr(x, "get"):
        return x.get().astype(np.float64)
    return x.float().cpu().numpy().astype(np.float64)


def run_case(rng, dtype, head_dim, hq, hkv, kind, num_splits) -> float:
    import gpukernels
    import refattn

    batch, kv_len = 3, 300
    rounded = lambda a: _to_host(_to_device(a, dtype))  # noqa: E731 - inputs as the GPU sees them
    if kind == "merge_states":
        outs = rng.standard_normal((5, batch, hq, head_dim))
        lses = rng.standard_normal((5, batch, hq)).astype(np.float32) * 3
        lses[0, 0] = -np.inf
        ref_out, _ = refattn.merge_states(rounded(outs), lses)
        import cupy as cp

        out, _ = gpukernels.merge_states(_to_device(outs, dtype), cp.asarray(lses))
    elif kind in ("hydragen", "hydragen:wide", "hydragen:merge", "hydragen:persistent", "hydragen:fused",
                  "bifurcated", "tree",
                  "tree:own", "tree:merge", "tree:paged", "span"):
        return _sharing_case(rng, rounded, dtype, head_dim, hq, hkv, kind)
    elif kind == "persistent":
        # more (sequence, head) items than the GPU holds blocks, of one length: the persistent kernel
        q = rounded(rng.standard_normal((24, hq, head_dim)))
        n = 200 if head_dim == 64 else 100
        k = rounded(rng.standard_normal((24, n, hkv, head_dim)))
        v = rounded(rng.standard_normal((24, n, hkv, head_dim)))
        ref_out, _ = refattn.decode(q, k, v)
        out, _ = gpukernels.split_kv(_to_device(q, dtype), _to_device(k, dtype), _to_device(v, dtype),
                                     num_splits=num_splits)
    else:
        q = rounded(rng.standard_normal((batch, hq, head_dim)))
        k = rounded(rng.standard_normal((batch, kv_len, hkv, head_dim)))
        v = rounded(rng.standard_normal((batch, kv_len, hkv, head_dim)))
        kv_lens = np.array([kv_len, 1, 0])[:batch]
        ref_out, _ = refattn.decode(q, k, v, kv_lens)
        qd = _to_device(q, dtype)
        if kind == "paged_bad_table":
            kc, vc, indptr, indices, last = refattn.paged_from_contiguous(
                k, v, kv_lens, page_size=16, shuffle=1, extra_pages=2)
            bad = indptr.copy()
            bad[-1] = len(indices) + 4            # the last sequence's pages run past kv_indices
            bad[-2] = min(bad[-2], bad[-1])
            out, _ = gpukernels.paged_decode(qd, _to_device(kc, dtype), _to_device(vc, dtype),
                                             *(_ints_to_device(a, dtype) for a in (bad, indices, last)),
                                             num_splits=num_splits)
            got = _to_host(out)
            if not np.isnan(got[-1]).all():
                return float("inf")            # the impossible sequence must be NaN
            return rel_error(got[:-1], ref_out[:-1])
        if kind.startswith("paged"):
            page_size = int(kind[len("paged"):])
            kc, vc, indptr, indices, last = refattn.paged_from_contiguous(
                k, v, kv_lens, page_size=page_size, shuffle=1, extra_pages=2)
            out, _ = gpukernels.paged_decode(qd, _to_device(kc, dtype), _to_device(vc, dtype), indptr,
                                             indices, last, num_splits=num_splits)
        else:
            fn = gpukernels.decode if kind == "decode" else gpukernels.split_kv
            kwargs = {} if kind == "decode" else {"num_splits": num_splits}
            out, _ = fn(qd, _to_device(k, dtype), _to_device(v, dtype), kv_lens, **kwargs)
    return rel_error(_to_host(out), ref_out)


def _sharing_case(rng, rounded, dtype, head_dim, hq, hkv, kind) -> float:
    """The first shared-prefix (both methods), tree and span kernels on small inputs."""
    import refattn
    from gpukernels.shared_prefix import shared_prefix
    from gpukernels.span import span
    from gpukernels.tree import Tree, plan_tree, tree

    dev = lambda a: _to_device(a, dtype)  # noqa: E731
    batch = {"hydragen:wide": 40, "hydragen:merge": 40, "hydragen:persistent": 24, "hydragen:fused": 40}.get(kind, 5)
    q = rounded(rng.standard_normal((batch, hq, head_dim)))
    if kind in ("hydragen", "hydragen:wide", "hydragen:merge", "hydragen:persistent", "hydragen:fused", "bifurcated"):
        kp, vp = (rounded(rng.standard_normal((700, hkv, head_dim))) for _ in range(2))
        ks, vs = (rounded(rng.standard_normal((batch, 40, hkv, head_dim))) for _ in range(2))
        # the persistent suffixes: one length, none given (768 items)
        lens = None if kind == "hydragen:persistent" else np.resize([40, 0, 13, 40, 1], batch)
        ref_out, _ = refattn.shared_prefix(q, kp, vp, ks, vs, lens)
        if kind in ("hydragen:merge", "hydragen:persistent", "hydragen:fused"):
            # the suffixes merging no states, then a merge launch; or inside the prefix pass
            import dataclasses

            from gpukernels.shared_prefix import SharedPrefix, plan_shared_prefix

            plan = plan_shared_prefix(batch, hq, hkv, head_dim, 700, 40, dtype=dtype, gpu="H200",
                                      fused=kind == "hydragen:fused", prefix_chunk_size=256 if kind == "hydragen:fused"
                                      else None)
            if kind != "hydragen:fused":
                plan = dataclasses.replace(plan, merge_launch=True, suffix_persistent=kind == "hydragen:persistent")
            out, _ = SharedPrefix(plan).run(dev(q), dev(kp), dev(vp), dev(ks), dev(vs),
                                            None if lens is None else _ints_to_device(lens, dtype))
        else:
            out, _ = shared_prefix(dev(q), dev(kp), dev(vp), dev(ks), dev(vs), lens, method=kind.split(":")[0])
    elif kind.startswith("tree"):
        lens = [300, 120, 70, 50, 0, 33, 64]
        paths = [[0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 2], [6]]
        segs = [[rounded(rng.standard_normal((n, hkv, head_dim))) for n in lens] for _ in range(2)]
        k_segs, v_segs, *index = refattn.tree_from_paths(segs[0], segs[1], paths)
        ref_out, _ = refattn.tree(q, k_segs, v_segs, *index)
        if kind == "tree":   # the one-shot call, the plan's own choice
            out, _ = tree(dev(q), dev(k_segs), dev(v_segs), *index)
        elif kind == "tree:paged":   # each segment in shuffled pages of 16, junk in the others
            seg_indptr, path_indptr, path_segs = index
            lens_s = np.diff(seg_indptr)
            padded = np.zeros((2, len(lens_s), int(lens_s.max()), hkv, head_dim))
            for s, n in enumerate(lens_s):
                padded[:, s, :n] = k_segs[seg_indptr[s]:seg_indptr[s] + n], v_segs[seg_indptr[s]:seg_indptr[s] + n]
            kc, vc, indptr, indices, last = refattn.paged_from_contiguous(padded[0], padded[1], lens_s, page_size=16,
                                                                          shuffle=1, extra_pages=2)
            out, _ = tree(dev(q), dev(kc), dev(vc), None, path_indptr, path_segs, seg_kv_indptr=indptr,
                          seg_kv_indices=indices, seg_kv_last_page_len=last)
        else:
            plan = plan_tree(*index, num_qo_heads=hq, num_kv_heads=hkv, head_dim=head_dim, dtype=dtype,
                             form=kind.split(":")[1], chunk_size=64, gpu="H200")
            out, _ = Tree(plan).run(dev(q), dev(k_segs), dev(v_segs))
    else:
        k, v = (rounded(rng.standard_normal((batch, 500, hkv, head_dim))) for _ in range(2))
        span_indptr = np.array([0, 2, 2, 5, 6, 7])
        spans = np.array([[0, 4], [300, 500], [1, 2], [17, 99], [400, 401], [0, 500], [64, 128]])
        ref_out, _ = refattn.span(q, k, v, span_indptr, spans)
        out, _ = span(dev(q), dev(k), dev(v), span_indptr, spans)
    return rel_error(_to_host(out), ref_out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decode-attention verify", description=__doc__.split("\n\n")[0],
                                     epilog="Exits 0 if every case is within its tolerance, 1 if any is "
                                            "not, 2 without CuPy and a CUDA GPU.")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random inputs of every case (default: %(default)s)")
    parser.add_argument("--only", metavar="KIND", action="append", default=None,
                        help="run only the cases whose kernel column starts with KIND (repeatable; e.g. "
                             "hydragen, tree): a sanitizer run of what a change touched (default: every case)")
    return parser


def _no_gpu_reason() -> str | None:
    """None when a CUDA GPU is usable through CuPy, else why not, in a few words."""
    try:
        from gpukernels import gpu_available
    except ImportError as e:
        return f"the gpukernels package does not import ({e})"
    if gpu_available():
        return None
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed"
    return "CuPy finds no CUDA GPU"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    reason = _no_gpu_reason()
    if reason is not None:
        print(f"decode-attention verify: needs CuPy and a CUDA GPU to run the kernels; {reason} here",
              file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    failures = 0
    print(f"{'dtype':<9} {'D':>4} {'Hq/Hkv':>7} {'kernel':<13} {'rel err':>9}  ")
    cases = [c for c in _cases() if args.only is None or any(c[4].startswith(k) for k in args.only)]
    if not cases:
        print(f"decode-attention verify: no case's kernel starts with {' or '.join(args.only)}", file=sys.stderr)
        return 2
    for dtype, head_dim, hq, hkv, kind, num_splits in cases:
        err = run_case(rng, dtype, head_dim, hq, hkv, kind, num_splits)
        ok = err <= OUT_RTOL[dtype]
        failures += not ok
        print(f"{dtype:<9} {head_dim:>4} {f'{hq}/{hkv}':>7} {kind:<13} {err:>9.2e}  {'ok' if ok else 'FAIL'}",
              flush=True)
    print(f"verify: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
