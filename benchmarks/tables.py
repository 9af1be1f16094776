"""Make the Markdown tables (and the scaling plots) again from the JSON the benchmarks wrote.

    python benchmarks/tables.py FOLDER

For each of gpu.json, results.json and scaling.json found in FOLDER it writes the matching .md
(and scaling_time.png / scaling_memory.png) beside it. A GPU machine lent for minutes sends back
few files (benchmarks/gpu_machine.sh returns the JSON only); the tables are made here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gpu  # noqa: E402
import report  # noqa: E402
import run as run_py  # noqa: E402
import scaling  # noqa: E402


def results_table(result: dict) -> str:
    """run.py's table; the checkpoints are the iteration counts scikit-image's curve holds."""
    num_iter = int(result["num_iter"])
    checkpoints = sorted(int(n) for n in result["cases"]["skimage"]["psnr"])
    return run_py.summarize(result, result["shape"], num_iter, checkpoints)


MAKERS = {
    "gpu": (gpu.table, None),
    "results": (results_table, None),
    "scaling": (scaling.table, scaling.plot),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[0])
    made = 0
    for name, (make, plot) in MAKERS.items():
        path = folder / f"{name}.json"
        if path.exists():
            result = json.loads(path.read_text())
            report.publish(folder, name, make(result), result, plot)
            made += 1
    return 0 if made else 1


if __name__ == "__main__":
    sys.exit(main())
