"""Writing one benchmark table: Markdown for people, JSON for tools, side by side.

Example
-------
>>> import tempfile
>>> from report import write_table
>>> folder = write_table(tempfile.mkdtemp(), "demo", "| a |", {"a": 1.0})
>>> sorted(p.name for p in folder.iterdir())
['demo.json', 'demo.md']
"""

from __future__ import annotations

import json
from pathlib import Path


def write_table(folder: str | Path, name: str, text: str, result: dict) -> Path:
    """Write ``folder/name.md`` (``text``) and ``folder/name.json`` (``result``); return the folder."""
    output = Path(folder)
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}.md").write_text(text + "\n")
    # numpy scalars and the like go in as floats
    (output / f"{name}.json").write_text(json.dumps(result, indent=1, default=float))
    return output


def parser(doc: str, name: str, quick: str):
    """The command line every benchmark script shares: ``--quick`` (``quick`` says what it runs)
    and ``--output`` (the folder for ``name``'s files, benchmarks/results by default)."""
    import argparse

    command = argparse.ArgumentParser(description=doc.split("\n")[0])
    command.add_argument("--quick", action="store_true", help=quick)
    default = str(Path(__file__).resolve().parent / "results")
    command.add_argument("--output", default=default, help=f"folder for {name}.md/json and plots")
    return command


def publish(folder: str | Path, name: str, text: str, result: dict, plot=None) -> Path:
    """Print the table, write it (:func:`write_table`), draw ``plot(result, folder)`` if given and
    say where each picture went; return the folder."""
    import sys

    print(text)
    output = write_table(folder, name, text, result)
    for path in plot(result, output) if plot is not None else ():
        print(f"wrote {path}", file=sys.stderr)
    return output
