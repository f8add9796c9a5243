"""Result tables: the markdown a benchmark prints, turned into the reStructuredText the docs include."""

from __future__ import annotations

__all__ = ["markdown_to_rst"]

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
        elif stripped:
            text.append(stripped)
    out = [" ".join(text), "", ".. list-table::", "   :header-rows: 1", ""] if text else [
        ".. list-table::", "   :header-rows: 1", ""]
    for row in rows:
        out.append(f"   * - {row[0]}")
        out.extend(f"     - {c}" for c in row[1:])
    return "\n".join(out) + "\n\n"
