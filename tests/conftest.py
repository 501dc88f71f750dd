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
