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

`library()` returns the loaded library or a string saying why it is unavailable (disabled, not
Linux, not x86-64, no AVX2/FMA/F16C, no compiler, or the build error with the tail of the
compiler's stderr); callers fall back to torch's op then. The library is built without
`-fopenmp`; `omp_library()` builds the OpenMP comparison variant separately, for the benchmark
only. `gemv` and `dequantise_rows` check every argument (`ortho_kernels.gemv_args`) before
the C code sees a raw pointer. Numerics: X rounded to 16-bit
fixed point per 64-element block (error <= 2^-16 of the block's largest |x|, 256x finer
than the bf16 activations of torch's op), exact int32 products, fp16 scales and zeros widened
exactly, fp32 accumulation; the ragged K tail and the sparse term use fp32 X.
`gemv(..., activations="int8")` rounds X to int8 per 64-element block instead (llama.cpp's
Q8 activations: error <= 2^-8 of the block's largest |x|, `error_bounds` "gemv_int8"), dotted
with the codes by AVX-512 VNNI where the CPU has it (`int8_isa`), else AVX2 vpmaddubsw; the
int16 path stays the default.
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

from ortho_kernels.gemv_args import check_dequantise, check_gemv, check_gemv_inputs

SOURCE = Path(__file__).with_name("_cpu_int4_gemv.c")
SOURCES = (SOURCE, SOURCE.with_name("_cpu_pool.c"), SOURCE.with_name("_cpu_q8_dot.c"),
           SOURCE.with_name("_cpu_pool.h"), SOURCE.with_name("_cpu_q8_dot.h"))
ACTIVATIONS = ("int16", "int8")  # X's rounding in the GEMV (module docstring)
VNNI_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
NARROW_CAPABILITIES = ("default", "avx2")  # ATEN_CPU_CAPABILITY values that ask for <= AVX2 code
# The op's library: no OpenMP runtime (its rows run on _cpu_pool.c), so it builds with any C
# compiler and never loads a second OpenMP runtime beside torch's.
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-pthread", "-fPIC", "-shared"]
# The benchmark's comparison variant (`ortho_int4_gemv_omp`), built only when asked for.
OMP_CFLAGS = [*CFLAGS, "-fopenmp"]
MAX_M = 8  # above this torch's GEMM-shaped op is faster (see `python benchmarks/dual_stream_op.py`)
STDERR_TAIL = 2000  # characters of the compiler's stderr kept in a build failure's reason

_LIB: ctypes.CDLL | str | None = None
_OMP_LIB: ctypes.CDLL | str | None = None
_GEMV_ARGTYPES = ([ctypes.c_void_p] * 3 + [ctypes.c_int] * 4 + [ctypes.c_void_p] * 5
                  + [ctypes.c_float, ctypes.c_int])


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None when it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


def _cache_dir() -> Path:
    root = os.environ.get("ORTHO_TRAIN_CACHE") or Path.home() / ".cache" / "ortho_train"
    return Path(root)


def _compiler() -> str | None:
    """$CC when it names a program on PATH (or a path to one), else gcc or cc; None: none."""
    given = os.environ.get("CC")
    if given:
        return shutil.which(given)
    return shutil.which("gcc") or shutil.which("cc")


def platform_reason() -> str | None:
    """Why this host cannot run the kernel at all (before any compiler is looked for), or None.

    The thread pool waits on Linux futexes, the kernel is x86-64 AVX2/FMA/F16C code."""
    if os.environ.get("ORTHO_TRAIN_NO_GEMV") == "1":
        return "disabled by ORTHO_TRAIN_NO_GEMV=1"
    if platform.system() != "Linux":
        return f"not Linux ({platform.system() or 'unknown OS'}): the thread pool uses Linux futexes"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"machine {platform.machine()} is not x86-64"
    flags = _cpu_flags()
    if flags is None:
        return "the CPU's flags cannot be read from /proc/cpuinfo"
    missing = {"avx2", "fma", "f16c"} - flags
    if missing:
        return f"CPU lacks {sorted(missing)}"
    return None


def _build(target: Path, compiler: str, flags: list[str]) -> None:
    """Compile to a temporary file, then rename: concurrent processes never see half a file.
    Raises RuntimeError with the compiler's exit status and the tail of its stderr."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        sources = [str(p) for p in SOURCES if p.suffix == ".c"]
        proc = subprocess.run([compiler, *flags, *sources, "-o", tmp],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip()[-STDERR_TAIL:] or "(no output on stderr)"
            raise RuntimeError(f"{compiler} exited with status {proc.returncode}: {tail}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile(flags: list[str], stem: str) -> ctypes.CDLL | str:
    """The sources built with `flags` (cached by content), loaded; or why not."""
    reason = platform_reason()
    if reason is not None:
        return reason
    compiler = _compiler()
    if compiler is None:
        given = os.environ.get("CC")
        return f"no C compiler: CC={given!r} is not on PATH" if given else "no C compiler (gcc/cc) on PATH"
    text = b"".join(p.read_bytes() for p in SOURCES) + " ".join(flags).encode()
    target = _cache_dir() / f"{stem}-{hashlib.sha256(text).hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _build(target, compiler, flags)
        return ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as err:
        return f"building {SOURCE.name} failed: {err}"


def _load() -> ctypes.CDLL | str:
    lib = _compile(CFLAGS, "cpu_int4_gemv")
    if isinstance(lib, str):
        return lib
    lib.ortho_int4_gemv.restype = ctypes.c_int
    lib.ortho_int4_gemv.argtypes = _GEMV_ARGTYPES
    lib.ortho_int4_gemv_mode.restype = ctypes.c_int
    lib.ortho_int4_gemv_mode.argtypes = [*_GEMV_ARGTYPES, ctypes.c_int]
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


def omp_library() -> ctypes.CDLL | str:
    """The OpenMP comparison build (`ortho_int4_gemv_omp`: rows split by an OpenMP static
    schedule), compiled on the first call only, or why it is unavailable (e.g. a compiler
    without OpenMP support: the build error's stderr tail). Only the benchmark asks for it."""
    global _OMP_LIB
    if _OMP_LIB is None:
        lib = _compile(OMP_CFLAGS, "cpu_int4_gemv_omp")
        if not isinstance(lib, str) and not hasattr(lib, "ortho_int4_gemv_omp"):
            lib = "the compiler took -fopenmp but did not define _OPENMP: no OpenMP variant built"
        if not isinstance(lib, str):
            lib.ortho_int4_gemv_omp.restype = ctypes.c_int
            lib.ortho_int4_gemv_omp.argtypes = _GEMV_ARGTYPES
        _OMP_LIB = lib
    return _OMP_LIB


def int8_isa() -> str:
    """The int8-activation dot's instructions: "vnni" (AVX-512 VNNI vpdpbusd) where the CPU has
    avx512_vnni/bw/vl and ATEN_CPU_CAPABILITY does not ask for narrower code ("default",
    "avx2"), else "avx2" (vpmaddubsw). Both give the same int32 sums, hence the same output."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in NARROW_CAPABILITIES:
        return "avx2"
    return "vnni" if VNNI_FLAGS <= (_cpu_flags() or set()) else "avx2"


def gemv_mode(activations: str, isa: str | None = None) -> int:
    """The C kernel's mode: 0 int16 X; int8 X with 1 AVX2 or 2 VNNI (`isa`, default `int8_isa()`)."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if activations == "int16":
        return 0
    isa = int8_isa() if isa is None else isa
    if isa not in ("avx2", "vnni"):
        raise ValueError(f"isa must be 'avx2' or 'vnni', got {isa!r}")
    return 2 if isa == "vnni" else 1


def unsupported(bits: int, group_size: int) -> str | None:
    """Why the GEMV cannot take a base with these parameters, or None."""
    if bits != 4:
        return f"bits={bits}: the GEMV is INT4-only"
    if group_size % 64:
        return f"group_size={group_size} is not a multiple of 64"
    lib = library()
    return lib if isinstance(lib, str) else None


def _ready_library() -> ctypes.CDLL:
    lib = library()
    if isinstance(lib, str):
        raise RuntimeError(f"CPU GEMV unavailable: {lib}")
    return lib


def gemv(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int,
         group_size: int, x2d: torch.Tensor, csr: tuple | None = None,
         alpha: float = 0.0, base_checked: bool = False, mode: int = 0) -> torch.Tensor:
    """Y = X · dequant(base)ᵀ (+ α · X · orthoᵀ if `csr`) for X (M, K) -> fp32 (M, N).

    qweight uint8 (N, ceil(K/2)), scales/zeros fp16 (N, G) as `QuantisedBase` stores them,
    csr = (crow int32 (N+1), col int32 (nnz), values fp16 (nnz)), all contiguous CPU tensors;
    X floating point on the CPU (converted to contiguous fp32 here). Every argument is checked
    (`gemv_args.check_gemv`: a ValueError/TypeError naming it) before a pointer reaches C.
    `base_checked=True`: the caller ran `gemv_args.check_gemv_base` on these very buffers when
    it took them (`dual_stream.CpuInt4Runtime`); X, the CSR and α are still checked per call.
    `mode` (`gemv_mode`): 0 X rounded to int16 (the default), 1/2 to int8 (AVX2/VNNI).
    """
    lib = _ready_library()
    if base_checked:
        check_gemv_inputs(qweight.shape[0], k, x2d, csr, alpha)
    else:
        check_gemv(qweight, scales, zeros, k, group_size, x2d, csr, alpha)
    if x2d.dtype is not torch.float32:
        x2d = x2d.float()
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    m, n = x2d.shape[0], qweight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)  # (M, N)
    if csr is None:
        crow = col = val = None
    else:
        crow, col, val = csr[0].data_ptr(), csr[1].data_ptr(), csr[2].data_ptr()
    if mode not in (0, 1, 2):
        raise ValueError(f"mode must be 0, 1 or 2 (cpu_gemv.gemv_mode), got {mode!r}")
    if mode == 2 and int8_isa() != "vnni":
        raise ValueError("mode=2 (AVX-512 VNNI) on a CPU without avx512_vnni/bw/vl")
    rc = lib.ortho_int4_gemv_mode(qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), m, n,
                                  k, group_size, x2d.data_ptr(), y.data_ptr(), crow, col, val,
                                  alpha, torch.get_num_threads(), mode)
    if rc:
        raise MemoryError("ortho_int4_gemv: workspace allocation failed")
    return y


def dequantise_rows(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int,
                    group_size: int, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
    """Dense fp32 rows [n0, n1) of dequant(base) into `out` (contiguous fp32, n1-n0 by K).

    Bit for bit `QuantisedBase.dequantise()[n0:n1]` ((q - z) * s is exact in fp32); any
    group size, on the pool's threads. Arguments checked as `gemv`'s. Returns `out`.
    """
    lib = _ready_library()
    check_dequantise(qweight, scales, zeros, k, group_size, n0, n1, out)
    lib.ortho_int4_dequant(qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), n0, n1, k,
                           group_size, out.data_ptr(), torch.get_num_threads())
    return out
