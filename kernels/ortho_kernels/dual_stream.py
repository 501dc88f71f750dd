"""The dual-stream linear, Y = X · dequant(W_base)ᵀ + α · X · W_orthoᵀ (+ bias).

One signature, three paths (`backend`):
- "reference": dequantise to a dense fp32 (fp64 for fp64 X) weight, add α·ortho, one matmul.
  Exact up to the matmul's rounding; it defines correctness.
- "cpu": for M <= 8 (decoding) ortho-train's fused GEMV (`ortho_kernels.cpu_gemv`: AVX2 C, X
  in 16-bit fixed point per 64 elements, exact int32 products, fp32 accumulation, the ortho
  CSR added in the same pass in fp32, built on first use, threads from a pool that never
  spins); for 8 < M <= 32, or where the GEMV cannot be built, torch's INT4 weight-only CPU
  op (`aten._weight_int4pack_mm_for_cpu`, bf16 activations, bf16 scale/zero, fp32
  accumulation, bf16 output) plus an MKL CSR product in fp32 for the ortho stream; for
  M > 32 (prefill, evaluation batches) the reference's own product, an fp32 matmul with
  dequant(W_base) (+ α·W_ortho): there the matmul is compute-bound and torch's op falls
  behind fp32 (1.3x at M = 128). By default that weight is rebuilt on every call in blocks
  of output rows through one reusable scratch buffer of a few MiB
  (`ortho_kernels.blocked_prefill`: no per-layer copy, each block bit for bit the reference's
  rows, the product within the reference's bound). With `weight_cache=True` it is built once
  and cached instead, bit for bit the reference at every α, at 4 bytes per weight for the
  base and 4 more per ortho stream run at α != 0 (rebuilt when α changes; freed with the
  tensors, or by `clear_cpu_caches()`). The other operands are prepared once and cached
  per base (`ortho_kernels.cpu_runtime`).
- "triton": one Triton launch (`ortho_kernels._triton_dual_stream`), CUDA, or CPU tensors under
  TRITON_INTERPRET=1.
"auto" picks "triton" for CUDA tensors and "cpu" otherwise; when the CPU op cannot take a
base (bits != 4, group size not in {32, 64, 128, 256}, op missing) it warns once with the
reason and uses the reference.

The kill switch: α == 0 or an empty ortho stream is decided here on the host. The ortho
tensors are then not touched at all (no CSR build, no sparse launch, no `HAS_ORTHO` code),
so the result is bit for bit the base-only result even when ortho values are NaN.

Gradients: an `autograd.Function` returns dL/dX = dL/dY · (dequant(W_base) + α·W_ortho) on
every path, computed densely in fp32 (the base and ortho streams are frozen).
"""
from __future__ import annotations

import os
import warnings

import torch

from ortho_kernels import cpu_runtime
from ortho_kernels.blocked_prefill import blocked_product
from ortho_kernels.cpu_runtime import CpuInt4Runtime
from ortho_kernels.streams import OrthoStream, QuantisedBase
from ortho_kernels.tensor_cache import TensorKeyedCache, stamp_of

BACKENDS = ("auto", "reference", "cpu", "triton")
DENSE_MIN_M = 33  # from here the CPU path multiplies by a dense W_eff (blocked or cached; see above)
CPU_GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
_WARNED = cpu_runtime.WARNED  # one set: a reason is warned about once per process


# --------------------------------------------------------------------------- reference
def add_ortho_(w: torch.Tensor, ortho: OrthoStream, alpha: float) -> torch.Tensor:
    """Dense w (N, K) + α·W_ortho: one `index_add_` of the stream's values (as w's dtype) at
    their flat positions, in place when w is contiguous (w is returned), else on a copy."""
    return w.reshape(-1).index_add_(0, ortho.indices.long(), ortho.values.to(w.dtype),
                                    alpha=alpha).reshape(w.shape)  # (N*K,) -> (N, K)


def effective_weight(base: QuantisedBase, ortho: OrthoStream | None, alpha: float,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense dequant(W_base) + α·W_ortho as `dtype` (N, K); the ortho term only if active."""
    w = base.dequantise(dtype)
    return add_ortho_(w, ortho, alpha) if _ortho_active(ortho, alpha) else w


def dual_stream_linear_ref(x2d: torch.Tensor, base: QuantisedBase, ortho: OrthoStream | None,
                           alpha: float) -> torch.Tensor:
    """Reference (M, K) -> (M, N): dense dequantise-and-matmul in fp32 (fp64 for fp64 X)."""
    dtype = torch.float64 if x2d.dtype == torch.float64 else torch.float32
    w = effective_weight(base, ortho, alpha, dtype)  # (N, K)
    return (x2d.to(dtype) @ w.T).to(x2d.dtype)


# --------------------------------------------------------------------------- CPU fast path
def cpu_fast_path_unsupported(base: QuantisedBase) -> str | None:
    """Why torch's CPU INT4 op cannot run this base, or None if it can."""
    if base.bits != 4:
        return f"bits={base.bits}: the CPU op is INT4-only"
    if base.group_size not in CPU_GROUP_SIZES:
        return f"group_size={base.group_size}: the CPU op accepts only {CPU_GROUP_SIZES}"
    if cpu_runtime.CPU_OP is None:
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
    if base.device.type != "cpu":
        return f"base is on {base.device}"
    return None


_CPU_BASE_CACHE = TensorKeyedCache()
_CSR_CACHE = TensorKeyedCache()
_DENSE_EFF_CACHE = TensorKeyedCache()


def clear_cpu_caches() -> None:
    """Drop every cached CPU operand (torch-op layouts, CSRs, dense prefill weights)."""
    _CPU_BASE_CACHE.clear()
    _CSR_CACHE.clear()
    _DENSE_EFF_CACHE.clear()


def _cpu_runtime(base: QuantisedBase) -> CpuInt4Runtime | str:
    """The cached runtime operands of a base, or the reason the CPU op cannot take it."""
    def build():
        reason = cpu_fast_path_unsupported(base)
        return reason if reason is not None else CpuInt4Runtime(base)

    stamp = stamp_of(base.qweight, base.scales, base.zeros) + (
        base.shape, base.group_size, base.bits)
    return _CPU_BASE_CACHE.get(base.qweight, stamp, build)


def prepare_cpu(base: QuantisedBase) -> CpuInt4Runtime:
    """Convert (once; cached) a base to torch's CPU INT4 layout. Raises if unsupported."""
    runtime = _cpu_runtime(base)
    if isinstance(runtime, str):
        raise ValueError(f"CPU fast path unavailable: {runtime}")
    return runtime


def _ortho_csr(ortho: OrthoStream, torch_sparse: bool):
    """Cached CSR of the ortho stream: a torch fp32 sparse_csr tensor (CPU) or raw int32/fp16."""
    def build():
        crow, col, values, shape = ortho.to_csr()
        if not torch_sparse:
            return crow.contiguous(), col.contiguous(), values.contiguous()
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(crow, col, values.float(), shape)

    stamp = stamp_of(ortho.indices, ortho.values) + (ortho.shape, torch_sparse)
    return _CSR_CACHE.get(ortho.indices, stamp, build)


def _dense_effective(runtime: CpuInt4Runtime, ortho: OrthoStream, alpha: float) -> torch.Tensor:
    """W_eff = dequant(W_base) + α·W_ortho fp32 (N, K) for prefill, cached per ortho stream
    (freed with it) and rebuilt when α or either stream changes: the reference's weight bit
    for bit (the same `add_ortho_` on the same dense base), 4 more bytes per weight."""
    def build():
        return add_ortho_(runtime.dense_weight().clone(), ortho, alpha)  # (N, K)

    stamp = stamp_of(ortho.indices, ortho.values, runtime.qweight) + (alpha, ortho.shape)
    return _DENSE_EFF_CACHE.get(ortho.indices, stamp, build)


def cpu_path(runtime: CpuInt4Runtime, m: int, weight_cache: bool = False) -> str:
    """The CPU path that computes M rows: "gemv" (decoding), "torch_int4", or for prefill
    "blocked" (no weight kept) or "dense" (`weight_cache=True`: the dense weight kept).

    Each rounds differently; `ortho_kernels.error_bounds.path_error_bound` gives each one's bound."""
    if m <= runtime.gemv_max_m:
        return "gemv"
    if m < DENSE_MIN_M:
        return "torch_int4"
    return "dense" if weight_cache else "blocked"


def resolved_path(base: QuantisedBase, m: int, backend: str = "auto",
                  weight_cache: bool = False) -> str:
    """The path `dual_stream_linear(x, base, backend=backend, weight_cache=...)` takes for M
    rows of X: "reference", "triton" or one of the CPU paths of `cpu_path`."""
    backend, runtime = _resolve_backend(backend, base.device.type == "cuda", base)
    return cpu_path(runtime, m, weight_cache) if backend == "cpu" else backend


def _cpu_forward(x2d: torch.Tensor, runtime: CpuInt4Runtime, ortho: OrthoStream | None,
                 alpha: float, weight_cache: bool = False) -> torch.Tensor:
    path = cpu_path(runtime, x2d.shape[0], weight_cache)
    if path == "gemv":  # decoding: one fused pass, fp32 out
        csr = None if ortho is None else _ortho_csr(ortho, torch_sparse=False)
        y = runtime.gemv(x2d, csr, alpha)  # (M, N)
        return y if x2d.dtype is torch.float32 else y.to(x2d.dtype)
    if path == "blocked":  # prefill: the reference's product, W_eff rebuilt block by block
        return blocked_product(x2d, runtime, ortho, alpha).to(x2d.dtype)  # (M, N)
    if path == "dense":  # prefill: the reference's product on a cached weight
        w = runtime.dense_weight() if ortho is None else _dense_effective(runtime, ortho, alpha)
        return (x2d.float() @ w.T).to(x2d.dtype)  # (M, N)
    y = runtime.matmul(x2d)  # (M, N) bf16
    if ortho is None:
        if x2d.dtype is torch.bfloat16:
            return y
        return y.float() if x2d.dtype is torch.float32 else y.to(x2d.dtype)
    csr = _ortho_csr(ortho, torch_sparse=True)
    xf = x2d.float()
    if x2d.shape[0] == 1:
        sparse = torch.mv(csr, xf[0]).unsqueeze(0)  # (1, N)
    else:
        sparse = torch.sparse.mm(csr, xf.T.contiguous()).T  # (N, M) -> (M, N); MKL is
        # faster on a contiguous dense operand than on the transposed view
    return y.float().add_(sparse, alpha=alpha).to(x2d.dtype)


# --------------------------------------------------------------------------- dispatch
def _ortho_active(ortho: OrthoStream | None, alpha: float) -> bool:
    return ortho is not None and alpha != 0 and ortho.nnz > 0


def _resolve_backend(backend: str, on_cuda: bool, base: QuantisedBase):
    """(backend, CPU runtime or None); the CPU op's limits turn "cpu" into "reference"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if on_cuda else "cpu"
    if backend == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set "
                         "before kernels are imported, for tests)")
    if backend == "triton" and base.bits != 4:
        raise ValueError(f"the Triton kernel is INT4-only, base has bits={base.bits}; "
                         f"use backend='reference'")
    if backend != "cpu":
        return backend, None
    runtime = _cpu_runtime(base)
    if isinstance(runtime, str):
        if runtime not in _WARNED:
            _WARNED.add(runtime)
            warnings.warn(f"dual_stream_linear: CPU fast path unavailable ({runtime}); "
                          f"using the reference path", stacklevel=3)
        return "reference", None
    return "cpu", runtime


def _forward(x2d, base, ortho, alpha, backend, runtime, variant, weight_cache=False):
    if backend == "reference":
        return dual_stream_linear_ref(x2d, base, ortho, alpha)
    if backend == "cpu":
        return _cpu_forward(x2d, runtime, ortho, alpha, weight_cache)
    from ortho_kernels import _triton_dual_stream  # lazy: Triton only where it is used

    csr = None if ortho is None else _ortho_csr(ortho, torch_sparse=False)
    return _triton_dual_stream.dual_stream_forward(
        x2d.contiguous(), base.qweight, base.scales, base.zeros, base.shape, base.group_size,
        csr, alpha, variant)


class DualStreamFunction(torch.autograd.Function):
    """Forward on the chosen path; backward dX = dY · W_eff with W_eff dense (frozen streams)."""

    @staticmethod
    def forward(ctx, x2d, base, ortho, alpha, backend, runtime, variant, weight_cache):
        ctx.streams = (base, ortho, alpha)
        return _forward(x2d, base, ortho, alpha, backend, runtime, variant, weight_cache)

    @staticmethod
    def backward(ctx, grad_y):
        base, ortho, alpha = ctx.streams
        dtype = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
        w = effective_weight(base, ortho, alpha, dtype)  # (N, K)
        grad_x = (grad_y.to(dtype) @ w).to(grad_y.dtype)  # (M, K)
        return grad_x, None, None, None, None, None, None, None


def dual_stream_linear(x: torch.Tensor, base: QuantisedBase, ortho: OrthoStream | None = None,
                       alpha: float = 1.0, bias: torch.Tensor | None = None,
                       backend: str = "auto", *, variant: str = "auto",
                       weight_cache: bool = False) -> torch.Tensor:
    """Y = X · dequant(W_base)ᵀ + α · X · W_orthoᵀ + bias for X (..., K) -> Y (..., N).

    alpha is a Python number (a host decision: α == 0 skips the ortho stream entirely).
    variant ("auto", "gemv", "mm") selects the Triton kernel and is ignored elsewhere.
    weight_cache: on the CPU path, keep the dense fp32 weight for prefill (M > 32; 4 bytes
    per weight, 4 more per active ortho stream) instead of rebuilding it block by block.
    """
    if not isinstance(base, QuantisedBase):
        raise TypeError(f"base must be a QuantisedBase, got {type(base).__name__}")
    if ortho is not None and not isinstance(ortho, OrthoStream):
        raise TypeError(f"ortho must be an OrthoStream or None, got {type(ortho).__name__}")
    alpha = float(alpha)
    n, k = base.shape
    ndim = x.dim()
    if ndim == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., {k}) for a base of shape {base.shape}, "
                         f"got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    on_cuda = x.is_cuda
    if (on_cuda or base.qweight.is_cuda) and x.device != base.device:  # cheap on CPU
        raise ValueError(f"x is on {x.device} but the base on {base.device}")
    if ortho is not None and (ortho.shape != base.shape or ortho.indices.is_cuda != on_cuda):
        raise ValueError(f"ortho stream {ortho.shape} on {ortho.device} does not match the "
                         f"base {base.shape} on {base.device}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    backend, runtime = _resolve_backend(backend, on_cuda, base)
    if ortho is not None and (alpha == 0 or ortho.indices.numel() == 0):
        ortho = None  # the kill switch, decided on the host: nothing below sees the stream
    x2d = x if ndim == 2 else x.reshape(-1, k)  # (M, K)
    if torch.is_grad_enabled() and x.requires_grad:
        y2d = DualStreamFunction.apply(x2d, base, ortho, alpha, backend, runtime, variant,
                                       weight_cache)
    else:
        y2d = _forward(x2d, base, ortho, alpha, backend, runtime, variant, weight_cache)
    if bias is not None:
        y2d = y2d + bias.to(y2d.dtype)
    return y2d if ndim == 2 else y2d.reshape(*x.shape[:-1], n)  # (..., N)
