"""What each table row cost: its wall-clock seconds and the process's peak RSS, plus a progress line.

A table announces the row it is computing (`RowMeter.stage`, one line on stderr such as
`[sieve table] row 3/18: posthoc ρ=0.05 — sieving`) and hands the finished row to
`RowMeter.record`, which adds
- `seconds`: wall time since the previous row was recorded (or the meter started), so building
  the row's model (quantising, sieving, noising) counts with its evaluation;
- `peak_rss_mib`: `resource.getrusage(RUSAGE_SELF).ru_maxrss` at that moment (kibibytes on
  Linux, bytes on macOS), the high-water mark of the whole process so far: it only grows, and
  a row that raises it is the row that needed the memory.
"""
from __future__ import annotations

import resource
import sys
import time
from typing import TextIO


def peak_rss_mib() -> float:
    """The process's peak resident set size so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class RowMeter:
    """Times and sizes the rows of one table; prints a progress line per stage on `stream`.

    Args:
        title: the table's name in the progress lines (`[<title>] row i/n: …`).
        total: rows the table expects (None: unknown, lines say `row i`).
        stream: where progress lines go (default stderr, so stdout keeps the tables).
    """

    def __init__(self, title: str, total: int | None = None, stream: TextIO | None = None):
        self.title, self.total, self.stream = title, total, stream
        self.rows: list[dict] = []
        self._last = time.perf_counter()

    def stage(self, what: str) -> None:
        """Say which row comes next and what it is computing."""
        n = len(self.rows) + 1
        of = f"/{self.total}" if self.total else ""
        print(f"[{self.title}] row {n}{of}: {what}", file=self.stream or sys.stderr, flush=True)

    def record(self, row: dict) -> dict:
        """Add `seconds` and `peak_rss_mib` to `row` (in place) and keep it for `note`."""
        now = time.perf_counter()
        row["seconds"], row["peak_rss_mib"] = round(now - self._last, 2), peak_rss_mib()
        self._last = now
        self.rows.append(row)
        return row

    def note(self, label=lambda row: str(len(row))) -> str:
        """One markdown note: seconds and peak RSS of every row, labelled by `label(row)`."""
        cells = [f"{i} {label(r)} {r['seconds']:.1f} s / {r['peak_rss_mib']:.0f} MiB"
                 for i, r in enumerate(self.rows, 1)]
        return "time and peak RSS per row (seconds since the row before; process high-water mark): " + "; ".join(cells)
