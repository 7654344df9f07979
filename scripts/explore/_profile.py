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


def kernel_profile(step, *, reps: int = 3, warmup: int = 2) -> list:
    """The CUDA kernels of `reps` eager calls of `step` under the PyTorch profiler (after `warmup`
    calls): (name, us per call, launches per call), the largest first."""
    from collections import defaultdict

    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                step()
            torch.cuda.synchronize()
    per_kernel = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[ev.name][0] += ev.device_time / reps
            per_kernel[ev.name][1] += 1
    return sorted(((name, t, n // reps) for name, (t, n) in per_kernel.items()), key=lambda row: -row[1])


def print_kernel_profile(kernels: list, top: int = 12) -> None:
    """The first `top` rows of `kernel_profile`."""
    for name, t, n in kernels[:top]:
        print(f"  {t:9.1f} us  {n:4d} calls  {name[:110]}")
