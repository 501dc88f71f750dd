"""The run section: saved configuration, library versions, wall time, the two streams' sizes."""
from __future__ import annotations

from ortho_train.report.load import STREAMS_DIR, RunArtifacts
from ortho_train.report.section import Section, Table, fmt, new_figure, number

MB = 1024 * 1024


def _streams_figure(streams: dict):
    """Bar chart of the saved stream files' sizes in MiB (base alone is the α = 0 model)."""
    files = streams["files"]
    names = sorted(files)
    fig, (ax,) = new_figure(1)
    bars = ax.bar(names, [files[n] / MB for n in names], color=["#4c72b0", "#dd8452"][: len(names)] or None)
    ax.bar_label(bars, fmt="%.2f MiB")
    ax.set_ylabel("file size (MiB)")
    ax.set_title(f"{STREAMS_DIR}/: base and ortho streams")
    return fig


def run_section(run: RunArtifacts) -> Section:
    """Configuration, versions and timing of the run, and its saved streams when there are some."""
    section = Section("run", "Run")
    section.notes.append(f"directory: {run.path}")
    info = run.run_info or {}
    rows = [[key, fmt(info[key], 1)] for key in ("started", "ended", "wall_seconds", "global_step")
            if key in info]
    rows += [[f"{package} version", str(version)] for package, version in sorted(info.get("versions", {}).items())]
    if rows:
        section.tables.append(Table("run", ["item", "value"], rows))
    else:
        section.notes.append(f"versions and wall time: {run.absent('run_info.json')}")
    if run.streams is not None:
        files = run.streams["files"]
        total = sum(files.values())
        stream_rows = [[name, fmt(size / MB, 3), fmt(size / total if total else None, 3)]
                       for name, size in sorted(files.items())]
        section.tables.append(Table("saved streams (base alone = the α = 0 model)",
                                    ["file", "MiB", "share"], stream_rows))
        meta = {k: v for k, v in run.streams["metadata"].items() if number(v) is not None or isinstance(v, str)}
        if meta:
            section.notes.append("streams: " + ", ".join(f"{k} = {v}" for k, v in sorted(meta.items())))
        if files:
            section.figures.append(("sizes of the saved stream files", _streams_figure(run.streams)))
    if run.config_text is not None:
        section.details.append(("config.yaml (as LightningCLI saved it)", run.config_text))
    else:
        section.notes.append("configuration: this run has no config.yaml (not started by train.py?)")
    return section
