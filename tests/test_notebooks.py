"""The notebooks run headless with small parameters, carry no outputs and match their .py pairs.

Each ``notebooks/*.ipynb`` is generated from its jupytext percent-format ``.py``
(the source of truth: ``jupytext --to ipynb notebooks/NAME.py``). The kernel is
this interpreter (``sys.executable``), registered in a temporary Jupyter path so
that no user- or system-wide "python3" kernel can stand in for it.
"""

import glob
import os
import sys

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
KERNEL_NAME = "mhc-jax-test"
# Injected after each notebook's "parameters" cell (papermill style) to keep CI short.
CI_PARAMETERS = {
    "quickstart.ipynb": {
        "NUM_STEPS": 6,
        "MODEL_OVERRIDES": "num_blocks=2,d_model=64,num_heads=2,d_ff=128",
        "EVAL_BATCHES": 2,
        "SAMPLE_TOKENS": 0,
    },
    "sinkhorn_and_stability.ipynb": {"DEPTH": 32, "NUM_MATRICES": 64},
    "sweep_results.ipynb": {"MICRO_STEPS": 6},
}


def test_every_notebook_has_ci_parameters():
    assert sorted(os.path.basename(p) for p in NOTEBOOKS) == sorted(CI_PARAMETERS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_stored_without_outputs_and_in_sync_with_py(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path}: outputs stored"
    paired = jupytext.read(path[: -len(".ipynb")] + ".py")
    assert [(c.cell_type, c.source) for c in nb.cells] == [
        (c.cell_type, c.source) for c in paired.cells
    ], f"{path} differs from its .py: run `jupytext --to ipynb {path[:-6]}.py`"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    install(kernel_name=KERNEL_NAME, prefix=str(prefix))  # argv: this sys.executable
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.path.join(prefix, "share", "jupyter")
    yield KERNEL_NAME
    if old is None:
        del os.environ["JUPYTER_PATH"]
    else:
        os.environ["JUPYTER_PATH"] = old


def _inject_parameters(nb, values: dict) -> None:
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, kernel_name):
    nb = nbformat.read(path, as_version=4)
    _inject_parameters(nb, CI_PARAMETERS[os.path.basename(path)])
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = NotebookClient(
        nb, kernel_name=kernel_name, timeout=300, resources={"metadata": {"path": NOTEBOOK_DIR}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable
