"""What a programmatic dependent launch of the attention kernel saves in a decode step, on one GPU.

An exploration, not a benchmark: it writes no result file. For the end-to-end suite's
Flash-Decoding setting (CodeLlama-34B, all 48 layers, batch 1, caches of random normals) at each
context it prints the step's median time under its CUDA graph with `split_kv` launched plainly
and with `SplitKV(..., programmatic=True)` (each layer's attention may start while the kernel
before it finishes), in alternating rounds, and the difference per step and per layer.
Run: PYTHONPATH=. python3 scripts/explore/pdl_step.py [contexts, default 8192,131072]
"""
import sys

import numpy as np
import torch

from costmodel.end_to_end import get_decoder
from decode_attention.e2e.generate import Generation
from decode_attention.e2e.model import random_decoder

CONTEXTS = [int(c) for c in sys.argv[1].split(",")] if len(sys.argv) > 1 else [8192, 131072]
STEPS, ROUNDS = 20, 3
shape = get_decoder("codellama-34b")
decoder = random_decoder(shape, max_positions=max(CONTEXTS) + STEPS + 2, device="cuda", dtype=torch.float16)

for context in CONTEXTS:
    gen = Generation(decoder, "split_kv", samples=1, prompt_len=context, new_tokens=STEPS + 1)
    for name, t in vars(gen.attention).items():
        if name.startswith(("k", "v")) and isinstance(t, torch.Tensor) and t.is_floating_point():
            t.normal_()
    times = {False: [], True: []}
    for _ in range(ROUNDS):
        for programmatic in (False, True):
            gen.attention.runner.programmatic = programmatic
            gen.position.fill_(context)
            times[programmatic].append(float(np.median(gen._decode(STEPS, None))))
    plain, pdl = (float(np.median(times[p])) for p in (False, True))
    print(f"1 x {context}: plain {plain:.3f} ms, programmatic {pdl:.3f} ms, saved {(plain - pdl) * 1e3:.1f} us a "
          f"step ({(plain - pdl) / shape.num_layers * 1e3:.2f} us a layer); rounds plain "
          f"{', '.join(f'{t:.3f}' for t in times[False])}, programmatic {', '.join(f'{t:.3f}' for t in times[True])}",
          flush=True)
    del gen
    torch.cuda.empty_cache()
