"""The host-path profile the exploration scripts print: `calls` calls of `fn` under cProfile, the
GPU drained afterwards, the `top` functions by own time."""
import cProfile
import io
import pstats

import cupy as cp


def print_host_profile(fn, *, calls: int = 2000, top: int = 12, lines: int = 30) -> None:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    cp.cuda.Device().synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    print("\n".join(text.getvalue().splitlines()[:lines]), flush=True)
