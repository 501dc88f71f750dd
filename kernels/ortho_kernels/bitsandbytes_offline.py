"""Import bitsandbytes without letting it fetch code from the Hugging Face hub.

On a CPU with AVX512-BF16, `import bitsandbytes` (0.50) asks Hugging Face's `kernels` package
for a 4-bit GEMM from the hub (`get_kernel("kernels-community/quantization-bitsandbytes")`) and,
when that fails, logs "Failed to load CPU gemm_4bit_forward from kernels-community …". The
toolkit never runs code downloaded at run time, so `import_bitsandbytes` imports the library
with `kernels.get_kernel` refusing for the duration of the import: no request is sent and no
cached hub code is loaded. bitsandbytes then uses its own shipped CPU kernels (the toolkit's
4-bit copies are checked against the format's exact definition anyway, see
`ortho_train.quantisation.bnb4_exact`), and the warning about the refused download is dropped.
Every import of bitsandbytes in the toolkit and its tests goes through here.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from types import ModuleType

HUB_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


class RefusedHubKernel(RuntimeError):
    """Raised in place of a hub download of kernel code."""


def refuse_hub_kernel(repo_id: str, *args, **kwargs):
    raise RefusedHubKernel(f"ortho-train runs no code from the hub (asked for {repo_id!r})")


class DropRefusedDownloadWarning(logging.Filter):
    """Drops bitsandbytes' warning about the refused kernel download; keeps every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(HUB_KERNEL_WARNING)


@contextlib.contextmanager
def hub_kernels_refused():
    """`kernels.get_kernel` raises `RefusedHubKernel` inside the block (when `kernels` is installed)."""
    try:
        import kernels as hub_kernels
    except ImportError:
        hub_kernels = None
    original = getattr(hub_kernels, "get_kernel", None)
    if original is not None:
        hub_kernels.get_kernel = refuse_hub_kernel
    try:
        yield
    finally:
        if original is not None:
            hub_kernels.get_kernel = original


def import_bitsandbytes() -> ModuleType:
    """The `bitsandbytes` module, imported (once) with hub kernels refused and that warning dropped."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    logger = logging.getLogger(HUB_KERNEL_LOGGER)
    quiet = DropRefusedDownloadWarning()
    logger.addFilter(quiet)
    try:
        with hub_kernels_refused():
            import bitsandbytes
    finally:
        logger.removeFilter(quiet)
    return bitsandbytes
