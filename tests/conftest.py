"""Shared test setup.

Triton has no CPU backend: without a GPU the kernels run under the Triton interpreter, which
must be switched on before any kernel module is imported — hence at the top of conftest.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Tests never touch the network: fail fast instead of retrying hub requests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# Test modules whose results depend on the CPU's vector kernels (matmuls, reductions, packing).
# CI runs them a second time under a non-native ATEN_CPU_CAPABILITY (README, line 2), so a test
# that needs two float orders to agree bit for bit fails here, not on a user's machine.
NUMERICS_MODULES = ("tests/kernels/", *(f"tests/ortho_train/test_{name}" for name in (
    "quantisation_", "sieve_core", "sieve_isolation", "ortho_linear", "metrics_", "unlearn_ptq",
    "unlearn_losses", "curvature", "mia_exchangeable")))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(NUMERICS_MODULES):
            item.add_marker("numerics")
