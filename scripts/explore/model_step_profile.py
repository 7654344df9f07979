"""Where the CodeLlama-34B decode step spends its time with split_kv and with SDPA's cuDNN backend,
kernel by kernel, on one GPU.

An exploration, not a benchmark: it writes no result file. For batch 1 at one context length (all
48 layers, random weights, caches of random normals as the end-to-end suite fills them) it prints,
per attention backend: the step's median time under its CUDA graph, the kernels of a few eager steps
under the PyTorch profiler (total us per step by kernel name), and the attention calls alone over
the model's own 48 caches, in a graph, while the weights stay allocated.
Run: PYTHONPATH=. python3 scripts/explore/model_step_profile.py [context, default 131072]
"""
import sys

import numpy as np
import torch

from _profile import kernel_profile, print_kernel_profile
from costmodel.end_to_end import get_decoder
from decode_attention.e2e.bench import graph_seconds
from decode_attention.e2e.generate import Generation
from decode_attention.e2e.model import random_decoder

CONTEXT = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
STEPS = 20
shape = get_decoder("codellama-34b")
decoder = random_decoder(shape, max_positions=CONTEXT + STEPS + 2, device="cuda", dtype=torch.float16)


def graph_us(fn) -> float:
    """Median time of one replay of a CUDA graph of `fn`, in us."""
    return graph_seconds(fn) * 1e6


for attention in ("split_kv", "peer:cudnn", "split_kv"):
    gen = Generation(decoder, attention, samples=1, prompt_len=CONTEXT, new_tokens=STEPS + 1)
    gen.position.fill_(CONTEXT)
    for name, t in vars(gen.attention).items():
        if name.startswith(("k", "v")) and isinstance(t, torch.Tensor) and t.is_floating_point():
            t.normal_()
    step_ms = float(np.median(gen._decode(STEPS, None)))
    gen.position.fill_(CONTEXT)
    gen.attention.prepare(gen.position)
    kernels = kernel_profile(gen._step)
    total = sum(t for _, t, _ in kernels)
    print(f"== {attention}, 1 x {CONTEXT}: step {step_ms:.3f} ms (graph); kernels of an eager step "
          f"{total / 1e3:.3f} ms", flush=True)
    print_kernel_profile(kernels)
    a = gen.attention
    q = torch.randn(1, shape.num_qo_heads, shape.head_dim, device="cuda", dtype=torch.float16)

    def all_layers():
        for layer in range(shape.num_layers):
            a.attend(layer, q)
    with torch.no_grad():
        print(f"  attention alone over the model's {shape.num_layers} caches in a graph: "
              f"{graph_us(all_layers) / shape.num_layers:.1f} us per layer", flush=True)
    del gen, a
    torch.cuda.empty_cache()
