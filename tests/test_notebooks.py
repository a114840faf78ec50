"""notebooks/: the course runs top to bottom, in its quick mode, without an error.

Every notebook is read from disk and executed *in memory* with nbclient (the committed file and
its outputs are never rewritten), with `TGR_NOTEBOOK_QUICK=1` so that data and steps shrink. The
kernel is this very interpreter: a kernelspec written to a temporary folder points at
`sys.executable`, and a cell appended to the in-memory copy checks it. Temporary files the
notebooks write (their training runs) go to pytest's temporary folder through `TMPDIR`.
"""

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
COURSE = [  # the reading order of the README
    "01_topk_gating_and_load_balancing.ipynb",
    "02_gradient_blocking_and_the_teacher_router.ipynb",
    "03_routing_distillation.ipynb",
    "04_half_schedule_switch.ipynb",
    "05_other_routers.ipynb",
    "06_moe_beyond_one_device.ipynb",
    "07_multi_teacher_experts.ipynb",
]
CELL_TIMEOUT_S = None  # no limit: a slow machine must not fail a cell that is only slow


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
    """A kernelspec folder whose only kernel runs `sys.executable -m ipykernel_launcher`."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / "tgr-moe-python"
    spec.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "tgr-moe (test interpreter)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    return KernelSpecManager(kernel_dirs=[str(root)])


def test_the_course_is_complete():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == COURSE


@pytest.mark.parametrize("name", COURSE, ids=lambda n: n[:2])
def test_notebook_runs_in_quick_mode(name, kernel_specs, tmp_path, monkeypatch):
    path = NOTEBOOK_DIR / name
    committed = path.read_bytes()
    nb = nbformat.reads(committed.decode(), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable, QUICK)"))
    monkeypatch.setenv("TGR_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' tempfile.mkdtemp() runs
    # ipc (Unix sockets in tmp_path), not tcp: no race for free ports with other kernels/tests
    km = AsyncKernelManager(
        kernel_name="tgr-moe-python",
        kernel_spec_manager=kernel_specs,
        transport="ipc",
        ip=str(tmp_path / "kernel"),
    )
    client = NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # cwd = notebooks/, as for a reader
    )
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error

    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    executable, quick = nb.cells[-1].outputs[0]["text"].rsplit(maxsplit=1)
    assert os.path.realpath(executable) == os.path.realpath(sys.executable)
    assert quick == "True"
    assert path.read_bytes() == committed, f"{name} was rewritten by its own execution"
