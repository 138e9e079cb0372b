"""The benchmarks' one report writer: Markdown tables, and the JSON of the same rows beside them.

`table(header, rows)` gives a table's Markdown lines; `write(stem, data, markdown)` writes
stem.json (the rows and whatever else the report records) and stem.md side by side.
"""
from __future__ import annotations

import json
from pathlib import Path


def table(header: list[str], rows: list[list], align: str | None = None) -> list[str]:
    """Markdown lines of a table; cells are str()-ed, `align` has one "l" or "r" per column (default: all "l")."""
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} columns, the header {len(header)}")
    return ["| " + " | ".join(map(str, header)) + " |",
            "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def write(stem: Path, data, markdown: str) -> None:
    """stem.json (`data`, values JSON cannot hold as strings) and stem.md (`markdown`)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    stem.with_name(stem.name + ".md").write_text(markdown)
