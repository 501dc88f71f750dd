"""The seeds section: mean and 95% confidence interval over runs of one configuration.

Runs are of one configuration when their saved `config.yaml` files are equal once every seed
setting (`seed_everything`, any key `seed`) is left out. Each group of two or more runs gets
its headline numbers (`comparison.headline`), the kill-switch α curves and the PTQ gap per
deployment as

    mean ± t_{0.975, n−1} · s / √n      (Student's t interval, s the sample standard deviation),

with the smallest and largest run beside it (min–max), so a reader sees both the interval and
the spread of the n seeds themselves.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np

from ortho_train.report.comparison import headline
from ortho_train.report.kill_switch import sieve_label
from ortho_train.report.load import RunArtifacts
from ortho_train.report.plots import category_ticks
from ortho_train.report.section import Section, Table, fmt, new_figure, number

# t_{0.975, ν} for ν = 1 … 30 degrees of freedom (two-sided 95%)
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
        2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
        2.0518, 2.0484, 2.0452, 2.0423)
Z975 = 1.959964
SEED_KEYS = ("seed_everything", "seed")


def t_quantile(dof: int) -> float:
    """t_{0.975, dof}: the table up to 30, beyond it the Cornish–Fisher expansion
    z + (z³ + z)/(4ν) + (5z⁵ + 16z³ + 3z)/(96ν²) (error < 1e-4 there)."""
    if dof < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {dof}")
    if dof <= len(T975):
        return T975[dof - 1]
    z = Z975
    return z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)


def t_interval(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, half-width of the 95% t interval, min, max) of two or more values."""
    if len(values) < 2:
        raise ValueError(f"an interval needs at least two runs, got {len(values)}")
    array = np.asarray(values, dtype=float)
    half = t_quantile(len(array) - 1) * array.std(ddof=1) / math.sqrt(len(array))
    return float(array.mean()), float(half), float(array.min()), float(array.max())


def _without_seeds(value):
    if isinstance(value, dict):
        return {k: _without_seeds(v) for k, v in value.items() if k not in SEED_KEYS}
    if isinstance(value, list):
        return [_without_seeds(v) for v in value]
    return value


def config_groups(runs: list[RunArtifacts]) -> list[list[RunArtifacts]]:
    """Runs with equal configurations apart from their seeds, groups of two or more, in run order."""
    groups: dict[str, list[RunArtifacts]] = defaultdict(list)
    for run in runs:
        if run.config:
            groups[json.dumps(_without_seeds(run.config), sort_keys=True, default=str)].append(run)
    return [group for group in groups.values() if len(group) >= 2]


def interval_rows(per_run: list[dict[str, float]]) -> dict[str, tuple[int, float, float, float, float]]:
    """`{name: (n, mean, half, min, max)}` of every number measured in at least two runs."""
    names = list(dict.fromkeys(k for numbers in per_run for k in numbers))
    out = {}
    for name in names:
        values = [n[name] for n in per_run if number(n.get(name)) is not None]
        if len(values) >= 2:
            out[name] = (len(values), *t_interval(values))
    return out


def _errorbar_panel(ax, stats: dict[str, tuple], per_run: list[dict[str, float]], title: str) -> None:
    names = list(stats)
    x = np.arange(len(names))
    means = [stats[n][1] for n in names]
    ax.bar(x, means, 0.6, color="C0", alpha=0.6, label="mean")
    ax.errorbar(x, means, yerr=[stats[n][2] for n in names], fmt="none", ecolor="black", capsize=4,
                label="95% t interval")
    for i, name in enumerate(names):
        seen = [n[name] for n in per_run if number(n.get(name)) is not None]
        ax.plot([i] * len(seen), seen, linestyle="none", marker="o", markersize=3, color="C3",
                label="each run" if i == 0 else None)
    category_ticks(ax, names, x)
    ax.set(title=title)
    ax.legend(fontsize=7)


def headline_figure(stats: dict[str, tuple], per_run: list[dict[str, float]]):
    """Mean, 95% t interval and each run of the headline numbers: rates in [0, 1] beside the rest."""
    rates = {k: v for k, v in stats.items() if 0.0 <= v[3] and v[4] <= 1.0}
    others = {k: v for k, v in stats.items() if k not in rates}
    panels = [(s, t) for s, t in ((rates, "rates and AUCs"), (others, "other numbers")) if s]
    fig, axes = new_figure(len(panels), label_space=0.8)
    for ax, (subset, title) in zip(axes, panels):
        _errorbar_panel(ax, subset, per_run, title)
    return fig


def alpha_curves(group: list[RunArtifacts], key: str) -> dict[str, dict[float, list[float]]]:
    """`{sieve label: {α: [value of each run]}}` of one kill-switch metric."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for run in group:
        for row in run.sieve_table or []:
            if isinstance(row, dict) and row.get("alpha") is not None and number(row.get(key)) is not None:
                out[sieve_label(row)][float(row["alpha"])].append(float(row[key]))
    return {label: dict(points) for label, points in out.items()}


def alpha_figure(group: list[RunArtifacts]):
    """Extraction and public perplexity against α: mean line, 95% t band, each run's points."""
    metrics = [(k, label) for k, label in (("extraction_rate", "member extraction"), ("public_ppl", "public perplexity"))
               if any(len(v) >= 2 for c in alpha_curves(group, k).values() for v in c.values())]
    if not metrics:
        return None
    fig, axes = new_figure(len(metrics), legend_space=1.6)
    for ax, (key, label) in zip(axes, metrics):
        for i, (name, points) in enumerate(sorted(alpha_curves(group, key).items())):
            alphas = sorted(a for a, v in points.items() if len(v) >= 2)
            if not alphas:
                continue
            stats = [t_interval(points[a]) for a in alphas]
            means, halves = np.array([s[0] for s in stats]), np.array([s[1] for s in stats])
            ax.plot(alphas, means, marker="o", color=f"C{i}", label=name)
            ax.fill_between(alphas, means - halves, means + halves, color=f"C{i}", alpha=0.2)
            for a in alphas:
                ax.plot([a] * len(points[a]), points[a], linestyle="none", marker=".", color=f"C{i}")
        ax.set(xlabel="α", ylabel=label, title=f"{label} vs α (band: 95% t interval)")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.03, 0.5))
    return fig


def ptq_numbers(run: RunArtifacts) -> dict[str, float]:
    """`{forget extraction <deployment>: value}` of a run's final PTQ gap."""
    gap = run.ptq_gap or {}
    names = ["fp"] + [v for v in gap.get("variants", []) if isinstance(v, str)]
    return {f"forget extraction {n}": number(gap.get(f"forget_extraction_{n}")) for n in names
            if number(gap.get(f"forget_extraction_{n}")) is not None}


def _group_block(section: Section, group: list[RunArtifacts]) -> None:
    names = ", ".join(run.name for run in group)
    per_run = [headline(run) | ptq_numbers(run) for run in group]
    stats = interval_rows(per_run)
    if stats:
        section.figures.append((f"{names}: mean (bar), 95% t interval (black) and each run (red)",
                                headline_figure(stats, per_run)))
        rows = [[k, str(n), fmt(mean), f"± {fmt(half)}", f"[{fmt(mean - half)}, {fmt(mean + half)}]",
                 f"{fmt(low)} – {fmt(high)}"] for k, (n, mean, half, low, high) in stats.items()]
        section.tables.append(Table(f"over {len(group)} runs of one configuration ({names})",
                                    ["number", "runs", "mean", "t_{0.975,n−1}·s/√n", "95% interval", "min – max"],
                                    rows))
    curve = alpha_figure(group)
    if curve is not None:
        section.figures.append((f"{names}: the kill-switch curves over seeds", curve))


def seeds_section(runs: list[RunArtifacts]) -> Section:
    """Confidence intervals over the runs of each configuration given more than once."""
    section = Section("seeds", "Seeds: mean and 95% interval per configuration")
    groups = config_groups(runs)
    if not groups:
        section.skipped = ("no two runs share a configuration (apart from seeds): pass several seeds of one "
                           "config to see intervals")
        return section
    for group in groups:
        _group_block(section, group)
    section.notes.append("interval: mean ± t_{0.975, n−1}·s/√n (Student's t, s the sample standard deviation "
                         "over runs); min – max: the smallest and largest run")
    return section
