"""The separation section: LMC curves, η and the SVD / pruning rows (`separation_table.json`).

The `SeparationTableCallback` writes `{step, rows, notes, eta}`: one row per model (the public
model W_pre, the run's own model — `dense`, or `ogd` / `isolated` at α = 0 and 1 —, the SVD
split `svd_clean` and naive pruning `pruned` at the same budget), each with extraction (fp,
NF4, INT4), perplexity, bits per weight and, where a path was measured, the loss along the
straight line between two models (`barrier_curve` at evenly spaced t, with its linear and
paper barriers); `eta` is η = |⟨ΔW_pub, ΔW_priv⟩| / (‖ΔW_pub‖·‖ΔW_priv‖), overall and per layer.
"""
from __future__ import annotations

import numpy as np

from ortho_train.report.load import RunArtifacts
from ortho_train.report.plots import grouped_bars, headroom, labelled_bars, category_ticks
from ortho_train.report.section import Section, Table, fmt, new_figure, number

EXTRACTIONS = (("extraction_rate", "fp"), ("nf4_extraction_rate", "NF4"), ("int4_rtn_extraction_rate", "INT4"))
PATHS = {"svd_clean": "W_pre → W_clean (SVD split)", "pruned": "W_pre → W_pruned", "ogd": "OGD α = 0 → 1",
         "isolated": "isolated α = 0 → 1"}
LAYERS_SHOWN = 24  # η bars: the most entangled layers


def row_label(row: dict) -> str:
    """`ogd α=1`, `svd_clean`, `public`."""
    alpha = number(row.get("alpha"))
    return str(row.get("variant")) + ("" if alpha is None else f" α={alpha:g}")


def lmc_figure(rows: list[dict]):
    """Loss along each measured straight path, against t (the barrier's endpoints at t = 0, 1)."""
    curves = [r for r in rows if isinstance(r.get("barrier_curve"), list) and len(r["barrier_curve"]) >= 2]
    if not curves:
        return None
    fig, (ax,) = new_figure(1, legend_space=2.6)
    for i, row in enumerate(curves):
        losses = [number(v) for v in row["barrier_curve"]]
        t = np.linspace(0.0, 1.0, len(losses))  # the callback's evenly spaced points
        label = (f"{PATHS.get(str(row.get('variant')), row_label(row))}\nbarrier "
                 f"{fmt(number(row.get('barrier_linear')), 4)} (paper {fmt(number(row.get('barrier_paper')), 4)})")
        ax.plot(t, [np.nan if v is None else v for v in losses], marker="o", markersize=3, color=f"C{i}",
                label=label)
    ax.set(xlabel="t  (θ(t) = (1 − t)·θ_a + t·θ_b)", ylabel="public NLL (nats / token)",
           title="linear mode connectivity")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.03, 0.5))
    return fig


def rows_figure(rows: list[dict]):
    """Extraction in fp, NF4 and INT4 per row; public perplexity and bits per weight per row."""
    labels = [row_label(r) for r in rows]
    fig, axes = new_figure(3, label_space=0.7)
    present = [(k, name) for k, name in EXTRACTIONS if any(number(r.get(k)) is not None for r in rows)]
    grouped_bars(axes[0], labels, {name: [number(r.get(k)) for r in rows] for k, name in present})
    axes[0].set(ylabel="member extraction", title="extraction per row (fp, NF4, INT4)")
    headroom(axes[0], 1.15)
    axes[0].legend(fontsize=7, loc="upper right")
    x = np.arange(len(rows))
    for ax, key, title in ((axes[1], "public_ppl", "public perplexity"), (axes[2], "bits_per_weight",
                                                                           "bits per weight")):
        values = [number(r.get(key)) for r in rows]
        labelled_bars(ax, x, values, 0.6, digits=4 if key == "public_ppl" else 3, color="C0")
        category_ticks(ax, labels, x)
        ax.set(ylabel=title, title=f"{title} per row")
        shown = [v for v in values if v is not None]
        if key == "public_ppl" and shown:  # perplexities differ by percents: zoom in
            ax.set_ylim(0.97 * min(shown), 1.03 * max(shown))
        else:
            headroom(ax)
    return fig


def eta_figure(eta: dict):
    """η per layer (the most entangled `LAYERS_SHOWN`), the overall η dashed."""
    per_layer = {k: number(v) for k, v in (eta.get("per_layer") or {}).items() if number(v) is not None}
    if not per_layer:
        return None
    shown = sorted(per_layer.items(), key=lambda kv: kv[1], reverse=True)[:LAYERS_SHOWN]
    fig, (ax,) = new_figure(1)
    fig.set_size_inches(7.5, 1.2 + 0.22 * len(shown))
    fig.subplots_adjust(left=0.42, right=0.95, bottom=0.6 / fig.get_figheight(), top=1 - 0.4 / fig.get_figheight())
    y = np.arange(len(shown))[::-1]
    bars = ax.barh(y, [v for _, v in shown], color="C2")
    ax.bar_label(bars, labels=[f"{v:.3g}" for _, v in shown], fontsize=6, padding=2)
    ax.set_yticks(y, [name for name, _ in shown], fontsize=6)
    overall = number(eta.get("overall"))
    if overall is not None:
        ax.axvline(overall, color="C3", linestyle="--", linewidth=1, label=f"overall η = {overall:.3g}")
        ax.legend(fontsize=7, loc="lower right")
    ax.set(xlabel="η = |⟨ΔW_pub, ΔW_priv⟩| / (‖ΔW_pub‖·‖ΔW_priv‖)",
           title=f"entanglement per layer ({len(shown)} of {len(per_layer)} layers, largest first)")
    ax.set_xlim(0, max(v for _, v in shown) * 1.15 or 1.0)
    return fig


def separation_rows(rows: list[dict]) -> Table:
    """The separation table's numbers, one line per row."""
    header = ["row", "energy", "extraction", "holdout extr.", "exposure", "MIA AUC", "public PPL", "η",
              "barrier (linear)", "barrier (paper)", "bits/weight", "NF4 extr.", "INT4 extr."]
    body = [[row_label(r), fmt(number(r.get("energy")), 2), fmt(number(r.get("extraction_rate")), 2),
             fmt(number(r.get("holdout_extraction_rate")), 2), fmt(number(r.get("exposure_mean")), 2),
             fmt(number(r.get("mia_auc_loss"))), fmt(number(r.get("public_ppl"))), fmt(number(r.get("eta"))),
             fmt(number(r.get("barrier_linear")), 4), fmt(number(r.get("barrier_paper")), 4),
             fmt(number(r.get("bits_per_weight")), 2), fmt(number(r.get("nf4_extraction_rate")), 2),
             fmt(number(r.get("int4_rtn_extraction_rate")), 2)] for r in rows]
    return Table("separation table (separation_table.json)", header, body)


def separation_section(run: RunArtifacts) -> Section:
    """LMC curves, the rows as bars, η per layer and the table of a separation run."""
    section = Section("separation", "Separation (LMC, η, SVD split, pruning)")
    table = run.separation or {}
    rows = [r for r in table.get("rows") or [] if isinstance(r, dict) and "variant" in r]
    if not rows:
        section.skipped = (run.absent("separation_table.json") if run.separation is None
                           else "separation_table.json has no rows")
        return section
    lmc = lmc_figure(rows)
    if lmc is not None:
        section.figures.append(("loss along the straight path between two models (LMC); barrier = the largest "
                                "rise above the chord", lmc))
    section.figures.append(("each row's extraction (fp and after NF4 / INT4), perplexity and size", rows_figure(rows)))
    eta = table.get("eta")
    figure = eta_figure(eta) if isinstance(eta, dict) else None
    if figure is not None:
        section.figures.append((f"η of the run's tracked displacements ({eta.get('rule', '–')})", figure))
    elif not isinstance(eta, dict):
        section.notes.append("η: not tracked in this run (set model.track_displacements, or train with ogd)")
    section.tables.append(separation_rows(rows))
    section.notes += [str(n) for n in table.get("notes") or [] if isinstance(n, str)]
    return section
