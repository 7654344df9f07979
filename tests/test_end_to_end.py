"""The end-to-end decoder: its arithmetic against a float64 NumPy forward pass written from the
weights (CPU, tiny shapes), every backend's KV layout against that truth through the references,
the step prediction, the `generate` command's checks; on a GPU, the same greedy tokens through
every backend."""

from __future__ import annotations

import functools
import importlib.util
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the end-to-end decoder needs PyTorch (pip install -e '.[test]')")

from costmodel import end_to_end as e2e_model  # noqa: E402
from costmodel.end_to_end import DecoderShape, predict_step  # noqa: E402
from costmodel.gpus import get_gpu  # noqa: E402
from costmodel.prediction import calibration_for  # noqa: E402
from decode_attention import cli  # noqa: E402
from decode_attention.e2e.attention import PAGE_SIZE, SpanPattern, prompt_pattern  # noqa: E402
from decode_attention.e2e.generate import Generation  # noqa: E402
from decode_attention.e2e.model import random_decoder  # noqa: E402

# Odd sizes on purpose: GQA 6 query / 2 KV heads, a prompt that ends inside a page.
TINY = DecoderShape("tiny", num_layers=2, hidden_size=48, intermediate_size=80, num_qo_heads=6, num_kv_heads=2,
                    head_dim=8, vocab_size=37, rope_theta=10000.0)
PROMPT_LEN = 37
NEW_TOKENS = 22          # crosses page boundaries (16) during decode


# ---------------------------------------------------------------------------------------------
# The truth: a float64 NumPy forward pass over whole sequences, from the same weights
# ---------------------------------------------------------------------------------------------

def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rotate(x, pos, theta):
    """x [T, H, D] at positions pos [T]: pairs (i, i + D/2) rotated by pos * theta^(-2i/D)."""
    d = x.shape[-1]
    freq = theta ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None] * freq[None]                                      # [T, D/2]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def truth_logits(decoder, tokens, visible=None) -> np.ndarray:
    """Logits [T, vocab] of one sequence; position i attends to the positions visible(i) (default
    0..i), nothing visible giving a zero attention output."""
    s = decoder.shape
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    group = s.num_qo_heads // s.num_kv_heads
    x = _np(decoder.embed)[np.asarray(tokens)]
    for w in decoder.layers:
        h = _rms(x, _np(w.attn_norm), s.rms_norm_eps)
        qkv = h @ _np(w.qkv).T
        q = qkv[:, : s.num_qo_heads * s.head_dim].reshape(T, s.num_qo_heads, s.head_dim)
        k = qkv[:, s.num_qo_heads * s.head_dim: (s.num_qo_heads + s.num_kv_heads) * s.head_dim]
        v = qkv[:, (s.num_qo_heads + s.num_kv_heads) * s.head_dim:]
        k = k.reshape(T, s.num_kv_heads, s.head_dim)
        v = v.reshape(T, s.num_kv_heads, s.head_dim)
        q, k = _rotate(q, pos, s.rope_theta), _rotate(k, pos, s.rope_theta)
        o = np.zeros_like(q)
        for i in range(T):
            keys = np.arange(i + 1) if visible is None else np.asarray(sorted(visible(i)), dtype=np.int64)
            if keys.size == 0:
                continue
            for hq in range(s.num_qo_heads):
                kh = hq // group
                scores = k[keys, kh] @ q[i, hq] / np.sqrt(s.head_dim)
                p = np.exp(scores - scores.max())
                o[i, hq] = (p / p.sum()) @ v[keys, kh]
        x = x + o.reshape(T, -1) @ _np(w.o).T
        h = _rms(x, _np(w.mlp_norm), s.rms_norm_eps)
        gate, up = np.split(h @ _np(w.gate_up).T, 2, axis=-1)
        x = x + (gate / (1 + np.exp(-gate)) * up) @ _np(w.down).T
    return _rms(x, _np(decoder.final_norm), s.rms_norm_eps) @ _np(decoder.lm_head).T


def _decoder(dtype=torch.float64, seed=0):
    return random_decoder(TINY, max_positions=PROMPT_LEN + NEW_TOKENS + 8, dtype=dtype, seed=seed)


def _inputs(samples, seed=1):
    rng = np.random.default_rng(seed)
    prompt = torch.as_tensor(rng.integers(0, TINY.vocab_size, PROMPT_LEN))
    forced = torch.as_tensor(rng.integers(0, TINY.vocab_size, (NEW_TOKENS, samples)))
    return prompt, forced


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------
# The model's arithmetic
# ---------------------------------------------------------------------------------------------

def test_prefill_logits_match_the_float64_truth():
    decoder = _decoder()
    prompt, _ = _inputs(1)
    gen = Generation(decoder, "none", samples=1, prompt_len=PROMPT_LEN, new_tokens=1, keep_logits=True)
    result = gen.generate(prompt)
    truth = truth_logits(decoder, prompt.numpy())[-1]
    assert _rel(result.logits[0, 0], truth) < 1e-12


def test_a_weight_change_changes_the_logits():
    """The truth reads every weight the model reads: a perturbed down projection is seen."""
    decoder = _decoder()
    prompt, _ = _inputs(1)
    before = truth_logits(decoder, prompt.numpy())[-1]
    decoder.layers[1].down[0, 0] += 1.0
    gen = Generation(decoder, "none", samples=1, prompt_len=PROMPT_LEN, new_tokens=1, keep_logits=True)
    after = gen.generate(prompt).logits[0, 0]
    assert _rel(after, truth_logits(decoder, prompt.numpy())[-1]) < 1e-12
    assert _rel(after, before) > 1e-6


def _decode_truth(decoder, prompt, forced, visible=None) -> np.ndarray:
    """[new_tokens, samples, vocab]: step i's logits of sample b follow prompt + forced[:i, b]."""
    out = []
    for b in range(forced.shape[1]):
        seq = np.concatenate([prompt.numpy(), forced[:-1, b].numpy()])
        out.append(truth_logits(decoder, seq, visible)[PROMPT_LEN - 1:])
    return np.stack(out, axis=1)


@pytest.mark.parametrize("attention", ["split_kv", "paged_decode", "shared_prefix", "peer:sdpa_math"])
def test_decode_steps_match_the_float64_truth(attention):
    """Every sample fed its own tokens; each step's logits equal the whole-sequence forward pass,
    through the backend's own KV layout (paged: the prompt's partial page copied per sample)."""
    decoder = _decoder()
    prompt, forced = _inputs(samples=3)
    gen = Generation(decoder, attention, samples=3, prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS, keep_logits=True)
    result = gen.generate(prompt, forced=forced)
    truth = _decode_truth(decoder, prompt, forced)
    for i in range(NEW_TOKENS):
        assert _rel(result.logits[i], truth[i]) < 1e-10, f"step {i}"
    assert np.array_equal(result.tokens, forced.numpy().T)


def _span_visible(pattern: SpanPattern):
    page = pattern.page_size()
    fixed = {t for p in pattern.fixed_pages(page) for t in range(p * page, (p + 1) * page)}
    fixed_end = (max(pattern.fixed_pages(page)) + 1) * page if fixed else 0

    def visible(i):
        if i < PROMPT_LEN:   # the prompt is prefilled with full causal attention
            return range(i + 1)
        n = i + 1
        start = max((n - pattern.window) // page * page, fixed_end)
        return fixed | set(range(start, n))

    return visible


@pytest.mark.parametrize("pattern", [SpanPattern(num_sinks=4, window=9), SpanPattern(num_sinks=8, window=1),
                                     SpanPattern(num_sinks=0, window=5, fixed_spans=((8, 16), (24, 32)))],
                         ids=["sinks4-window9", "sinks8-window1", "fixed-spans"])
def test_span_steps_attend_to_sinks_spans_and_window(pattern):
    decoder = _decoder()
    prompt, forced = _inputs(samples=2)
    gen = Generation(decoder, "span", samples=2, prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS, span=pattern,
                     keep_logits=True)
    result = gen.generate(prompt, forced=forced)
    truth = _decode_truth(decoder, prompt, forced, _span_visible(pattern))
    dense = _decode_truth(decoder, prompt, forced)
    for i in range(NEW_TOKENS):
        assert _rel(result.logits[i], truth[i]) < 1e-10, f"step {i}"
    assert _rel(result.logits[-1], dense[-1]) > 1e-6   # the spans matter: not dense attention


def test_none_skips_attention_in_the_decode_steps():
    decoder = _decoder()
    prompt, forced = _inputs(samples=2)
    result = Generation(decoder, "none", samples=2, prompt_len=PROMPT_LEN, new_tokens=4,
                        keep_logits=True).generate(prompt, forced=forced[:4])
    truth = _decode_truth(decoder, prompt, forced[:4], lambda i: range(i + 1) if i < PROMPT_LEN else ())
    assert _rel(result.logits, truth) < 1e-10


def test_greedy_tokens_agree_across_backends_in_float32():
    """Free greedy decoding, float32 on the CPU: every backend gives the tokens of the float64
    truth computed from the same weights."""
    prompt, _ = _inputs(1)
    decoder = _decoder(torch.float32)
    tokens = {attention: Generation(decoder, attention, samples=2, prompt_len=PROMPT_LEN,
                                    new_tokens=NEW_TOKENS).generate(prompt).tokens
              for attention in ("split_kv", "paged_decode", "shared_prefix", "span")}
    seq = list(prompt.numpy())
    for _ in range(NEW_TOKENS):
        seq.append(int(np.argmax(truth_logits(decoder, np.asarray(seq))[-1])))
    expected = np.asarray(seq[PROMPT_LEN:])
    for attention, t in tokens.items():
        assert np.array_equal(t, np.stack([expected, expected])), attention


def test_sampling_gives_samples_their_own_tokens():
    decoder = _decoder(torch.float32)
    prompt, _ = _inputs(1)
    torch.manual_seed(0)
    result = Generation(decoder, "shared_prefix", samples=4, prompt_len=PROMPT_LEN, new_tokens=8,
                        temperature=1.0).generate(prompt)
    assert len({tuple(row) for row in result.tokens}) > 1
    assert ((0 <= result.tokens) & (result.tokens < TINY.vocab_size)).all()


def test_paged_layout_stores_the_prompt_pages_once():
    decoder = _decoder()
    gen = Generation(decoder, "paged_decode", samples=5, prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS)
    pages = gen.attention.pages
    shared = PROMPT_LEN // PAGE_SIZE
    own = -(-(PROMPT_LEN + NEW_TOKENS) // PAGE_SIZE) - shared
    assert pages.num_pages == shared + 5 * own
    table = pages.table.numpy()
    assert (table[:, :shared] == np.arange(shared)).all()          # the same physical pages
    assert len(set(table[:, shared:].ravel())) == 5 * own           # the others each sequence's own


def test_generation_checks_its_arguments():
    decoder = _decoder()
    with pytest.raises(ValueError, match="attention must be one of"):
        Generation(decoder, "flash", samples=1, prompt_len=4, new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the decoder's"):
        Generation(decoder, "split_kv", samples=1, prompt_len=PROMPT_LEN, new_tokens=1000)
    with pytest.raises(ValueError, match="runs on a CUDA GPU only"):
        Generation(decoder, "peer:cudnn", samples=1, prompt_len=4, new_tokens=2)
    with pytest.raises(ValueError, match="fixed spans must lie inside the prompt"):
        Generation(decoder, "span", samples=1, prompt_len=PROMPT_LEN, new_tokens=2,
                   span=SpanPattern(num_sinks=0, window=4, fixed_spans=((32, 48),)))
    gen = Generation(decoder, "split_kv", samples=1, prompt_len=PROMPT_LEN, new_tokens=2)
    with pytest.raises(ValueError, match="prompt must be"):
        gen.generate(torch.zeros(PROMPT_LEN + 1, dtype=torch.int64))


def test_prompt_pattern_spans_lie_on_pages_inside_the_prompt():
    pattern = prompt_pattern("summarization", 8192, density=0.1, window=256)
    assert pattern.page_size() == 64 and pattern.fixed_spans
    covered = sum(e - s for s, e in pattern.fixed_spans)
    assert 0.1 * 8192 <= covered <= 0.1 * 8192 + 2 * 64 * len(pattern.fixed_spans)
    ends = [b for span in pattern.fixed_spans for b in span]
    assert ends == sorted(ends) and ends[-1] <= 8192


# ---------------------------------------------------------------------------------------------
# The step prediction
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, published_params", [(e2e_model.LLAMA3_8B, 8.03e9), (e2e_model.CODELLAMA_34B, 33.74e9),
                                                     (e2e_model.LLAMA2_7B, 6.74e9)])
def test_decoder_shapes_have_their_published_sizes(shape, published_params):
    assert shape.params == pytest.approx(published_params, rel=2e-3)


def test_step_prediction_terms():
    p = predict_step("llama3-8b", "none", batch=1, context_len=4096, gpu="H200")
    params = e2e_model.LLAMA3_8B.params - e2e_model.LLAMA3_8B.vocab_size * 4096
    assert p.weight_bytes == 2 * params
    assert p.attention_s == 0 and p.kv_bytes == 0
    assert p.time_s == pytest.approx(p.weights_s + p.launches_s)
    dense = predict_step("llama3-8b", "split_kv", batch=1, context_len=4096, gpu="H200")
    assert dense.kv_bytes == 32 * 2 * 4096 * 8 * 128 * 2
    assert dense.time_s == pytest.approx(dense.weights_s + dense.attention_s + dense.launches_s)
    assert 0 < dense.attention_share < 1


def test_shared_prefix_step_reads_the_prompt_once():
    kw = dict(batch=32, context_len=8192 + 128, prompt_len=8192, gpu="H200")
    shared = predict_step("llama2-7b", "shared_prefix", **kw)
    copied = predict_step("llama2-7b", "split_kv", **kw)
    per_layer_prompt = 2 * 8192 * 32 * 128 * 2
    assert copied.kv_bytes >= 32 * 32 * per_layer_prompt
    assert shared.kv_bytes < 2 * 32 * per_layer_prompt
    assert shared.time_s < copied.time_s / 2


def test_only_an_attention_with_a_cache_writes_the_new_token_to_it():
    none = predict_step("llama3-8b", "none", batch=4, context_len=4096, gpu="H200")
    dense = predict_step("llama3-8b", "split_kv", batch=4, context_len=4096, gpu="H200")
    layers = e2e_model.LLAMA3_8B.num_layers
    assert none.other_kernels == layers * e2e_model.KERNELS_PER_LAYER + e2e_model.STEP_KERNELS
    assert dense.other_kernels - none.other_kernels == layers * e2e_model.KV_WRITE_KERNELS
    assert dense.launches_s > none.launches_s and dense.weights_s == none.weights_s


def test_shared_prefix_step_runs_the_two_launches_of_the_kernels():
    """Hydragen in the step is what `gpukernels.shared_prefix` launches: the prefix pass in the
    chunks its plan takes, then the suffixes by split-KV with their plan, whose blocks merge every
    chunk's state."""
    from costmodel.shared_prefix import SharedPrefixShape
    from gpukernels.shared_prefix import plan_shared_prefix

    for batch, (hq, hkv), prompt in ((16, (32, 32), 8192), (256, (32, 8), 16384), (3, (28, 4), 1000)):
        shape = SharedPrefixShape(batch, hq, hkv, 128, prompt, 129)
        plan = plan_shared_prefix(batch, hq, hkv, 128, prompt, 129, gpu="H200")
        prefix, suffixes = e2e_model.hydragen_launches(shape, gpu=get_gpu("H200"))
        tiles = -(-batch * (hq // hkv) // plan.prefix_block_rows)   # 128 rows a block past 64 on Hopper
        assert prefix.num_blocks == plan.num_chunks * tiles * hkv
        assert prefix.bytes_by_tensor["partial_lse_write"] == plan.num_chunks * batch * hq * 4
        assert prefix.bytes_by_tensor["k_prefix"] == tiles * prompt * hkv * 128 * 2
        assert suffixes.num_blocks == plan.suffix.num_blocks
        assert suffixes.bytes_by_tensor["prefix_states"] == plan.num_chunks * batch * hq * 129 * 4
    step = predict_step("llama2-7b", "shared_prefix", batch=16, context_len=8192 + 129, prompt_len=8192, gpu="H200")
    assert step.attention_launches == 2 * e2e_model.LLAMA2_7B.num_layers
    layer = step.attention_per_layer
    assert {"prefix_pass.time_s", "suffixes.time_s"} <= set(layer.terms)
    assert layer.time_s == pytest.approx(sum(layer.terms[f"{n}.time_s"] for n in ("prefix_pass", "suffixes")))


def test_shared_prompt_pages_come_from_hbm_once_per_wave_of_resident_sequences():
    """The paged cache lists the prompt's full pages in every table: the sequences resident
    together read them from HBM once, the others from L2; its copied partial page is each
    sequence's own. MHA, 8k prompt, pages of 16, 264 resident blocks on an H200 (two per SM):
    with one split, 32 blocks a sequence and 8 sequences a wave."""
    gpu = get_gpu("H200")
    prompt, own = 8192 + 5, 129
    kv_token = 2 * 32 * 128 * 2                                   # K and V of one token, one layer
    shared = prompt // PAGE_SIZE * PAGE_SIZE
    for batch in (1, 4, 9, 64):
        step = predict_step("llama2-7b", "paged_decode", batch=batch, context_len=prompt + own, prompt_len=prompt,
                            gpu=gpu)
        layer = step.attention_per_layer
        resident = 264 // (layer.num_blocks // batch)
        waves = -(-batch // resident)
        assert layer.launches == 1 and (batch != 64 or (resident, waves) == (8, 8))
        per_sequence = (prompt + own - shared) * kv_token
        assert layer.l2_hit_bytes == (batch - waves) * shared * kv_token
        kv_hbm = layer.hbm_bytes - sum(v for k, v in layer.bytes_by_tensor.items() if not k.startswith(("k", "v")))
        assert kv_hbm == waves * shared * kv_token + batch * per_sequence
    copied = predict_step("llama2-7b", "split_kv", batch=64, context_len=prompt + own, prompt_len=prompt, gpu=gpu)
    assert step.attention_s < copied.attention_s and copied.attention_per_layer.l2_hit_bytes == 0


def test_accuracy_reports_the_end_to_end_rows_and_skips_unmeasured_ones(tmp_path):
    """`decode-attention accuracy` scores a `model:` row by its step prediction; a row out of
    memory was not measured and is neither scored nor unsupported; peers are never scored."""
    from costmodel import accuracy as acc
    from costmodel.rows import UnsupportedRow, predict_row

    gpu = get_gpu("H200")
    row = {"suite": "end_to_end", "impl": "model:shared_prefix", "model": e2e_model.LLAMA2_7B.name, "num_layers": 8,
           "dtype": "float16", "batch": 16, "num_qo_heads": 32, "num_kv_heads": 32, "head_dim": 128,
           "prompt_len": 8192, "own_tokens": 128, "context_len": 8192 + 129, "status": "ok"}
    step = e2e_model.predict_result_row(row, gpu)
    assert predict_row(row, gpu).time_s == step.time_s
    with pytest.raises(UnsupportedRow, match="unknown model"):
        predict_row({**row, "model": "GPT-2"}, gpu)
    rows = [{**row, "time_ms": 1.25 * step.time_s * 1e3},
            {**row, "impl": "model:split_kv", "batch": 256, "status": "oom"},
            {**row, "impl": "peer:cudnn", "status": "failed"}]
    (tmp_path / "h200").mkdir()
    (tmp_path / "h200" / "end_to_end.json").write_text(json.dumps({"meta": {"gpu": "NVIDIA H200"}, "rows": rows}))
    errors, unsupported = acc.row_errors(acc.load_results(tmp_path))
    assert unsupported == [] and [e.impl for e in errors] == ["model:shared_prefix"]
    assert errors[0].rel_error == pytest.approx(0.2)
    (suite, _) = acc.summarize(errors)
    assert suite.suite == "end_to_end" and not suite.meets_target


def test_step_prediction_checks_its_arguments():
    with pytest.raises(ValueError, match="attention must be one of"):
        predict_step("llama3-8b", "flash", batch=1, context_len=10, gpu="H200")
    with pytest.raises(ValueError, match="unknown model"):
        predict_step("gpt-5", "none", batch=1, context_len=10, gpu="H200")
    with pytest.raises(ValueError, match="prompt_len must be at most"):
        predict_step("llama3-8b", "none", batch=1, context_len=10, prompt_len=11, gpu="H200")
    assert "tokens/s" in str(predict_step("llama3-8b", "span", batch=8, context_len=32768, gpu="H200"))


@pytest.mark.parametrize("attention, pattern", [("shared_prefix", ""), ("split_kv", ""), ("span", "sinks_window"),
                                                 ("span", "arithmetic")])
def test_result_rows_are_predicted_as_the_suite_predicted_them(attention, pattern):
    """A row of the end_to_end suite carries what its prediction needs: the model, its layers run,
    the workload and the spans; predicting the row again gives the row's own prediction."""
    from costmodel.gpus import get_gpu
    from decode_attention.e2e import bench

    gpu = get_gpu("H200")
    decoder = e2e_model.LLAMA3_8B.with_layers(8)
    span = bench._span(pattern, 32768) if pattern else None
    row = {"impl": f"model:{attention}" + (f":{pattern}" if pattern else ""), "model": decoder.name, "num_layers": 8,
           "dtype": "float16", "batch": 8, "prompt_len": 32768, "own_tokens": 128, "context_len": 32768 + 129}
    if span is not None:
        row.update(num_sinks=span.num_sinks, window=span.window, fixed_spans=[list(x) for x in span.fixed_spans])
    expected = bench._prediction(decoder, attention, 8, 32768, 128, span, gpu)["predicted_ms"]
    assert e2e_model.predict_result_row(row, gpu).time_s * 1e3 == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="only rows of this project's attentions"):
        e2e_model.predict_result_row({**row, "impl": "peer:cudnn"}, gpu)
    # the matrix-vector rate the run measured for the decoder reads its weights, as the suite did
    measured = gpu.with_measured(gemv_bytes_per_s=3.9e12)
    expected = bench._prediction(decoder, attention, 8, 32768, 128, span, measured)
    again = e2e_model.predict_result_row({**row, "gemv_bytes_per_s": 3.9e12}, gpu)
    assert again.time_s * 1e3 == pytest.approx(expected["predicted_ms"], rel=1e-12)
    assert again.weights_s == pytest.approx(again.weight_bytes / 3.9e12, rel=1e-12)


def test_measured_rates_replace_the_estimates_and_projections_are_not_counted_twice():
    """A run's measured small-kernel cost replaces GRAPH_KERNEL_S; with the projections' rate
    measured under a graph, their launches are inside the weights term and leave the launch count."""
    gpu = get_gpu("H200")
    base = predict_step("llama2-7b", "split_kv", batch=4, context_len=8192, gpu=gpu)
    small = predict_step("llama2-7b", "split_kv", batch=4, context_len=8192,
                         gpu=gpu.with_measured(graph_kernel_s=1.5e-6))
    assert small.other_kernels == base.other_kernels
    assert small.launches_s == pytest.approx(base.other_kernels * 1.5e-6)
    assert base.launches_s == pytest.approx(base.other_kernels * e2e_model.GRAPH_KERNEL_S)
    both = predict_step("llama2-7b", "split_kv", batch=4, context_len=8192,
                        gpu=gpu.with_measured(graph_kernel_s=1.5e-6, gemv_bytes_per_s=3.5e12))
    layers = e2e_model.get_decoder("llama2-7b").num_layers
    assert base.other_kernels - both.other_kernels == layers * e2e_model.PROJECTION_KERNELS_PER_LAYER
    assert both.weights_s == pytest.approx(both.weight_bytes / 3.5e12)
    # at 256 tokens the roofline puts the products at the matrix-product rate; a rate measured at
    # that batch already holds that bound and replaces it
    wide = predict_step("llama3-8b", "none", batch=256, context_len=1024, gpu=gpu)
    cal = calibration_for(gpu, None)
    assert wide.weights_s == pytest.approx(wide.weight_flops / (cal.matmul_fraction * gpu.matmul_flops_per_s))
    measured = predict_step("llama3-8b", "none", batch=256, context_len=1024,
                            gpu=gpu.with_measured(gemv_bytes_per_s=2.4e12))
    assert measured.weights_s == pytest.approx(measured.weight_bytes / 2.4e12)


def test_suite_measures_a_row_on_the_cpu_too():
    """The suite's measurement of one row, here eagerly on a CPU: the caches filled with random
    normals, the step timed, the row's prediction beside it."""
    from costmodel.gpus import get_gpu
    from decode_attention.e2e import bench

    decoder = _decoder(torch.float32)
    rows = [bench._measure_row(decoder, attention, 3, PROMPT_LEN, 5, get_gpu("H200"))
            for attention in ("shared_prefix", "split_kv", "none")]
    for row in rows:
        assert row["status"] == "ok" and row["time_ms"] > 0 and row["predicted_ms"] > 0, row
        assert row["context_len"] == PROMPT_LEN + 6 and row["kv_fill"].startswith("random normals")
    assert rows[0]["kv_cache_bytes"] < rows[1]["kv_cache_bytes"]   # the prompt once, not per sample
    assert rows[2]["kv_cache_bytes"] == 0
    peer = bench._measure_row(decoder, "peer:sdpa_math", 3, PROMPT_LEN, 5, get_gpu("H200"))
    assert peer["status"] == "ok" and peer["impl"] == "peer:sdpa_math" and peer["time_ms"] > 0, peer


def test_suite_rows_get_their_ceiling_and_attention_share():
    from decode_attention.e2e.bench import _with_ceiling, format_rows

    base = {"setting": "hydragen", "model": "m", "batch": 256, "prompt_len": 1024}
    rows = _with_ceiling([{**base, "impl": "model:none", "status": "ok", "time_ms": 4.0},
                          {**base, "impl": "model:shared_prefix", "status": "ok", "time_ms": 5.0},
                          {**base, "impl": "model:split_kv", "status": "oom", "error": "CUDA out of memory"},
                          {**base, "prompt_len": 4096, "impl": "model:split_kv", "status": "ok", "time_ms": 9.0}])
    assert rows[1]["attention_ms"] == pytest.approx(1.0) and rows[1]["attention_share"] == pytest.approx(0.2)
    assert "attention_share" not in rows[2] and "attention_share" not in rows[3]   # no ceiling of its workload
    table = format_rows(rows)
    assert "oom" in table and "20%" in table


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--attention", "flash"], "invalid choice"),
    (["--samples", "0"], "must be a positive integer"),
    (["--model", "gpt-5"], "invalid choice"),
    (["--prompt-len", "100000", "--model", "llama2-7b", "--attention", "split_kv"], "exceeds"),
    (["--layers", "40", "--model", "llama3-8b"], "at most 32"),
])
def test_generate_rejects_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_without_a_gpu_says_so(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = cli.main(["generate", "--json", str(tmp_path / "out.json")])
    assert code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


# ---------------------------------------------------------------------------------------------
# On the GPU: the kernels inside the CUDA-graph loop
# ---------------------------------------------------------------------------------------------

def _have_gpu() -> bool:
    try:
        import gpukernels
    except ImportError:
        return False
    return torch.cuda.is_available() and gpukernels.gpu_available()


GPU_SHAPE = DecoderShape("small", num_layers=3, hidden_size=512, intermediate_size=1024, num_qo_heads=8,
                         num_kv_heads=2, head_dim=128, vocab_size=1000)
GPU_BACKENDS = ("split_kv", "paged_decode", "shared_prefix", "span", "peer:cudnn") + (
    ("peer:flashinfer",) if importlib.util.find_spec("flashinfer") else ())


def _gpu_run(attention, dtype, *, prompt, new_tokens, samples=4, forced=None):
    decoder = random_decoder(GPU_SHAPE, max_positions=4096, device="cuda", dtype=dtype, seed=0)
    span = SpanPattern(num_sinks=64, window=4096) if attention == "span" else None
    gen = Generation(decoder, attention, samples=samples, prompt_len=len(prompt), new_tokens=new_tokens, span=span,
                     keep_logits=True)
    return gen.generate(prompt, forced=forced)


LOGITS_ATOL = {torch.float16: 5e-2, torch.bfloat16: 2.5e-1}


@functools.cache
def _greedy_reference(dtype):
    """The eager float32 run of the decoder's `dtype`-rounded weights (1000-token prompt, 48 new),
    made once per dtype and process: (prompt, result, decisive [steps, samples], forced tokens)."""
    prompt = torch.as_tensor(np.random.default_rng(0).integers(0, GPU_SHAPE.vocab_size, 1000))
    decoder32 = random_decoder(GPU_SHAPE, max_positions=4096, device="cuda", dtype=dtype, seed=0)
    for w in decoder32.layers:   # the same (rounded) weights, computed in float32
        for name in vars(w):
            setattr(w, name, getattr(w, name).float())
    decoder32.embed, decoder32.lm_head = decoder32.embed.float(), decoder32.lm_head.float()
    decoder32.final_norm = decoder32.final_norm.float()
    decoder32.cos, decoder32.sin = decoder32.cos.float(), decoder32.sin.float()
    ref = Generation(decoder32, "split_kv", samples=4, prompt_len=1000, new_tokens=48, keep_logits=True,
                     use_graph=False).generate(prompt)
    top2 = np.sort(ref.logits, axis=-1)[..., -2:]
    decisive = (top2[..., 1] - top2[..., 0]) > 2 * LOGITS_ATOL[dtype]
    return prompt, ref, decisive, torch.as_tensor(ref.tokens.T.copy())


@pytest.mark.gpu
@pytest.mark.skipif(not _have_gpu(), reason="needs PyTorch with CUDA, CuPy and a CUDA GPU")
@pytest.mark.parametrize("attention", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_gpu_backends_give_the_same_greedy_tokens(dtype, attention):
    """Greedy decoding of one prompt (1000 tokens, 48 new) under CUDA graphs: the backend's
    logits agree with the eager float32 run of the same weights within the dtype's tolerance,
    and its tokens are the reference's, except after a step where the reference's two best
    logits lie within that tolerance (a tie the dtype cannot decide). Span: 64 sinks and a
    4096-token window hold every token here."""
    prompt, ref, decisive, forced = _greedy_reference(dtype)
    same_inputs = _gpu_run(attention, dtype, prompt=prompt, new_tokens=48, forced=forced)
    assert np.abs(same_inputs.logits - ref.logits).max() <= LOGITS_ATOL[dtype]
    free = _gpu_run(attention, dtype, prompt=prompt, new_tokens=48)
    for b in range(4):
        differ = np.flatnonzero(free.tokens[b] != ref.tokens[b])
        if differ.size:
            assert not decisive[: differ[0] + 1, b].all(), (b, differ[0])
    # Random weights give near-flat logits: the free runs' tokens are held to the reference only where
    # its two best logits lie apart by more than the tolerance (bfloat16: a few steps). The check of
    # every step is the forced run's logits above.
    assert decisive.any()


@pytest.mark.gpu
@pytest.mark.skipif(not _have_gpu(), reason="needs PyTorch with CUDA, CuPy and a CUDA GPU")
def test_gpu_generate_command_writes_its_figures(tmp_path):
    path = tmp_path / "gen.json"
    code = cli.main(["generate", "--model", "llama3-8b", "--layers", "2", "--samples", "4", "--prompt-len", "512",
                     "--new-tokens", "16", "--attention", "shared_prefix", "--json", str(path)])
    assert code == 0
    figures = json.loads(path.read_text())
    assert figures["tokens_per_s"] > 0 and 0 <= figures["attention_share"] < 1
    assert figures["predicted"]["step_ms"] > 0
