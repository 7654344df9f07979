"""Attention shapes (and sizes) of the models the papers and the examples use, from their
published configurations."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelShape", "LLAMA3_8B", "CODELLAMA_34B", "CODELLAMA_13B", "MHA_7B"]


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    num_params: float        # weights read once per decode step (fp16: 2 bytes each)

    def sharded(self, tensor_parallel: int) -> "ModelShape":
        """One GPU's share under tensor parallelism: heads and weights divided."""
        if self.num_kv_heads % tensor_parallel or self.num_qo_heads % tensor_parallel:
            raise ValueError(f"{self.name}: heads do not divide over {tensor_parallel} GPUs")
        return ModelShape(f"{self.name} / TP{tensor_parallel}", self.num_layers,
                          self.num_qo_heads // tensor_parallel, self.num_kv_heads // tensor_parallel,
                          self.head_dim, self.num_params / tensor_parallel)


# Meta Llama 3 8B: 32 layers, 32 query heads, 8 KV heads (GQA), head_dim 128 (hidden 4096).
LLAMA3_8B = ModelShape("Llama-3-8B", 32, 32, 8, 128, 8.0e9)
# CodeLlama-34B (Rozière et al., 2023; its config.json): 48 layers, hidden 8192 = 64 query heads
# of 128, 8 KV heads (GQA). The Flash-Decoding post's micro-benchmark used its per-GPU share on 4
# GPUs: 16 query heads, 2 KV heads.
CODELLAMA_34B = ModelShape("CodeLlama-34B", 48, 64, 8, 128, 33.7e9)
# CodeLlama-13B: 40 layers, hidden 5120 = 40 heads of 128, multi-head (no GQA). Hydragen's
# end-to-end runs used it at batch 1024 with tensor parallelism over eight A100s.
CODELLAMA_13B = ModelShape("CodeLlama-13B", 40, 40, 40, 128, 13.0e9)
# A 7B multi-head model as in the bifurcated-attention paper: 32 layers, 32 heads of 128.
MHA_7B = ModelShape("7B MHA", 32, 32, 32, 128, 6.7e9)
