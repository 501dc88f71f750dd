"""`CpuInt4Runtime`: the CPU operands of one INT4 base, prepared once and kept per base.

`ortho_kernels.dual_stream` caches one runtime per base (keyed on its qweight) and picks a
path by the number M of rows of X: ortho-train's GEMV (M <= `cpu_gemv.MAX_M`), torch's INT4
op (`aten._weight_int4pack_mm_for_cpu`) up to M = 32, and for prefill an fp32 product with
dequant(W_base) — by default dequantised block by block into a scratch buffer
(`ortho_kernels.blocked_prefill`), with `weight_cache=True` built once and kept
(`dense_weight`, 4 bytes per weight).
"""
from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F

from ortho_kernels import cpu_gemv
from ortho_kernels.gemv_args import check_gemv_base
from ortho_kernels.streams import QuantisedBase

# the C-bound function, not torch.ops.aten...: no Python frame per call on the hot path
CPU_OP = getattr(torch, "_weight_int4pack_mm_for_cpu", None)
WARNED: set[str] = set()  # reasons already warned about, once per process


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
        if reason is not None and reason not in WARNED:
            WARNED.add(reason)
            warnings.warn(f"dual_stream_linear: CPU GEMV unavailable ({reason}); small M uses "
                          f"torch's INT4 op", stacklevel=4)
        self.n_pad = -n % 16
        self.k_pad = base.n_groups * base.group_size - k  # ragged last group -> whole group
        self._torch_operands = None
        self.bits = base.bits
        self._dense = None  # dequant(W_base) fp32 (N, K), kept with weight_cache=True

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

    def dequantise_rows(self, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [n0, n1) of dequant(W_base) into `out` (contiguous fp32, n1 - n0 by K): the C
        dequantiser where the GEMV is built, else `group_dequantise` on those rows; both bit
        for bit the rows of `QuantisedBase.dequantise()` ((q - z)·s is exact in fp32)."""
        k = self.shape[1]
        if self.gemv_max_m:
            return cpu_gemv.dequantise_rows(self.qweight, self.scales, self.zeros, k,
                                            self.group_size, n0, n1, out)
        rows = QuantisedBase(self.qweight[n0:n1], self.scales[n0:n1], self.zeros[n0:n1],
                             (n1 - n0, k), self.group_size, self.bits)
        return out.copy_(rows.dequantise(torch.float32))

    def dense_weight(self) -> torch.Tensor:
        """dequant(W_base) as fp32 (N, K), built once and kept (the `weight_cache=True` prefill):
        4 bytes per weight, independent of α and of the ortho stream."""
        if self._dense is None:
            n, k = self.shape
            self._dense = self.dequantise_rows(0, n, torch.empty(n, k))
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
        y = CPU_OP(xb, packed, self.group_size, scale_and_zeros)  # (M, N')
        return y[:, : self.shape[0]] if self.n_pad else y
