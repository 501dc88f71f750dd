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
  dequant(W_base) (+ α·W_ortho) built once and cached: there the matmul is compute-bound and
  torch's op falls behind fp32 (1.3x at M = 128), while the dense weight makes the op as fast
  as fp32 and bit for bit the reference at every α. The caches cost 4 bytes per weight for
  the base and 4 more per ortho stream run at α != 0 (rebuilt when α changes; freed with the
  tensors, or by `clear_cpu_caches()`). The operands are prepared once and cached per base.
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
import weakref

import torch
import torch.nn.functional as F

from ortho_kernels import cpu_gemv
from ortho_kernels.gemv_args import check_gemv_base
from ortho_kernels.streams import OrthoStream, QuantisedBase
from ortho_kernels.tensor_cache import TensorKeyedCache, stamp_of

BACKENDS = ("auto", "reference", "cpu", "triton")
DENSE_MIN_M = 33  # from here the CPU path multiplies by a cached dense W_eff (see above)
CPU_GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
# the C-bound function, not torch.ops.aten...: no Python frame per call on the hot path
_CPU_OP = getattr(torch, "_weight_int4pack_mm_for_cpu", None)


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
class CpuInt4Runtime:
    """CPU operands of one base: ortho-train's GEMV (small M) and torch's INT4 op (the rest).

    For M <= `cpu_gemv.MAX_M` the fused GEMV (`ortho_kernels.cpu_gemv`) reads the base's own
    buffers in place and adds the ortho CSR in the same pass. Larger M go to torch's op,
    whose operands are converted on first use: it wants N % 16 == 0, K % group == 0 and K
    even, so extra rows get zero scales and are sliced off the output; K is padded to whole
    groups and X with zeros there, so the padded weights never contribute.
    """

    def __init__(self, base: QuantisedBase):
        n, k = base.shape
        self.shape, self.group_size = (n, k), base.group_size
        qweight = base.qweight.contiguous()  # (N, ceil(K/2)) uint8
        # The caches are keyed on base.qweight and drop an entry when it is freed, so the
        # entry must not keep it alive: held weakly (a copy, if one was made, strongly).
        self._qweight_copy = None if qweight is base.qweight else qweight
        self._qweight_ref = weakref.ref(qweight)
        self.scales, self.zeros = base.scales.contiguous(), base.zeros.contiguous()  # (N, G)
        reason = cpu_gemv.unsupported(base.bits, base.group_size)
        self.gemv_max_m = cpu_gemv.MAX_M if reason is None else 0
        if reason is None:  # once here, not per decoding call: the buffers are kept as they are
            check_gemv_base(qweight, self.scales, self.zeros, k, base.group_size)
        if reason is not None and reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(f"dual_stream_linear: CPU GEMV unavailable ({reason}); small M uses "
                          f"torch's INT4 op", stacklevel=4)
        self.n_pad = -n % 16
        self.k_pad = base.n_groups * base.group_size - k  # ragged last group -> whole group
        self._torch_operands = None
        self.bits = base.bits
        self._dense = None  # dequant(W_base) fp32 (N, K) for M >= DENSE_MIN_M

    @property
    def qweight(self) -> torch.Tensor:
        return self._qweight_ref()

    @property
    def packed(self) -> torch.Tensor:
        return self._torch_op_operands()[0]

    @property
    def scale_and_zeros(self) -> torch.Tensor:
        return self._torch_op_operands()[1]

    def _torch_op_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._torch_operands is None:
            from ortho_kernels.packing import to_int4pack_cpu_layout, unpack_int4

            k = self.shape[1]
            codes = F.pad(unpack_int4(self.qweight, k), (0, self.k_pad, 0, self.n_pad), value=8)  # (N', K')
            scales = F.pad(self.scales, (0, 0, 0, self.n_pad))  # (N', G)
            zeros = F.pad(self.zeros, (0, 0, 0, self.n_pad), value=8.0)  # (N', G)
            self._torch_operands = to_int4pack_cpu_layout(codes, scales, zeros, self.group_size)
        return self._torch_operands

    def dense_weight(self) -> torch.Tensor:
        """dequant(W_base) as fp32 (N, K), built as the reference builds it, kept for prefill
        (M >= DENSE_MIN_M): 4 bytes per weight, independent of α and of the ortho stream."""
        if self._dense is None and self.gemv_max_m:  # the C dequantiser: exact, on the pool
            n, k = self.shape
            self._dense = cpu_gemv.dequantise_rows(self.qweight, self.scales, self.zeros, k,
                                                   self.group_size, 0, n, torch.empty(n, k))
        elif self._dense is None:
            base = QuantisedBase(self.qweight, self.scales, self.zeros, self.shape,
                                 self.group_size, self.bits)
            self._dense = base.dequantise(torch.float32)
        return self._dense

    def gemv(self, x2d: torch.Tensor, csr: tuple | None = None, alpha: float = 0.0) -> torch.Tensor:
        """(M, K) -> (M, N) fp32 with ortho-train's GEMV; M <= gemv_max_m."""
        return cpu_gemv.gemv(self.qweight, self.scales, self.zeros, self.shape[1],
                             self.group_size, x2d, csr, alpha, base_checked=True)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) bf16, base stream only, with torch's INT4 op."""
        # Every Python-level step here costs ~4x its hot-loop time right after the op has
        # streamed the weight through the caches, so the path avoids no-op dispatches.
        packed, scale_and_zeros = self._torch_op_operands()
        xb = x2d if x2d.dtype is torch.bfloat16 else x2d.bfloat16()
        if self.k_pad:
            xb = F.pad(xb, (0, self.k_pad))  # (M, K')
        if not xb.is_contiguous():
            xb = xb.contiguous()
        y = _CPU_OP(xb, packed, self.group_size, scale_and_zeros)  # (M, N')
        return y[:, : self.shape[0]] if self.n_pad else y


def cpu_fast_path_unsupported(base: QuantisedBase) -> str | None:
    """Why torch's CPU INT4 op cannot run this base, or None if it can."""
    if base.bits != 4:
        return f"bits={base.bits}: the CPU op is INT4-only"
    if base.group_size not in CPU_GROUP_SIZES:
        return f"group_size={base.group_size}: the CPU op accepts only {CPU_GROUP_SIZES}"
    if _CPU_OP is None:
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
    if base.device.type != "cpu":
        return f"base is on {base.device}"
    return None


_CPU_BASE_CACHE = TensorKeyedCache()
_CSR_CACHE = TensorKeyedCache()
_DENSE_EFF_CACHE = TensorKeyedCache()
_WARNED: set[str] = set()


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


def cpu_path(runtime: CpuInt4Runtime, m: int) -> str:
    """The CPU path that computes M rows: "gemv" (decoding), "torch_int4" or "dense" (prefill).

    Each rounds differently; `ortho_kernels.error_bounds.path_error_bound` gives each one's bound."""
    if m <= runtime.gemv_max_m:
        return "gemv"
    return "dense" if m >= DENSE_MIN_M else "torch_int4"


def resolved_path(base: QuantisedBase, m: int, backend: str = "auto") -> str:
    """The path `dual_stream_linear(x, base, backend=backend)` takes for M rows of X:
    "reference", "triton" or one of the CPU paths of `cpu_path`."""
    backend, runtime = _resolve_backend(backend, base.device.type == "cuda", base)
    return cpu_path(runtime, m) if backend == "cpu" else backend


def _cpu_forward(x2d: torch.Tensor, runtime: CpuInt4Runtime, ortho: OrthoStream | None,
                 alpha: float) -> torch.Tensor:
    path = cpu_path(runtime, x2d.shape[0])
    if path == "gemv":  # decoding: one fused pass, fp32 out
        csr = None if ortho is None else _ortho_csr(ortho, torch_sparse=False)
        y = runtime.gemv(x2d, csr, alpha)  # (M, N)
        return y if x2d.dtype is torch.float32 else y.to(x2d.dtype)
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


def _forward(x2d, base, ortho, alpha, backend, runtime, variant):
    if backend == "reference":
        return dual_stream_linear_ref(x2d, base, ortho, alpha)
    if backend == "cpu":
        return _cpu_forward(x2d, runtime, ortho, alpha)
    from ortho_kernels import _triton_dual_stream  # lazy: Triton only where it is used

    csr = None if ortho is None else _ortho_csr(ortho, torch_sparse=False)
    return _triton_dual_stream.dual_stream_forward(
        x2d.contiguous(), base.qweight, base.scales, base.zeros, base.shape, base.group_size,
        csr, alpha, variant)


class DualStreamFunction(torch.autograd.Function):
    """Forward on the chosen path; backward dX = dY · W_eff with W_eff dense (frozen streams)."""

    @staticmethod
    def forward(ctx, x2d, base, ortho, alpha, backend, runtime, variant):
        ctx.streams = (base, ortho, alpha)
        return _forward(x2d, base, ortho, alpha, backend, runtime, variant)

    @staticmethod
    def backward(ctx, grad_y):
        base, ortho, alpha = ctx.streams
        dtype = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
        w = effective_weight(base, ortho, alpha, dtype)  # (N, K)
        grad_x = (grad_y.to(dtype) @ w).to(grad_y.dtype)  # (M, K)
        return grad_x, None, None, None, None, None, None


def dual_stream_linear(x: torch.Tensor, base: QuantisedBase, ortho: OrthoStream | None = None,
                       alpha: float = 1.0, bias: torch.Tensor | None = None,
                       backend: str = "auto", *, variant: str = "auto") -> torch.Tensor:
    """Y = X · dequant(W_base)ᵀ + α · X · W_orthoᵀ + bias for X (..., K) -> Y (..., N).

    alpha is a Python number (a host decision: α == 0 skips the ortho stream entirely).
    variant ("auto", "gemv", "mm") selects the Triton kernel and is ignored elsewhere.
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
        y2d = DualStreamFunction.apply(x2d, base, ortho, alpha, backend, runtime, variant)
    else:
        y2d = _forward(x2d, base, ortho, alpha, backend, runtime, variant)
    if bias is not None:
        y2d = y2d + bias.to(y2d.dtype)
    return y2d if ndim == 2 else y2d.reshape(*x.shape[:-1], n)  # (..., N)
