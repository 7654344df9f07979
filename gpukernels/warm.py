"""Compile every kernel instantiation on this GPU machine, in parallel, into CuPy's kernel cache.

Each instantiation takes NVRTC a few seconds; a test run or a benchmark that meets them one at a
time spends minutes compiling. Run first, this fills CuPy's on-disk cache (`~/.cupy/kernel_cache`,
or `$CUPY_CACHE_DIR`) from several processes at once, and every later process loads the binaries.

    python -m gpukernels.warm [--jobs 8]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import time


def instantiations() -> list[tuple[str, str]]:
    """(source, name expression) of every kernel the launchers can ask for."""
    from .compile_check import merge_states_expressions
    from .shared_prefix import instantiations as shared_prefix_instantiations
    from .split_kv import all_name_expressions as split_kv_expressions
    from .tree import all_name_expressions as tree_expressions

    return ([("split_kv", e) for e in split_kv_expressions()]
            + [("merge_states", e) for e in merge_states_expressions()]
            + shared_prefix_instantiations()
            + [("shared_prefix", e) for e in tree_expressions()])


def _compile(items: list[tuple[str, str]]) -> int:
    from . import _runtime as rt

    for source, expression in items:
        rt.kernel(source, expression)
    return len(items)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpukernels.warm", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="compiling processes (default: %(default)s, at most 8)")
    args = parser.parse_args(argv)
    from ._runtime import gpu_available

    if not gpu_available():
        print("gpukernels.warm: needs CuPy and a CUDA GPU; none found here", file=sys.stderr)
        return 2
    items = instantiations()
    jobs = max(1, min(args.jobs, len(items)))
    shares = [items[i::jobs] for i in range(jobs)]
    start = time.time()
    context = multiprocessing.get_context("spawn")   # no CUDA state crosses a fork
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        done = sum(pool.map(_compile, shares))
    print(f"gpukernels.warm: {done} kernel instantiations compiled into CuPy's cache in "
          f"{time.time() - start:.0f} s ({jobs} processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
