"""The training section: loss, learning rate, perplexity and memorisation over steps (`metrics.csv`)."""
from __future__ import annotations

from ortho_train.report.load import RunArtifacts
from ortho_train.report.section import Section, Table, fmt, new_figure

# (panel title, y label, which metrics.csv columns it draws)
PANELS = (
    ("loss", "nats / token", lambda c: c.startswith("train/") and c != "train/phase"),
    ("learning rate", "lr", lambda c: c.startswith("lr-")),
    ("perplexity", "perplexity", lambda c: c in ("val/public_ppl", "guard/retain_ppl")),
    ("memorisation (validation)", "rate / AUC",
     lambda c: c in ("val/extraction_rate", "val/holdout_extraction_rate", "val/mia_auc_loss")),
)


def phase_switch(run: RunArtifacts) -> int | None:
    """The step where canaries are mixed in: `model.public_steps` of the saved config when the
    run had a public warm-up, else the first step logged with `train/phase` = 1 after a 0."""
    public_steps = run.model_setting("public_steps")
    if isinstance(public_steps, int) and not isinstance(public_steps, bool):
        return public_steps if public_steps > 0 else None
    points = run.series.get("train/phase", [])
    if not points or points[0][1] >= 1:
        return None
    return next((step for step, value in points if value >= 1), None)


def training_figure(series: dict[str, list[tuple[int, float]]], switch: int | None):
    """One panel per group of `PANELS` that has data; the canary phase's start (`switch`) marked."""
    panels = [(title, label, [c for c in sorted(series) if pick(c)]) for title, label, pick in PANELS]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None, []
    fig, axes = new_figure(len(panels), columns=2)
    for ax, (title, label, columns) in zip(axes, panels):
        for column in columns:
            steps, values = zip(*series[column])
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=column)
        if switch is not None:
            ax.axvline(switch, color="grey", linestyle="--", linewidth=1, label="canaries mixed in")
        ax.set(title=title, xlabel="step", ylabel=label)
        ax.legend(fontsize=7)
    return fig, [c for _, _, cs in panels for c in cs]


def training_section(run: RunArtifacts) -> Section:
    """Curves over steps from `metrics.csv`, with the first and last value of each."""
    section = Section("training", "Training")
    if not run.series:
        section.skipped = run.absent("metrics.csv")
        return section
    switch = phase_switch(run)
    fig, columns = training_figure(run.series, switch)
    if fig is None:
        section.skipped = "metrics.csv has no loss, learning-rate, perplexity or memorisation column"
        return section
    section.figures.append(("training curves" + (" (dashed: canaries mixed in)" if switch is not None else ""), fig))
    rows = [[c, str(run.series[c][0][0]), fmt(run.series[c][0][1], 4), str(run.series[c][-1][0]),
             fmt(run.series[c][-1][1], 4)] for c in columns]
    section.tables.append(Table("first and last logged values", ["metric", "first step", "value",
                                                                 "last step", "value"], rows))
    if switch is not None:
        section.notes.append(f"canary phase from step {switch} (public warm-up before)")
    if not any(c.startswith("lr-") for c in run.series):
        section.notes.append("learning rate not logged (add lightning's LearningRateMonitor to the callbacks)")
    return section
