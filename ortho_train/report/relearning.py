"""The relearning section: does the forgetting survive a little fine-tuning (`relearning.json`)?

The relearning callback fine-tunes copies of the unlearned model (and of the model before
unlearning) for a few steps on public text or on a held-out part of the forget set, then
measures the rest of the forget set in full precision and in each 4-bit deployment. Its file
holds rows — a list, or a dict with a `rows` list — read tolerantly:

- `condition`: what the copy relearned on (`public`, `forget` — the relearn part of the forget
  set —, …);
- `steps`: relearning steps (0: the model itself);
- `deployment`: `fp` or a quantised deployment (default `fp`);
- `model`: `unlearned` or `start` (default `unlearned`);
- `extraction`: extraction rate of the measured forget secrets (also read as `extraction_rate`
  or `forget_extraction`);
- `nll`: their mean NLL (also `nll_mean`, `mean_nll` or `forget_nll`).

A dict's `notes` (a list of strings) are shown under the table.

A row without condition, steps or any of the two metrics is left out, and counted in a note.
"""
from __future__ import annotations

from collections import defaultdict

from ortho_train.report.load import RunArtifacts
from ortho_train.report.section import Section, Table, fmt, new_figure, number

ALIASES = {"extraction": ("extraction", "extraction_rate", "forget_extraction"),
           "nll": ("nll", "nll_mean", "mean_nll", "forget_nll")}
METRICS = (("extraction", "extraction of the measured forget secrets"), ("nll", "their mean NLL (nats)"))
STYLES = {"unlearned": "-", "start": "--"}


def _first(row: dict, names: tuple[str, ...]):
    return next((number(row[n]) for n in names if number(row.get(n)) is not None), None)


def read_rows(payload) -> tuple[list[dict], int]:
    """Normalised rows `{condition, steps, deployment, model, extraction, nll}` and the number
    of rows left out (no condition, no integer steps, or neither metric)."""
    raw = payload.get("rows") if isinstance(payload, dict) else payload
    rows, dropped = [], 0
    for row in raw if isinstance(raw, list) else []:
        steps = number(row.get("steps")) if isinstance(row, dict) else None
        values = {m: _first(row, names) for m, names in ALIASES.items()} if isinstance(row, dict) else {}
        if steps is None or not isinstance(row.get("condition"), str) or all(v is None for v in values.values()):
            dropped += 1
            continue
        rows.append({"condition": row["condition"], "steps": int(steps),
                     "deployment": str(row.get("deployment") or "fp"), "model": str(row.get("model") or "unlearned"),
                     **values})
    return rows, dropped


def curves(rows: list[dict], metric: str) -> dict[str, dict[tuple[str, str], list[tuple[int, float]]]]:
    """`{condition: {(model, deployment): [(steps, value)] sorted}}` of one metric."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row[metric] is not None:
            out[row["condition"]][(row["model"], row["deployment"])].append((row["steps"], row[metric]))
    return {c: {k: sorted(v) for k, v in lines.items()} for c, lines in out.items()}


def relearning_figure(rows: list[dict]):
    """One panel per condition and metric: the metric against relearning steps, one line per
    deployment (colour) and model (solid: unlearned, dashed: the model before unlearning)."""
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    metrics = [(m, label) for m, label in METRICS if any(r[m] is not None for r in rows)]
    deployments = list(dict.fromkeys(r["deployment"] for r in rows))
    fig, axes = new_figure(len(conditions) * len(metrics), columns=len(conditions), legend_space=2.0)
    for m_index, (metric, label) in enumerate(metrics):
        lines = curves(rows, metric)
        for c_index, condition in enumerate(conditions):
            ax = axes[m_index * len(conditions) + c_index]
            for (model, deployment), points in sorted(lines.get(condition, {}).items()):
                ax.plot(*zip(*points), marker="o", markersize=4, linestyle=STYLES.get(model, ":"),
                        color=f"C{deployments.index(deployment) % 10}", label=f"{model}, {deployment}")
            ax.set(xlabel="relearning steps", ylabel=label, title=f"relearned on {condition}")
            if metric == "extraction":
                ax.set_ylim(-0.03, 1.03)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    axes[len(conditions) - 1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.03, 1.0))
    return fig


def relearning_table(rows: list[dict]) -> Table:
    """Extraction (mean NLL) per condition, model and deployment, one column per step count."""
    steps = sorted({r["steps"] for r in rows})
    cells: dict = defaultdict(dict)
    for r in rows:
        cells[(r["condition"], r["model"], r["deployment"])][r["steps"]] = (
            f"{fmt(r['extraction'], 2)} ({fmt(r['nll'], 2)})")
    body = [[c, m, d] + [values.get(s, "–") for s in steps] for (c, m, d), values in cells.items()]
    return Table("extraction of the measured forget secrets (mean NLL) after N relearning steps",
                 ["condition", "model", "deployment"] + [f"{s} steps" for s in steps], body)


def relearning_section(run: RunArtifacts) -> Section:
    """Relearning curves of an unlearning run with the relearning callback."""
    section = Section("relearning", "Relearning")
    if run.relearning is None:
        section.skipped = run.absent("relearning.json")
        return section
    rows, dropped = read_rows(run.relearning)
    if not rows:
        section.skipped = f"relearning.json has no readable rows ({dropped} left out)"
        return section
    section.figures.append(("forget-set extraction and NLL after N relearning steps (solid: the unlearned model; "
                            "dashed: the model before unlearning)", relearning_figure(rows)))
    section.tables.append(relearning_table(rows))
    if dropped:
        section.notes.append(f"{dropped} row(s) of relearning.json had no condition, steps or metric: left out")
    if isinstance(run.relearning, dict):
        section.notes += [n for n in run.relearning.get("notes") or [] if isinstance(n, str)]
    return section
