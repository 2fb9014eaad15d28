"""The quickstart notebook runs top to bottom (so it cannot rot)."""

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="the notebook test needs the test extra (nbformat, nbclient)")
    nbclient = pytest.importorskip("nbclient", reason="the notebook test needs the test extra (nbclient, ipykernel)")
    shutil.copy(ROOT / "examples" / "quickstart.ipynb", tmp_path / "quickstart.ipynb")
    notebook = nbformat.read(tmp_path / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "AUROC" in outputs and "test" in outputs
    assert "flagged: False" in outputs  # the explain section: the maps of the trained model fall apart when randomized
    assert (tmp_path / "maps" / "gradcam.png").is_file() and (tmp_path / "maps" / "shortcuts.png").is_file()
    assert any((tmp_path / "runs").iterdir())
