"""The attack columns of the report's tables: extraction@k, offline RMIA and the one-run audit.

Keys as the measurement tables write them on a row (the PTQ gap prefixes them with `forget_` and
suffixes the deployment): `extraction_at_k`; `mia_auc_rmia` with its DeLong standard error
`mia_auc_rmia_se` ("Low-Cost High-Power Membership Inference Attacks"); `mia_tpr_at_<f>pct_fpr_rmia`,
the TPR at FPR f, None where the n holdout canaries cannot resolve f (n·f < 1), shown as
`unresolved (n=N)` from `mia_holdout_count`; `audit_epsilon_lb`, the lower bound on ε of "Privacy
Auditing with One (1) Training Run". A column appears when any row holds its key; a row without
it (or with a value that is not a number) shows "–".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ortho_train.report.section import fmt, number

AUDIT = "audit_epsilon_lb"
TPR_PREFIX, TPR_SUFFIX = "mia_tpr_at_", "pct_fpr_rmia"


@dataclass(frozen=True)
class Column:
    """A table column: its header and how a row becomes its cell."""

    header: str
    cell: Callable[[dict], str]


def auc_cell(row: dict, key: str = "mia_auc_rmia") -> str:
    """`AUC ± SE`, the AUC alone without a standard error, "–" without an AUC."""
    auc, se = number(row.get(key)), number(row.get(f"{key}_se"))
    return fmt(auc) + ("" if auc is None or se is None else f" ± {se:.3f}")


def tpr_cell(row: dict, key: str) -> str:
    """The TPR at one FPR; `unresolved (n=N)` where the row holds None and its holdout count N."""
    count = number(row.get("mia_holdout_count"))
    if key in row and row[key] is None and count is not None:
        return f"unresolved (n={int(count)})"
    return fmt(number(row.get(key)))


def tpr_keys(keys) -> list[str]:
    """The `mia_tpr_at_<f>pct_fpr_rmia` keys among `keys`, largest FPR first."""
    found = {k for k in keys if k.startswith(TPR_PREFIX) and k.endswith(TPR_SUFFIX)}

    def fpr(key: str) -> float:
        try:
            return float(key.removeprefix(TPR_PREFIX).removesuffix(TPR_SUFFIX))
        except ValueError:
            return -1.0
    return sorted(found, key=lambda k: (-fpr(k), k))


def _tpr_column(key: str) -> Column:
    level = key.removeprefix(TPR_PREFIX).removesuffix(TPR_SUFFIX)
    return Column(f"RMIA TPR@{level}%FPR", lambda row: tpr_cell(row, key))


def attack_columns(rows: list[dict], audit: bool = True) -> list[Column]:
    """The attack columns `rows` hold: extraction@k, RMIA AUC ± SE, RMIA TPR at each FPR and (with
    `audit`) the audit's ε lower bound."""
    keys = {k for row in rows for k in row}
    columns = []
    if "extraction_at_k" in keys:
        columns.append(Column("extraction@k", lambda row: fmt(number(row.get("extraction_at_k")), 2)))
    if "mia_auc_rmia" in keys:
        columns.append(Column("RMIA AUC ± SE", auc_cell))
        columns += [_tpr_column(k) for k in tpr_keys(keys)]
    if audit and AUDIT in keys:
        columns.append(Column("audit ε ≥", lambda row: fmt(number(row.get(AUDIT)), 2)))
    return columns


def deployment_row(results: dict, deployment: str, prefix: str = "forget_") -> dict:
    """The attack keys of one deployment of flat results (`<prefix><key>_<deployment>`, as
    `ptq_gap.json` holds them) as a row of plain keys."""
    row = {}
    suffix = f"_{deployment}"
    for key, value in results.items():
        if key.startswith(prefix) and key.endswith(suffix):
            row[key.removeprefix(prefix).removesuffix(suffix)] = value
    return row
