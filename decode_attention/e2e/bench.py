"""The end-to-end suite (`python -m decode_attention.e2e.bench --out results`): decode steps of
Llama-shaped decoders in the four published settings, each attention beside the step with no
attention (the ceiling) and the cost model's prediction of the step.

| setting | decoder | grid | attention |
|---|---|---|---|
| `flash_decoding` | CodeLlama-34B, all 48 layers | batch 1, context 1k to 128k | split_kv, SDPA cuDNN, FlashInfer decode, none |
| `bifurcated` | Llama-2-7B shape (7B MHA), 8 of its 32 layers | prompt 8k + 128 own tokens, 1 to 64 samples | shared_prefix, split_kv (prompt copied), paged_decode (prompt pages in every table), none |
| `hydragen` | Llama-3-8B, all 32 layers | 256 samples, shared prompt 1k to 16k | shared_prefix, split_kv (prompt copied: out of memory first), none |
| `spans` | Llama-3-8B, all 32 layers | batch 8, 32k context | span (64 sinks + 4032 window; arithmetic and summarization patterns at 10% of the prompt, widened to pages of 64), split_kv, none |

Each row is one step's median over `STEPS` CUDA-graph replays (CUDA events; the L2 is not
flushed: a step reads far more than it holds). The caches are filled with random normals, not by
a prefill (a step's cost does not depend on the values; the rows say so). Rows of a reduced
decoder say how many of the model's layers ran (`num_layers` of `model_layers`); nothing is
scaled to the full model. A run out of memory is a row with `status: "oom"`, a peer that is not
installed one with `status: "unavailable"`, a backend that fails one with `status: "failed"` (and
the command exits 1); each says its error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["SETTINGS", "run_end_to_end_suite", "write_end_to_end", "main"]

STEPS = 20
OWN_TOKENS = 128      # tokens each sample has decoded when its steps are timed (shared-prompt settings)
SPAN_SINKS, SPAN_WINDOW = 64, 4032

# setting -> (decoder key, layers run or None for all, [(batch, prompt_len, own_tokens)], attentions)
SETTINGS = {
    "flash_decoding": ("codellama-34b", None, [(1, n, 0) for n in (1024, 8192, 32768, 131072)],
                       ("split_kv", "peer:cudnn", "peer:flashinfer", "none")),
    # FlashInfer's decode on this MHA shape (0.5.3, H200) once failed or stopped the run in four
    # runs of five; those runs planned the warm-up step of the graph's capture on the capture
    # stream, which the tests showed to fail so (Generation._capture). With the warm-up planned on
    # the current stream it completed six `decode-attention generate` runs of six (1, 16 and 64
    # samples) and runs here again.
    "bifurcated": ("llama2-7b", 8, [(b, 8192, OWN_TOKENS) for b in (1, 4, 16, 32, 64)],
                   ("shared_prefix", "split_kv", "paged_decode", "peer:flashinfer", "none")),
    "hydragen": ("llama3-8b", None, [(256, n, OWN_TOKENS) for n in (1024, 4096, 16384)],
                 ("shared_prefix", "split_kv", "none")),
    "spans": ("llama3-8b", None, [(8, 32768, 0)],
              ("span:sinks_window", "span:arithmetic", "span:summarization", "split_kv", "none")),
}


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _span(kind: str, prompt_len: int):
    from .attention import SpanPattern, prompt_pattern

    if kind == "sinks_window":
        return SpanPattern(num_sinks=SPAN_SINKS, window=SPAN_WINDOW)
    return prompt_pattern(kind, prompt_len, density=0.1, window=STEPS + 1)


def _impl(attention: str) -> str:
    """The row's `impl`: peers as `peer:...`, this project's attentions inside the model as `model:...`
    (a step of the whole model, not one attention call)."""
    return attention if attention.startswith("peer:") else f"model:{attention}"


def _prediction(decoder, attention: str, batch: int, prompt_len: int, own: int, span, gpu) -> dict:
    from costmodel.end_to_end import predict_step

    from .attention import PAGE_SIZE

    if attention.startswith("peer:"):
        return {}
    kind = attention.partition(":")[0]
    span_lens = None
    if span is not None and span.fixed_spans:
        span_lens = [e - s for s, e in span.fixed_spans] + [min(span.window, own + 1)]
    p = predict_step(decoder, kind, batch=batch, context_len=prompt_len + own + 1, prompt_len=prompt_len,
                     num_sinks=span.num_sinks if span else 4, window=span.window if span else 4096,
                     span_lens=span_lens, page_size=span.page_size() if span else PAGE_SIZE, gpu=gpu)
    return {"predicted_ms": p.time_s * 1e3, "predicted_weights_ms": p.weights_s * 1e3,
            "predicted_attention_ms": p.attention_s * 1e3, "predicted_launches_ms": p.launches_s * 1e3,
            "predicted_kernels": p.other_kernels + p.attention_launches, "weight_bytes": p.weight_bytes,
            "kv_bytes": p.kv_bytes}


GEMV_LAYERS = 4        # layers whose projections the matrix-vector rate is measured on
LAYERS_PER_GRAPH = 8   # layers' small kernels in the graph that times one small kernel
GRAPH_REPS = 20        # replays a graph is timed over (the median kept)


def graph_seconds(fn, reps: int = GRAPH_REPS) -> float:
    """Median time of one replay of `fn` captured in a CUDA graph (CUDA events), in seconds."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return float(np.median(times))


def measure_graph_kernel_s(decoder, batch: int = 1) -> float:
    """What one small kernel of this decoder's step costs inside a CUDA graph, its start included:
    the operations of a layer other than its projections and its attention, as `Decoder.step` runs
    them on `batch` tokens (two RMS norms, the rotary embedding of q and of k, the two residual adds,
    SiLU and the product), LAYERS_PER_GRAPH layers' worth one after another, per kernel (the
    cost model's count of them: KERNELS_PER_LAYER less PROJECTION_KERNELS_PER_LAYER). It is
    `costmodel.end_to_end`'s `graph_kernel_s`."""
    import torch
    import torch.nn.functional as F

    from costmodel.end_to_end import KERNELS_PER_LAYER, PROJECTION_KERNELS_PER_LAYER

    from .model import apply_rotary, rms_norm

    s = decoder.shape
    dev, dt = decoder.embed.device, decoder.dtype
    x = torch.randn(batch, s.hidden_size, device=dev, dtype=dt)
    q = torch.randn(batch, s.num_qo_heads, s.head_dim, device=dev, dtype=dt)
    k = torch.randn(batch, s.num_kv_heads, s.head_dim, device=dev, dtype=dt)
    gate, up = (torch.randn(batch, s.intermediate_size, device=dev, dtype=dt) for _ in range(2))
    cos, sin = decoder.cos[:1], decoder.sin[:1]
    norm = decoder.layers[0].attn_norm

    def small_kernels():
        for _ in range(LAYERS_PER_GRAPH):
            h = rms_norm(x, norm, s.rms_norm_eps)
            apply_rotary(q[:, None], cos, sin)
            apply_rotary(k[:, None], cos, sin)
            h = h + x
            rms_norm(h, norm, s.rms_norm_eps)
            F.silu(gate) * up
            h + x

    kernels = LAYERS_PER_GRAPH * (KERNELS_PER_LAYER - PROJECTION_KERNELS_PER_LAYER)
    return graph_seconds(small_kernels) / kernels


def measure_gemv(decoder, batch: int = 1) -> float:
    """Bytes per second at which PyTorch's products of `batch` tokens with this decoder's projection
    weights (fused qkv, o, fused gate and up, down) of its first GEMV_LAYERS layers and with its
    LM head read those weights, one product after another under a CUDA graph as a decode step runs
    them (the median of GRAPH_REPS replays; those weights hold far more than the L2). The rate at which the cost model
    reads a step's weights (`costmodel.end_to_end.weight_read_bytes_per_s`): cuBLAS's kernels, not
    this project's, whose speed depends on the matrices' shapes and the batch."""
    import torch

    weights = [w for layer in decoder.layers[:GEMV_LAYERS] for w in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    weights.append(decoder.lm_head)
    xs = {n: torch.randn(batch, n, device=weights[0].device, dtype=weights[0].dtype)
          for n in {w.shape[1] for w in weights}}

    def products():
        for w in weights:
            torch.matmul(xs[w.shape[1]], w.T)

    return sum(w.numel() * w.element_size() for w in weights) / graph_seconds(products)


def _free() -> None:
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    try:
        import cupy as cp

        cp.get_default_memory_pool().free_all_blocks()
    except ImportError:
        pass


def _measure_row(decoder, attention: str, batch: int, prompt_len: int, own: int, gpu) -> dict:
    import torch

    from .generate import step_time_ms

    # "span:<pattern>" is the span backend with one of its patterns; "peer:<name>" is a backend's name
    kind, _, pattern = attention.partition(":") if attention.startswith("span:") else (attention, "", "")
    span = _span(pattern, prompt_len) if kind == "span" else None
    s = decoder.shape
    row = {"suite": "end_to_end", "impl": _impl(attention), "model": s.name, "num_layers": s.num_layers,
           "dtype": str(decoder.dtype).removeprefix("torch."), "batch": batch, "num_qo_heads": s.num_qo_heads,
           "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim, "prompt_len": prompt_len, "own_tokens": own,
           "context_len": prompt_len + own + 1, "steps": STEPS,
           "kv_fill": "random normals (no prefill)"}
    if span is not None:
        row.update(num_sinks=span.num_sinks, window=span.window, fixed_spans=[list(x) for x in span.fixed_spans],
                   span_pattern=pattern)
    row.update(_prediction(s, kind, batch, prompt_len, own, span, gpu))
    try:
        step_ms, facts = step_time_ms(decoder, kind, samples=batch,
                                      context_len=prompt_len, own_tokens=own, steps=STEPS, span=span)
        row.update(status="ok", time_ms=step_ms, tokens_per_s=batch / (step_ms * 1e-3), **facts)
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status="oom", error=str(exc).splitlines()[0][:200])
    except ImportError as exc:   # a peer that is not installed here
        row.update(status="unavailable", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    except Exception as exc:  # noqa: BLE001 - a backend that cannot run here: recorded, the suite goes on
        oom = "out of memory" in str(exc).lower()
        row.update(status="oom" if oom else "failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    _free()
    return row


def _with_ceiling(rows: list[dict]) -> list[dict]:
    """Each row's step without attention (`none_ms`, the same workload's `model:none` row), the
    attention's share of the step and its time measured as the difference."""
    ceilings = {(r["model"], r["batch"], r["prompt_len"]): r.get("time_ms") for r in rows if r["impl"] == "model:none"}
    for r in rows:
        none_ms = ceilings.get((r["model"], r["batch"], r["prompt_len"]))
        if none_ms and r.get("time_ms"):
            r["none_ms"] = none_ms
            r["attention_ms"] = max(r["time_ms"] - none_ms, 0.0)
            r["attention_share"] = r["attention_ms"] / r["time_ms"]
    return rows


def run_end_to_end_suite(gpu, *, quick: bool = False, settings=None, after_setting=None) -> list[dict]:
    """Every setting's rows (the first workload of each when `quick`), `gpu` the cost model's GPU
    with the run's measured ceilings. `after_setting(rows)`, if given, gets the rows so far after
    each setting (the suite writes them, so that a run stopped later keeps them)."""
    import torch

    from costmodel.end_to_end import get_decoder

    from .model import random_decoder

    rows = []
    for name in settings or SETTINGS:
        key, layers, grid, attentions = SETTINGS[name]
        shape = get_decoder(key)
        full_layers = shape.num_layers
        if layers:
            shape = shape.with_layers(layers)
        grid = grid[:1] if quick else grid
        longest = max(p + own + STEPS + 2 for _, p, own in grid)
        _progress(f"{name}: {shape.name}, {shape.num_layers} of {full_layers} layers, random weights")
        decoder = random_decoder(shape, max_positions=longest, device="cuda", dtype=torch.float16)
        gemv, small = {}, {}
        for batch, prompt_len, own in grid:
            if batch not in gemv:
                gemv[batch] = measure_gemv(decoder, batch)
                small[batch] = measure_graph_kernel_s(decoder, batch)
                _progress(f"  {batch} token{'s' if batch > 1 else ''} at a time: its projections read at "
                          f"{gemv[batch] / 1e12:.2f} TB/s, a small kernel of its step in a graph takes "
                          f"{small[batch] * 1e6:.2f} us")
            setting_gpu = gpu.with_measured(gemv_bytes_per_s=gemv[batch], graph_kernel_s=small[batch])
            for attention in attentions:
                row = _measure_row(decoder, attention, batch, prompt_len, own, setting_gpu)
                row.update(setting=name, model_layers=full_layers, gemv_bytes_per_s=gemv[batch],
                           graph_kernel_s=small[batch])
                rows.append(row)
                shown = f"{row['time_ms']:.3f} ms" if row["status"] == "ok" else row["status"]
                _progress(f"  {attention:<20} batch {batch:>3}, prompt {prompt_len:>6}: {shown}")
        del decoder
        _free()
        if after_setting is not None:
            after_setting(_with_ceiling(rows))
    return _with_ceiling(rows)


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'setting':<15} {'batch':>5} {'prompt':>7} {'impl':<26} {'step ms':>9} {'pred ms':>8} "
             f"{'tok/s':>10} {'attn share':>10}"]
    for r in rows:
        step = f"{r['time_ms']:.3f}" if r.get("status") == "ok" else r.get("status", "-")
        pred = f"{r['predicted_ms']:.3f}" if "predicted_ms" in r else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        share = f"{r['attention_share']:.0%}" if "attention_share" in r else "-"
        lines.append(f"{r['setting']:<15} {r['batch']:>5} {r['prompt_len']:>7} {r['impl']:<26} {step:>9} {pred:>8} "
                     f"{tps:>10} {share:>10}")
    return "\n".join(lines)


def write_end_to_end(rows: list[dict], meta: dict, out_dir: Path) -> Path:
    """`<out_dir>/end_to_end.json` in the layout of every result file: {"meta", "rows"}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "end_to_end.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return path


def main(argv=None) -> int:
    """Measure the ceilings and the suite on this machine's GPU, as `gpukernels.bench` measures its
    suites, and write `<out>/<gpu>/end_to_end.json`."""
    parser = argparse.ArgumentParser(prog="python -m decode_attention.e2e.bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results",
                        help="results folder; a <gpu>/ subfolder is made (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="the first workload of each setting only, nothing written (default: off)")
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), metavar="SETTING",
                        help=f"run only these of {', '.join(SETTINGS)} (default: all)")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("the end_to_end suite needs PyTorch: pip install -e '.[model]'", file=sys.stderr)
        return 2
    from gpukernels._runtime import gpu_available

    if not (torch.cuda.is_available() and gpu_available()):
        print("the end_to_end suite needs PyTorch with CUDA, CuPy and a CUDA GPU; none found here", file=sys.stderr)
        return 2
    from costmodel.gpus import get_gpu
    from gpukernels.bench import Timer, _meta, gpu_slug, measure_ceilings

    command = "python -m decode_attention.e2e.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    _progress("measuring ceilings (copy, read, fp16 matmul)")
    ceilings = measure_ceilings(Timer(30))
    meta = _meta(ceilings, command.strip())
    gpu = get_gpu(meta["gpu"]).with_measured(copy_bytes_per_s=ceilings["copy_bytes_per_s"],
                                               read_bytes_per_s=ceilings["read_bytes_per_s"],
                                               matmul_flops_per_s=ceilings["matmul_flops_per_s"])
    _free()
    out_dir = Path(args.out) / gpu_slug(meta["gpu"])

    def write_so_far(rows):   # each setting's rows on disk as soon as it ends
        write_end_to_end(rows, {**meta, "complete": False}, out_dir)

    rows = run_end_to_end_suite(gpu, quick=args.quick, settings=args.settings,
                                after_setting=None if args.quick else write_so_far)
    if not args.quick:
        _progress(f"wrote {write_end_to_end(rows, {**meta, 'complete': True}, out_dir)}")
    print(format_rows(rows))
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed:
        print(f"{r['setting']} {r['impl']} batch {r['batch']} prompt {r['prompt_len']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
