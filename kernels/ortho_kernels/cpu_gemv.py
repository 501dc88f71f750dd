"""ortho-train's own fused INT4 + CSR GEMV for small M on x86-64 CPUs (AVX2/FMA/F16C).

torch's CPU INT4 op (`aten._weight_int4pack_mm_for_cpu`) is a GEMM: at M = 1 on a 2-core
AVX2 machine it reaches about 3.3x fp32 `nn.Linear`, 3x above the memory floor. Decoding is a
GEMV, so this module compiles `_cpu_int4_gemv.c` (once per source version, with the system C
compiler, cached under $ORTHO_TRAIN_CACHE or ~/.cache/ortho_train) and calls it through
ctypes on ortho-train's own storage in place: packed codes, fp16 scales/zeros, and the CSR of
the ortho stream added into the same accumulator (one pass, no second launch). The dense
K-loop is integer (vpmaddwd of the nibbles with X in 16-bit fixed point per 64 elements);
see the C file's header for the layout. Rows run on `_cpu_pool.c`, a thread pool that never
spins and hands out small chunks, so a thread that loses its core to another process delays
the call by at most one chunk (OpenMP's static split waited for it: 10x slower under load).

`library()` returns the loaded library or a string saying why it is unavailable (no compiler,
no AVX2, not x86-64); callers fall back to torch's op then. Numerics: X rounded to 16-bit
fixed point per 64-element block (error <= 2^-16 of the block's largest |x|, 256x finer
than the bf16 activations of torch's op), exact int32 products, fp16 scales and zeros widened
exactly, fp32 accumulation; the ragged K tail and the sparse term use fp32 X.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_cpu_int4_gemv.c")
SOURCES = (SOURCE, SOURCE.with_name("_cpu_pool.c"), SOURCE.with_name("_cpu_pool.h"))
# -fopenmp only for the OpenMP variant the benchmark compares against; the op uses the pool
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-pthread", "-fPIC", "-shared"]
MAX_M = 8  # above this torch's GEMM-shaped op is faster (see `python benchmarks/dual_stream_op.py`)

_LIB: ctypes.CDLL | str | None = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    root = os.environ.get("ORTHO_TRAIN_CACHE") or Path.home() / ".cache" / "ortho_train"
    return Path(root)


def _build(target: Path, compiler: str) -> None:
    """Compile to a temporary file, then rename: concurrent processes never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *CFLAGS, *(str(p) for p in SOURCES[:2]), "-o", tmp],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip()[-2000:])
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | str:
    if os.environ.get("ORTHO_TRAIN_NO_GEMV") == "1":
        return "disabled by ORTHO_TRAIN_NO_GEMV=1"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"machine {platform.machine()} is not x86-64"
    missing = {"avx2", "fma", "f16c"} - _cpu_flags()
    if missing:
        return f"CPU lacks {sorted(missing)}"
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return "no C compiler (gcc/cc) on PATH"
    text = b"".join(p.read_bytes() for p in SOURCES) + " ".join(CFLAGS).encode()
    digest = hashlib.sha256(text).hexdigest()[:16]
    target = _cache_dir() / f"cpu_int4_gemv-{digest}.so"
    try:
        if not target.exists():
            _build(target, compiler)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as err:
        return f"building {SOURCE.name} failed: {err}"
    for fn in (lib.ortho_int4_gemv, lib.ortho_int4_gemv_omp):
        fn.restype = ctypes.c_int
        fn.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int] * 4 + [ctypes.c_void_p] * 5
                       + [ctypes.c_float, ctypes.c_int])
    lib.ortho_int4_dequant.restype = None
    lib.ortho_int4_dequant.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4 + [
        ctypes.c_void_p, ctypes.c_int]
    lib.pool_workers.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | str:
    """The compiled kernel (built on first use), or why it is unavailable."""
    global _LIB
    if _LIB is None:
        _LIB = _load()
    return _LIB


def unsupported(bits: int, group_size: int) -> str | None:
    """Why the GEMV cannot take a base with these parameters, or None."""
    if bits != 4:
        return f"bits={bits}: the GEMV is INT4-only"
    if group_size % 64:
        return f"group_size={group_size} is not a multiple of 64"
    lib = library()
    return lib if isinstance(lib, str) else None


def gemv(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int,
         group_size: int, x2d: torch.Tensor, csr: tuple | None = None,
         alpha: float = 0.0) -> torch.Tensor:
    """Y = X · dequant(base)ᵀ (+ α · X · orthoᵀ if `csr`) for fp32 X (M, K) -> fp32 (M, N).

    qweight uint8 (N, ceil(K/2)), scales/zeros fp16 (N, G) as `QuantisedBase` stores them,
    csr = (crow int32 (N+1), col int32 (nnz), values fp16 (nnz)). No checks here beyond the
    dtype of X: the caller (`ortho_kernels.dual_stream`) validated the streams once.
    """
    lib = library()
    if isinstance(lib, str):
        raise RuntimeError(f"CPU GEMV unavailable: {lib}")
    if x2d.dtype is not torch.float32:
        x2d = x2d.float()
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    m, n = x2d.shape[0], qweight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if csr is None:
        crow = col = val = None
    else:
        crow, col, val = csr[0].data_ptr(), csr[1].data_ptr(), csr[2].data_ptr()
    rc = lib.ortho_int4_gemv(qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), m, n, k,
                             group_size, x2d.data_ptr(), y.data_ptr(), crow, col, val, alpha,
                             torch.get_num_threads())
    if rc:
        raise MemoryError("ortho_int4_gemv: workspace allocation failed")
    return y


def dequantise_rows(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int,
                    group_size: int, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
    """Dense fp32 rows [n0, n1) of dequant(base) into `out` (contiguous fp32, n1-n0 by K).

    Bit for bit `QuantisedBase.dequantise()[n0:n1]` ((q - z) * s is exact in fp32); any
    group size, on the pool's threads. Returns `out`.
    """
    lib = library()
    if isinstance(lib, str):
        raise RuntimeError(f"CPU GEMV unavailable: {lib}")
    lib.ortho_int4_dequant(qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), n0, n1, k,
                           group_size, out.data_ptr(), torch.get_num_threads())
    return out
