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
