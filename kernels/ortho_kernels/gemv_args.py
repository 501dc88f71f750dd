"""Argument checks of the CPU GEMV's Python boundary (`ortho_kernels.cpu_gemv`).

The C kernel reads raw pointers with the sizes it is told: a tensor of the wrong shape,
dtype, layout or device would be read out of bounds, not refused. Every argument is checked
here, against the layout of the C file's header:

    qweight uint8 (N, ceil(K/2))     scales, zeros fp16 (N, G), G = ceil(K / group_size)
    crow int32 (N+1), col int32 (nnz), values fp16 (nnz)     X (M, K) -> Y fp32 (M, N)

all contiguous CPU tensors (X may be any floating dtype and layout: it is converted to
contiguous fp32 before the call). The CSR's structure is checked in O(1) (crow[0] = 0,
crow[N] = nnz); its column indices are `OrthoStream`'s, validated when it was built. Sizes
must fit the kernel's C `int`. Errors: TypeError for a wrong kind of value, ValueError for a
wrong size or place, each naming the argument.
"""
from __future__ import annotations

import ctypes
import numbers

import torch

INT_MAX = 2**31 - 1  # the kernel's sizes are C ints
GEMV_GROUP_MULTIPLE = 64  # the GEMV's superblock: a group holds whole 64-weight superblocks


def _int(name: str, value, low: int = 0) -> int:
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not low <= value <= INT_MAX:
        raise ValueError(f"{name}={value} must be in [{low}, {INT_MAX}]")
    return int(value)


def _tensor(name: str, t, dtype: torch.dtype | None, shape: tuple[int, ...] | None,
            contiguous: bool = True) -> torch.Tensor:
    """`t` is a CPU tensor of `dtype` (None: any floating dtype) and `shape`."""
    if type(t) is not torch.Tensor and not isinstance(t, torch.Tensor):  # the first test is the fast one
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cpu:  # (t.device costs microseconds per call, is_cpu nanoseconds: this runs per decode step)
        raise ValueError(f"{name} is on {t.device}: the CPU GEMV reads CPU tensors only")
    if t.layout is not torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if dtype is None and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if dtype is not None and t.dtype is not dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() once, when the stream is built)")
    return t


def check_base(qweight, scales, zeros, k, group_size) -> tuple[int, int]:
    """The INT4 base's buffers for K = `k` inputs: returns (N, K)."""
    k = _int("k", k, low=1)
    group_size = _int("group_size", group_size, low=1)
    _tensor("qweight", qweight, torch.uint8, None, contiguous=False)
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D (N, ceil(K/2)), got shape {tuple(qweight.shape)}")
    n = _int("N (qweight rows)", qweight.shape[0], low=1)
    _tensor("qweight", qweight, torch.uint8, (n, (k + 1) // 2))  # two codes per byte
    groups = -(-k // group_size)  # G = ceil(K / group_size)
    _tensor("scales", scales, torch.float16, (n, groups))
    _tensor("zeros", zeros, torch.float16, (n, groups))
    return n, k


def check_csr(csr, n: int) -> None:
    """(crow int32 (N+1), col int32 (nnz), values fp16 (nnz)) of an N-row ortho stream."""
    if not isinstance(csr, (tuple, list)) or len(csr) != 3:
        raise TypeError("csr must be a tuple (crow, col, values), got "
                        f"{type(csr).__name__}{f' of {len(csr)}' if isinstance(csr, (tuple, list)) else ''}")
    crow, col, values = csr
    _tensor("csr crow", crow, torch.int32, (n + 1,))
    _tensor("csr col", col, torch.int32, None, contiguous=False)
    if col.dim() != 1:
        raise ValueError(f"csr col must be 1-D (nnz,), got shape {tuple(col.shape)}")
    nnz = col.shape[0]
    _tensor("csr col", col, torch.int32, (nnz,))
    _tensor("csr values", values, torch.float16, (nnz,))
    # crow[0], crow[N] read in place (checked above: contiguous int32 CPU, N+1 long); indexing
    # the tensor would cost ~10 µs per decode step
    first = ctypes.c_int32.from_address(crow.data_ptr()).value
    last = ctypes.c_int32.from_address(crow.data_ptr() + 4 * n).value
    if first != 0 or last != nnz:
        raise ValueError(f"csr crow must run from 0 to nnz={nnz}, got crow[0]={first}, crow[N]={last}")


def check_gemv(qweight, scales, zeros, k, group_size, x2d, csr, alpha) -> None:
    """Every argument of `cpu_gemv.gemv`; raises TypeError/ValueError naming the first bad one."""
    check_gemv_base(qweight, scales, zeros, k, group_size)
    check_gemv_inputs(qweight.shape[0], k, x2d, csr, alpha)


def check_gemv_base(qweight, scales, zeros, k, group_size) -> None:
    """The base's part of `check_gemv`: once per base for a caller that keeps its buffers."""
    check_base(qweight, scales, zeros, k, group_size)
    if group_size % GEMV_GROUP_MULTIPLE:
        raise ValueError(f"group_size={group_size} is not a multiple of {GEMV_GROUP_MULTIPLE} (the GEMV's superblock)")


def check_gemv_inputs(n: int, k: int, x2d, csr, alpha) -> None:
    """The per-call part of `check_gemv`: X (M, K), the CSR of an N-row stream, α."""
    _tensor("x2d", x2d, None, None, contiguous=False)
    if x2d.dim() != 2:
        raise ValueError(f"x2d must be 2-D (M, K={k}), got shape {tuple(x2d.shape)}")
    m = _int("M (x2d rows)", x2d.shape[0], low=1)
    _tensor("x2d", x2d, None, (m, k), contiguous=False)  # converted to contiguous fp32 by the caller
    if csr is not None:
        check_csr(csr, n)
    if type(alpha) is not float and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__} {alpha!r}")


def check_dequantise(qweight, scales, zeros, k, group_size, n0, n1, out) -> None:
    """Every argument of `cpu_gemv.dequantise_rows`: rows 0 <= n0 <= n1 <= N into `out`
    contiguous fp32 (n1 - n0, K); any group size."""
    n, k = check_base(qweight, scales, zeros, k, group_size)
    n0, n1 = _int("n0", n0), _int("n1", n1)
    if not n0 <= n1 <= n:
        raise ValueError(f"rows [n0, n1) = [{n0}, {n1}) are not inside the base's {n} rows")
    _tensor("out", out, torch.float32, (n1 - n0, k))
