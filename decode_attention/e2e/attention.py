"""Attention backends of the decoder: each keeps the KV cache in its own layout and attends to it
through one of this project's variants, a peer, or not at all.

| name | KV layout | one layer's attention |
|---|---|---|
| `split_kv` | contiguous [batch, max_len, Hkv, D], the prompt copied into every sequence | `gpukernels.SplitKV(plan).run` |
| `paged_decode` | pages of 16; the prompt's full pages stored once and listed in every table, its partial last page copied per sequence | `SplitKV(plan).run_paged` |
| `shared_prefix` | the prompt once [P, Hkv, D]; each sequence's own tokens [batch, new_tokens, Hkv, D] | `gpukernels.SharedPrefix(plan).run` (Hydragen) |
| `span` | contiguous, read through a page table of its spans: sinks + a window (and fixed spans of the prompt) | `SplitKV(plan).run_paged` over the cache seen as pages |
| `peer:cudnn` | contiguous, the prompt copied | PyTorch SDPA, cuDNN backend, an additive mask over the unwritten positions |
| `peer:flashinfer` | as `paged_decode` | FlashInfer's paged decode wrapper (tensor cores from 4 query heads per KV head), planned each step on the host |
| `peer:sdpa_math` | as `peer:cudnn` | PyTorch SDPA's math backend (also on a CPU) |
| `none` | nothing | skipped: the ceiling a faster attention approaches |

Every backend has the same four calls, made by `Decoder.prefill` and `Decoder.step`:
`store_prompt(layer, k, v)` (the prompt's K, V [P, Hkv, D], once), `prepare(position)` (once a
step: lengths and page tables from the position, on the device), `append(layer, k, v)` (the new
token's K, V [batch, Hkv, D]) and `attend(layer, q) -> out` (q, out [batch, Hq, D]). On the GPU,
`prepare`, `append` and `attend` read nothing on the host, so the step is captured in a CUDA
graph (FlashInfer's host plan, made in `before_step`, is the exception). On a CPU the same layouts are
attended by the NumPy references of the same variants (`refattn`), which is how the tests check
the layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from costmodel.end_to_end import span_backend_page
from costmodel.span import MAX_SPAN_PAGE

__all__ = ["AttentionSetup", "SpanPattern", "make_attention", "BACKENDS", "PAGE_SIZE"]

PAGE_SIZE = 16                     # tokens per page of the paged backends
BACKENDS = ("split_kv", "paged_decode", "shared_prefix", "span", "peer:cudnn", "peer:flashinfer", "peer:sdpa_math",
            "none")


@dataclass(frozen=True)
class AttentionSetup:
    """What every backend is sized for: `batch` sequences sharing a prompt of `prompt_len`
    tokens, each then decoding up to `max_new_tokens` positions."""

    batch: int
    prompt_len: int
    max_new_tokens: int
    num_layers: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.max_new_tokens

    @property
    def on_gpu(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class SpanPattern:
    """What the span backend attends to: the first `num_sinks` tokens, the last `window` tokens
    (from the page holding their first token: up to a page more), and `fixed_spans`, half-open
    intervals of the prompt (a pattern like the self-selected spans of a task). Sinks and fixed
    spans must lie on page boundaries of the page size they allow (`page_size`)."""

    num_sinks: int = 4
    window: int = 4096
    fixed_spans: tuple[tuple[int, int], ...] = ()

    def page_size(self) -> int:
        """The largest power of two up to MAX_SPAN_PAGE dividing the sinks and every fixed boundary
        (`costmodel.end_to_end.span_backend_page`, which the step's prediction uses too)."""
        return span_backend_page(self.num_sinks, self.fixed_spans)

    def fixed_pages(self, page: int) -> list[int]:
        """Pages of the sinks and the fixed spans, in order, each once."""
        pages = set(range(self.num_sinks // page))
        for start, end in self.fixed_spans:
            pages.update(range(start // page, end // page))
        return sorted(pages)


def make_attention(name: str, setup: AttentionSetup, *, span: "SpanPattern | None" = None):
    """The backend `name` (one of BACKENDS) sized for `setup`."""
    kinds = {"split_kv": SplitKVAttention, "paged_decode": PagedAttention, "shared_prefix": SharedPrefixAttention,
             "peer:cudnn": SdpaAttention, "peer:flashinfer": FlashInferAttention, "none": NoAttention}
    if name == "span":
        return SpanAttention(setup, span or SpanPattern())
    if name == "peer:sdpa_math":
        return SdpaAttention(setup, "math")
    if name not in kinds:
        raise ValueError(f"attention must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name.startswith("peer:") and not setup.on_gpu:
        raise ValueError(f"{name} runs on a CUDA GPU only")
    return kinds[name](setup)


def _plan_gpu(setup: AttentionSetup):
    """(num_sms, the cost model's GPU or None) of the setup's device, for the kernels' plans."""
    from gpukernels.split_kv import device_gpu, num_sms

    index = torch.device(setup.device).index or 0
    return num_sms(index), device_gpu(index)


def _host(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


class _Backend:
    """Shared by the backends: the setup, the output buffers, the position-derived lengths."""

    name = ""

    def __init__(self, setup: AttentionSetup):
        self.setup = setup
        s = setup
        self.out = torch.zeros(s.batch, s.num_qo_heads, s.head_dim, dtype=s.dtype, device=s.device)
        self.lse = torch.zeros(s.batch, s.num_qo_heads, dtype=torch.float32, device=s.device)
        self.kv_lens = torch.zeros(s.batch, dtype=torch.int32, device=s.device)   # tokens attended, per sequence
        self.position = torch.zeros(1, dtype=torch.int64, device=s.device)

    def prepare(self, position: torch.Tensor) -> None:
        self.position.copy_(position)
        self.kv_lens.copy_((position + 1).to(torch.int32).expand(self.setup.batch))

    def before_step(self, position: int) -> None:
        """Host work before a step (outside a CUDA graph); nothing for most backends."""

    def kv_bytes(self) -> int:
        """Bytes this backend's cache holds."""
        return 0

    def _to_out(self, out_np: np.ndarray) -> torch.Tensor:
        self.out.copy_(torch.from_numpy(np.ascontiguousarray(out_np)).to(self.setup.dtype))
        return self.out


class NoAttention(_Backend):
    """Attention skipped (its output zero): what the rest of the model costs on its own."""

    name = "none"

    def store_prompt(self, layer, k, v) -> None:
        pass

    def append(self, layer, k, v) -> None:
        pass

    def attend(self, layer, q) -> torch.Tensor:
        return self.out


class _Contiguous(_Backend):
    """K, V [layers, batch, max_len, Hkv, D], the prompt copied into every sequence."""

    def __init__(self, setup: AttentionSetup, max_len: "int | None" = None):
        super().__init__(setup)
        s = setup
        shape = (s.num_layers, s.batch, max_len or s.max_len, s.num_kv_heads, s.head_dim)
        self.k = torch.zeros(shape, dtype=s.dtype, device=s.device)
        self.v = torch.zeros(shape, dtype=s.dtype, device=s.device)

    def kv_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def store_prompt(self, layer, k, v) -> None:
        P = k.shape[0]
        self.k[layer, :, :P] = k[None]
        self.v[layer, :, :P] = v[None]

    def append(self, layer, k, v) -> None:
        self.k[layer].index_copy_(1, self.position, k[:, None])
        self.v[layer].index_copy_(1, self.position, v[:, None])


class SplitKVAttention(_Contiguous):
    name = "split_kv"

    def __init__(self, setup: AttentionSetup):
        super().__init__(setup)
        s = setup
        if s.on_gpu:
            import gpukernels

            sms, gpu = _plan_gpu(s)
            self.runner = gpukernels.SplitKV(gpukernels.plan_split_kv(
                s.batch, s.num_qo_heads, s.num_kv_heads, s.head_dim, s.max_len, dtype=s.dtype_name,
                num_sms=sms if gpu is None else None, gpu=gpu))

    def attend(self, layer, q) -> torch.Tensor:
        if self.setup.on_gpu:
            self.runner.run(q, self.k[layer], self.v[layer], self.kv_lens, out=self.out, lse=self.lse)
            return self.out
        import refattn

        out, _ = refattn.split_kv(_host(q), _host(self.k[layer]), _host(self.v[layer]), _host(self.kv_lens))
        return self._to_out(out)


class SdpaAttention(_Contiguous):
    """PyTorch SDPA over the contiguous cache on one backend (`backend`: "cudnn", or "math", which
    also runs on a CPU); positions not yet written are masked by an additive mask
    [batch, 1, 1, max_len] kept on the device."""

    def __init__(self, setup: AttentionSetup, backend: str = "cudnn"):
        super().__init__(setup)
        from torch.nn.attention import SDPBackend

        self.name = f"peer:sdpa_{backend}" if backend != "cudnn" else "peer:cudnn"
        self.backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]
        s = setup
        self.mask = torch.zeros(s.batch, 1, 1, s.max_len, dtype=s.dtype, device=s.device)
        self.arange = torch.arange(s.max_len, device=s.device)

    def prepare(self, position):
        super().prepare(position)
        blocked = (self.arange > position).expand(self.setup.batch, 1, 1, -1)
        self.mask.copy_(torch.zeros_like(self.mask).masked_fill_(blocked, float("-inf")))

    def attend(self, layer, q) -> torch.Tensor:
        from torch.nn.attention import sdpa_kernel

        s = self.setup
        with sdpa_kernel([self.backend]):
            o = F.scaled_dot_product_attention(q[:, :, None], self.k[layer].transpose(1, 2),
                                               self.v[layer].transpose(1, 2), attn_mask=self.mask,
                                               enable_gqa=s.num_qo_heads != s.num_kv_heads)
        return o[:, :, 0]


class _PageTable:
    """Pages of every sequence: the prompt's full pages shared (stored once), then each sequence's
    own pages (its copy of the prompt's partial last page, then its new tokens).

    `table` [batch, max_pages]: physical page of logical page j of sequence b. Each step, with
    every sequence at the same length n, `indptr` = b * ceil(n / page), `indices` the first
    ceil(n / page) entries of each row back to back (then zeros to a fixed size), and
    `last_page_len` = n - (ceil(n / page) - 1) * page: all computed on the device."""

    def __init__(self, setup: AttentionSetup, page: int):
        s = setup
        self.page = page
        self.shared_pages = s.prompt_len // page
        self.max_pages = -(-s.max_len // page)
        own = self.max_pages - self.shared_pages
        self.num_pages = self.shared_pages + s.batch * own
        logical = np.arange(self.max_pages)[None, :]
        b = np.arange(s.batch)[:, None]
        table = np.where(logical < self.shared_pages, logical,
                         self.shared_pages + b * own + (logical - self.shared_pages))
        dev = s.device
        self.table = torch.as_tensor(table, dtype=torch.int64, device=dev)           # [B, max_pages]
        self.flat = torch.arange(s.batch * self.max_pages, device=dev)               # slots of indices
        self.indptr = torch.zeros(s.batch + 1, dtype=torch.int32, device=dev)
        self.indices = torch.zeros(s.batch * self.max_pages, dtype=torch.int32, device=dev)
        self.last = torch.zeros(s.batch, dtype=torch.int32, device=dev)
        self.write_pages = torch.zeros(s.batch, dtype=torch.int64, device=dev)
        self.batch_range = torch.arange(s.batch + 1, device=dev)

    def update(self, position: torch.Tensor) -> None:
        """The table for sequences of position + 1 tokens; the pages the new token goes to."""
        n = position + 1                                                            # [1]
        used = (n + self.page - 1) // self.page
        self.indptr.copy_((self.batch_range * used).to(torch.int32))
        b, j = self.flat // used, self.flat % used
        inside = b < self.table.shape[0]
        gathered = self.table.reshape(-1)[torch.where(inside, b * self.max_pages + j, 0)]
        self.indices.copy_(torch.where(inside, gathered, 0).to(torch.int32))
        self.last.copy_((n - (used - 1) * self.page).to(torch.int32).expand_as(self.last))
        self.write_pages.copy_(self.table[:, position // self.page][:, 0])

    def host_tables(self):
        """indptr, indices (up to indptr[-1]), last_page_len on the host, as the references take them."""
        indptr = _host(self.indptr)
        return indptr, _host(self.indices)[: indptr[-1]], _host(self.last)


class PagedAttention(_Backend):
    name = "paged_decode"

    def __init__(self, setup: AttentionSetup):
        super().__init__(setup)
        s = setup
        self.pages = _PageTable(setup, PAGE_SIZE)
        shape = (s.num_layers, self.pages.num_pages, PAGE_SIZE, s.num_kv_heads, s.head_dim)
        self.k = torch.zeros(shape, dtype=s.dtype, device=s.device)
        self.v = torch.zeros(shape, dtype=s.dtype, device=s.device)
        if s.on_gpu:
            self._make_runner()

    def _make_runner(self) -> None:
        import gpukernels

        s = self.setup
        sms, gpu = _plan_gpu(s)
        self.runner = gpukernels.SplitKV(gpukernels.plan_split_kv(
            s.batch, s.num_qo_heads, s.num_kv_heads, s.head_dim, s.max_len, dtype=s.dtype_name,
            page_size=PAGE_SIZE, num_sms=sms if gpu is None else None, gpu=gpu))

    def kv_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def store_prompt(self, layer, k, v) -> None:
        s, p = self.setup, self.pages
        full = p.shared_pages * PAGE_SIZE
        self.k[layer, : p.shared_pages] = k[:full].reshape(p.shared_pages, PAGE_SIZE, *k.shape[1:])
        self.v[layer, : p.shared_pages] = v[:full].reshape(p.shared_pages, PAGE_SIZE, *v.shape[1:])
        tail = k.shape[0] - full
        if tail:   # the partial last page: each sequence's own copy
            own_first = p.table[:, p.shared_pages]                                  # [B]
            self.k[layer, own_first, :tail] = k[full:][None].expand(s.batch, -1, -1, -1)
            self.v[layer, own_first, :tail] = v[full:][None].expand(s.batch, -1, -1, -1)

    def prepare(self, position):
        super().prepare(position)
        self.pages.update(position)

    def append(self, layer, k, v) -> None:
        slot = (self.position % PAGE_SIZE).expand(self.setup.batch)
        self.k[layer].index_put_((self.pages.write_pages, slot), k)
        self.v[layer].index_put_((self.pages.write_pages, slot), v)

    def attend(self, layer, q) -> torch.Tensor:
        p = self.pages
        if self.setup.on_gpu:
            self.runner.run_paged(q, self.k[layer], self.v[layer], p.indptr, p.indices, p.last, out=self.out,
                                  lse=self.lse)
            return self.out
        import refattn

        out, _ = refattn.paged_decode(_host(q), _host(self.k[layer]), _host(self.v[layer]), *p.host_tables())
        return self._to_out(out)


TENSOR_CORE_GROUP = 4   # query heads per KV head from which FlashInfer's decode runs on tensor cores


class FlashInferAttention(PagedAttention):
    """FlashInfer's paged decode over the same pages, on tensor cores where a KV head serves at
    least TENSOR_CORE_GROUP query heads, else on CUDA cores (its documentation: tensor cores are faster
    for large groups; on the 7B MHA shape its tensor-core planner read a garbage indptr in one run and
    never returned in two, at 1 to 64 samples, while the GQA shape ran). Its plan is made on the host
    before every step (`before_step`), as FlashInfer's CUDA-graph mode requires. A plan stages its
    tables in one pinned host buffer and copies them to the GPU on the stream, behind the steps
    already queued; the next plan waits for that copy (an event), else it could rewrite the buffer
    before the copy reads it (replanned each step with no wait, the suite saw an indptr of garbage
    in one run and a step that never returned in the next, as that race would give). The warm-up
    step before a CUDA graph's capture is planned on the current stream too, the capture stream
    waiting for it (`Generation._capture`): planned on the capture stream, the step read tables
    not yet copied while other processes kept the GPU busy, and two test processes running this
    backend at once hung or hit an illegal memory access in two runs of five."""

    name = "peer:flashinfer"

    def _make_runner(self) -> None:
        import flashinfer

        s, p = self.setup, self.pages
        dev = s.device
        self.workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
        self.fi_indptr = torch.zeros(s.batch + 1, dtype=torch.int32, device=dev)
        self.fi_indices = torch.zeros(s.batch * p.max_pages, dtype=torch.int32, device=dev)
        self.fi_last = torch.zeros(s.batch, dtype=torch.int32, device=dev)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True,
            use_tensor_cores=s.num_qo_heads // s.num_kv_heads >= TENSOR_CORE_GROUP,
            paged_kv_indptr_buffer=self.fi_indptr, paged_kv_indices_buffer=self.fi_indices,
            paged_kv_last_page_len_buffer=self.fi_last)
        self.host_table = _host(p.table).astype(np.int32)
        self.planned = None   # an event after the last plan's copies were queued

    def before_step(self, position: int) -> None:
        s, p = self.setup, self.pages
        if self.planned is not None:
            self.planned.synchronize()
        n = position + 1
        used = -(-n // PAGE_SIZE)
        indptr = torch.arange(s.batch + 1, dtype=torch.int32) * used
        indices = torch.from_numpy(np.ascontiguousarray(self.host_table[:, :used].reshape(-1)))
        last = torch.full((s.batch,), n - (used - 1) * PAGE_SIZE, dtype=torch.int32)
        self.wrapper.plan(indptr, indices, last, s.num_qo_heads, s.num_kv_heads, s.head_dim, PAGE_SIZE,
                          data_type=s.dtype, q_data_type=s.dtype)
        self.planned = torch.cuda.Event()
        self.planned.record()

    def attend(self, layer, q) -> torch.Tensor:
        return self.wrapper.run(q, (self.k[layer], self.v[layer]))


class SharedPrefixAttention(_Backend):
    """The prompt's K, V once [layers, P, Hkv, D]; each sequence's own [layers, B, new, Hkv, D]."""

    name = "shared_prefix"

    def __init__(self, setup: AttentionSetup):
        super().__init__(setup)
        s = setup
        prefix = (s.num_layers, s.prompt_len, s.num_kv_heads, s.head_dim)
        suffix = (s.num_layers, s.batch, s.max_new_tokens, s.num_kv_heads, s.head_dim)
        self.k_prefix = torch.zeros(prefix, dtype=s.dtype, device=s.device)
        self.v_prefix = torch.zeros(prefix, dtype=s.dtype, device=s.device)
        self.k_suffix = torch.zeros(suffix, dtype=s.dtype, device=s.device)
        self.v_suffix = torch.zeros(suffix, dtype=s.dtype, device=s.device)
        self.suffix_index = torch.zeros(1, dtype=torch.int64, device=s.device)
        if s.on_gpu:
            from gpukernels.shared_prefix import SharedPrefix, plan_shared_prefix

            sms, gpu = _plan_gpu(s)
            self.runner = SharedPrefix(plan_shared_prefix(
                s.batch, s.num_qo_heads, s.num_kv_heads, s.head_dim, s.prompt_len, s.max_new_tokens,
                dtype=s.dtype_name, num_sms=sms if gpu is None else None, gpu=gpu))

    def kv_bytes(self) -> int:
        return sum(2 * t.numel() * t.element_size() for t in (self.k_prefix, self.k_suffix))

    def store_prompt(self, layer, k, v) -> None:
        self.k_prefix[layer] = k
        self.v_prefix[layer] = v

    def prepare(self, position):
        super().prepare(position)
        self.suffix_index.copy_(position - self.setup.prompt_len)
        self.kv_lens.copy_((self.suffix_index + 1).to(torch.int32).expand(self.setup.batch))   # own tokens

    def append(self, layer, k, v) -> None:
        self.k_suffix[layer].index_copy_(1, self.suffix_index, k[:, None])
        self.v_suffix[layer].index_copy_(1, self.suffix_index, v[:, None])

    def attend(self, layer, q) -> torch.Tensor:
        args = (self.k_prefix[layer], self.v_prefix[layer], self.k_suffix[layer], self.v_suffix[layer])
        if self.setup.on_gpu:
            self.runner.run(q, *args, self.kv_lens, out=self.out, lse=self.lse)
            return self.out
        import refattn

        out, _ = refattn.shared_prefix(_host(q), *map(_host, args), _host(self.kv_lens))
        return self._to_out(out)


class SpanAttention(_Contiguous):
    """Sinks, fixed spans of the prompt and a recent window, read from the contiguous cache seen as
    pages of `page` tokens through a page table built on the device each step: sequence b lists
    the pages of its sinks and fixed spans, then the window's pages from the one holding
    position + 1 - window (never before the fixed pages' end) to the one holding the position,
    which is its partly filled last page."""

    name = "span"

    def __init__(self, setup: AttentionSetup, pattern: SpanPattern):
        page = pattern.page_size()
        padded = -(-setup.max_len // page) * page
        for start, end in pattern.fixed_spans:
            if not 0 <= start < end <= setup.prompt_len:
                raise ValueError(f"fixed spans must lie inside the prompt [0, {setup.prompt_len}), got "
                                 f"[{start}, {end})")
        if pattern.num_sinks > setup.prompt_len:
            raise ValueError(f"num_sinks must be at most the prompt's {setup.prompt_len} tokens, got "
                             f"{pattern.num_sinks}")
        if pattern.window < 1:
            raise ValueError(f"window must be at least 1 token (the newest), got {pattern.window}")
        super().__init__(setup, padded)
        s, dev = setup, setup.device
        self.pattern, self.page = pattern, page
        self.pages_per_seq = padded // page
        fixed = pattern.fixed_pages(page)
        self.num_fixed = len(fixed)
        self.fixed_end = (max(fixed) + 1) if fixed else 0
        self.fixed = torch.as_tensor(fixed + [0], dtype=torch.int64, device=dev)   # padded: never empty
        self.capacity = self.num_fixed + self.pages_per_seq
        self.flat = torch.arange(s.batch * self.capacity, device=dev)
        self.indptr = torch.zeros(s.batch + 1, dtype=torch.int32, device=dev)
        self.indices = torch.zeros(s.batch * self.capacity, dtype=torch.int32, device=dev)
        self.last = torch.zeros(s.batch, dtype=torch.int32, device=dev)
        self.batch_range = torch.arange(s.batch + 1, device=dev)
        if s.on_gpu:
            import gpukernels

            sms, gpu = _plan_gpu(s)
            attended = min(padded, pattern.num_sinks + sum(e - b for b, e in pattern.fixed_spans)
                           + pattern.window + page)
            self.runner = gpukernels.SplitKV(gpukernels.plan_split_kv(
                s.batch, s.num_qo_heads, s.num_kv_heads, s.head_dim, attended, dtype=s.dtype_name,
                page_size=page, num_sms=sms if gpu is None else None, gpu=gpu))

    def prepare(self, position):
        super().prepare(position)
        n = position + 1
        last_page = position // self.page
        first_window = torch.clamp((n - self.pattern.window) // self.page, min=self.fixed_end)
        count = self.num_fixed + last_page - first_window + 1                       # [1], the same for all
        self.indptr.copy_((self.batch_range * count).to(torch.int32))
        b, j = self.flat // count, self.flat % count
        fixed = self.fixed[torch.clamp(j, max=max(self.num_fixed - 1, 0))]
        page = torch.where(j < self.num_fixed, fixed, first_window + j - self.num_fixed)
        inside = b < self.setup.batch
        self.indices.copy_(torch.where(inside, b * self.pages_per_seq + page, 0).to(torch.int32))
        self.last.copy_((n - last_page * self.page).to(torch.int32).expand_as(self.last))

    def attended_len(self, position: int) -> int:
        """Tokens each sequence attends to at `position` (host arithmetic, for reports)."""
        n = position + 1
        last_page = position // self.page
        first_window = max((n - self.pattern.window) // self.page, self.fixed_end)
        return self.num_fixed * self.page + (last_page - first_window) * self.page + (n - last_page * self.page)

    def _pages(self, x: torch.Tensor) -> torch.Tensor:
        s = self.setup
        return x.reshape(s.batch * self.pages_per_seq, self.page, s.num_kv_heads, s.head_dim)

    def attend(self, layer, q) -> torch.Tensor:
        k, v = self._pages(self.k[layer]), self._pages(self.v[layer])
        if self.setup.on_gpu:
            self.runner.run_paged(q, k, v, self.indptr, self.indices, self.last, out=self.out, lse=self.lse)
            return self.out
        import refattn

        indptr = _host(self.indptr)
        out, _ = refattn.paged_decode(_host(q), _host(k), _host(v), indptr, _host(self.indices)[: indptr[-1]],
                                      _host(self.last))
        return self._to_out(out)


def span_bytes_note(pattern: SpanPattern) -> str:
    """How the pattern is read, in words (for result rows)."""
    page = pattern.page_size()
    return (f"{pattern.num_sinks} sinks + {pattern.window} window"
            + (f" + {len(pattern.fixed_spans)} fixed spans" if pattern.fixed_spans else "")
            + f", pages of {page}")


def prompt_pattern(kind: str, prompt_len: int, *, density: float, window: int, seed: int = 0) -> SpanPattern:
    """A span pattern over the prompt like the self-selected spans of a task (`refattn.span_pattern`
    kinds "arithmetic" or "summarization" at `density`), its spans widened to pages of
    MAX_SPAN_PAGE tokens, with every generated token in the window."""
    import refattn

    _, spans = refattn.span_pattern(kind, batch=1, kv_len=prompt_len, density=density, seed=seed)
    page = MAX_SPAN_PAGE
    widened = []
    for start, end in np.asarray(spans, dtype=np.int64):
        start, end = (int(start) // page) * page, min(math.ceil(int(end) / page) * page, prompt_len // page * page)
        if end > start:
            if widened and start <= widened[-1][1]:
                widened[-1] = (widened[-1][0], max(end, widened[-1][1]))
            else:
                widened.append((start, end))
    return SpanPattern(num_sinks=0, window=window, fixed_spans=tuple(widened))
