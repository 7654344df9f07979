"""Compile every kernel instantiation with nvcc for sm_90 and fail on an error or a register spill.

Runs on a machine with no GPU (nvcc only). Prints ptxas's register and shared-memory report for
each instantiation, so the log shows what every kernel costs, and fails too when a tensor-core
kernel's registers give an SM another number of resident blocks than the cost model assumes.

    python -m gpukernels.compile_check [--arch sm_90] [--jobs 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from costmodel.split_kv import tensor_core_blocks_per_sm

from . import _runtime as rt
_shared_prefix = importlib.import_module("gpukernels.shared_prefix")   # the modules, not the functions
_tree = importlib.import_module("gpukernels.tree")                     # the package exports by these names
from .split_kv import all_name_expressions

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_USAGE = re.compile(r"Used (\d+) registers.*?(?:, (\d+) bytes smem)?$")


def merge_states_expressions() -> list[str]:
    return [f"decode_attention::merge_states_kernel<{c}>" for c in rt.C_TYPES.values()]


def _translation_unit(source: str, expressions: list[str]) -> str:
    lines = [f'#include "{source}.cu"', "", "void* decode_attention_instances[] = {"]
    lines += [f"    (void*)&{expr}," for expr in expressions]
    lines += ["};", ""]
    return "\n".join(lines)


def _compile(nvcc: str, arch: str, source: str, expressions: list[str], workdir: Path, tag: str):
    unit = workdir / f"unit_{tag}.cu"
    unit.write_text(_translation_unit(source, expressions))
    if arch == "sm_90" and rt.arch_options(source, "90"):
        arch = "sm_90a"   # as the runtime compiles it for Hopper
    cmd = [nvcc, f"-arch={arch}", *rt.COMPILE_OPTIONS, f"-I{rt.CUDA_DIR}", "-Xptxas", "-v",
           "-c", str(unit), "-o", str(workdir / f"{tag}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return tag, proc.returncode, proc.stdout + proc.stderr


def _report(log: str) -> list[tuple[str, int, int, int]]:
    """(mangled name, registers, smem bytes, spill bytes) per compiled entry."""
    rows, name, spill = [], None, 0
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            name, spill = m.group(1), 0
            continue
        m = _SPILL.search(line)
        if m and name:
            spill = int(m.group(1)) + int(m.group(2))
            continue
        m = _USAGE.search(line)
        if m and name:
            rows.append((name, int(m.group(1)), int(m.group(2) or 0), spill))
            name = None
    return rows


_MMA_KEY = re.compile(r"split_kv_mma_kernelI\w+?Li(\d+)ELi\d+ELb([01])ELi(\d+)E")


def _residency_problem(name: str, registers: int) -> "str | None":
    """A message when a tensor-core kernel's registers give an SM another number of resident
    blocks than the cost model assumes (costmodel.split_kv.TENSOR_CORE_REGISTERS), else None.
    Residency is what both the registers and the instantiation's pipeline stages allow."""
    m = _MMA_KEY.search(name)
    if not m:
        return None
    head_dim, paged, stages = int(m.group(1)), m.group(2) == "1", int(m.group(3))
    want = tensor_core_blocks_per_sm(head_dim, stages, paged)
    got = tensor_core_blocks_per_sm(head_dim, stages, registers=registers)
    if got == want:
        return None
    return (f"{name}: {registers} registers per thread and {stages} pipeline stages hold {got} blocks "
            f"per SM; the cost model assumes {want} (update "
            f"costmodel.split_kv.TENSOR_CORE_REGISTERS[{head_dim}, {paged}])")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpukernels.compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("compile check: nvcc not found on PATH", file=sys.stderr)
        return 2
    groups: dict[str, tuple[str, list[str]]] = {}
    for expr in all_name_expressions():
        tag = "split_kv_" + re.sub(r"\W+", "_", expr.split("<", 1)[1].split(",")[0])
        groups.setdefault(tag, ("split_kv", []))[1].append(expr)
    groups["merge_states"] = ("merge_states", merge_states_expressions())
    for source, expr in _shared_prefix.instantiations():
        groups.setdefault(source, (source, []))[1].append(expr)
    groups["shared_prefix"][1].extend(_tree.all_name_expressions())
    n_total = sum(len(e) for _, e in groups.values())
    print(f"compiling {n_total} kernel instantiations for {args.arch} in {len(groups)} units", flush=True)
    start = time.time()
    failed = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(_compile, nvcc, args.arch, src, exprs, Path(tmp), tag)
                   for tag, (src, exprs) in groups.items()]
        for fut in concurrent.futures.as_completed(futures):
            tag, rc, log = fut.result()
            if rc != 0:
                failed = True
                print(f"[{tag}] nvcc failed:\n{log}", file=sys.stderr)
                continue
            unit_rows = _report(log)
            rows += unit_rows
            print(f"[{tag}] {len(unit_rows)} entries compiled ({time.time() - start:.0f} s)", flush=True)
    print(f"{'registers':>9} {'smem B':>7} {'spill B':>7}  kernel")
    for name, regs, smem, spill in sorted(rows):
        print(f"{regs:>9} {smem:>7} {spill:>7}  {name}")
    spills = [r for r in rows if r[3] > 0]
    if spills:
        failed = True
        print(f"{len(spills)} instantiations spill registers", file=sys.stderr)
    for name, regs, _, _ in rows:
        problem = _residency_problem(name, regs)
        if problem:
            failed = True
            print(problem, file=sys.stderr)
    if len(rows) < n_total and not failed:
        failed = True
        print(f"expected {n_total} compiled entries, found {len(rows)}", file=sys.stderr)
    print(f"compile check {'FAILED' if failed else 'passed'}: {len(rows)} entries, "
          f"{time.time() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
