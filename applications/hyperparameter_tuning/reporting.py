"""Writing application results: JSON, markdown tables and matplotlib figures (Agg backend, no display)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files
import matplotlib.pyplot as plt
from cycler import cycler

#: Lines of one axes differ in colour, line style *and* marker, so that two curves that
#: coincide (two solvers with the same training trajectory) both stay visible and a figure
#: printed in grey still tells them apart.
LINE_CYCLE = (
    cycler(color=["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"])
    + cycler(linestyle=["-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1))])
    + cycler(marker=["o", "s", "^", "D", "v", "x"])
    + cycler(markevery=[0.1, (0.05, 0.1), (0.03, 0.1), (0.07, 0.1), (0.02, 0.1), (0.08, 0.1)])
    + cycler(markersize=[4, 4, 4, 4, 4, 4])
)
#: Text sizes for figures shown at page width (about 740 px): 10-point text on a 100-dpi
#: figure 10 inches wide is about 10 px on the page, and the documentation links the PNG.
FIGURE_STYLE = {
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "xtick.labelsize": 9.5,
    "ytick.labelsize": 9.5,
    "legend.fontsize": 9,
    "axes.prop_cycle": LINE_CYCLE,
    "axes.grid": True,
    "grid.alpha": 0.3,
}

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
    """A figure with ``ncols`` side-by-side axes, in :data:`FIGURE_STYLE` (distinct line styles).

    The style applies to what is drawn on these axes afterwards: text sizes are set on the
    figure's artists when :func:`save_figure` lays it out, and the line cycle is the axes'.
    """
    with plt.rc_context(FIGURE_STYLE):
        fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    for ax in axes[0]:
        ax.set_prop_cycle(LINE_CYCLE)
        ax.grid(True, alpha=0.3)
    return fig, list(axes[0])


def new_grid(nrows: int, ncols: int, cell: float = 1.2):
    """A figure with an ``nrows x ncols`` grid of small square axes (e.g. image galleries)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, cell * nrows + 0.3), squeeze=False)
    return fig, [list(row) for row in axes]


def _apply_text_sizes(fig) -> None:
    """Give every text of ``fig`` the sizes of :data:`FIGURE_STYLE` (callers add labels after creation)."""
    for ax in fig.axes:
        ax.title.set_fontsize(FIGURE_STYLE["axes.titlesize"])
        ax.xaxis.label.set_fontsize(FIGURE_STYLE["axes.labelsize"])
        ax.yaxis.label.set_fontsize(FIGURE_STYLE["axes.labelsize"])
        ax.tick_params(axis="x", labelsize=FIGURE_STYLE["xtick.labelsize"])
        ax.tick_params(axis="y", labelsize=FIGURE_STYLE["ytick.labelsize"])
        legend = ax.get_legend()
        if legend is not None:
            for text in legend.get_texts():
                text.set_fontsize(FIGURE_STYLE["legend.fontsize"])


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as PNG at ``path`` (parents created, 100 dpi, readable text sizes) and release it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _apply_text_sizes(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
