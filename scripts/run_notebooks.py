"""Execute the notebooks top to bottom and store them with their outputs.

Each notebook runs in a fresh kernel, from the repository root, with the packages of this checkout
importable (installed or not) and figures drawn off-screen as PNG; it is then written back in
place with its outputs. `tests/test_notebooks.py` runs them the same way (`execute`), on a copy.

    python scripts/run_notebooks.py                          every notebook in notebooks/
    python scripts/run_notebooks.py notebooks/roofline.ipynb one of them
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO / "notebooks"
CELL_TIMEOUT_S = 120
KERNEL_NAME = "python3"


def notebook_paths() -> list[Path]:
    """Every notebook of the repository, in name order."""
    return sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def kernel_env() -> dict[str, str]:
    """The environment of the notebook kernel: this checkout first on the path, inline figures."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    return env


def execute(nb, *, timeout_s: int = CELL_TIMEOUT_S):
    """Run every cell of the notebook `nb` (an nbformat node, changed in place) in a fresh kernel
    started in the repository root; raises nbclient's CellExecutionError at the first failing cell."""
    import nbclient

    client = nbclient.NotebookClient(nb, timeout=timeout_s, kernel_name=KERNEL_NAME,
                                     resources={"metadata": {"path": str(REPO)}},
                                     record_timing=False)  # no timestamps: a rerun changes only what changed
    client.execute(env=kernel_env())
    return nb


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/run_notebooks.py", description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to run (default: every notebooks/*.ipynb)")
    parser.add_argument("--timeout", type=int, default=CELL_TIMEOUT_S,
                        help=f"seconds one cell may take before the run fails (default: {CELL_TIMEOUT_S})")
    args = parser.parse_args(argv)

    import nbclient
    import nbformat

    paths = [p.resolve() for p in args.notebooks] or notebook_paths()
    failed = 0
    for path in paths:
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        try:
            execute(nb, timeout_s=args.timeout)
        except nbclient.exceptions.CellExecutionError as err:
            failed += 1
            print(f"{os.path.relpath(path, REPO)}: FAILED, left unchanged\n{err}", file=sys.stderr)
            continue
        nbformat.write(nb, path)
        print(f"{os.path.relpath(path, REPO)}: executed and saved with outputs in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
