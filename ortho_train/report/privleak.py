"""The PrivLeak section of an unlearning run, per deployment (`ptq_gap.json`).

PrivLeak ("MUSE: Machine Unlearning Six-Way Evaluation for Language Models", §3):
(AUC_unl − AUC_ref) / AUC_ref · 100, with the Min-40% membership-inference AUC of forget vs
holdout canaries and AUC_ref that of a model that never saw the forget set. 0 is a model that
leaks as little as the reference; a large positive value is under-unlearning (the forget set
still stands out), a large negative one over-unlearning (it stands out by being forgotten).
The `PTQGapCallback` writes `forget_privleak_<deployment>` for full precision and every
quantised deployment (and `…_before` for the starting model), or `privleak_refused` with the
reason when no reference model exists — then this section says so and draws nothing.
"""
from __future__ import annotations

import numpy as np

from ortho_train.report.load import RunArtifacts
from ortho_train.report.plots import category_ticks, labelled_bars
from ortho_train.report.section import Section, Table, fmt, new_figure, number
from ortho_train.report.unlearning import deployments

KEY = "forget_privleak_"


def privleak_values(results: dict) -> dict[str, tuple[float | None, float | None]]:
    """`{deployment: (PrivLeak after, PrivLeak before)}` for fp and every deployment measured."""
    return {name: (number(results.get(f"{KEY}{name}")), number(results.get(f"{KEY}{name}_before")))
            for name in deployments(results) if f"{KEY}{name}" in results}


def privleak_figure(values: dict[str, tuple[float | None, float | None]]):
    """PrivLeak after unlearning per deployment (bars, each labelled), before as hollow markers."""
    names = list(values)
    fig, (ax,) = new_figure(1, label_space=0.5)
    fig.set_figwidth(max(6.0, 0.8 * len(names) + 2.0))
    x = np.arange(len(names))
    labelled_bars(ax, x, [values[n][0] for n in names], 0.6, digits=3, color="C0", label="after unlearning")
    before = [(i, values[n][1]) for i, n in enumerate(names) if values[n][1] is not None]
    if before:
        ax.plot(*zip(*before), linestyle="none", marker="D", markerfacecolor="white", markeredgecolor="C3",
                label="before unlearning")
    ax.axhline(0.0, color="black", linewidth=0.8)
    category_ticks(ax, names, x)
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, -5.0) * 1.15, max(high, 5.0) * 1.4)  # room for the legend above the markers
    ax.set(ylabel="PrivLeak (%)", title="PrivLeak per deployment (0 = leaks like the reference)")
    ax.legend(fontsize=7, ncol=2, loc="upper center")
    return fig


def privleak_section(run: RunArtifacts) -> Section:
    """PrivLeak of every deployment before and after unlearning, or why it was not measured."""
    section = Section("privleak", "PrivLeak")
    results = run.ptq_gap
    if results is None:
        section.skipped = run.absent("ptq_gap.json")
        return section
    values = privleak_values(results)
    if not values:
        reason = results.get("privleak_refused")
        section.skipped = (f"not measured: {reason}" if isinstance(reason, str)
                           else "ptq_gap.json has no forget_privleak_* values")
        return section
    section.figures.append(("PrivLeak = (AUC_unlearned − AUC_reference) / AUC_reference · 100, Min-40% forget vs "
                            "holdout, per deployment", privleak_figure(values)))
    rows = [[name, fmt(before, 2), fmt(after, 2)] for name, (after, before) in values.items()]
    section.tables.append(Table("PrivLeak (%)", ["deployment", "before", "after"], rows))
    reference = results.get("privleak_reference")
    if isinstance(reference, dict):
        section.notes.append(f"reference AUC (a model that never saw the forget set): "
                             f"{fmt(number(reference.get('forget_mia_auc_mink_40')))}")
    return section
