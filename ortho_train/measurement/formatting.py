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


def format_tpr(row: dict, key: str) -> str:
    """A TPR at a fixed FPR, or `unresolved (n=N)` where the holdout count N cannot resolve that FPR
    (the row holds None for it: N·FPR < 1)."""
    if key in row and row[key] is None and row.get("mia_holdout_count") is not None:
        return f"unresolved (n={row['mia_holdout_count']})"
    return format_value(row.get(key))


def _rmia_tpr_keys(rows: list[dict]) -> list[str]:
    """`mia_tpr_at_<f>pct_fpr_rmia` keys of the rows, largest FPR first."""
    keys = {k for r in rows for k in r if k.startswith("mia_tpr_at_") and k.endswith("_fpr_rmia")}
    return sorted(keys, key=lambda k: -float(k.removeprefix("mia_tpr_at_").removesuffix("pct_fpr_rmia")))


def attack_head(rows: list[dict]) -> str:
    """Header cells (each starting with ` | `) of the attack columns the rows hold: extraction@k,
    RMIA AUC ± SE, RMIA TPR at each FPR, the one-run audit's ε lower bound."""
    cells = []
    if any("extraction_at_k" in r for r in rows):
        cells.append("extraction@k")
    if any("mia_auc_rmia" in r for r in rows):
        cells.append("RMIA AUC ± SE")
        cells += [f"RMIA TPR@{k.removeprefix('mia_tpr_at_').removesuffix('pct_fpr_rmia')}%FPR"
                  for k in _rmia_tpr_keys(rows)]
    if any("audit_epsilon_lb" in r for r in rows):
        cells.append("audit ε ≥")
    return "".join(f" | {c}" for c in cells)


def attack_cells(row: dict, rows: list[dict]) -> list[str]:
    """`row`'s cells under `attack_head(rows)`."""
    cells = []
    if any("extraction_at_k" in r for r in rows):
        cells.append(format_value(row.get("extraction_at_k"), 2))
    if any("mia_auc_rmia" in r for r in rows):
        cells.append(format_auc(row, "mia_auc_rmia"))
        cells += [format_tpr(row, k) for k in _rmia_tpr_keys(rows)]
    if any("audit_epsilon_lb" in r for r in rows):
        cells.append(format_value(row.get("audit_epsilon_lb"), 2))
    return cells
