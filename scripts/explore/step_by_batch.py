"""What grows with the batch in a decode step without attention, kernel by kernel, on one GPU.

An exploration, not a benchmark: it writes no result file. For the end-to-end suite's bifurcated
setting (the Llama-2-7B shape, 8 layers, attention "none") at each batch it prints the step's
median time under its CUDA graph, the kernels of a few eager steps under the PyTorch profiler
(us per step by kernel name, the largest first), and what the cost model's inputs measure at that
batch: the projections' read rate (`measure_gemv`) and one small kernel in a graph
(`measure_graph_kernel_s`).
Run: PYTHONPATH=. python3 scripts/explore/step_by_batch.py [batches, default 1,4,16,64]
"""
import sys

import numpy as np
import torch

from _profile import kernel_profile, print_kernel_profile
from costmodel.end_to_end import get_decoder
from decode_attention.e2e.bench import measure_gemv, measure_graph_kernel_s
from decode_attention.e2e.generate import Generation
from decode_attention.e2e.model import random_decoder

BATCHES = [int(b) for b in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 4, 16, 64]
PROMPT, STEPS = 8192, 20
shape = get_decoder("llama2-7b").with_layers(8)
decoder = random_decoder(shape, max_positions=PROMPT + STEPS + 2, device="cuda", dtype=torch.float16)

for batch in BATCHES:
    gen = Generation(decoder, "none", samples=batch, prompt_len=PROMPT, new_tokens=STEPS + 1)
    step_ms = float(np.median(gen._decode(STEPS, None)))
    gen.position.fill_(PROMPT)
    kernels = kernel_profile(gen._step)
    total = sum(t for _, t, _ in kernels)
    gemv = measure_gemv(decoder, batch)
    small = measure_graph_kernel_s(decoder, batch)
    print(f"== batch {batch}: step {step_ms:.3f} ms (graph); kernels of an eager step {total / 1e3:.3f} ms "
          f"in {sum(n for _, _, n in kernels)} launches; projections read at {gemv / 1e12:.2f} TB/s; "
          f"a small kernel in a graph {small * 1e6:.2f} us", flush=True)
    print_kernel_profile(kernels, top=14)
    del gen
    torch.cuda.empty_cache()
