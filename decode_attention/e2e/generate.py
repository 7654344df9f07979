"""Prefill a prompt once, then decode: one step per token for every sample, replayed as a CUDA
graph on the GPU (eagerly on a CPU), timed step by step with CUDA events.

    >>> run = Generation(decoder, "shared_prefix", samples=32, prompt_len=8192, new_tokens=256)  # doctest: +SKIP
    >>> result = run.generate(prompt)                                                           # doctest: +SKIP
    >>> result.tokens_per_s, result.step_ms_median                                              # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .attention import AttentionSetup, SpanPattern, make_attention
from .model import Decoder

__all__ = ["Generation", "GenerateResult", "step_time_ms"]


@dataclass
class GenerateResult:
    tokens: np.ndarray                 # [samples, new_tokens]: the first from the prefill's logits
    step_ms: np.ndarray                # [new_tokens - 1]: each decode step
    prefill_ms: float
    logits: "np.ndarray | None" = None  # [new_tokens, samples, vocab] when kept (float64 for a float64 model)
    extra: dict = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return self.tokens.shape[0]

    @property
    def step_ms_median(self) -> float:
        return float(np.median(self.step_ms)) if self.step_ms.size else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """Decoded tokens of all samples per second of decode steps (the prefill excluded)."""
        total_s = float(self.step_ms.sum()) * 1e-3
        return self.samples * self.step_ms.size / total_s if total_s else float("nan")


def _next_tokens(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Greedy (temperature 0) or sampled by the Gumbel-max trick (no host synchronisation)."""
    if temperature <= 0:
        return logits.argmax(-1)
    gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_(1e-20, 1.0)))
    return (logits / temperature + gumbel).argmax(-1)


class Generation:
    """One decoder, one attention backend, `samples` sequences sharing a prompt of `prompt_len`
    tokens, up to `new_tokens` tokens each."""

    def __init__(self, decoder: Decoder, attention: str, *, samples: int, prompt_len: int, new_tokens: int,
                 span: "SpanPattern | None" = None, use_graph: "bool | None" = None, temperature: float = 0.0,
                 keep_logits: bool = False):
        if new_tokens < 1:
            raise ValueError(f"new_tokens must be at least 1, got {new_tokens}")
        if prompt_len + new_tokens > decoder.max_positions:
            raise ValueError(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the decoder's "
                             f"{decoder.max_positions} positions")
        s = decoder.shape
        self.decoder = decoder
        self.setup = AttentionSetup(samples, prompt_len, new_tokens, s.num_layers, s.num_qo_heads,
                                    s.num_kv_heads, s.head_dim, decoder.dtype, decoder.device)
        self.attention = make_attention(attention, self.setup, span=span)
        self.use_graph = self.setup.on_gpu if use_graph is None else use_graph
        self.temperature = temperature
        self.keep_logits = keep_logits
        dev = decoder.device
        self.tokens_in = torch.zeros(samples, dtype=torch.int64, device=dev)
        self.position = torch.full((1,), prompt_len, dtype=torch.int64, device=dev)
        self.start_position = prompt_len     # the first decode step's position, on the host
        self.out_tokens = torch.zeros(new_tokens, samples, dtype=torch.int64, device=dev)
        wide = torch.float64 if decoder.dtype == torch.float64 else torch.float32
        self.logits = (torch.zeros(new_tokens, samples, s.vocab_size, dtype=wide, device=dev)
                       if keep_logits else None)
        self.forced = None

    # one step, as captured: reads and writes device tensors only
    def _step(self) -> None:
        logits = self.decoder.step(self.tokens_in, self.position, self.attention)
        index = self.position - self.setup.prompt_len + 1                        # [1]
        chosen = _next_tokens(logits, self.temperature)
        if self.forced is not None:
            chosen = self.forced[index][0]
        self.out_tokens.index_copy_(0, index, chosen[None])
        if self.logits is not None:
            self.logits.index_copy_(0, index, logits[None].to(self.logits.dtype))
        self.tokens_in.copy_(chosen)
        self.position.add_(1)

    def _capture(self):
        """The step as a CUDA graph (warmed up once on the capture stream, state restored). The
        host plan of the warm-up step (`before_step`) is made on the current stream, as in the
        replays, and the capture stream waits for it: a plan's copies of its tables are queued on
        the stream it is made on, which the capture stream does not follow by itself."""
        stream = torch.cuda.Stream()
        saved = (self.tokens_in.clone(), self.position.clone())
        self.attention.before_step(int(saved[1].item()))
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.tokens_in.copy_(saved[0])
        self.position.copy_(saved[1])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self._step()
        return graph

    def generate(self, prompt: torch.Tensor, *, forced: "torch.Tensor | None" = None, progress=None) -> GenerateResult:
        """Prefill `prompt` [prompt_len] and decode; `progress(done, total)` is called now and then.
        `forced` [new_tokens, samples] (tests): the tokens fed instead of the chosen ones, so that
        backends are compared on the same inputs."""
        s = self.setup
        if prompt.shape != (s.prompt_len,):
            raise ValueError(f"prompt must be [prompt_len] = ({s.prompt_len},), got {tuple(prompt.shape)}")
        self.forced = None if forced is None else forced.to(self.decoder.device)
        sync = torch.cuda.synchronize if s.on_gpu else (lambda: None)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            first_logits = self.decoder.prefill(prompt.to(self.decoder.device), self.attention)
        first = _next_tokens(first_logits[None].expand(s.batch, -1), self.temperature)
        if self.forced is not None:
            first = self.forced[0]
        self.out_tokens[0] = first
        if self.logits is not None:
            self.logits[0] = first_logits
        self.tokens_in.copy_(first)
        sync()
        prefill_ms = (time.perf_counter() - start) * 1e3
        steps = s.max_new_tokens - 1
        step_ms = self._decode(steps, progress)
        return GenerateResult(self.out_tokens.T.cpu().numpy(), step_ms, prefill_ms,
                              None if self.logits is None else self.logits.cpu().numpy())

    def _decode(self, steps: int, progress) -> np.ndarray:
        if steps == 0:
            return np.zeros(0)
        report_every = max(1, steps // 20)
        with torch.no_grad():
            if not self.use_graph:
                times = []
                for i in range(steps):
                    start = time.perf_counter()
                    self.attention.before_step(self.start_position + i)
                    self._step()
                    if self.setup.on_gpu:
                        torch.cuda.synchronize()
                    times.append((time.perf_counter() - start) * 1e3)
                    if progress and (i + 1) % report_every == 0:
                        progress(i + 1, steps)
                return np.asarray(times)
            graph = self._capture()
            events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            events[0].record()
            for i in range(steps):
                self.attention.before_step(self.start_position + i)
                graph.replay()
                events[i + 1].record()
                if progress and (i + 1) % report_every == 0:
                    events[i + 1].synchronize()
                    progress(i + 1, steps)
            torch.cuda.synchronize()
            return np.asarray([events[i].elapsed_time(events[i + 1]) for i in range(steps)])


def step_time_ms(decoder: Decoder, attention: str, *, samples: int, context_len: int, own_tokens: int = 0,
                 steps: int = 20, span: "SpanPattern | None" = None, fill_seed: int = 0) -> tuple[float, dict]:
    """Median time of a decode step (CUDA graph replays, CUDA events) of `samples` sequences that
    share a prompt of `context_len` tokens and have decoded `own_tokens` each, the caches filled
    with random normals instead of a prefill (a step's cost does not depend on the values).
    Returns (median ms, facts of the run)."""
    gen = Generation(decoder, attention, samples=samples, prompt_len=context_len,
                     new_tokens=own_tokens + steps + 1, span=span)
    gen.start_position = context_len + own_tokens
    gen.position.fill_(gen.start_position)
    torch.manual_seed(fill_seed)
    for name, t in vars(gen.attention).items():
        if name.startswith(("k", "v")) and isinstance(t, torch.Tensor) and t.is_floating_point():
            t.normal_()
    gen.tokens_in.random_(0, decoder.shape.vocab_size)
    step_ms = gen._decode(steps, None)
    facts = {"kv_cache_bytes": gen.attention.kv_bytes()}
    if hasattr(gen.attention, "attended_len"):
        facts["attended_len"] = gen.attention.attended_len(context_len + own_tokens)
    return float(np.median(step_ms)), facts
