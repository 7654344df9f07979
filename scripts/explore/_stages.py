"""The pipeline depth of the split-KV kernels, for the exploration scripts: after `use_stages(n)`
the launcher takes the tensor-core kernel compiled with n stages (None: the library's own depth;
`paged_only`: contiguous caches keep theirs), by replacing its kernel lookup when imported."""
import functools
import importlib

from gpukernels import _runtime as rt

sk = importlib.import_module("gpukernels.split_kv")
_own_kernel = sk._kernel
_chosen = {"stages": None, "paged_only": False}


@functools.lru_cache(None)
def _compiled(dtype, head_dim, heads_per_block, paged, stages, states=False, windows=False):
    extra = {"windows": True} if windows else {}
    return rt.Kernel("split_kv", sk.name_expression(dtype, head_dim, heads_per_block, paged, stages=stages,
                                                    states=states, **extra),
                     sk.KERNEL_SIGNATURE, shared_mem=sk.dynamic_smem_bytes(dtype, head_dim, paged, stages=stages))


def _kernel(plan, paged, states=False, *windows):
    stages = _chosen["stages"]
    if stages is None or (_chosen["paged_only"] and not paged):
        return _own_kernel(plan, paged, states, *windows)
    return _compiled(plan.dtype, plan.head_dim, plan.heads_per_block, paged, stages, states, *windows)


sk._kernel = _kernel


def use_stages(stages, *, paged_only: bool = False) -> None:
    """Launch the split-KV kernels with `stages` pipeline stages from now on (None: their own)."""
    _chosen.update(stages=stages, paged_only=paged_only)
