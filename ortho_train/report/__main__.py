"""`python -m ortho_train.report RUN_DIR [RUN_DIR ...] [-o report.html]`: the HTML report."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display is ever opened

from ortho_train.report.build import build_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ortho_train.report", description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (runs/<name>/version_N)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="output file (default: report.html in the run directory when there is one "
                             "run, else ./report.html)")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    out = args.output or (args.run_dirs[0] / "report.html" if len(args.run_dirs) == 1 else Path("report.html"))
    start = time.perf_counter()
    try:
        path = build_report(args.run_dirs, out)
    except OSError as err:  # the output cannot be written: say where and why, in one line
        print(f"error: the report cannot be written to {out}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"report written to {path} ({path.stat().st_size / 1024:.0f} KiB, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
