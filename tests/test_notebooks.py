"""Every notebook runs top to bottom on the CPU, from the repository root, without an error, and is
stored with the outputs of such a run (`python scripts/run_notebooks.py` writes them)."""

import copy
import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
REGENERATE = "python scripts/run_notebooks.py"


def _load_runner():
    """scripts/run_notebooks.py as a module: the tests execute notebooks exactly as it does."""
    spec = importlib.util.spec_from_file_location("run_notebooks", REPO / "scripts" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = _load_runner()


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code" and cell.source.strip()]


def _errors(nb):
    return [o for cell in _code_cells(nb) for o in cell.get("outputs", []) if o.get("output_type") == "error"]


def test_the_three_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"roofline.ipynb", "predicted_vs_measured.ipynb", "papers.ipynb"}
    assert [p.name for p in runner.notebook_paths()] == [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_with_outputs(path):
    # stored as one clean run leaves it: every code cell executed once, in order, with no error
    nb = nbformat.read(path, as_version=4)
    cells = _code_cells(nb)
    counts = [cell.get("execution_count") for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name} is not stored as one run from the top (execution counts {counts}); run {REGENERATE}")
    assert not _errors(nb), f"{path.name} is stored with an error output; run {REGENERATE}"
    assert any(cell.get("outputs") for cell in cells), f"{path.name} is stored without outputs; run {REGENERATE}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path):
    stored = nbformat.read(path, as_version=4)
    nb = runner.execute(copy.deepcopy(stored))       # on a copy: the stored file is not written
    assert not _errors(nb)
    images = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    if path.stem != "predicted_vs_measured":
        assert images, f"{path.name} drew no figure"
    # every cell that shows something when run is stored showing it
    bare = [i for i, (ran, kept) in enumerate(zip(_code_cells(nb), _code_cells(stored)), 1)
            if ran.get("outputs") and not kept.get("outputs")]
    assert not bare, f"{path.name}: code cells {bare} are stored without their outputs; run {REGENERATE}"
