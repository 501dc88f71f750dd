"""Drawing helpers the sections share: bars that show a zero, category labels that do not overlap.

A bar of height 0 is invisible, and a missing value looks the same as a zero: every bar drawn
here carries its value as a label (`0` for a zero, `–` for a missing value, with a small marker
on the axis so the slot is seen). Category labels are wrapped to a few words per line and
rotated when there are many of them, so neighbours never overlap.
"""
from __future__ import annotations

import re

import numpy as np

WRAP = 14  # characters per line of a category label


def wrap(label: str, width: int = WRAP) -> str:
    """`label` on lines of at most `width` characters where it can, broken after spaces and
    underscores (a longer piece keeps its own line)."""
    lines: list[str] = []
    for piece in re.split(r"(?<=[_ ])", label):
        if lines and len(lines[-1]) + len(piece.rstrip()) <= width:
            lines[-1] += piece
        else:
            lines.append(piece)
    return "\n".join(line.rstrip() for line in lines if line.strip()) or label


def category_ticks(ax, labels: list[str], positions=None) -> None:
    """Wrapped category labels on the x axis, rotated 30° (anchored at their right end) when
    more than four share the axis."""
    positions = np.arange(len(labels)) if positions is None else positions
    rotate = len(labels) > 4
    ax.set_xticks(positions, [wrap(label) for label in labels], fontsize=7,
                  rotation=30 if rotate else 0, ha="right" if rotate else "center",
                  rotation_mode="anchor" if rotate else "default")


def value_label(value: float | None, digits: int = 2) -> str:
    """The text over a bar: `–` missing, `0` zero, else `digits` significant digits."""
    if value is None or not np.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"


def labelled_bars(ax, positions, values: list[float | None], width: float = 0.8, digits: int = 2,
                  labels: bool = True, **style):
    """Bars of `values` at `positions`, each labelled with its value (unless `labels` is False); a
    zero or missing value gets a hollow marker on the baseline so its slot is visible. Returns
    the bar container."""
    # a missing value is drawn as an empty bar of height 0 so that its "–" label has a place
    heights = [0.0 if v is None or not np.isfinite(v) else v for v in values]
    bars = ax.bar(positions, heights, width, **style)
    if labels:
        ax.bar_label(bars, labels=[value_label(v, digits) for v in values], fontsize=6, padding=1.5)
    empty = [p for p, v in zip(np.atleast_1d(positions), values) if v is None or not np.isfinite(v) or v == 0]
    if empty:
        colour = bars.patches[0].get_facecolor() if bars.patches else "grey"
        ax.plot(empty, [0.0] * len(empty), linestyle="none", marker="o", markersize=4, markerfacecolor="white",
                markeredgecolor=colour, clip_on=False, zorder=3)
    return bars


def grouped_bars(ax, groups: list[str], series: dict[str, list[float | None]], digits: int = 2,
                 labels: bool = True) -> None:
    """One group of bars per entry of `groups`, one bar per series, zeros marked; each bar labelled
    with its value unless `labels` is False (too many bars for their labels to be read)."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        labelled_bars(ax, x + (i - (len(series) - 1) / 2) * width, values, width, digits, labels,
                      label=name, color=f"C{i % 10}")
    category_ticks(ax, groups, x)


def headroom(ax, top: float | None = None) -> None:
    """Leave room above the tallest bar for its label (or fix the top at `top`)."""
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, 0.0), top if top is not None else high + 0.12 * (high - min(low, 0.0) or 1.0))


def spread_annotations(ax, points: list[tuple[float, float]], labels: list[str], fontsize: float = 6.0) -> None:
    """Annotate each point with its label, moving a label up in steps of one line until its box
    (estimated from its length in pixels) overlaps no label placed before it. Call after the
    axes' limits and scales are final: placement works in display coordinates."""
    ax.get_xlim(), ax.get_ylim()  # apply any pending autoscaling before reading the transform
    char_w, line_h = 0.6 * fontsize * ax.figure.dpi / 72, 1.25 * fontsize * ax.figure.dpi / 72
    placed: list[tuple[float, float, float, float]] = []
    order = sorted(range(len(points)), key=lambda i: (points[i][1], points[i][0]))
    for i in order:
        x, y = ax.transData.transform(points[i])
        width, lift = char_w * len(labels[i]), 0
        flip = x + 3 + width > ax.bbox.x1  # no room on the right inside the axes: label on the left
        left = x - 3 - width if flip else x + 3
        while any(left < r and left + width > l and y + lift < t and y + lift + line_h > b
                  for l, b, r, t in placed) and lift < 40 * line_h:
            lift += line_h
        placed.append((left, y + lift, left + width, y + lift + line_h))
        ax.annotate(labels[i], points[i], fontsize=fontsize, xytext=(-3 if flip else 3, 2 + lift * 72 / ax.figure.dpi),
                    textcoords="offset points", ha="right" if flip else "left",
                    arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.5} if lift else None)
