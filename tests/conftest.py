"""Shared test setup.

Triton has no CPU backend: without a GPU the kernels run under the Triton interpreter, which
must be switched on before any kernel module is imported — hence at the top of conftest.
"""
import os
from pathlib import Path

import pytest
import torch

import ortho_train  # noqa: F401

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`-n N`) the N workers share the cores: each takes its share of threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))

# Tests never touch the network: fail fast instead of retrying hub requests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# Test modules whose results depend on the CPU's vector kernels (matmuls, reductions, packing).
# CI runs them a second time under a non-native ATEN_CPU_CAPABILITY (README, line 2), so a test
# that needs two float orders to agree bit for bit fails here, not on a user's machine.
NUMERICS_MODULES = ("tests/kernels/", *(f"tests/ortho_train/test_{name}" for name in (
    "quantisation_", "sieve_core", "sieve_isolation", "ortho_linear", "metrics_", "unlearn_ptq",
    "unlearn_losses", "curvature", "mia_exchangeable")))


# Tests that start train.py in child processes or train a model for several seconds. Under
# pytest-xdist (`-n 2 --dist worksteal`, README line 2) each worker starts on its half of the
# collection order and an idle worker steals from the end of the other's queue, so these go first:
# last, one of them would keep one worker busy while the other has nothing left to run.
LONG_TESTS = ("tests/test_ddp.py", "tests/test_resume.py", "tests/test_interruption.py", "tests/test_import_names.py",
              "tests/test_run_dirs.py", "tests/test_train_cli.py", "tests/ortho_train/test_threads.py",
              "tests/ortho_train/test_unlearn_module.py", "tests/callbacks/test_adapter_export.py",
              "tests/ortho_train/test_evaluation.py", "tests/ortho_train/test_unlearn_mansu.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(NUMERICS_MODULES):
            item.add_marker("numerics")
    items.sort(key=lambda item: not item.nodeid.startswith(LONG_TESTS))  # stable: same order on every worker


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


@pytest.fixture
def assert_within_path_bound():
    """assert_within_path_bound(y, x, base, ortho, alpha, backend): |y - exact| <= the derived error
    bound of the path `backend` takes for x's rows (`kernels.error_bounds`), elementwise."""
    from ortho_kernels.dual_stream import resolved_path
    from ortho_kernels.error_bounds import path_error_bound, reference_product

    def check(y, x, base, ortho, alpha, backend="cpu", what=""):
        path = resolved_path(base, x.shape[0], backend)
        ratio = ((y.double() - reference_product(x, base, ortho, alpha)).abs()
                 / path_error_bound(path, x, base, ortho, alpha).clamp_min(1e-300)).max().item()
        print(f"{what} [{path}]: max error / bound {ratio:.3f}")
        assert ratio <= 1, f"{what} [{path}]: error {ratio:.3f}x its derived bound"

    return check
