"""Result tables: the markdown a benchmark prints, turned into the reStructuredText the docs include."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["markdown_to_rst", "write_results"]

#: An empty cell: a bare "-" or "--" in a list-table cell would be read as a bullet list.
EMPTY = "—"


def markdown_to_rst(markdown: str) -> str:
    """Turn ``text paragraph + pipe table`` markdown into a paragraph and an RST ``list-table``.

    Examples
    --------
    >>> print(markdown_to_rst("Caption.\\n\\n| a | b |\\n|---|---|\\n| 1 | -- |\\n"))
    Caption.
    <BLANKLINE>
    .. list-table::
       :header-rows: 1
    <BLANKLINE>
       * - a
         - b
       * - 1
         - —
    <BLANKLINE>
    <BLANKLINE>
    """
    text, rows = [], []
    for line in markdown.splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            if all(set(c) <= set("-: ") for c in cells):
                continue  # the header separator
            rows.append([EMPTY if c in ("-", "--", "") else c for c in cells])
        elif stripped.startswith("#"):  # a markdown heading becomes the caption's first sentence
            heading = stripped.lstrip("#").strip()
            text.append(heading if heading.endswith((".", ":", "?", "!")) else heading + ".")
        elif stripped:
            text.append(stripped)
    out = [" ".join(text), "", ".. list-table::", "   :header-rows: 1", ""] if text else [
        ".. list-table::", "   :header-rows: 1", ""]
    for row in rows:
        out.append(f"   * - {row[0]}")
        out.extend(f"     - {c}" for c in row[1:])
    return "\n".join(out) + "\n\n"


def write_results(out_dir: Path, stem: str, result: dict[str, Any], table: str) -> None:
    """Write ``<stem>.json`` (the results), ``<stem>.md`` (the table) and ``<stem>.rst`` (the docs' include)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(table)
    (out_dir / f"{stem}.rst").write_text(markdown_to_rst(table))
