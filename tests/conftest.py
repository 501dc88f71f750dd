"""Shared test setup.

Triton has no CPU backend: without a GPU the kernels run under the Triton interpreter, which
must be switched on before any kernel module is imported — hence at the top of conftest.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Tests never touch the network: fail fast instead of retrying hub requests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`train.py fit --config configs/tiny.yaml` once per session: (the CLI, its run directory)."""
    from train import cli_main

    repo = Path(__file__).resolve().parents[1]
    workdir = tmp_path_factory.mktemp("tiny")
    old, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(workdir)
    torch.set_num_threads(1)  # a toy model gains nothing from a second thread on a busy machine
    try:
        cli = cli_main(["fit", "--config", str(repo / "configs/tiny.yaml"), "--trainer.enable_progress_bar=false"])
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)
    return cli, workdir / "runs/tiny/version_0"
