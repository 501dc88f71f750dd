"""The privacy section: ε against utility and membership inference (`dp_table.json`).

Each row of the `DPTableCallback`'s table is one model: the run at each α (α = 0 never saw a
canary: ε = 0), post-hoc global / dual noise, GPTQ with and without noise, stochastic
quantisation. Its ε is the accountant's (post-processing keeps the run's ε) or "none" for a
model without a DP guarantee, drawn right of every numeric ε. Where the table also holds an
empirical lower bound on ε from a privacy audit (`audit_epsilon_lb`, as the table writes it, else
`audit_epsilon_lower` or any key naming both an audit and ε), it is drawn beside the accountant's ε
at the same utility: the true ε of the mechanism lies between the two. The table shows it next to
ε, and extraction@k and RMIA (AUC ± SE, TPR at each FPR) where the rows hold them
(`report.attacks`).
"""
from __future__ import annotations

import numpy as np

from ortho_train.report.attacks import attack_columns
from ortho_train.report.load import RunArtifacts
from ortho_train.report.plots import category_ticks, headroom, labelled_bars, spread_annotations
from ortho_train.report.section import Section, Table, fmt, new_figure, number

AUDIT_KEYS = ("audit_epsilon_lb", "audit_epsilon_lower")
PANELS = (("public_ppl", "public perplexity"), ("mia_auc_loss", "MIA AUC (LOSS)"))


def audit_key(rows: list[dict]) -> str | None:
    """The key of the audit's ε lower bound in `rows`: `audit_epsilon_lb`, `audit_epsilon_lower`, else
    any key naming both an audit and ε (a differently spelt column), else None."""
    keys = {k for row in rows for k in row}
    for key in AUDIT_KEYS:
        if key in keys:
            return key
    found = sorted(k for k in keys if "audit" in k and "eps" in k and not k.endswith("_se"))
    return found[0] if found else None


def row_label(row: dict) -> str:
    """`run α=1`, `posthoc_dual σ=0.1`, `int4_gptq`."""
    label = str(row.get("kind") or row.get("variant"))
    if number(row.get("alpha")) is not None and row.get("kind") == "run":
        label += f" α={row['alpha']:g}"
    if number(row.get("noise")) is not None:
        label += f" σ={row['noise']:g}"
    return label


def epsilon_positions(rows: list[dict]) -> tuple[list[float], float | None]:
    """Each row's x on the ε axis, and where "none" sits (right of every numeric ε), if used."""
    numeric = [number(r.get("epsilon")) for r in rows]
    top = max((e for e in numeric if e is not None), default=0.0)
    none_at = top * 1.25 + 1.0
    xs = [e if e is not None else none_at for e in numeric]
    return xs, (none_at if any(e is None for e in numeric) else None)


def _kinds(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(str(r.get("kind")) for r in rows))


def _dodged(rows: list[dict], xs: list[float], kinds: list[str]) -> list[float]:
    """Each row's x moved sideways by its kind among the kinds at the same ε, so they stand side
    by side instead of on top of each other."""
    step = 0.035 * ((max(xs) - min(xs)) or 1.0)
    out = []
    for row, x in zip(rows, xs):
        here = [k for k in kinds if any(str(r.get("kind")) == k and xr == x for r, xr in zip(rows, xs))]
        out.append(x + (here.index(str(row.get("kind"))) - (len(here) - 1) / 2) * step)
    return out


def _scatter(ax, points: list[tuple[float, float, dict, str, bool]]) -> None:
    """(x, y, row, colour, hollow) points; each noisy filled point labelled with its σ, the labels
    kept apart."""
    labelled = []
    for x, y, row, colour, hollow in points:
        style = {"facecolors": "white", "edgecolors": colour} if hollow else {"color": colour, "alpha": 0.85}
        ax.scatter([x], [y], s=30, zorder=3, **style)
        if number(row.get("noise")) is not None and not hollow:
            labelled.append(((x, y), f"σ={row['noise']:g}"))
    if labelled:
        spread_annotations(ax, [p for p, _ in labelled], [t for _, t in labelled], fontsize=5.5)


def epsilon_figure(rows: list[dict], audit: str | None):
    """Public perplexity and MIA AUC against ε (filled: the accountant's ε; hollow, joined by a
    dotted line: the audit's lower bound); MIA AUC against perplexity. Colour = row kind; rows of
    one ε stand side by side by kind, each noisy row labelled with its σ."""
    fig, axes = new_figure(3, legend_space=1.9)
    kinds = _kinds(rows)
    colour = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
    numeric, none_at = epsilon_positions(rows)
    xs = _dodged(rows, numeric, kinds)
    for ax, (key, label) in zip(axes, PANELS):
        points = []
        for row, x in zip(rows, xs):
            y, c = number(row.get(key)), colour[str(row.get("kind"))]
            bound = number(row.get(audit)) if audit else None
            if y is not None:
                points.append((x, y, row, c, False))
            if y is not None and bound is not None:
                ax.plot([bound, x], [y, y], linestyle=":", color=c, linewidth=1)
                points.append((bound, y, row, c, True))
        ax.set(xlabel="ε (δ fixed by the run)", ylabel=label, title=f"{label} vs ε")
        if none_at is not None:
            ticks = [t for t in ax.get_xticks() if 0 <= t < none_at * 0.9]
            ax.set_xticks(ticks + [none_at], [f"{t:g}" for t in ticks] + ["none"])
        _scatter(ax, points)
    _scatter(axes[2], [(number(r.get("public_ppl")), number(r.get("mia_auc_loss")), r, colour[str(r.get("kind"))],
                        False) for r in rows
                       if number(r.get("public_ppl")) is not None and number(r.get("mia_auc_loss")) is not None])
    for ax in axes[1:]:
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    axes[2].set(xlabel="public perplexity", ylabel="MIA AUC (LOSS)", title="privacy–utility trade-off")
    handles = [axes[2].scatter([], [], color=colour[k], label=k) for k in kinds]
    if audit:
        handles.append(axes[2].scatter([], [], facecolors="white", edgecolors="black", label="audit ε lower bound"))
    axes[-1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.03, 0.5))
    return fig


def audit_figure(rows: list[dict], audit: str):
    """The accountant's ε and the audit's lower bound of each row side by side."""
    measured = [r for r in rows if number(r.get(audit)) is not None]
    fig, (ax,) = new_figure(1, label_space=0.9)
    fig.set_figwidth(max(6.0, 0.55 * len(measured) + 2.0))
    x = np.arange(len(measured))
    labelled_bars(ax, x - 0.2, [number(r.get("epsilon")) for r in measured], 0.4, label="accountant ε",
                  color="C0")
    labelled_bars(ax, x + 0.2, [number(r.get(audit)) for r in measured], 0.4, label="audit lower bound",
                  color="C1")
    category_ticks(ax, [row_label(r) for r in measured], x)
    headroom(ax)
    ax.set(ylabel="ε", title="ε: the accountant's upper bound and the audit's lower bound")
    ax.legend(fontsize=7)
    return fig


def privacy_table(rows: list[dict], audit: str | None) -> Table:
    """The privacy table as the callback wrote it (the audit column next to ε when there is one, the
    other attack columns after the LOSS attack's)."""
    attacks = attack_columns(rows, audit=False)
    header = ["row", "ε"] + (["audit ε ≥"] if audit else []) + [
        "extraction", "exposure", "MIA AUC (LOSS)", "± SE", "TPR@1%FPR"] + [a.header for a in attacks] + [
        "public PPL", "bits/weight"]
    body = []
    for r in rows:
        epsilon = r.get("epsilon")
        cells = [row_label(r), epsilon if isinstance(epsilon, str) else fmt(number(epsilon), 2)]
        cells += [fmt(number(r.get(audit)), 2)] if audit else []
        cells += [fmt(number(r.get("extraction_rate")), 2), fmt(number(r.get("exposure_mean")), 2),
                  fmt(number(r.get("mia_auc_loss"))), fmt(number(r.get("mia_auc_loss_se"))),
                  fmt(number(r.get("mia_tpr_at_1pct_fpr_loss")), 2)] + [a.cell(r) for a in attacks]
        cells += [fmt(number(r.get("public_ppl"))), fmt(number(r.get("bits_per_weight")), 2)]
        body.append(cells)
    return Table("privacy table (dp_table.json)", header, body)


def _dp_note(summary: dict | None) -> str | None:
    dp = (summary or {}).get("dp")
    if not isinstance(dp, dict) or number(dp.get("epsilon")) is None:
        return None
    parts = [f"ε = {dp['epsilon']:.3f}"] + [f"{name} = {dp[key]}" for key, name in
                                             (("delta", "δ"), ("noise_multiplier", "σ"), ("sample_rate", "q"),
                                              ("steps", "steps"), ("scope", "scope"), ("accountant", "accountant"))
                                             if key in dp]
    return "DP-SGD of this run: " + ", ".join(parts)


def privacy_section(run: RunArtifacts) -> Section:
    """ε against perplexity and MIA AUC, the audit bound beside the accountant's ε, the table."""
    section = Section("privacy", "Privacy (ε vs utility and MIA)")
    rows = [r for r in (run.dp_table or []) if isinstance(r, dict) and ("kind" in r or "variant" in r)]
    if not rows:
        section.skipped = run.absent("dp_table.json") if run.dp_table is None else "dp_table.json has no rows"
        return section
    audit = audit_key(rows)
    section.figures.append(("public perplexity and MIA AUC against ε (filled: accountant's ε"
                            + ("; hollow: the audit's lower bound" if audit else "") + "; kinds at one ε side by side)",
                            epsilon_figure(rows, audit)))
    if audit and any(number(r.get(audit)) is not None for r in rows):
        section.figures.append(("the accountant's ε beside the audit's empirical lower bound", audit_figure(rows, audit)))
    section.tables.append(privacy_table(rows, audit))
    note = _dp_note(run.summary)
    section.notes.append(note or "no DP-SGD in this run: ε is 'none' for every model that saw the canaries")
    section.notes.append("noise σ is a noise scale, not a guarantee: post-hoc noise and stochastic quantisation "
                         "keep the run's ε (post-processing) and add none of their own")
    if not audit:
        section.notes.append("no audit column in dp_table.json: only the accountant's ε is shown")
    return section
