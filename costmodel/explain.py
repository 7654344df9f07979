"""For a workload, predict every applicable variant, rank them, and say in one sentence why the
winner wins.

A workload is one decode step of `batch` sequences whose contexts are a `prefix_len`-token prefix
shared by all of them plus `suffix_len` tokens of their own, of which a `density` fraction is
attended (1.0: dense). The baseline is `decode` on the concatenated cache (the prefix copied into
every sequence, one block per sequence and KV head): what runs without any of the techniques.

With `num_gpus` > 1 the explanation adds the sharded variant (`costmodel.sharded`: each sequence's
cache sharded along its tokens over that many GPUs, split_kv on every shard, one all-gather of the
partial states, a merge) as the row `sharded:<N>_gpus`, and says from which context length it
beats split_kv on one GPU (`Explanation.crossover_kv_len`).

>>> e = explain(Workload(batch=16, prefix_len=8192, suffix_len=256), gpu="H100")
>>> e.winner
'shared_prefix:hydragen'

`print(e)` (or `e` in a notebook) shows the table: one row per variant with its time, speedup,
traffic and rates in units, and the sentence on why the winner wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import decode, paged_decode, shared_prefix, sharded, span, split_kv, tree
from .calibration import Calibration
from .display import explanation_html, format_bytes, format_explanation, format_seconds
from .gpus import GPUSpec, get_gpu
from .models import LLAMA3_8B
from .prediction import Prediction, calibration_for, check_fraction, check_shape_fields

__all__ = ["Workload", "VariantRow", "Explanation", "explain", "builtin_workloads", "format_explanation",
           "format_bytes", "sharded_variant", "BASELINE"]

BASELINE = "decode"


@dataclass(frozen=True)
class Workload:
    batch: int = 16
    num_qo_heads: int = LLAMA3_8B.num_qo_heads
    num_kv_heads: int = LLAMA3_8B.num_kv_heads
    head_dim: int = LLAMA3_8B.head_dim
    prefix_len: int = 8192          # tokens shared by every sequence
    suffix_len: int = 256           # each sequence's own tokens
    density: float = 1.0            # fraction of each context attended (spans); 1.0 is dense
    num_spans: int = 8              # spans per sequence when density < 1
    page_size: int = 16             # for paged_decode
    dtype: str = "float16"
    title: str = ""
    num_gpus: int = 1               # GPUs the cache may be sharded over (> 1 adds the sharded row)

    def __post_init__(self):
        # sizes: ints (NumPy integers too), stored as int; TypeError for a wrong type, ValueError
        # for a wrong value
        check_shape_fields(self, ("batch", "num_qo_heads", "num_kv_heads", "head_dim", "num_spans", "page_size"),
                           ("prefix_len", "suffix_len"))
        object.__setattr__(self, "density", check_fraction(self.density, "density", low_open=True))
        object.__setattr__(self, "num_gpus", sharded.check_num_gpus(self.num_gpus))
        for name in ("dtype", "title"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
        if self.context_len < 1:
            raise ValueError("the context (prefix_len + suffix_len) must hold at least one token")

    @property
    def context_len(self) -> int:
        return self.prefix_len + self.suffix_len

    @property
    def shares_prefix(self) -> bool:
        return self.prefix_len > 0 and self.batch > 1

    def describe(self) -> str:
        ctx = (f"{self.batch} sequences sharing a prefix of {self.prefix_len} tokens, "
               f"{self.suffix_len} own tokens each"
               if self.shares_prefix else f"{self.batch} sequences of {self.context_len} tokens")
        sparse = f", {self.density:.1%} attended in {self.num_spans} spans" if self.density < 1 else ""
        gpus = f"; up to {self.num_gpus} GPUs" if self.num_gpus > 1 else ""
        return (f"{ctx}{sparse}; {self.num_qo_heads} query heads, {self.num_kv_heads} KV heads, "
                f"head_dim {self.head_dim}, {self.dtype}{gpus}")


@dataclass(frozen=True, repr=False)
class VariantRow:
    variant: str
    prediction: "Prediction | sharded.ShardedPrediction"
    speedup: float       # baseline time / this variant's time
    plan: str            # how the call is cut, in words

    def __repr__(self) -> str:
        return (f"<VariantRow {self.variant}: {format_seconds(self.prediction.time_s)}, "
                f"{self.speedup:.2f}x the baseline, {self.plan}>")


@dataclass(frozen=True, repr=False)
class Explanation:
    """What `explain` returns. Prints as a table (`str`, `repr`) and renders as one in a notebook
    (`_repr_html_`); `rows[i].prediction` holds each variant's bytes and time terms."""

    workload: Workload
    gpu: GPUSpec
    rows: tuple[VariantRow, ...]      # fastest first
    winner: str
    why: str                          # with num_gpus > 1, also where sharding starts to pay
    crossover_kv_len: int | None = None   # num_gpus > 1: context below which one GPU's split_kv is faster

    @property
    def baseline(self) -> str:
        return BASELINE

    def row(self, variant: str) -> VariantRow:
        for r in self.rows:
            if r.variant == variant:
                return r
        raise KeyError(variant)

    def __str__(self) -> str:
        return format_explanation(self)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return explanation_html(self)


def builtin_workloads() -> list[Workload]:
    """The README's example: a Llama-3-8B-like layer, 16 samples of one 8k prompt with 256 own
    tokens each; and 8 sequences of 32k tokens attending to 12.5% of them in 8 spans."""
    return [
        Workload(title="16 samples of one 8k-token prompt"),
        Workload(batch=8, prefix_len=0, suffix_len=32768, density=0.125, num_spans=8,
                 title="sparse spans over a 32k-token context"),
    ]


def _splits(n: int) -> str:
    return f"{n} split{'' if n == 1 else 's'}"


def _predictions(w: Workload, gpu: GPUSpec, cal: Calibration) -> list[tuple[str, Prediction, str]]:
    b, hq, hkv, d, n = w.batch, w.num_qo_heads, w.num_kv_heads, w.head_dim, w.context_len
    out = []
    base = decode.plan_decode(b, hq, hkv, d, n, dtype=w.dtype, gpu=gpu)
    out.append(("decode", decode.predict(base, gpu=gpu, calibration=cal),
                f"{base.num_blocks} blocks, whole cache per block"))
    sk = split_kv.plan_split_kv(b, hq, hkv, d, n, dtype=w.dtype, gpu=gpu)
    out.append(("split_kv", split_kv.predict(sk, gpu=gpu, calibration=cal),
                f"{_splits(sk.num_splits)} of {sk.chunk_size} tokens"))
    pg = paged_decode.plan_paged_decode(b, hq, hkv, d, n, page_size=w.page_size, dtype=w.dtype, gpu=gpu)
    out.append(("paged_decode", paged_decode.predict(pg, gpu=gpu, calibration=cal),
                f"pages of {w.page_size}, {_splits(pg.num_splits)}"))
    if w.shares_prefix:
        shape = shared_prefix.SharedPrefixShape(b, hq, hkv, d, w.prefix_len, w.suffix_len, w.dtype)
        hp = shared_prefix.plan_hydragen(shape, gpu=gpu, calibration=cal)
        out.append(("shared_prefix:hydragen",
                    shared_prefix.predict(shape, method="hydragen", gpu=gpu, calibration=cal, plan=hp),
                    f"prefix pass in chunks of {hp.prefix_chunk_size}, suffixes in chunks of {hp.suffix_chunk_size}"
                    + (", then a merge launch" if hp.merge_launch else " merging the prefix's states")))
        out.append(("shared_prefix:bifurcated",
                    shared_prefix.predict(shape, method="bifurcated", gpu=gpu, calibration=cal),
                    "the paper's form: 5 launches, float32 logits in memory"))
        ts = tree.TreeShape(b, hq, hkv, d, ((1, w.prefix_len), (b, w.suffix_len)), w.dtype)
        tp = tree.plan_tree(ts, gpu=gpu, calibration=cal)
        out.append(("tree", tree.predict(ts, gpu=gpu, calibration=cal, plan=tp),
                    f"2 levels: the shared one in chunks of {tp.chunk_size}, then "
                    + ("each sequence's own tokens by split-KV, merging the shared states" if tp.form == "own"
                       else "the merge of each sequence's states")))
    if w.density < 1.0:
        shape = span.SpanShape.from_density(b, hq, hkv, d, n, density=w.density, num_spans=w.num_spans,
                                            dtype=w.dtype)
        sp = span.plan_span(shape, gpu=gpu, calibration=cal)
        out.append(("span", span.predict(shape, gpu=gpu, calibration=cal, plan=sp),
                    f"pages of {sp.split.page_size} in {_splits(sp.split.num_splits)} of {sp.split.chunk_size} "
                    f"rows"))
    if w.num_gpus > 1:
        plan = sharded.plan_sharded(b, hq, hkv, d, n, num_gpus=w.num_gpus, dtype=w.dtype, gpu=gpu)
        p = sharded.predict(plan, gpu=gpu, calibration=cal)
        longest = plan.rank_plans[p.slowest_rank]
        out.append((sharded_variant(w.num_gpus), p,
                    f"{w.num_gpus} GPUs x {_splits(longest.num_splits)} of {longest.chunk_size} tokens, "
                    f"all-gather of {format_bytes(plan.payload_bytes)} per GPU"))
    return out


def sharded_variant(num_gpus: int) -> str:
    """The explanation's name for the sharded row."""
    return f"sharded:{num_gpus}_gpus"


def _why_sharded(w: Workload, gpu: GPUSpec, win: VariantRow, base: VariantRow) -> str:
    p, q = win.prediction, base.prediction
    shard = p.slowest_shard
    ceiling = shard.achieved_bytes_per_s / gpu.stream_bytes_per_s
    return (f"{win.variant} wins, {win.speedup:.1f}x faster than {base.variant}, because each of its "
            f"{w.num_gpus} GPUs reads only its shard of the cache ({format_bytes(shard.hbm_bytes)} of "
            f"memory traffic instead of {format_bytes(q.hbm_bytes)}) in {format_seconds(p.shard_s)}, and "
            f"exchanging and merging the partial states (packing, the all-gather, unpacking, the merge) "
            f"adds only {format_seconds(p.exchange_s)}; the slowest shard is {shard.bound}-bound, "
            f"reaching {ceiling:.0%} of one GPU's {gpu.stream_bytes_per_s / 1e12:.1f} TB/s memory ceiling.")


def _crossover_sentence(w: Workload, rows, crossover: "int | None") -> str:
    one = next(r for r in rows if r.variant == "split_kv").prediction.time_s
    many = next(r for r in rows if r.variant == sharded_variant(w.num_gpus)).prediction.time_s
    here = f"at this workload's {w.context_len:,} tokens it takes {many / one:.2f}x the time of one GPU's split_kv"
    if crossover is None:
        return (f"Sharded over {w.num_gpus} GPUs, split_kv does not beat one GPU below "
                f"{sharded.MAX_SEARCH_KV_LEN:,} tokens of context (predicted); {here}.")
    return (f"Sharded over {w.num_gpus} GPUs, split_kv beats one GPU from a context of {crossover:,} "
            f"tokens up (predicted crossover); {here}.")


def _why(w: Workload, gpu: GPUSpec, win: VariantRow, base: VariantRow) -> str:
    p, q = win.prediction, base.prediction
    if win.variant.startswith("sharded:"):
        return _why_sharded(w, gpu, win, base)
    if win.variant == base.variant:
        return (f"{base.variant} is already the fastest: {q.num_blocks} blocks keep the "
                f"{gpu.num_sms} SMs busy and it moves no more than the {format_bytes(q.hbm_bytes)} "
                "the others must move.")
    reasons = []
    byte_ratio = q.hbm_bytes / max(p.hbm_bytes, 1)
    if byte_ratio >= 1.25:
        if win.variant.startswith(("shared_prefix", "tree")):
            cause = (f"it reads the {w.prefix_len}-token shared prefix once instead of once per "
                     f"sequence ({w.batch} times)")
        elif win.variant == "span":
            cause = f"it reads only the attended {w.density:.1%} of each context"
        else:
            cause = "it moves fewer bytes"
        reasons.append(f"{cause}: {format_bytes(p.hbm_bytes)} of memory traffic instead of "
                       f"{format_bytes(q.hbm_bytes)} ({byte_ratio:.1f}x less)")
    if p.num_blocks >= 2 * q.num_blocks and q.num_blocks < gpu.num_sms:
        reasons.append(f"it cuts the work into {p.num_blocks} blocks where {base.variant} has "
                       f"{q.num_blocks} for {gpu.num_sms} SMs")
    if not reasons:
        reasons.append(f"it has the least overhead ({p.launches} launch{'es' if p.launches > 1 else ''}, "
                       f"{p.num_blocks} blocks)")
    ceiling = p.achieved_bytes_per_s / gpu.stream_bytes_per_s
    return (f"{win.variant} wins, {win.speedup:.1f}x faster than {base.variant}, because "
            f"{' and '.join(reasons)}; it is {p.bound}-bound, reaching {ceiling:.0%} of the "
            f"{gpu.stream_bytes_per_s / 1e12:.1f} TB/s memory ceiling.")


def explain(workload: Workload, gpu: "GPUSpec | str" = "H100", *,
            calibration: Calibration | None = None) -> Explanation:
    """Predict every variant that applies to `workload` on `gpu`, fastest first, and say why the
    winner wins. The result prints as a table (and renders as one in a notebook)."""
    if not isinstance(workload, Workload):
        raise TypeError(f"workload must be a Workload, got {type(workload).__name__}")
    gpu = get_gpu(gpu)
    cal = calibration_for(gpu, calibration)
    preds = _predictions(workload, gpu, cal)
    base_time = next(p.time_s for name, p, _ in preds if name == BASELINE)
    rows = sorted((VariantRow(name, p, base_time / p.time_s, plan) for name, p, plan in preds),
                  key=lambda r: r.prediction.time_s)
    base = next(r for r in rows if r.variant == BASELINE)
    why = _why(workload, gpu, rows[0], base)
    crossover = None
    if workload.num_gpus > 1:
        w = workload
        crossover = sharded.crossover_kv_len(w.batch, w.num_qo_heads, w.num_kv_heads, w.head_dim,
                                             num_gpus=w.num_gpus, dtype=w.dtype, gpu=gpu, calibration=cal)
        why = f"{why} {_crossover_sentence(w, rows, crossover)}"
    return Explanation(workload, gpu, tuple(rows), rows[0].variant, why, crossover)
