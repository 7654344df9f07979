"""End to end: a Llama-shaped decoder with random weights (PyTorch) whose attention is any of this
project's variants or a peer, a prompt prefilled once, then a decode loop replayed as a CUDA graph.

Needs PyTorch (`pip install 'decode-attention[model]'`); the kernels need CuPy and a GPU, and the
model's code also runs on a CPU with the NumPy references in their place (`decode_attention.e2e.model`).
"""
