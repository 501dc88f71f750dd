"""The unlearning section: the PTQ gap as grouped bars, bin crossing, CAD (`ptq_gap.json`).

Each deployment measured by the `PTQGapCallback` (full precision `fp`, then every quantised
copy: `nf4`, `fp4`, `int4_rtn` merged and `<fmt>_adapter` = quantised base + fp adapter) is one
bar per metric; a positive forget-extraction gap means quantisation brought secrets back. The
table adds, where the callback measured them (`attack_metrics`), the forget canaries'
extraction@k, RMIA AUC ± SE and RMIA TPR at each FPR per deployment (`report.attacks`).
"""
from __future__ import annotations

import numpy as np

from ortho_train.report.attacks import attack_columns, deployment_row
from ortho_train.report.load import RunArtifacts
from ortho_train.report.plots import category_ticks, grouped_bars, headroom, labelled_bars
from ortho_train.report.section import Section, Table, fmt, new_figure, number

RATE_METRICS = ("forget_extraction", "forget_mia_auc_loss", "forget_verbmem", "retain_extraction",
                "holdout_extraction")
TABLE_METRICS = RATE_METRICS + ("forget_exposure", "public_ppl")


def deployments(results: dict) -> list[str]:
    """`fp` then the quantised deployments the results hold, in the callback's order."""
    return ["fp"] + [v for v in results.get("variants", []) if isinstance(v, str)]


def ptq_gap_figures(results: dict) -> list[tuple[str, object]]:
    """Grouped bars (metric × deployment), exposure and perplexity per deployment, bin crossing;
    every zero bar marked on the axis (a forget extraction of 0 is the result, not a gap)."""
    names = deployments(results)
    fig, axes = new_figure(3, label_space=0.6)
    rates = [m for m in RATE_METRICS if f"{m}_fp" in results]
    grouped_bars(axes[0], rates, {d: [number(results.get(f"{m}_{d}")) for m in rates] for d in names},
                 labels=len(rates) * len(names) <= 16)
    axes[0].set(ylabel="rate / AUC / ROUGE-L", title="forget and retain metrics per deployment", ylim=(0, 1.05))
    axes[0].legend(fontsize=6, ncol=2)
    for ax, metric, label in ((axes[1], "forget_exposure", "forget exposure (bits)"),
                              (axes[2], "public_ppl", "public perplexity")):
        values = [number(results.get(f"{metric}_{d}")) for d in names]
        before = number(results.get(f"{metric}_fp_before"))
        labelled_bars(ax, np.arange(len(names)), values, 0.7, digits=3, color="C0")
        category_ticks(ax, names)
        title = label
        if before is not None:
            ax.axhline(before, color="C3", linestyle="--", linewidth=1)
            title += f" (dashed: before, {before:.3g})"
        ax.set(ylabel=label, title=title)
        shown = [v for v in values + [before] if v is not None]
        if metric == "public_ppl" and shown:  # perplexities differ by percents: zoom in
            ax.set_ylim(0.97 * min(shown), 1.03 * max(shown))
        else:
            headroom(ax)
    figures = [("PTQ gap: every deployment after unlearning (dashed: before)", fig)]
    formats = sorted({k.removeprefix("bin_crossing_fraction_") for k in results
                      if k.startswith("bin_crossing_fraction_")})
    if formats:
        fig2, (ax,) = new_figure(1)
        grouped_bars(ax, formats, {
            "|ΔW| > half a bin": [number(results.get(f"bin_crossing_fraction_{f}")) for f in formats],
            "quantised value changed": [number(results.get(f"dequantised_change_fraction_{f}")) for f in formats]})
        ax.set(ylabel="fraction of updated weights", title="bin crossing per format", ylim=(0, 1.3))
        ax.legend(fontsize=7, loc="upper center", ncol=2)
        figures.append(("share of updated weights that cross half a quantisation bin", fig2))
    return figures


def gap_table(results: dict) -> Table:
    """Metric rows × deployment columns, with the starting full-precision value."""
    names = deployments(results)
    rows = []
    for metric in TABLE_METRICS:
        if f"{metric}_fp" in results:
            rows.append([metric, fmt(number(results.get(f"{metric}_fp_before")))]
                        + [fmt(number(results.get(f"{metric}_{d}"))) for d in names])
    measured = [deployment_row(results, d) for d in ["fp_before"] + names]
    for column in attack_columns(measured):
        rows.append([f"forget {column.header}"] + [column.cell(row) for row in measured])
    gaps = [number(results.get(f"ptq_gap_extraction_{d}")) for d in names[1:]]
    rows.append(["forget extraction gap (quantised − fp)", "", ""] + [fmt(g) for g in gaps])
    return Table("PTQ gap (ptq_gap.json)", ["metric", "fp before"] + names, rows)


def _outcome_notes(results: dict, card: dict | None) -> list[str]:
    notes = [f"status: {results.get('status', '–')}; forgetting survives quantisation: "
             f"{results.get('forgetting_survives', '–')} (tolerated gap {fmt(number(results.get('max_extraction_gap')))})"]
    training = (card or {}).get("training", {}) if isinstance(card, dict) else {}
    if number(training.get("cad")) is not None:
        notes.append(f"CAD (circuit attribution divergence, before vs after): {training['cad']:.4f}")
    if training.get("divergence"):
        notes.append(f"divergence guard: {training['divergence']}")
    if number(results.get("median_abs_update")) is not None:
        notes.append(f"median |ΔW| of updated weights: {results['median_abs_update']:.3g}")
    return notes


def unlearning_section(run: RunArtifacts) -> Section:
    """PTQ gap of an unlearning run, with the outcome from `metrics_card.json` when present."""
    section = Section("unlearning", "Unlearning and the PTQ gap")
    if run.ptq_gap is None or "forget_extraction_fp" not in run.ptq_gap:
        section.skipped = (run.absent("ptq_gap.json") if run.ptq_gap is None
                           else "ptq_gap.json has no forget_extraction_fp")
        return section
    section.figures.extend(ptq_gap_figures(run.ptq_gap))
    section.tables.append(gap_table(run.ptq_gap))
    section.notes.extend(_outcome_notes(run.ptq_gap, run.metrics_card))
    if run.metrics_card is None:
        section.notes.append(f"method card: {run.absent('metrics_card.json')}")
    else:
        method = run.metrics_card.get("method", {})
        if isinstance(method, dict):
            section.notes.append("method: " + ", ".join(f"{k} = {method[k]}" for k in
                                                        ("mode", "loss", "lr", "trainable_parameters") if k in method))
    return section
