"""Prefill without a weight cache: the dense fp32 product in blocks of output rows.

    Y[:, n0:n1] = X · W_eff[n0:n1]ᵀ,   W_eff[n0:n1] = dequant(W_base)[n0:n1] + α·W_ortho[n0:n1]

For M > 32 rows of X (prefill, evaluation batches) the product is compute-bound, and an fp32
GEMM on the dequantised weight is the fastest CPU path (`ortho_kernels.dual_stream`). Keeping
that weight costs 4 bytes per weight (8 with an active ortho stream), 7x the packed base. Here
each block of R output rows is dequantised into a per-thread scratch buffer of R·K·4 ≈
`SCRATCH_BYTES` bytes, the ortho entries of those rows are added in place, the block is
multiplied, and the buffer is reused for the next block (and the next layer): the memory is
the scratch alone; the dequantisation is redone on every call, N·K cheap operations against
the GEMM's M·N·K multiply-adds.

Exactness: each block is bit for bit the same rows of the cached W_eff (the same dequantiser,
`CpuInt4Runtime.dequantise_rows`, and the same `index_add_` of the same fp16 values at the
same positions, unique within a stream). Each output is one K-term fp32 dot product, so the
dense path's error bound holds (`ortho_kernels.error_bounds`, γ_{K+2}·Σ|w_eff||x|), though not
necessarily its bits: the BLAS may split K differently for a narrower matrix.
"""
from __future__ import annotations

import threading

import torch

from ortho_kernels.cpu_runtime import CpuInt4Runtime
from ortho_kernels.streams import OrthoStream

SCRATCH_BYTES = 4 << 20  # per thread; a block of fp32 rows this size stays in a 2-4 MiB L2/L3 slice
_LOCAL = threading.local()  # one scratch per Python thread: concurrent callers never share one


def block_rows(n: int, k: int, scratch_bytes: int = SCRATCH_BYTES) -> int:
    """Rows per block: as many fp32 rows of length K as fit `scratch_bytes` (1 ≤ R ≤ N)."""
    return max(1, min(n, scratch_bytes // (4 * k)))


def scratch(numel: int) -> torch.Tensor:
    """This thread's fp32 scratch, grown to `numel` elements when a call needs more."""
    buffer = getattr(_LOCAL, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _LOCAL.buffer = torch.empty(numel)
    return buffer[:numel]


def release_scratch() -> None:
    """Free this thread's scratch (the next blocked call allocates it again)."""
    _LOCAL.buffer = None


def effective_rows(runtime: CpuInt4Runtime, ortho: OrthoStream | None, alpha: float, n0: int,
                   n1: int, out: torch.Tensor, span: tuple[int, int] | None = None) -> torch.Tensor:
    """Rows [n0, n1) of W_eff = dequant(W_base) + α·W_ortho into `out` (fp32, n1 - n0 by K).

    span: the positions [a, b) of the ortho entries of those rows in the stream (found by
    binary search when not given). Bit for bit `dual_stream.effective_weight(...)[n0:n1]`."""
    runtime.dequantise_rows(n0, n1, out)
    if ortho is None:
        return out
    k = runtime.shape[1]
    if span is None:
        span = tuple(_entry_spans(ortho, [n0, n1], k))
    a, b = span
    if b > a:
        flat = ortho.indices[a:b].long() - n0 * k  # positions inside the block, row-major
        out.view(-1).index_add_(0, flat, ortho.values[a:b].to(out.dtype), alpha=alpha)  # (R·K,)
    return out


def _entry_spans(ortho: OrthoStream, row_starts: list[int], k: int) -> list[int]:
    """Index of the first ortho entry at or after each row start (indices are sorted, row-major)."""
    starts = torch.tensor([r * k for r in row_starts], dtype=torch.int64)  # N·K may be 2^31
    return torch.searchsorted(ortho.indices, starts).tolist()


def blocked_product(x2d: torch.Tensor, runtime: CpuInt4Runtime, ortho: OrthoStream | None,
                    alpha: float, scratch_bytes: int = SCRATCH_BYTES) -> torch.Tensor:
    """X (M, K) -> X · W_effᵀ (M, N) fp32, W_eff built block by block (module docstring)."""
    n, k = runtime.shape
    rows = block_rows(n, k, scratch_bytes)
    starts = list(range(0, n, rows))
    spans = _entry_spans(ortho, starts + [n], k) if ortho is not None else None
    x2d = x2d.float()
    y = torch.empty(x2d.shape[0], n)  # (M, N)
    buffer = scratch(rows * k)
    for i, n0 in enumerate(starts):
        n1 = min(n, n0 + rows)
        w = buffer[: (n1 - n0) * k].view(n1 - n0, k)  # (R·K,) -> (R, K)
        span = None if spans is None else (spans[i], spans[i + 1])
        effective_rows(runtime, ortho, alpha, n0, n1, w, span)
        torch.mm(x2d, w.T, out=y[:, n0:n1])  # (M, K) @ (K, R) -> (M, R), written in place (row stride N)
    return y
