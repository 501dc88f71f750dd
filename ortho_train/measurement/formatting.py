"""Cells and notes of the measurement tables' markdown: one spelling of a number for every table."""
from __future__ import annotations

import math


def format_value(value, digits: int = 3) -> str:
    """A cell: "–" for a missing or NaN value, a float to `digits` decimals, anything else as str."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_auc(row: dict, key: str = "mia_auc_loss") -> str:
    """`AUC ± SE` (the DeLong standard error, `<key>_se`), or the AUC alone where the row has none."""
    se = row.get(f"{key}_se")
    return format_value(row.get(key)) + ("" if se is None else f" ± {format_value(se, 3)}")


def markdown_table(head: str, cells: list[list[str]], notes: list[str] = ()) -> str:
    """`head` (a `| a | b |` line), a separator, one line per row of cells, then the notes as a list."""
    width = head.count("|") - 1
    lines = [head, "|" + "---|" * width] + ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"
