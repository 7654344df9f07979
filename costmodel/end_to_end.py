"""One decode step of a whole Llama-shaped decoder, predicted: the weights read once, the
attention of every layer by this project's variant predictions, and the launches in between.

A decode step of a batch of sequences runs every layer once, one token per sequence::

    weights_s   = weight_bytes / gemv_bytes_per_s                        (measured at the batch)
                | max(weight_bytes / (bw_fraction * stream_bytes_per_s),
                      2 * weight_params * batch / (matmul_fraction * matmul_flops_per_s))
    attention_s = num_layers * (the call as the decoder runs it, each launch's term at graph_kernel_s)
    launches_s  = other_kernels * graph_kernel_s
    step_s      = weights_s + attention_s + launches_s

`gemv_bytes_per_s` is the rate the framework's products of the step's tokens with the decoder's
projection weights and LM head read those weights, as the benchmark measures it for each decoder and
batch beside its rows (`gemv_bytes_per_s` of a row; `weight_read_bytes_per_s`). Measured at the
row's batch, that rate already holds whatever bounds the products there (at 256 tokens they are
matrix products, 2.5 TB/s on H200), so it stands alone; the roofline of the second line is for a
step without a measurement (the attention kernels' `bw_fraction` of the stream ceiling, or the
weights' FLOPs at the fitted matrix-product rate). `weight_bytes` counts every weight a step reads:
each layer's projections, MLP and norms, the final norm and the output head (the embedding table is
not read, only one row per sequence). `other_kernels` counts the launches of the step other than
attention (`KERNELS_PER_LAYER` a layer, as the decoder of `decode_attention.e2e` issues them,
`KV_WRITE_KERNELS` a layer more for an attention that keeps a KV cache, and `STEP_KERNELS` once a
step), each of which, at decode sizes, costs about one kernel's launch inside a CUDA graph:
`graph_kernel_s`, as the benchmark measures it for each decoder and batch (the decoder's own
element-wise operations on the row's tokens under a CUDA graph, per kernel: `graph_kernel_s` of a
row) or, unmeasured, the estimate `GRAPH_KERNEL_S`. Where the projections' matrix-vector rate was
measured under a CUDA graph, their launches are inside `weights_s` and `other_kernels` leaves them
out (`PROJECTION_KERNELS_PER_LAYER`).

The attention variants, as the decoder's backends run them:

| attention | what one layer runs |
|---|---|
| `split_kv` | `costmodel.split_kv` over a contiguous cache, the prompt copied into every sequence |
| `paged_decode` | `costmodel.paged_decode`, pages of `page_size`, the prompt's full pages in every table: the sequences whose blocks are resident together read them from HBM once, the others from L2 (`shared_page_l2_hits`) |
| `shared_prefix` | Hydragen as `gpukernels.shared_prefix` runs it (`costmodel.shared_prefix.predict`, `hydragen_launches`): the prefix pass on the tensor cores (the chunk of `costmodel.shared_prefix.hydragen_schedule`), then the suffixes by `costmodel.split_kv`, whose blocks merge the prefix chunks' states; or, where the plan takes a merge launch, the suffixes beside the prefix pass and a merge after both |
| `span` | the backend's page table of the sinks, fixed spans and window in pages of `span_backend_page` tokens, by the paged split-KV model with the plan the backend makes |
| `none` | nothing, not even the KV write: the ceiling a faster attention approaches |

>>> p = predict_step(LLAMA3_8B, "split_kv", batch=1, context_len=8192, gpu="H200")
>>> round(p.weight_bytes / 1e9, 2), p.attention_launches
(15.01, 32)
>>> predict_step(LLAMA2_7B, "shared_prefix", batch=16, context_len=8192 + 128, prompt_len=8192,
...              gpu="H200").attention_launches
96
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from decode_attention.contract import check_nonnegative_int, check_positive_int

from . import paged_decode, shared_prefix, span, split_kv
from .calibration import Calibration
from .display import Table, format_bytes, format_seconds
from .gpus import GPUSpec, get_gpu
from .prediction import Prediction, calibration_for, dtype_bytes, predict_launches
from .shared_prefix import hydragen_launches

__all__ = ["DecoderShape", "LLAMA3_8B", "CODELLAMA_34B", "LLAMA2_7B", "DECODERS", "get_decoder",
           "ATTENTIONS", "StepPrediction", "predict_step", "GRAPH_KERNEL_S", "graph_kernel_seconds",
           "KERNELS_PER_LAYER", "KV_WRITE_KERNELS", "STEP_KERNELS", "hydragen_launches", "shared_page_l2_hits",
           "decoder_for_row", "predict_result_row"]

# A kernel inside a CUDA graph at decode sizes, when the run did not measure it: the gap between
# dependent nodes plus a small kernel's own run. On H200 the end-to-end suite measured 1.58-1.66 us
# for the decoders' own element-wise kernels on one token in a graph (`graph_kernel_s` of its rows;
# the earlier estimate, 2.5 us, put the two-GPU step's five small kernels 8 us above what the step
# less its shard and all-gather measured).
GRAPH_KERNEL_S = 1.6e-6
# Launches per layer other than attention, as `decode_attention.e2e.model.Decoder.step` issues
# them: two RMS norms (8 each: widen, square, mean, add eps, rsqrt, scale, narrow, weight), the
# fused QKV projection, the rotary embedding of q and of k (5 each: negate, concatenate, two
# products, sum), the output projection and its residual add, the fused gate-up projection, SiLU
# and the product, the down projection and its residual add.
KERNELS_PER_LAYER = 34
# The new token's K and V written to the cache (one copy each), by every attention but `none`,
# which keeps no cache.
KV_WRITE_KERNELS = 2
# Of KERNELS_PER_LAYER, the projections (fused QKV, output, fused gate-up, down): where the run
# measured their matrix-vector rate under a CUDA graph (`gemv_bytes_per_s`), their starts are inside
# that rate's time and are not counted again among the launches.
PROJECTION_KERNELS_PER_LAYER = 4
# Once a step: the position and lengths (4), the embedding lookup, the rotary rows (2), the final
# norm (8), the output head and its widening (2), the next token, the step's bookkeeping (5).
STEP_KERNELS = 23
ATTENTIONS = ("split_kv", "paged_decode", "shared_prefix", "span", "none")


@dataclass(frozen=True)
class DecoderShape:
    """The shape of a Llama-style decoder (its published configuration)."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_qo_heads", "num_kv_heads",
                     "head_dim", "vocab_size"):
            check_positive_int(getattr(self, name), name)
        if self.num_qo_heads % self.num_kv_heads:
            raise ValueError(f"num_qo_heads must be a multiple of num_kv_heads, got {self.num_qo_heads} "
                             f"and {self.num_kv_heads}")

    def with_layers(self, num_layers: int) -> "DecoderShape":
        """The same decoder with `num_layers` layers (every layer costs the same)."""
        return dataclasses.replace(self, num_layers=check_positive_int(num_layers, "num_layers"))

    @property
    def layer_params(self) -> int:
        """Weights of one layer: QKV and output projections, gate, up and down, two norms."""
        h, d = self.hidden_size, self.head_dim
        attention = h * (self.num_qo_heads + 2 * self.num_kv_heads) * d + self.num_qo_heads * d * h
        mlp = 3 * h * self.intermediate_size
        return attention + mlp + 2 * h

    @property
    def params(self) -> int:
        """Every weight: the layers, the embedding, the final norm and the output head."""
        return self.num_layers * self.layer_params + 2 * self.vocab_size * self.hidden_size + self.hidden_size

    @property
    def params_read_per_step(self) -> int:
        """Weights one decode step reads: all but the embedding table (one row per sequence)."""
        return self.params - self.vocab_size * self.hidden_size

    def weight_bytes(self, dtype: str = "float16") -> int:
        return self.params * dtype_bytes(dtype)

    def kv_bytes_per_token(self, dtype: str = "float16") -> int:
        """K and V of one token in every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes(dtype)


# Published configurations (each model's config.json).
LLAMA3_8B = DecoderShape("Llama-3-8B", 32, 4096, 14336, 32, 8, 128, 128256, rope_theta=500000.0)
CODELLAMA_34B = DecoderShape("CodeLlama-34B", 48, 8192, 22016, 64, 8, 128, 32000, rope_theta=1000000.0)
# The bifurcated-attention paper's "7B MHA model", in Llama-2-7B's shape: 32 heads of 128, no GQA.
LLAMA2_7B = DecoderShape("Llama-2-7B (7B MHA)", 32, 4096, 11008, 32, 32, 128, 32000)
DECODERS = {"llama3-8b": LLAMA3_8B, "codellama-34b": CODELLAMA_34B, "llama2-7b": LLAMA2_7B}


def get_decoder(name: "str | DecoderShape") -> DecoderShape:
    """A decoder by its key in DECODERS (a DecoderShape is returned as is)."""
    if isinstance(name, DecoderShape):
        return name
    try:
        return DECODERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; known: {', '.join(DECODERS)}") from None


@dataclass(frozen=True, repr=False)
class StepPrediction:
    """A predicted decode step, every term in bytes, FLOPs and seconds."""

    decoder: str
    attention: str
    batch: int
    context_len: int               # tokens each sequence attends to at this step (prompt + own)
    weight_bytes: int              # read once per step
    weight_flops: int              # 2 * params read * batch
    weights_s: float
    attention_per_layer: "Prediction | None"
    attention_s: float             # all layers
    kv_bytes: int                  # KV bytes the step's attention reads, all layers
    attention_launches: int
    other_kernels: int
    launches_s: float              # the kernels other than attention
    time_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.time_s

    @property
    def attention_share(self) -> float:
        return self.attention_s / self.time_s

    def terms_ms(self) -> dict[str, float]:
        """The step's terms in milliseconds (as result rows store them)."""
        return {"weights_ms": self.weights_s * 1e3, "attention_ms": self.attention_s * 1e3,
                "launches_ms": self.launches_s * 1e3, "step_ms": self.time_s * 1e3}

    def table(self) -> Table:
        rows = (("weights", format_bytes(self.weight_bytes), format_seconds(self.weights_s)),
                ("attention", format_bytes(self.kv_bytes), format_seconds(self.attention_s)),
                (f"other kernels ({self.other_kernels})", "", format_seconds(self.launches_s)),
                ("step", "", format_seconds(self.time_s)))
        return Table((f"{self.decoder}, attention {self.attention}, batch {self.batch}, "
                      f"{self.context_len} tokens of context:",),
                     ("term", "bytes", "time"), rows,
                     (f"{self.tokens_per_s:,.0f} tokens/s; attention {self.attention_share:.0%} of the step",))

    def __str__(self) -> str:
        return self.table().text()

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return self.table().html()


def shared_page_l2_hits(plan: split_kv.SplitKVPlan, shared_tokens: int, *, resident_blocks: int) -> int:
    """Bytes of pages listed in every sequence's table (the first `shared_tokens` tokens) that
    come from L2 rather than HBM, beyond the head groups' re-reads `split_kv_launch` already
    counts. Blocks are dispatched sequence after sequence (`plan.num_splits * plan.seq_heads /
    batch` blocks each); the sequences whose blocks are resident together stream the same pages
    of each KV head side by side, so the first of them reads a page from HBM and the others find it
    in L2. Each wave of resident sequences reads the shared pages from HBM once.
    `resident_blocks`: the launch's blocks resident at once (SMs x blocks per SM)."""
    if shared_tokens <= 0 or plan.batch < 2:
        return 0
    blocks_per_sequence = plan.num_splits * plan.num_kv_heads * plan.head_groups
    resident = max(1, resident_blocks // blocks_per_sequence)
    waves = -(-plan.batch // resident)
    shared_bytes = 2 * shared_tokens * plan.num_kv_heads * plan.head_dim * dtype_bytes(plan.dtype)   # K and V
    return (plan.batch - waves) * shared_bytes


def _attention_prediction(decoder: DecoderShape, attention: str, *, batch: int, prompt_len: int,
                          own_len: int, dtype: str, page_size: int, num_sinks: int, window: int,
                          span_lens, gpu: GPUSpec, cal: Calibration) -> "Prediction | None":
    """One layer's attention call at this step, or None for `none`."""
    hq, hkv, d = decoder.num_qo_heads, decoder.num_kv_heads, decoder.head_dim
    context = prompt_len + own_len
    lens = [context] * batch
    if attention == "none":
        return None
    if attention == "split_kv":
        plan = split_kv.plan_split_kv(batch, hq, hkv, d, max(context, 1), dtype=dtype, gpu=gpu)
        return split_kv.predict(plan, kv_lens=lens, gpu=gpu, calibration=cal)
    if attention == "paged_decode":
        plan = paged_decode.plan_paged_decode(batch, hq, hkv, d, max(context, 1), page_size=page_size,
                                              dtype=dtype, gpu=gpu)
        launch = split_kv.split_kv_launch(plan, lens, name="paged_decode")
        shared_tokens = prompt_len // page_size * page_size      # the prompt's partial last page is copied
        resident = gpu.num_sms * (launch.blocks_per_sm or cal.blocks_per_sm)
        hits = shared_page_l2_hits(plan, shared_tokens, resident_blocks=resident)
        launch = dataclasses.replace(launch, l2_hit_bytes=launch.l2_hit_bytes + hits)
        return predict_launches("paged_decode", [launch], gpu=gpu, calibration=cal)
    if attention == "shared_prefix":
        shape = shared_prefix.SharedPrefixShape(batch, hq, hkv, d, prompt_len, own_len, dtype)
        return shared_prefix.predict(shape, method="hydragen", gpu=gpu, calibration=cal)
    if attention == "span":
        # The decoder's span backend: a page table of `page_size` pages over the contiguous cache,
        # rebuilt on the device each step (sinks, fixed spans, then the window's pages), run by the
        # paged split-KV kernel with the plan it makes for the sinks, fixed spans, window and a page.
        sinks = min(num_sinks, context)
        recent = min(window, context - sinks)
        attended = sinks + (sum(span_lens) if span_lens is not None else recent)   # span_lens[-1]: the window
        planned = min(-(-context // page_size) * page_size,
                      sinks + (sum(span_lens[:-1]) if span_lens is not None else 0) + window + page_size)
        plan = split_kv.plan_split_kv(batch, hq, hkv, d, max(planned, 1), dtype=dtype, page_size=page_size,
                                      gpu=gpu)
        return split_kv.predict(plan, kv_lens=[attended] * batch, gpu=gpu, calibration=cal, variant="span")
    raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")


def graph_kernel_seconds(spec: GPUSpec) -> float:
    """What a small kernel costs inside a CUDA graph on `spec`: the run's measurement
    (`GPUSpec.graph_kernel_s`) when there is one, else GRAPH_KERNEL_S."""
    return spec.graph_kernel_s or GRAPH_KERNEL_S


def weight_read_bytes_per_s(spec: GPUSpec, cal: Calibration) -> float:
    """The rate a step's weights are read at: the matrix-vector rate measured in the same run
    (`GPUSpec.gemv_bytes_per_s`) when there is one, else the attention kernels' fitted fraction of
    the stream ceiling. The projections are cuBLAS's kernels, not this project's, and read below
    that fraction: on H200 the CodeLlama-34B step's projections read at 3.7-4.4 TB/s, where
    1.1 x the measured read ceiling is 5.0 TB/s (the step predicted 9% fast)."""
    if spec.gemv_bytes_per_s:
        return spec.gemv_bytes_per_s
    return cal.bw_fraction * spec.stream_bytes_per_s


def predict_step(decoder: "DecoderShape | str", attention: str, *, batch: int, context_len: int,
                 prompt_len: "int | None" = None, dtype: str = "float16", page_size: int = 16,
                 num_sinks: int = 4, window: int = 4096, span_lens=None, gpu: "GPUSpec | str",
                 calibration: "Calibration | None" = None,
                 graph_kernel_s: "float | None" = None) -> StepPrediction:
    """The predicted decode step of `batch` sequences, each attending to `context_len` tokens, of
    which `prompt_len` (default: all) are a prompt the sequences share (only `shared_prefix`
    reads it once for all of them; the others read it per sequence). `span` attends to
    `num_sinks` + `window` tokens, or to `span_lens` when given: the fixed spans' lengths, then the
    window's tokens at this step (as `predict_result_row` and the suite build them). `page_size`:
    the pages of `paged_decode`, and of the span backend's table (`span_backend_page`)."""
    decoder = get_decoder(decoder)
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    batch = check_positive_int(batch, "batch")
    context_len = check_nonnegative_int(context_len, "context_len")
    prompt_len = context_len if prompt_len is None else check_nonnegative_int(prompt_len, "prompt_len")
    if prompt_len > context_len:
        raise ValueError(f"prompt_len must be at most context_len = {context_len}, got {prompt_len}")
    spec = get_gpu(gpu)
    cal = calibration_for(spec, calibration)
    if graph_kernel_s is None:
        graph_kernel_s = graph_kernel_seconds(spec)
    in_graph = dataclasses.replace(cal, launch_s=graph_kernel_s)

    params = decoder.params_read_per_step
    weight_bytes = params * dtype_bytes(dtype)
    weight_flops = 2 * params * batch
    if spec.gemv_bytes_per_s:
        # the products measured at this batch: their rate holds whatever bounds them there
        weights_s = weight_bytes / spec.gemv_bytes_per_s
    else:
        weights_s = max(weight_bytes / weight_read_bytes_per_s(spec, cal),
                        weight_flops / (cal.matmul_fraction * spec.matmul_flops_per_s))
    layer = _attention_prediction(decoder, attention, batch=batch, prompt_len=prompt_len,
                                  own_len=context_len - prompt_len, dtype=dtype, page_size=page_size,
                                  num_sinks=num_sinks, window=window, span_lens=span_lens, gpu=spec,
                                  cal=in_graph)
    n = decoder.num_layers
    attention_s = n * layer.time_s if layer else 0.0
    kv_bytes = n * sum(v for k, v in layer.bytes_by_tensor.items() if k.startswith(("k", "v"))) if layer else 0
    per_layer = KERNELS_PER_LAYER - (PROJECTION_KERNELS_PER_LAYER if spec.gemv_bytes_per_s else 0)
    other_kernels = n * (per_layer + (KV_WRITE_KERNELS if layer else 0)) + STEP_KERNELS
    launches_s = other_kernels * graph_kernel_s
    return StepPrediction(decoder.name, attention, batch, context_len, weight_bytes, weight_flops, weights_s,
                          layer, attention_s, kv_bytes, n * (layer.launches if layer else 0), other_kernels,
                          launches_s, weights_s + attention_s + launches_s)


def span_backend_page(num_sinks: int, fixed_spans=()) -> int:
    """The page of the decoder's span backend (`decode_attention.e2e.attention.SpanPattern.page_size`):
    the largest power of two up to span.MAX_SPAN_PAGE dividing the sinks and every fixed boundary."""
    bounds = [int(num_sinks)] + [int(b) for s in fixed_spans for b in s]
    page = span.MAX_SPAN_PAGE
    while page > 1 and any(b % page for b in bounds):
        page //= 2
    return page


def decoder_for_row(row: dict) -> DecoderShape:
    """The decoder an end-to-end result row ran: its model's shape with the row's `num_layers`."""
    by_name = {d.name: d for d in DECODERS.values()}
    try:
        decoder = by_name[row["model"]]
    except KeyError:
        raise ValueError(f"unknown model {row.get('model')!r} in an end_to_end row; known: "
                         f"{', '.join(by_name)}") from None
    return decoder.with_layers(int(row.get("num_layers", decoder.num_layers)))


def predict_result_row(row: dict, gpu: "GPUSpec | str", *, calibration: "Calibration | None" = None) -> StepPrediction:
    """The predicted step of an end_to_end result row (`impl` "model:<attention>"; peers are not
    predicted): its decoder, batch, prompt and own tokens, span settings, and the matrix-vector
    rate the run measured for its decoder (`gemv_bytes_per_s`) when the row has one."""
    impl = str(row.get("impl", ""))
    if not impl.startswith("model:"):
        raise ValueError(f"only rows of this project's attentions inside the model are predicted, got {impl!r}")
    attention = impl.removeprefix("model:").partition(":")[0]
    fixed = row.get("fixed_spans") or []
    span_lens = None
    page_size = 16
    if fixed:
        span_lens = [int(e) - int(s) for s, e in fixed] + [min(int(row["window"]), int(row.get("own_tokens", 0)) + 1)]
    if attention == "span":
        page_size = span_backend_page(int(row.get("num_sinks", 4)), fixed)
    if row.get("gemv_bytes_per_s") or row.get("graph_kernel_s"):   # what the run measured for this decoder
        gpu = get_gpu(gpu).with_measured(gemv_bytes_per_s=row.get("gemv_bytes_per_s"),
                                         graph_kernel_s=row.get("graph_kernel_s"))
    return predict_step(decoder_for_row(row), attention, batch=int(row["batch"]), context_len=int(row["context_len"]),
                        prompt_len=int(row["prompt_len"]), dtype=str(row.get("dtype", "float16")),
                        num_sinks=int(row.get("num_sinks", 4)), window=int(row.get("window", 4096)),
                        span_lens=span_lens, page_size=page_size, gpu=gpu, calibration=calibration)
