"""Writing application results: JSON, markdown tables and matplotlib figures (Agg backend, no display)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["markdown_table", "write_json", "write_text", "new_figure", "new_grid", "save_figure", "format_number"]


def format_number(value: Any) -> str:
    """Short, table-friendly rendering of numbers (4 significant digits); other values via ``str``."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0.0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Render a list of dicts as a GitHub-flavoured markdown table.

    Examples
    --------
    >>> print(markdown_table([{"method": "a", "loss": 0.5}]))
    | method | loss |
    |---|---|
    | a | 0.5 |
    """
    if not rows:
        raise ValueError("markdown_table needs at least one row")
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_number(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_json(data: Any, path: Path) -> Path:
    """Write ``data`` as indented JSON, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def write_text(text: str, path: Path) -> Path:
    """Write ``text`` to ``path``, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def new_figure(ncols: int = 1, width: float = 5.0, height: float = 3.6):
    """A figure with ``ncols`` side-by-side axes."""
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def new_grid(nrows: int, ncols: int, cell: float = 1.2):
    """A figure with an ``nrows x ncols`` grid of small square axes (e.g. image galleries)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, cell * nrows + 0.3), squeeze=False)
    return fig, [list(row) for row in axes]


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as PNG at ``path`` (parents created) and release it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
