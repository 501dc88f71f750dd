"""Progress a log file can hold: one line per phase or every half minute of training, with the
process's peak resident memory, for runs whose output is not a terminal (nohup, Slurm, CI), where the
rich progress bar draws nothing.

    [train] step 24/60 · 21.4 s/step · loss 3.49 · peak RSS 6.3 GiB
    [isolation set-up] done in 212 s · peak RSS 6.1 GiB
"""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Mapping

from lightning.pytorch.utilities import rank_zero_only

PRINT_EVERY_S = 30.0


def peak_rss_gib() -> float:
    """The process's peak resident set size so far, GiB (Linux reports `ru_maxrss` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def is_terminal() -> bool:
    return sys.stdout.isatty()


@rank_zero_only
def emit(line: str) -> None:
    print(line, flush=True)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Print `[name] …` on entry and its seconds and the peak RSS on exit."""
    emit(f"[{name}] …")
    start = time.perf_counter()
    yield
    emit(f"[{name}] done in {time.perf_counter() - start:.0f} s · peak RSS {peak_rss_gib():.1f} GiB")


class TrainingLines:
    """Training progress as lines: at most one per `every_s` seconds, and one at the last step."""

    def __init__(self, every_s: float = PRINT_EVERY_S):
        self.every_s = every_s
        self._start: tuple[float, int] | None = None  # (time, step) of the first batch seen
        self._last_print: float | None = None  # the first update always prints

    def update(self, step: int, max_steps: int, metrics: Mapping[str, float]) -> None:
        now = time.perf_counter()
        if self._start is None:
            self._start = (now, step - 1)
        if self._last_print is not None and now - self._last_print < self.every_s and step < max_steps:
            return
        self._last_print = now
        seconds_per_step = (now - self._start[0]) / max(step - self._start[1], 1)
        loss = next((float(v) for k, v in metrics.items() if k.startswith("train/loss") or k == "loss"), None)
        loss_text = "" if loss is None else f" · loss {loss:.3g}"
        total = f"/{max_steps}" if max_steps > 0 else ""
        emit(f"[train] step {step}{total} · {seconds_per_step:.1f} s/step{loss_text} · "
             f"peak RSS {peak_rss_gib():.1f} GiB")
