"""`torch.ops.ortho_kernels.int4_gemv`: the CPU GEMV (`ortho_kernels.cpu_gemv`) as a registered
torch operator, so that a `torch.compile`d decode step (`ortho_train.sieve.fast_decode`) keeps
it as one opaque node instead of breaking its graph at a ctypes call.

    y = torch.ops.ortho_kernels.int4_gemv(x, qweight, scales, zeros, crow, col, values,
                                          k, group_size, alpha, mode)   # (M, K) -> fp32 (M, N)

Y = X · dequant(W_base)ᵀ + α · X · W_orthoᵀ (the CSR triple may be None: base only), with X
rounded per `mode` (`cpu_gemv.gemv_mode`: 0 int16, 1/2 int8). The fake (meta) kernel gives the
output's shape for tracing; the CPU kernel checks every argument as `cpu_gemv.gemv` does.
The op is functional (no argument is mutated), so the compiler may reorder it freely.
"""
from __future__ import annotations

import torch

from ortho_kernels import cpu_gemv

NAMESPACE, NAME = "ortho_kernels", "int4_gemv"
SCHEMA = (f"{NAME}(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? crow, "
          "Tensor? col, Tensor? values, int k, int group_size, float alpha, int mode) -> Tensor")


def _cpu_kernel(x, qweight, scales, zeros, crow, col, values, k, group_size, alpha, mode):
    csr = None if crow is None else (crow, col, values)
    return cpu_gemv.gemv(qweight, scales, zeros, k, group_size, x, csr, alpha, mode=mode)


def _fake_kernel(x, qweight, scales, zeros, crow, col, values, k, group_size, alpha, mode):
    return x.new_empty((x.shape[0], qweight.shape[0]), dtype=torch.float32)  # (M, N)


def _register() -> torch.library.Library | None:
    """Defines the op once per process (a second import of this file under another module
    name must not define it again)."""
    if hasattr(getattr(torch.ops, NAMESPACE), NAME):
        return None
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    lib.define(SCHEMA)
    lib.impl(NAME, _cpu_kernel, "CPU")
    torch.library.register_fake(f"{NAMESPACE}::{NAME}", _fake_kernel, lib=lib)
    return lib


_LIBRARY = _register()  # kept alive: dropping the Library object would unregister the op
int4_gemv = getattr(getattr(torch.ops, NAMESPACE), NAME).default
