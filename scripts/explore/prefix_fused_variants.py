"""Where the fused pass's time goes (`plan_shared_prefix(..., fused=True)`): its planned call on a
shared-prefix row, with the kernels compiled from the library's sources and from variants of
them, each with one part of the suffix tiles taken out (so their outputs are wrong, and not
checked): no suffix tiles at all (the prefix pass alone at that chunk), no cleaning of the
suffixes' values before their product, no products on the suffix tiles, no copies into them; and
the suffix tiles' scores as a 64-column product (ptxas serialises the products then), correct.

An exploration, not a benchmark: lines of text (us), no result file.
Run: PYTHONPATH=. python3 scripts/explore/prefix_fused_variants.py [ROW,ROW...]   (indices into the grid)
"""
import importlib
import pathlib
import shutil
import sys
import tempfile

import cupy as cp

from _inputs import shared_prefix_inputs
from gpukernels.bench import SHARED_PREFIX_GRID, Timer

rt = importlib.import_module("gpukernels._runtime")
sp = importlib.import_module("gpukernels.shared_prefix")
HQ, D = 32, 128
timer = Timer(30)
LIBRARY = rt.CUDA_DIR

# name -> (text of cuda/shared_prefix.cu, its replacement)
VARIANTS = {
    "no suffix tiles": ("    suffix_tiles = max(slots[0].count, slots[1].count);", "    suffix_tiles = 0;"),
    "no cleaning": ("      if (h.end <= 0) return;\n      const unsigned v_half", "      return;\n      const unsigned v_half"),
    "no suffix products": ("  auto tile_scores = [&](float (&s)[S_TILES][4], int t, const Half& h) {\n",
                           "  auto tile_scores = [&](float (&s)[S_TILES][4], int t, const Half& h) {\n"
                           "    if (h.suffix) { wgmma_commit(); return; }\n"),
    "no suffix copies": ("            mbarrier_expect_bytes(full, 2 * HALF_BYTES);",
                         "            mbarrier_expect_bytes(full, 0); continue;"),
    "suffix scores 64 wide": (
        "  auto tile_scores = [&](float (&s)[S_TILES][4], int t, const Half& h) {\n"
        "    scores(s, t, h.suffix ? cw * HALF_OFFSET : 0u);\n"
        "  };",
        "  auto tile_scores = [&](float (&s)[S_TILES][4], int t, const Half& h) {\n"
        "    if (!h.suffix) { scores(s, t); return; }\n"
        "    if constexpr (SUFFIX) {\n"
        "      auto& s_half = reinterpret_cast<float (&)[S_TILES / 2][4]>(s);\n"
        "      const unsigned k_half = smem_base + (t % STAGES) * Tile::STAGE_BYTES + cw * HALF_OFFSET;\n"
        "      fence_accumulators(s_half);\n"
        "      wgmma_fence();\n"
        "      for (int kk = 0; kk < K_STEPS; ++kk) {\n"
        "        const unsigned step = (kk & 3) * 32;\n"
        "        wgmma_ss<T, SUFFIX_ROWS>(s_half, sw128_descriptor(q_tile + (kk >> 2) * (QUERY_ROWS * 128) + step, 16,"
        " 1024), sw128_descriptor(k_half + (kk >> 2) * COLUMN_BYTES + step, 16, 1024), kk > 0);\n"
        "      }\n"
        "      wgmma_commit();\n"
        "    }\n"
        "  };"),
}


def variant_dir(old: str, new: str) -> pathlib.Path:
    d = pathlib.Path(tempfile.mkdtemp()) / "cuda"
    shutil.copytree(LIBRARY, d)
    src = (d / "shared_prefix.cu").read_text()
    assert src.count(old) == 1, old
    (d / "shared_prefix.cu").write_text(src.replace(old, new))
    return d


def use(sources: pathlib.Path) -> None:
    rt.CUDA_DIR = sources
    for cached in (rt.module, sp._fused_kernel, sp._merge_kernel, sp._specialized_kernel, sp._prefix_kernel):
        cached.cache_clear()


dirs = {"library": LIBRARY} | {name: variant_dir(*change) for name, change in VARIANTS.items()}
rows = SHARED_PREFIX_GRID if len(sys.argv) < 2 else [SHARED_PREFIX_GRID[int(i)] for i in sys.argv[1].split(",")]
for hkv, B, P, S in rows:
    q, kp, vp, ks, vs, out, lse = shared_prefix_inputs(hkv, B, P, S)
    plan = sp.plan_shared_prefix(B, HQ, hkv, D, P, S, gpu="H200", fused=True)
    runner = sp.SharedPrefix(plan)
    line = []
    for name, d in dirs.items():
        use(d)
        call = lambda: runner.run(q, kp, vp, ks, vs, out=out, lse=lse)  # noqa: E731
        call()
        line.append(f"{name} {timer(call) * 1e3:.1f}")
    use(LIBRARY)
    print(f"32/{hkv} x {B} x {P} + {S}, fused, chunk {plan.prefix_chunk_size}: " + ", ".join(line), flush=True)
    del runner, q, kp, vp, ks, vs, out, lse
    cp.get_default_memory_pool().free_all_blocks()
