"""The kill-switch section: extraction, exposure and perplexity against α (`sieve_table.json`).

Sieved rows (posthoc / delta / isolated and the DQC twins posthoc_dqc / delta_dqc, one per α and ρ) are drawn as curves over α; the
reference rows (fp32, INT4, NF4, pre-SFT, …) as horizontal lines. A scatter of bits per
weight against extraction, coloured by perplexity, shows the trade-off across ρ and α.
"""
from __future__ import annotations

from collections import defaultdict

from ortho_train.report.attacks import attack_columns
from ortho_train.report.load import RunArtifacts
from ortho_train.report.plots import spread_annotations
from ortho_train.report.section import Section, Table, fmt, new_figure, number

METRICS = (("extraction_rate", "member extraction"), ("exposure_mean", "exposure (bits)"),
           ("public_ppl", "public perplexity"))
SIEVES = ("posthoc", "delta", "isolated", "posthoc_dqc", "delta_dqc")
COLUMNS = ("variant", "alpha", "rho", "extraction_rate", "holdout_extraction_rate", "exposure_mean",
           "mia_auc_loss", "public_ppl", "bits_per_weight", "ortho_density", "base")


def sieve_label(row: dict) -> str:
    """`isolated ρ=0.05` for sieved rows; the variant name for references."""
    rho = number(row.get("rho"))
    return f"{row['variant']} ρ={rho:g}" if row["variant"] in SIEVES and rho is not None else str(row["variant"])


def split_rows(rows: list[dict]) -> tuple[dict[str, list[dict]], list[dict]]:
    """Sieved rows grouped into curves by label (sorted by α), and the reference rows."""
    curves: dict[str, list[dict]] = defaultdict(list)
    references = []
    for row in rows:
        if row.get("alpha") is not None:
            curves[sieve_label(row)].append(row)
        else:
            references.append(row)
    return {k: sorted(v, key=lambda r: r["alpha"]) for k, v in curves.items()}, references


def alpha_figure(rows: list[dict]):
    """Extraction, exposure and perplexity against α; references as horizontal lines."""
    curves, references = split_rows(rows)
    fig, axes = new_figure(len(METRICS), legend_space=1.8)
    for ax, (key, label) in zip(axes, METRICS):
        for i, (name, curve) in enumerate(curves.items()):
            points = [(r["alpha"], number(r.get(key))) for r in curve if number(r.get(key)) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", color=f"C{i}", label=name)
        for j, ref in enumerate(references):
            value = number(ref.get(key))
            if value is not None:
                ax.axhline(value, color=f"C{(len(curves) + j) % 10}", linestyle="--", linewidth=1,
                           label=str(ref["variant"]))
        ax.set(xlabel="α (ortho stream scale)", ylabel=label, title=f"{label} vs α")
        if key == "extraction_rate":
            ax.set_ylim(-0.03, 1.03)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.03, 0.5))
    return fig


def tradeoff_figure(rows: list[dict]):
    """Bits per weight against extraction for every row, colour = public perplexity."""
    points = [(number(r.get("bits_per_weight")), number(r.get("extraction_rate")), number(r.get("public_ppl")),
               sieve_label(r) + ("" if r.get("alpha") is None else f" α={r['alpha']:g}")) for r in rows]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    if not points:
        return None
    fig, (ax,) = new_figure(1, legend_space=0.9)  # room for the colour bar
    colours = [p[2] for p in points]
    coloured = all(c is not None for c in colours)
    scatter = ax.scatter([p[0] for p in points], [p[1] for p in points], c=colours if coloured else None,
                         cmap="viridis", s=40)
    if coloured:
        fig.colorbar(scatter, ax=ax, label="public perplexity")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="bits per weight (sieved linears)", ylabel="member extraction",
           title="size vs leakage vs perplexity", ylim=(-0.05, 1.1))
    spread_annotations(ax, [(p[0], p[1]) for p in points], [p[3] for p in points])
    return fig


def kill_switch_figures(rows: list[dict]) -> list[tuple[str, object]]:
    """(caption, figure) pairs of a kill-switch table, for the report and for TensorBoard."""
    figures = [("extraction, exposure and public perplexity against α (dashed: reference rows)",
                alpha_figure(rows))]
    tradeoff = tradeoff_figure(rows)
    if tradeoff is not None:
        figures.append(("bits per weight vs extraction, colour = public perplexity", tradeoff))
    return figures


def table_rows(rows: list[dict]) -> Table:
    """The kill-switch table itself, one line per row of `sieve_table.json`; extraction@k, RMIA and
    the audit's ε lower bound before `base` where the rows hold them (`report.attacks`)."""
    digits = {"alpha": 2, "extraction_rate": 2, "holdout_extraction_rate": 2, "exposure_mean": 2,
              "bits_per_weight": 2, "ortho_density": 4}
    attacks = attack_columns(rows)
    body = [[fmt(r.get(c), digits.get(c, 3)) for c in COLUMNS[1:-1]] for r in rows]
    body = [[str(r.get("variant") or "")] + cells + [a.cell(r) for a in attacks] + [str(r.get("base") or "")]
            for r, cells in zip(rows, body)]
    header = list(COLUMNS[:-1]) + [a.header for a in attacks] + [COLUMNS[-1]]
    return Table("kill-switch table (sieve_table.json)", header, body)


def kill_switch_section(run: RunArtifacts) -> Section:
    """The final kill-switch table of a run with the `SieveCallback`."""
    section = Section("kill_switch", "Kill switch")
    rows = [r for r in (run.sieve_table or []) if isinstance(r, dict) and "variant" in r]
    if not rows:
        section.skipped = run.absent("sieve_table.json") if run.sieve_table is None else \
            "sieve_table.json has no rows"
        return section
    section.figures.extend(kill_switch_figures(rows))
    section.tables.append(table_rows(rows))
    alphas = sorted({r["alpha"] for r in rows if r.get("alpha") is not None})
    if len(alphas) <= 2:
        section.notes.append(f"α evaluated at {alphas}: set the SieveCallback's `alphas` "
                             "(e.g. [0, 0.25, 0.5, 0.75, 1]) for a denser curve")
    return section
