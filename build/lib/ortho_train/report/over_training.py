"""The over-training section: periodic kill-switch tables and PTQ gaps as curves over steps.

Periodic tables are `sieve_table_step<N>.json` (`SieveCallback(every_n_steps=N)`) and
`ptq_gap_step<N>.json` (`PTQGapCallback(every_n_steps=N)`), joined by the final table and the
final `ptq_gap.json` (with its `_before` values at step 0 when it has them).
"""
from __future__ import annotations

from collections import defaultdict

from matplotlib import colormaps

from ortho_train.report.kill_switch import sieve_label
from ortho_train.report.load import RunArtifacts
from ortho_train.report.section import Section, Table, fmt, new_figure, number

PTQ_PREFIX = "forget_extraction_"
PALETTE = colormaps["tab20"]  # tables have more rows than the default cycle has colours


def final_step(run: RunArtifacts) -> int | None:
    """The step of the final table: the run's last step (run_info.json, else metrics.csv)."""
    if run.run_info and number(run.run_info.get("global_step")) is not None:
        return int(run.run_info["global_step"])
    steps = [s for points in run.series.values() for s, _ in points]
    return max(steps) if steps else None


def table_curves(tables: dict[int, list], key: str) -> dict[str, list[tuple[int, float]]]:
    """`{row label (with α): [(step, value)]}` of one metric across the tables."""
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for step in sorted(tables):
        for row in tables[step]:
            if not isinstance(row, dict) or "variant" not in row:
                continue
            label = sieve_label(row) + ("" if row.get("alpha") is None else f" α={row['alpha']:g}")
            value = number(row.get(key))
            if value is not None:
                curves[label].append((step, value))
    return dict(curves)


def ptq_curves(run: RunArtifacts, step: int | None) -> dict[str, list[tuple[int, float]]]:
    """`{deployment: [(step, forget extraction)]}` from the periodic and final PTQ measurements."""
    if not run.periodic_ptq:
        return {}
    measurements = dict(run.periodic_ptq)
    final = run.ptq_gap or {}
    if step is not None and step not in measurements and PTQ_PREFIX + "fp" in final:
        before = {k.removesuffix("_before"): v for k, v in final.items() if k.endswith("_before")}
        if before:
            measurements.setdefault(0, before)
        measurements[step] = {k: v for k, v in final.items() if not k.endswith("_before")}
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for at in sorted(measurements):
        for key, value in measurements[at].items():
            if key.startswith(PTQ_PREFIX) and (value := number(value)) is not None:
                curves[key.removeprefix(PTQ_PREFIX)].append((at, value))
    return dict(curves)


def over_training_figure(tables: dict[int, list], ptq: dict[str, list[tuple[int, float]]]):
    """PTQ extraction over steps; extraction, exposure and public perplexity of every table row
    over steps (one colour per row in every panel, their legend outside on the right)."""
    panels = [("forget extraction per deployment", ptq)] if ptq else []
    if tables:
        panels += [(f"kill-switch rows: {name}", table_curves(tables, key)) for key, name in
                   (("extraction_rate", "member extraction"), ("exposure_mean", "exposure (bits)"),
                    ("public_ppl", "public perplexity"))]
        panels = [p for p in panels if p[1]]
    fig, axes = new_figure(len(panels), legend_space=2.2 if tables else 0.0)
    labels = sorted({label for _, curves in panels[1 if ptq else 0:] for label in curves})
    for ax, (title, curves) in zip(axes, panels):
        for label, points in sorted(curves.items()):
            i = labels.index(label) if label in labels else sorted(curves).index(label)
            dashed = " α=" not in label and title.startswith("kill")  # references dashed
            ax.plot(*zip(*points), marker="o", linestyle="--" if dashed else "-", color=PALETTE(i % 20),
                    label=label)
        ax.set(title=title, xlabel="step")
        if "extraction" in title:
            ax.set_ylim(-0.03, 1.03)
    if ptq:
        axes[0].legend(fontsize=7)
    if tables:
        axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.03, 1.0))
    return fig


def over_training_section(run: RunArtifacts) -> Section:
    """Curves from the periodic tables (plus the final one) and the periodic PTQ gap."""
    section = Section("over_training", "Over training")
    tables = dict(run.periodic_tables)
    step = final_step(run)
    if tables and run.sieve_table and step is not None and step not in tables:
        tables[step] = run.sieve_table
    ptq = ptq_curves(run, step)
    if not run.periodic_tables and not ptq:
        section.skipped = ("no periodic tables (SieveCallback / PTQGapCallback with every_n_steps write "
                           "sieve_table_step<N>.json / ptq_gap_step<N>.json)")
        return section
    section.figures.append(("the periodic tables over steps (dashed: reference rows)",
                            over_training_figure(tables, ptq)))
    curves = table_curves(tables, "extraction_rate") if tables else {}
    curves |= {f"PTQ {k}": v for k, v in ptq.items()}
    steps = sorted({s for points in curves.values() for s, _ in points})
    rows = [[label] + [fmt(dict(points).get(s), 2) for s in steps] for label, points in sorted(curves.items())]
    section.tables.append(Table("extraction at each measured step", ["row"] + [str(s) for s in steps], rows))
    return section
