"""`train.py fit` inside the test's own process: one interpreter start-up (~12 s of imports on a
2-core machine) less than a subprocess, for runs that need no launch of their own (one rank, not
killed). Working directory, thread count, environment and process group are restored after, so
the rank and run-directory variables Lightning and train.py set do not reach later tests."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def fit_in_this_process(workdir: Path, *args: str) -> None:
    """`cli_main(["fit", *args])` in `workdir` with one thread (as OMP_NUM_THREADS=1 in a subprocess)."""
    from train import cli_main

    workdir.mkdir(parents=True, exist_ok=True)
    environ, cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    os.chdir(workdir)
    torch.set_num_threads(1)
    try:
        cli_main(["fit", *args])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.chdir(cwd)
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)
