"""The comparison section: the headline numbers of several runs side by side."""
from __future__ import annotations

from ortho_train.report.load import RunArtifacts
from ortho_train.report.plots import grouped_bars
from ortho_train.report.section import Section, Table, fmt, new_figure, number

RATES = ("extraction", "MIA AUC (loss)", "extraction α=0", "extraction α=1", "forget extraction fp",
         "max PTQ extraction gap")


def headline(run: RunArtifacts) -> dict[str, float]:
    """The few numbers that say what a run did, from whichever tables it has."""
    out: dict[str, float | None] = {}
    summary = run.summary or {}
    out["extraction"] = number(summary.get("extraction_rate"))
    out["exposure"] = number(summary.get("exposure_mean"))
    out["MIA AUC (loss)"] = number(summary.get("mia_auc_loss"))
    out["public PPL"] = number(summary.get("public_ppl"))
    rows = [r for r in (run.sieve_table or []) if isinstance(r, dict) and r.get("alpha") is not None]
    preferred = [r for r in rows if r.get("variant") == "isolated"] or rows
    for alpha in (0.0, 1.0):
        match = [r for r in preferred if r.get("alpha") == alpha]
        if match:
            out[f"extraction α={alpha:g}"] = number(match[0].get("extraction_rate"))
            out[f"PPL α={alpha:g}"] = number(match[0].get("public_ppl"))
    gap = run.ptq_gap or {}
    out["forget extraction fp"] = number(gap.get("forget_extraction_fp"))
    gaps = [number(v) for k, v in gap.items() if k.startswith("ptq_gap_extraction_")]
    out["max PTQ extraction gap"] = max((g for g in gaps if g is not None), default=None)
    if out["public PPL"] is None:
        out["public PPL"] = number(gap.get("public_ppl_fp"))
    return {k: v for k, v in out.items() if v is not None}


def comparison_figure(names: list[str], numbers: list[dict[str, float]]):
    """Grouped bars of the [0, 1] headline numbers, one bar per run."""
    metrics = [m for m in RATES if any(m in n for n in numbers)]
    if not metrics:
        return None
    fig, (ax,) = new_figure(1, legend_space=2.2, label_space=0.5)
    fig.set_figwidth(max(6.0, 1.2 * len(metrics) * max(1, len(names) / 2)) + 2.2)
    grouped_bars(ax, metrics, {name: [found.get(m) for m in metrics] for name, found in zip(names, numbers)},
                 labels=len(metrics) * len(names) <= 24)
    ax.set(ylim=(0, 1.12), ylabel="rate / AUC", title="headline numbers per run")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig


def comparison_section(runs: list[RunArtifacts]) -> Section:
    """Side-by-side headline numbers; skipped with fewer than two runs."""
    section = Section("comparison", "Comparison")
    if len(runs) < 2:
        section.skipped = "one run only: pass several run directories to compare them"
        return section
    numbers = [headline(run) for run in runs]
    columns = list(dict.fromkeys(k for n in numbers for k in n))
    if not columns:
        section.skipped = "none of the runs has headline numbers (summary.json, sieve_table.json, ptq_gap.json)"
        return section
    names = [run.name for run in runs]
    fig = comparison_figure(names, numbers)
    if fig is not None:
        section.figures.append(("headline rates of each run", fig))
    rows = [[name] + [fmt(n.get(c)) for c in columns] for name, n in zip(names, numbers)]
    section.tables.append(Table("headline numbers", ["run"] + columns, rows))
    return section
