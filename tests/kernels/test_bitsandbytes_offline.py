"""bitsandbytes is imported without fetching code from the hub, and without the warning about it."""
import json
import os
import subprocess
import sys

import pytest

from ortho_kernels import bitsandbytes_offline as offline

PROBE = """
import json
import ortho_kernels.bitsandbytes_offline as offline
calls, refuse = [], offline.refuse_hub_kernel
def counting_refusal(repo_id, *args, **kwargs):
    calls.append(repo_id)
    return refuse(repo_id)
offline.refuse_hub_kernel = counting_refusal
bnb = offline.import_bitsandbytes()
import bitsandbytes.backends.cpu.ops as ops
from bitsandbytes.functional import has_avx512bf16
import kernels
print(json.dumps({"calls": calls, "avx512bf16": bool(has_avx512bf16()),
                  "hub_kernel": getattr(ops, "gemm_4bit_forward_kernel", None) is not None,
                  "restored": kernels.get_kernel is not counting_refusal}))
"""


def test_get_kernel_refused_inside_the_block_and_restored_after():
    hub = pytest.importorskip("kernels")
    original = hub.get_kernel
    with offline.hub_kernels_refused():
        from kernels import get_kernel
        with pytest.raises(offline.RefusedHubKernel, match="no code from the hub"):
            get_kernel("kernels-community/quantization-bitsandbytes", version=1)
    assert hub.get_kernel is original


def test_import_asks_the_hub_for_nothing_and_says_nothing_about_it():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    # On an AVX512-BF16 CPU bitsandbytes asks once, is refused and uses its own kernel; elsewhere it never asks.
    assert out["calls"] == (["kernels-community/quantization-bitsandbytes"] if out["avx512bf16"] else [])
    assert not out["hub_kernel"] and out["restored"]
    assert "gemm_4bit_forward" not in result.stderr and "trust" not in result.stderr


def test_the_filter_drops_only_that_warning():
    keep = offline.DropRefusedDownloadWarning()
    record = lambda msg: __import__("logging").LogRecord("x", 30, "f", 1, msg, None, None)  # noqa: E731
    assert not keep.filter(record(offline.HUB_KERNEL_WARNING + ": refused"))
    assert keep.filter(record("something else went wrong"))
