"""Competing CPU load for the benchmarks' `--load N` (`dual_stream_op.py`, `cpu_threads.py`, `sieve_generate.py`):
N busy-loop processes.

    python benchmarks/busy_load.py --processes 2 --seconds 60     # load the machine by hand

Each process spins in pure Python (no memory traffic to speak of: it takes a core, as a
data loader or another job would) and ends by itself after `seconds`, so a benchmark that
dies cannot leave them behind for long; the context manager also kills them on exit.
"""
from __future__ import annotations

import argparse
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=1, help="busy-loop processes")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long they spin")
    args = parser.parse_args(argv)
    with busy_load(args.processes, args.seconds):
        time.sleep(args.seconds)


if __name__ == "__main__":
    main()
