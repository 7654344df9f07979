"""A Llama-shaped decoder in PyTorch with random weights: RMSNorm, rotary embeddings, grouped-query
attention, a SwiGLU MLP. Made on the device it runs on (nothing is downloaded), in the shape of a
published model (`costmodel.end_to_end.DECODERS`), with as many layers as asked.

Two passes:

* `prefill(tokens)`: the prompt of one sequence, causal attention by PyTorch's SDPA; every layer's
  K and V of the prompt are handed to the attention backend (`store_prompt`), once.
* `step(tokens, position)`: one token for each of `batch` sequences at one position (a device
  tensor, so that a CUDA graph of the step can be replayed step after step); attention by the
  backend (`decode_attention.e2e.attention`), which keeps the KV cache in its own layout.

The same code runs on a CPU (float32 or float64), where the backends run the NumPy references
in place of the kernels; that is how the CPU tests check the model's arithmetic and the
backends' layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from costmodel.end_to_end import DecoderShape

__all__ = ["Decoder", "LayerWeights", "random_decoder", "rms_norm", "rotary_tables", "apply_rotary"]


@dataclass
class LayerWeights:
    """One layer's weights, as `x @ w.T` reads them."""

    attn_norm: torch.Tensor   # [hidden]
    qkv: torch.Tensor         # [(Hq + 2 Hkv) * D, hidden]: q, k and v projections, fused
    o: torch.Tensor           # [hidden, Hq * D]
    mlp_norm: torch.Tensor    # [hidden]
    gate_up: torch.Tensor     # [2 * intermediate, hidden]: gate and up projections, fused
    down: torch.Tensor        # [hidden, intermediate]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, computed in float32 or wider."""
    wide = x if x.dtype == torch.float64 else x.float()
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def rotary_tables(max_positions: int, head_dim: int, theta: float, *, device, dtype):
    """cos, sin [max_positions, head_dim] of the rotary embedding (the two halves repeated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.arange(max_positions, dtype=torch.float64, device=device)[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], dim=-1)                          # [positions, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., tokens, heads, D] rotated by cos, sin [tokens, D] (pairs i and i + D/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Decoder:
    """The decoder's weights and its two passes; `attention` is a backend of
    `decode_attention.e2e.attention` made for this decoder's heads."""

    def __init__(self, shape: DecoderShape, layers: list[LayerWeights], embed: torch.Tensor,
                 final_norm: torch.Tensor, lm_head: torch.Tensor, max_positions: int):
        self.shape = shape
        self.layers = layers
        self.embed = embed                # [vocab, hidden]
        self.final_norm = final_norm      # [hidden]
        self.lm_head = lm_head            # [vocab, hidden]
        self.cos, self.sin = rotary_tables(max_positions, shape.head_dim, shape.rope_theta,
                                           device=embed.device, dtype=embed.dtype)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    def _qkv(self, w: LayerWeights, x: torch.Tensor):
        """q [T, Hq, D], k, v [T, Hkv, D] of hidden states x [T, hidden]."""
        s = self.shape
        qkv = rms_norm(x, w.attn_norm, s.rms_norm_eps) @ w.qkv.T
        q, k, v = qkv.split([s.num_qo_heads * s.head_dim, s.num_kv_heads * s.head_dim,
                             s.num_kv_heads * s.head_dim], dim=-1)
        return (q.view(-1, s.num_qo_heads, s.head_dim), k.view(-1, s.num_kv_heads, s.head_dim),
                v.view(-1, s.num_kv_heads, s.head_dim))

    def _mlp(self, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate, up = (rms_norm(x, w.mlp_norm, self.shape.rms_norm_eps) @ w.gate_up.T).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w.down.T

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 (float64 for a float64 model) logits [T, vocab] of hidden states [T, hidden]."""
        out = rms_norm(x, self.final_norm, self.shape.rms_norm_eps) @ self.lm_head.T
        return out if out.dtype == torch.float64 else out.float()

    def prefill(self, tokens: torch.Tensor, attention) -> torch.Tensor:
        """Run the prompt tokens [P] of one sequence; each layer's prompt K, V [P, Hkv, D] go to
        `attention.store_prompt(layer, k, v)`. Returns the logits of the last position [vocab]."""
        s = self.shape
        P = tokens.shape[0]
        if not 1 <= P <= self.max_positions:
            raise ValueError(f"the prompt must have 1 to {self.max_positions} tokens, got {P}")
        cos, sin = self.cos[:P], self.sin[:P]
        x = self.embed[tokens]                                           # [P, hidden]
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(w, x)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            attention.store_prompt(i, k, v)
            o = F.scaled_dot_product_attention(                          # [1, Hq, P, D]
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                is_causal=True, enable_gqa=s.num_qo_heads != s.num_kv_heads)
            x = x + o[0].transpose(0, 1).reshape(P, -1) @ w.o.T
            x = x + self._mlp(w, x)
        return self.logits(x[-1:])[0]

    def step(self, tokens: torch.Tensor, position: torch.Tensor, attention) -> torch.Tensor:
        """One decode step: tokens [batch] at `position` (a one-element int64 tensor on the
        device, the same for every sequence). Returns logits [batch, vocab]. Reads the position
        only on the device, so the step can be captured in a CUDA graph."""
        s = self.shape
        batch = tokens.shape[0]
        cos, sin = self.cos[position], self.sin[position]               # [1, D]
        attention.prepare(position)
        x = self.embed[tokens]                                           # [B, hidden]
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(w, x)                                    # [B, H, D]
            q = apply_rotary(q[:, None], cos, sin)[:, 0]
            k = apply_rotary(k[:, None], cos, sin)[:, 0]
            attention.append(i, k, v)
            o = attention.attend(i, q.contiguous())                      # [B, Hq, D]
            x = x + o.reshape(batch, -1) @ w.o.T
            x = x + self._mlp(w, x)
        return self.logits(x)


def _normal(shape, std: float, *, generator, device, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=dtype).mul_(std)


def random_decoder(shape: DecoderShape, *, max_positions: int, device="cpu", dtype=torch.float16,
                   seed: int = 0) -> Decoder:
    """A decoder of `shape` with random weights drawn on `device` from `seed`: projections with
    standard deviation 1/sqrt(fan_in), so activations keep their scale through the layers; norm
    weights near 1; logits of about unit scale."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    h, inter, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    qkv_rows = (shape.num_qo_heads + 2 * shape.num_kv_heads) * d
    kw = {"generator": gen, "device": device, "dtype": dtype}

    def norm_weight():
        return _normal((h,), 0.05, **kw).add_(1.0)

    layers = [LayerWeights(attn_norm=norm_weight(), qkv=_normal((qkv_rows, h), h ** -0.5, **kw),
                           o=_normal((h, shape.num_qo_heads * d), (shape.num_qo_heads * d) ** -0.5, **kw),
                           mlp_norm=norm_weight(), gate_up=_normal((2 * inter, h), h ** -0.5, **kw),
                           down=_normal((h, inter), inter ** -0.5, **kw))
              for _ in range(shape.num_layers)]
    embed = _normal((shape.vocab_size, h), 1.0, **kw)
    lm_head = _normal((shape.vocab_size, h), h ** -0.5, **kw)
    return Decoder(shape, layers, embed, norm_weight(), lm_head, max_positions)
