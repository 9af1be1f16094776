"""The benchmark reports: tables made again from the JSON equal the published ones; ratios right."""

import importlib.util
import shutil
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")  # the scaling table's plots

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str):
    """A benchmark script loaded from its file (a name like ``tables`` could be another
    package's), so that an error in it fails the test instead of skipping it."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu = _script("gpu")
tables = _script("tables")


def test_the_gpu_tables_are_made_again_from_their_json(tmp_path):
    published = BENCHMARKS / "results" / "gpu"
    for name in ("gpu", "results", "scaling"):
        shutil.copy(published / f"{name}.json", tmp_path)
    assert tables.main([str(tmp_path)]) == 0
    for name in ("gpu", "results", "scaling"):
        assert (tmp_path / f"{name}.md").read_text() == (published / f"{name}.md").read_text(), name
    assert (tmp_path / "scaling_time.png").stat().st_size > 10_000


def test_gpu_table_ratios():
    entry = {
        "shape": [8, 16, 16],
        "fft_shape": [12, 20, 20],
        "fft_floor_seconds": 0.001,
        "cases": {
            "microdecon-plain": {"seconds_per_iteration": 0.0015, "floor_ratio": 1.5},
            "microdecon-accel": {"seconds_per_iteration": 0.002, "floor_ratio": 2.0},
            "microdecon-cg": {"seconds_per_iteration": 0.0025, "floor_ratio": 2.5},
            "cucim": {"seconds_per_iteration": 0.0033},
            "skimage": {"status": "missing", "reason": "not installed"},
        },
    }
    result = {"machine": "test", "date": "2026-11-26", "sizes": [entry], "end_to_end": {}}
    row = gpu.table(result).splitlines()[4]
    assert row == (
        "| 8x16x16 | 12x20x20 | 1.0 ms | 1.5 ms (1.50x floor) | 2.0 ms (2.00x floor) | "
        "2.5 ms (2.50x floor) | 3.3 ms | missing | 2.2x | - |"
    )
