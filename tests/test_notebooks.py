"""The notebooks run top to bottom on the demo pair (offline), and are stored without outputs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.integration  # test tier (tests/conftest.py, TIERS)

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_alpha_steering.ipynb", "03_paper_analyses.ipynb", "04_components.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_a_kernelspec_and_uses_public_api_only(path):
    notebook = nbformat.read(path, as_version=4)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert notebook.metadata["kernelspec"]["language"] == "python"
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    # no demo-internal helpers: the α sweep of notebook 02 is tuco_lens.analyses.behaviour_sweep
    assert "tuco_lens.demo.report" not in code and "refusal_sweep" not in code
    for module in re.findall(r"from (tuco_lens[\w.]*) import", code):
        assert not any(part.startswith("_") for part in module.split(".")), module


@pytest.mark.slow  # minutes: each notebook runs top to bottom in a kernel
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # with ipywidgets installed (the notebook and test extras), tqdm draws widgets, not a warning
    stderr = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs
                     if o.output_type == "stream" and o.name == "stderr")
    if importlib.util.find_spec("ipywidgets") is not None:
        assert "IProgress not found" not in stderr
    # every figure cell produced a plotly figure
    figures = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) >= 2
