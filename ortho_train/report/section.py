"""What a report section is (figures, tables, notes) and the small helpers every section uses.

Figures are plain `matplotlib.figure.Figure` objects on the Agg canvas (no pyplot, no global
state, no display), so the same figure can be embedded in the HTML or sent to TensorBoard.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PANEL_SIZE = (4.6, 3.4)  # inches per subplot: readable at 100 dpi in a browser


@dataclass
class Table:
    """Numbers under a plot: a caption, column names and rows of already formatted cells."""

    caption: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    """One block of the report. `skipped` (one line) replaces everything when data is absent."""

    key: str
    title: str
    figures: list[tuple[str, Figure]] = field(default_factory=list)  # (caption, figure)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: list[tuple[str, str]] = field(default_factory=list)  # (summary, preformatted text)
    skipped: str | None = None


def new_figure(panels: int, columns: int | None = None, legend_space: float = 0.0,
               label_space: float = 0.0) -> tuple[Figure, list]:
    """A figure with `panels` subplots in a grid of at most `columns` (default: all in a row),
    `legend_space` inches on the right for a legend outside the axes and `label_space` inches
    more under each row for long (wrapped, rotated) category labels.

    Margins are fixed in inches rather than computed by a layout engine: a layout engine draws
    every figure twice, which doubles the report's build time.
    """
    columns = min(panels, columns or panels)
    rows = math.ceil(panels / columns)
    width, height = PANEL_SIZE[0] * columns + legend_space, (PANEL_SIZE[1] + label_space) * rows
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.85 / width, right=1 - (0.2 + legend_space) / width,
                        bottom=(0.6 + label_space) / height, top=1 - 0.4 / height, wspace=0.32,
                        hspace=0.45 + label_space / PANEL_SIZE[1])
    axes = fig.subplots(rows, columns, squeeze=False).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return fig, axes[:panels]


def fmt(value, digits: int = 3) -> str:
    """A table cell: '–' for missing/NaN, fixed digits for floats, str otherwise."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def number(value) -> float | None:
    """`value` as a finite float, or None (JSON null, strings, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None
