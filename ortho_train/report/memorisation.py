"""The memorisation section: MIA ROC curves, the exposure histogram, the final summary numbers."""
from __future__ import annotations

import math

import numpy as np

from ortho_train.report.load import RunArtifacts
from ortho_train.report.roc import draw_roc, finish_roc_axes, fpr_floor
from ortho_train.report.section import Section, Table, fmt, new_figure, number

SUMMARY_ROWS = (
    ("extraction_rate", "member extraction (greedy, exact secret)"),
    ("holdout_extraction_rate", "holdout extraction (never trained)"),
    ("symbol_accuracy", "member symbol accuracy"),
    ("exposure_mean", "mean exposure (rank)"),
    ("exposure_max_measurable", "exposure ceiling log2|references|"),
    ("exposure_skewnorm_mean", "mean exposure (skew-normal extrapolation)"),
    ("public_ppl", "public perplexity"),
    ("public_ppl_before_canaries", "public perplexity before canaries"),
)
SCORES = ("loss", "zlib", "mink", "mink_40", "minkpp", "minkpp_40")


def skewnorm_pdf(x: np.ndarray, a: float, loc: float, scale: float) -> np.ndarray:
    """Skew-normal density 2/ω · φ(z) · Φ(a·z), z = (x − ξ)/ω (numpy only: importing
    scipy.stats would cost the report command more than drawing every figure)."""
    z = (np.asarray(x, dtype=float) - loc) / scale
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(a * z / math.sqrt(2.0)))
    return 2.0 / scale * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi) * cdf


def roc_figure(roc: dict):
    """ROC of each MIA score of the final model, one panel per score (side by side, not on top of
    each other), log-scale FPR; AUC and TPR at the low-FPR level in each title."""
    level = roc.get("fpr_level", 0.01)
    floor = fpr_floor(roc.get("holdout"))
    curves = list(roc["curves"].items())
    fig, axes = new_figure(len(curves), columns=min(3, len(curves)))
    for i, (ax, (name, curve)) in enumerate(zip(axes, curves)):
        draw_roc(ax, curve["fpr"], curve["tpr"], floor, color=f"C{i}", linewidth=1.6)
        finish_roc_axes(ax, floor, level)
        ax.set_title(f"{name}: AUC {curve['auc']:.3f}, TPR@{100 * level:g}% {curve['tpr_at_fpr']:.2f}", fontsize=9)
    return fig


def exposure_figure(hist: dict):
    """Histogram of reference log-perplexities, its skew-normal fit, the members marked."""
    edges, counts = np.asarray(hist["bin_edges"], dtype=float), np.asarray(hist["counts"], dtype=float)
    fig, (ax,) = new_figure(1)
    ax.stairs(counts, edges, fill=True, alpha=0.5, label=f"reference secrets ({int(counts.sum())})")
    fit = hist.get("skewnorm")
    members = [m for m in hist.get("member_log_perplexity", []) if number(m) is not None]
    low = min([edges[0]] + members)
    grid = np.linspace(low, edges[-1], 400)
    if fit:
        density = skewnorm_pdf(grid, fit["a"], fit["loc"], fit["scale"])
        ax.plot(grid, density * counts.sum() * np.diff(edges).mean(), color="C1",
                label=f"skew-normal fit (a = {fit['a']:.2f})")
    for i, value in enumerate(members):
        ax.axvline(value, color="C3", linewidth=1.2, label="members' secrets" if i == 0 else None)
    ax.set(xlabel=f"log-perplexity of the secret ({hist.get('units', 'bits')})", ylabel="count",
           title=f"exposure: {hist.get('contexts')} contexts × {hist.get('references')} references")
    ax.legend(fontsize=7)
    return fig


def _mia_rows(summary: dict) -> list[list[str]]:
    return [[name, fmt(summary.get(f"mia_auc_{name}")), fmt(summary.get(f"mia_tpr_at_1pct_fpr_{name}"), 2)]
            for name in SCORES if f"mia_auc_{name}" in summary]


def memorisation_section(run: RunArtifacts) -> Section:
    """Final memorisation metrics of an SFT run (`summary.json`, `roc.json`, `exposure_refs.json`)."""
    section = Section("memorisation", "Memorisation")
    if run.roc is not None and run.roc.get("curves"):
        section.figures.append((f"MIA ROC curves of the final model, one panel per score: {run.roc.get('members')} "
                                f"members vs {run.roc.get('holdout')} holdout (log-scale FPR)", roc_figure(run.roc)))
    else:
        section.notes.append(f"ROC curves: {run.absent('roc.json')}")
    if run.exposure_refs is not None and run.exposure_refs.get("counts"):
        section.figures.append(("reference secrets' log-perplexities; members in red (further left = "
                                "more exposed)", exposure_figure(run.exposure_refs)))
    else:
        section.notes.append(f"exposure histogram: {run.absent('exposure_refs.json')}")
    summary = run.summary or {}
    rows = [[label, fmt(summary.get(key))] for key, label in SUMMARY_ROWS if key in summary]
    if rows:
        section.tables.append(Table("final evaluation (summary.json)", ["metric", "value"], rows))
        mia = _mia_rows(summary)
        if mia:
            section.tables.append(Table("membership inference", ["score", "ROC-AUC", "TPR @ 1% FPR"], mia))
    else:
        section.notes.append(f"final numbers: {run.absent('summary.json')}")
    if not section.figures and not section.tables:
        section.skipped = ("no memorisation data: " + "; ".join(
            run.absent(f) for f in ("summary.json", "roc.json", "exposure_refs.json")))
    return section
