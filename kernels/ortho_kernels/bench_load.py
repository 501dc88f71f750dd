"""Competing CPU load for `python -m ortho_kernels.bench --load N`: N busy-loop processes.

Each process spins in pure Python (no memory traffic to speak of: it takes a core, as a
data loader or another job would) and ends by itself after `seconds`, so a benchmark that
dies cannot leave them behind for long; the context manager also kills them on exit.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time

_SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def busy_load(n: int, seconds: float = 1800.0):
    """Run `n` busy-loop processes (bounded by `seconds`) for the duration of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN.format(seconds=seconds)])
             for _ in range(n)]
    try:
        if procs:
            time.sleep(0.5)  # let them start spinning before anything is timed
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
