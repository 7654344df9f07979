"""decode-attention: fast decode-step attention, exact references, and a cost model that explains them.

The packages are `refattn` (NumPy references), `gpukernels` (CuPy CUDA kernels) and `costmodel`
(plans and roofline predictions). This package holds what they share: the API contract's input
checks (`decode_attention.contract`), the kernels' check against the references
(`decode_attention.verify`) and the command line (`decode_attention.cli`).
"""

__version__ = "0.1.0"
