"""Both notebooks run top to bottom (on a smaller demo dataset, set through SSW_NB_CELLS)."""

import os
from pathlib import Path

import pytest

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
DEMO = Path(__file__).resolve().parents[1] / "scsuperweight" / "checkpoints" / "demo" / "best_model.pt"


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_real_checkpoint_and_atlas.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if not DEMO.is_file():
        pytest.skip("the demo checkpoint is not in the package yet (scsuperweight pretrain --recipe demo)")
    monkeypatch.setenv("SSW_NB_CELLS", "420")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("SCGPT_MODEL_DIR", str(tmp_path / "absent_model"))
    monkeypatch.setenv("SSW_ATLAS", str(tmp_path / "absent.h5ad"))
    nb = nbformat.read(NB_DIR / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    if name.startswith("02"):
        assert "falling back to the shipped demo model" in outputs
        assert (tmp_path / "real_run" / "report.html").is_file()
    else:
        assert (tmp_path / "quickstart_report.html").is_file()
    assert os.environ.get("SSW_NB_CELLS") == "420"
