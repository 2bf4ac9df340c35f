"""Execute every tutorial notebook on CPU, as CI does, and check the stored notebooks stay clean.

Each notebook runs in a fresh kernel of *this* interpreter: ``kernel_name="python3"`` is ipykernel's native kernel,
and jupyter_client replaces a ``python`` / ``python3`` launcher with ``sys.executable``, so a bare virtual
environment with ipykernel installed (nbmake's dependency) needs no registered kernelspec and the kernel sees the
same packages as pytest. The notebooks assert their own numbers (e.g. the forum values 1.9096 and 1.0013), so an
execution error is a failing test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 300


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def test_tutorials_found():
    """The numbered notebooks exist (a glob that matches nothing would silently skip the execution tests)."""
    assert len(NOTEBOOKS) >= 3, f"expected at least 3 numbered notebooks in {TUTORIALS}, found {NOTEBOOKS}"
    numbers = [p.name[:2] for p in NOTEBOOKS]
    assert numbers == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)], numbers


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_clean(path: Path):
    """Stored notebooks are valid, with outputs and execution counts cleared (no embedded images in git)."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} have stored outputs or execution counts; clear them"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run every cell in a fresh kernel, from the tutorials folder, with a CPU-only, non-interactive setup."""
    # inherited by the kernel process: no GPU, no display, a writable MPL cache, modest threading on shared CI cores
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    monkeypatch.setenv("GDL_PLUS_TUTORIAL_OUT", str(tmp_path / "out"))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}", pytrace=False)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
