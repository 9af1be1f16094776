"""The example notebooks run top to bottom in a fresh kernel and get the numbers they promise."""

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def this_python_kernel(tmp_path, monkeypatch):
    """A "python3" kernel spec running this interpreter, found before any other on the machine, so
    the notebook sees the microdecon under test and not a system-wide Python's."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3 (tests)", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return "python3"


def run_notebook(path: Path, workdir: Path, kernel: str):
    notebook = nbformat.read(path, as_version=4)
    # The suite's FFT policy (conftest.py): scipy.fft, deterministic and without FFTW's planning,
    # which measures each new grid shape (a minute or more on a busy 2-core machine).
    setup = nbformat.v4.new_code_cell("from microdecon import _backend\n_backend.set_cpu_fft('pocketfft')")
    setup["id"] = "test-setup"
    notebook.cells.insert(0, setup)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=kernel,
        timeout=300,  # per cell: generous, for a busy machine (about 10 s in all on 2 idle cores)
        resources={"metadata": {"path": str(workdir)}},  # the kernel's working directory
    )
    client.execute()
    return notebook


def text_of(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream" and output["name"] == "stdout":
            parts.append(output["text"])
        elif output["output_type"] in ("execute_result", "display_data"):
            data = output.get("data", {})
            parts.append(data.get("text/markdown", data.get("text/plain", "")))
    return "".join(parts)


def test_quickstart_is_stored_without_outputs():
    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_quickstart_runs_and_restores_the_sample(tmp_path, this_python_kernel):
    notebook = run_notebook(EXAMPLES / "quickstart.ipynb", tmp_path, this_python_kernel)
    cells = {cell.get("id"): cell for cell in notebook.cells}
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors

    # the PSNR it prints: restored well above observed (29.25 dB -> about 33.9 dB on the CPU)
    printed = text_of(cells["psnr"])
    observed = float(re.search(r"PSNR observed: ([0-9.]+) dB", printed).group(1))
    restored = float(re.search(r"PSNR restored: ([0-9.]+) dB", printed).group(1))
    assert observed == pytest.approx(29.25, abs=0.05)
    assert restored > observed + 3

    # the table: one row per method, each with a time and a PSNR better than the data's
    table = text_of(cells["methods"])
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ")]
    by_method = {(row[0].strip(), row[1].strip()): row for row in rows[1:]}
    assert {name for name, _ in by_method} == {"observed", "rl", "rl-tv", "landweber", "fista", "wiener"}
    for (name, _), row in by_method.items():
        if name != "observed":
            assert float(row[2]) > 0 and float(row[3]) > observed, row
    accelerated = float(by_method[("rl", "30 iterations, accelerated")][3])
    plain = float(by_method[("rl", "30 iterations, plain")][3])
    assert accelerated > plain

    # the pictures were drawn (one PNG per compare call) and the result was saved
    pictures = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pictures) == 3
    assert (tmp_path / "sample_restored.tif").exists()
