"""ROC curves of the deployments side by side: one panel per model of a table, one score (LOSS).

The kill-switch and privacy tables store, per row, the LOSS attack's ROC rates members vs
holdout (`mia_roc_loss`: `{fpr, tpr}`). The models compared are the deployments of one
fine-tune: full precision (`fp32`, or the run's own final model from `roc.json`), the
pre-canary model, the quantised references (INT4, NF4, …) and each sieve or DP model at
α = 0 and α = 1. An unlearning run's `ptq_gap.json` stores the same rates of the forget canaries
against holdout per deployment (`forget_mia_roc_loss_<deployment>`): full precision `fp`, each
quantised deployment, and the start model before unlearning (`fp_before`), drawn side by side in
the same way. FPR is on a log scale, where the low-FPR regime that matters for membership
inference is visible; FPR = 0 is drawn at half of 1/#holdout.
"""
from __future__ import annotations

import numpy as np

from ortho_train.report.load import RunArtifacts
from ortho_train.report.section import Section, new_figure, number

SCORE = "loss"  # the attack whose curves are compared (the tables' headline MIA)
COLUMNS = 4


def fpr_floor(holdout: int | None) -> float:
    """Where FPR = 0 is drawn on a log axis: half of the smallest non-zero FPR."""
    return 1.0 / max(2 * (holdout or 100), 2)


def draw_roc(ax, fpr, tpr, floor: float, **style) -> None:
    """One ROC curve as a step function on log-scale FPR, clipped at `floor`."""
    ax.step(np.clip(np.asarray(fpr, dtype=float), floor, 1.0), tpr, where="post", **style)


def finish_roc_axes(ax, floor: float, level: float | None = 0.01) -> None:
    """Chance diagonal, the low-FPR level, log FPR axis and labels."""
    ax.plot([floor, 1], [floor, 1], color="grey", linestyle=":", linewidth=1)
    if level is not None:
        ax.axvline(level, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set(xlim=(floor, 1), ylim=(0, 1.02), xlabel="FPR (holdout)", ylabel="TPR (members)")


def _label(row: dict) -> str:
    alpha = number(row.get("alpha"))
    name = str(row.get("variant") or row.get("kind"))
    if row.get("kind") == "run" and row.get("variant"):
        name = "run"
    rho = number(row.get("rho"))
    if alpha is not None and rho is not None and row.get("variant") not in (None, "run"):
        name += f" ρ={rho:g}"
    noise = number(row.get("noise"))
    return name + ("" if alpha is None else f" α={alpha:g}") + ("" if noise is None else f" σ={noise:g}")


def _valid(curve) -> bool:
    return (isinstance(curve, dict) and isinstance(curve.get("fpr"), list) and isinstance(curve.get("tpr"), list)
            and len(curve["fpr"]) == len(curve["tpr"]) >= 2)


def deployment_curves(rows: list[dict], roc: dict | None) -> list[tuple[str, dict, float | None]]:
    """(label, {fpr, tpr}, AUC) of every deployment to draw: reference rows and α ∈ {0, 1} rows;
    the fp32 row without rates of its own takes the run's final `roc.json` curve (the same model)."""
    out = []
    for row in rows:
        alpha = number(row.get("alpha"))
        if alpha not in (None, 0.0, 1.0) or number(row.get("noise")) is not None:
            continue
        curve = row.get("mia_roc_loss")
        if not _valid(curve) and row.get("variant") == "fp32" and roc:
            curve = (roc.get("curves") or {}).get(SCORE)
        if _valid(curve):
            out.append((_label(row), curve, number(row.get("mia_auc_loss"))))
    return out


START = "start (before unlearning)"


def ptq_gap_curves(results: dict | None) -> list[tuple[str, dict, float | None]]:
    """(label, {fpr, tpr}, AUC) of each deployment of `ptq_gap.json` that stored ROC rates: `fp`, the
    quantised deployments (`variants`), then the start model (`fp_before`)."""
    if not isinstance(results, dict):
        return []
    names = ["fp"] + [v for v in results.get("variants", []) if isinstance(v, str)] + ["fp_before"]
    out = []
    for name in names:
        curve = results.get(f"forget_mia_roc_loss_{name}")
        if _valid(curve):
            out.append((START if name == "fp_before" else name, curve,
                        number(results.get(f"forget_mia_auc_loss_{name}"))))
    return out


def deployments_figure(curves: list[tuple[str, dict, float | None]], reference_label: str = "fp32"):
    """One panel per deployment, the full-precision curve (`reference_label`, when there is one)
    faint in each; FPR = 0 drawn at half the smallest non-zero FPR (1/#holdout)."""
    floor = min((f for _, c, _ in curves for f in c["fpr"] if f > 0), default=0.01) / 2
    reference = next((c for label, c, _ in curves if label == reference_label), None)
    fig, axes = new_figure(len(curves), columns=min(COLUMNS, len(curves)))
    for i, (ax, (label, curve, auc)) in enumerate(zip(axes, curves)):
        if reference is not None and curve is not reference:
            draw_roc(ax, reference["fpr"], reference["tpr"], floor, color="grey", alpha=0.5, linewidth=1,
                     label=reference_label)
        draw_roc(ax, curve["fpr"], curve["tpr"], floor, color=f"C{i % 10}", linewidth=1.8, label=label)
        finish_roc_axes(ax, floor)
        ax.set_title(f"{label}" + ("" if auc is None else f"  (AUC {auc:.3f})"), fontsize=9)
        if reference is not None and curve is not reference:
            ax.legend(fontsize=6, loc="lower right")
    return fig


def deployments_roc_section(run: RunArtifacts) -> Section:
    """The LOSS-attack ROC of every deployment of the run's tables, side by side."""
    section = Section("deployments_roc", "MIA ROC per deployment")
    for name, rows in (("sieve_table.json", run.sieve_table), ("dp_table.json", run.dp_table)):
        dict_rows = [r for r in rows or [] if isinstance(r, dict)]
        curves = deployment_curves(dict_rows, run.roc)
        if curves:
            section.figures.append((f"LOSS-attack ROC of each model of {name}, members vs holdout, one panel each "
                                    "(grey: full precision)", deployments_figure(curves)))
    curves = ptq_gap_curves(run.ptq_gap)
    if curves:
        section.figures.append(("LOSS-attack ROC of the forget canaries vs holdout in each deployment of "
                                "ptq_gap.json, one panel each (grey: full precision after unlearning)",
                                deployments_figure(curves, reference_label="fp")))
    if not section.figures:
        section.skipped = ("no table row holds ROC rates (mia_roc_loss): tables without MIA, or written by an "
                           "older version" if run.sieve_table or run.dp_table or run.ptq_gap else
                           "this run has no sieve_table.json, dp_table.json or ptq_gap.json")
    return section
