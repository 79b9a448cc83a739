"""notebooks/inspect_losses.ipynb runs top to bottom (its cells assert what they show)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.slow
def test_inspect_losses_notebook_executes():
    notebook = nbformat.read(NOTEBOOKS / "inspect_losses.ipynb", as_version=4)
    # The kernel inherits this process's environment; the notebook itself asks for 8 devices
    # before importing JAX, as a reader's fresh kernel needs.
    client = NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    printed = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert "jaxpr of the sharded loss" in printed
    assert "'collective_permute'" in printed and "'all_gather'" in printed
    assert "global/loss" in printed
