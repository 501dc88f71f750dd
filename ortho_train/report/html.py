"""Assemble sections into one self-contained HTML page: inline CSS, PNG data URIs, no script.

Nothing in the page refers to anything outside it (no URL, no font, no stylesheet), so it
opens from any directory, offline, without a server. Every text is HTML-escaped.
"""
from __future__ import annotations

import base64
import html
import io

from ortho_train.report.section import Section, Table

DPI = 100
STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1500px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #4c72b0; margin-top: 2em; }
h3 { margin-bottom: 0.3em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 5px; text-align: right; }
th { background: #eef1f7; } td:first-child, th:first-child { text-align: left; }
td:not(:last-child) { white-space: nowrap; }  /* "0.581 ± 0.130", "unresolved (n=48)" on one line */
caption { text-align: left; font-weight: bold; padding: 3px 0; }
.skipped { color: #777; font-style: italic; }
.problem { color: #a00; font-weight: bold; }
pre { background: #f6f6f6; padding: 0.6em; font-size: 0.8em; overflow-x: auto; }
"""


def png_data_uri(figure) -> str:
    """The figure as a PNG data URI (rendered with Agg at `DPI`)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    return f"<table><caption>{html.escape(table.caption)}</caption><tr>{head}</tr>{body}</table>"


def render_section(section: Section, level: int = 3) -> str:
    """One section: its figures (each with a caption), tables and notes, or its one skip line."""
    title = f"<h{level} id=\"{html.escape(section.key)}\">{html.escape(section.title)}</h{level}>"
    if section.skipped is not None:
        return f"{title}<p class=\"skipped\">skipped: {html.escape(section.skipped)}</p>"
    parts = [title]
    for caption, figure in section.figures:
        parts.append(f"<figure><img alt=\"{html.escape(caption)}\" src=\"{png_data_uri(figure)}\">"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts += [_table(t) for t in section.tables]
    parts += [f"<p>{html.escape(n)}</p>" for n in section.notes]
    parts += [f"<details><summary>{html.escape(s)}</summary><pre>{html.escape(text)}</pre></details>"
              for s, text in section.details]
    return "\n".join(parts)


def render_page(title: str, runs: list[tuple[str, list[str], list[Section]]], extra: list[Section],
                footer: str) -> str:
    """The whole page: per run (name, problems, sections), then the cross-run sections."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for name, problems, sections in runs:
        body.append(f"<h2>{html.escape(name)}</h2>")
        body += [f"<p class=\"problem\">{html.escape(p)}</p>" for p in problems]
        body += [render_section(s) for s in sections]
    if extra:
        body.append("<h2>All runs</h2>")
        body += [render_section(s) for s in extra]
    body.append(f"<p class=\"skipped\">{html.escape(footer)}</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
