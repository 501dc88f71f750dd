"""Triton kernels of the dual-stream linear (private; use `ortho_kernels.dual_stream`).

    Y[m, n] = sum_k X[m, k] * (q[n, k] - z[n, g(k)]) * s[n, g(k)]
            + alpha * sum_{p in row n of the CSR} v[p] * X[m, col[p]]

One launch per call. The dense part is a dequantising K-loop into an fp32 accumulator; the
sparse rows of the program's N-tile are then added *into the same accumulator* before the
single store. `HAS_ORTHO` is a `tl.constexpr`: with α=0 the host launches the specialisation
without any sparse code, so ortho buffers are never read (NaNs there cannot leak) and the
result is bit for bit the base-only kernel's.

One kernel, `_dual_stream_kernel`, two variants by the `USE_DOT` constexpr:
- "mm" (USE_DOT): tiles (BLOCK_M, BLOCK_N) with `tl.dot` (prefill, training);
- "gemv": small M (decoding); a broadcast multiply-and-reduce on (BLOCK_M, BLOCK_N,
  BLOCK_K) instead of `tl.dot`, whose tiles need M >= 16.

Departures from the Triton matmul tutorial: W stays packed (two INT4 codes per byte along
K, our storage layout, no repacking), the group's scale/zero is fetched once per tile when
BLOCK_K divides the group size (else per element), and there is no autotuning: the block
sizes below are reasoned defaults, not measured (this project has no GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_tile(q_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_qn, stride_sn,
                  GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K) fp32 tile of (q - z) * s for rows offs_n, columns k0 + [0, BLOCK_K)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    mask = n_mask[:, None] & (offs_k[None, :] < K)
    byte = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] // 2, mask=mask, other=0)
    q = (byte.to(tl.int32) >> ((offs_k[None, :] % 2) * 4)) & 0xF  # even k: low nibble
    if GROUP_SIZE % BLOCK_K == 0:  # the whole tile lies in one group
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        z = tl.load(z_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    else:
        sz_off = offs_n[:, None] * stride_sn + offs_k[None, :] // GROUP_SIZE
        s = tl.load(s_ptr + sz_off, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz_off, mask=mask, other=0.0).to(tl.float32)
    return (q.to(tl.float32) - z) * s


@triton.jit
def _add_sparse_rows(acc, x_ptr, stride_xm, offs_m, M, crow_ptr, col_ptr, val_ptr, offs_n, N,
                     alpha, BLOCK_NNZ: tl.constexpr):
    """acc[m, n] += alpha * sum_p v[p] * X[m, col[p]] over the CSR rows offs_n."""
    n_mask = offs_n < N
    start = tl.load(crow_ptr + offs_n, mask=n_mask, other=0)
    length = tl.load(crow_ptr + offs_n + 1, mask=n_mask, other=0) - start  # (BN,)
    longest = tl.max(length, axis=0)  # this tile's longest row bounds the loop
    m_mask = (offs_m < M)[:, None, None]
    for l0 in range(0, longest, BLOCK_NNZ):
        offs_l = l0 + tl.arange(0, BLOCK_NNZ)
        l_mask = offs_l[None, :] < length[:, None]  # (BN, BL)
        p = start[:, None] + offs_l[None, :]
        col = tl.load(col_ptr + p, mask=l_mask, other=0)
        val = tl.load(val_ptr + p, mask=l_mask, other=0.0).to(tl.float32)  # (BN, BL)
        xg = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + col[None, :, :],
                     mask=m_mask & l_mask[None, :, :], other=0.0).to(tl.float32)  # (BM, BN, BL)
        acc += alpha * tl.sum(xg * val[None, :, :], axis=2)
    return acc


@triton.jit
def _dual_stream_kernel(
    # pointers
    x_ptr, q_ptr, s_ptr, z_ptr, crow_ptr, col_ptr, val_ptr, y_ptr,
    # sizes
    M, N, K, alpha,
    # strides (X and Y are contiguous along their last dim)
    stride_xm, stride_qn, stride_sn, stride_ym,
    # meta
    GROUP_SIZE: tl.constexpr, HAS_ORTHO: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_NNZ: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of Y; grid (N tiles, M tiles)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(q_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_qn, stride_sn,
                          GROUP_SIZE, BLOCK_K)  # (BN, BK)
        if USE_DOT:  # tensor cores; tl.dot tiles need BLOCK_M >= 16
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
        else:  # decoding: broadcast multiply-and-reduce over (BM, BN, BK)
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)  # (BM, BN)
    if HAS_ORTHO:
        acc = _add_sparse_rows(acc, x_ptr, stride_xm, offs_m, M, crow_ptr, col_ptr, val_ptr,
                               offs_n, N, alpha, BLOCK_NNZ)
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=y_mask)


GEMV_MAX_M = 8  # up to here the decode variant is used


def _pick_block_k(group_size: int, preferred: int) -> int:
    """Largest power of two <= preferred dividing the group (one scale per tile), else preferred."""
    bk = preferred
    while bk >= 16:
        if group_size % bk == 0:
            return bk
        bk //= 2
    return preferred


def dual_stream_forward(x2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor, shape: tuple[int, int], group_size: int,
                        csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                        alpha: float, variant: str = "auto") -> torch.Tensor:
    """Launch one kernel: Y (M, N) in x2d's dtype. csr=None launches HAS_ORTHO=False.

    x2d: (M, K) contiguous fp16/bf16/fp32; qweight uint8 (N, ceil(K/2)); scales/zeros fp16
    (N, G); csr = (crow int32 (N+1,), col int32 (nnz,), values fp16 (nnz,)).
    variant: "auto" (gemv for M <= GEMV_MAX_M), "gemv" or "mm" (tests force both).
    """
    m, k = x2d.shape
    n = shape[0]
    if not x2d.is_contiguous():
        raise ValueError("x2d must be contiguous")
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return y
    has_ortho = csr is not None
    crow, col, val = csr if has_ortho else (qweight, qweight, qweight)  # never read
    args = (x2d, qweight, scales, zeros, crow, col, val, y, m, n, k, float(alpha),
            x2d.stride(0), qweight.stride(0), scales.stride(0), y.stride(0))
    if variant == "auto":
        variant = "gemv" if m <= GEMV_MAX_M else "mm"
    if variant == "gemv":
        block_m = min(triton.next_power_of_2(m), GEMV_MAX_M)
        block_k = _pick_block_k(group_size, 128 if block_m == 1 else 64)
        block_n = max(16, 4096 // (block_m * block_k))
        if x2d.is_cuda:  # decoding is bandwidth-bound: keep every SM busy (~2 programs each)
            sms = torch.cuda.get_device_properties(x2d.device).multi_processor_count
            while block_n > 16 and triton.cdiv(n, block_n) * triton.cdiv(m, block_m) < 2 * sms:
                block_n //= 2
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
        _dual_stream_kernel[grid](*args, GROUP_SIZE=group_size, HAS_ORTHO=has_ortho,
                                  USE_DOT=False, DOT_PRECISION="ieee", BLOCK_M=block_m,
                                  BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_NNZ=16, num_warps=4)
    elif variant == "mm":
        block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
        block_n, block_k = 64, _pick_block_k(group_size, 64)
        block_nnz = max(2, 8192 // (block_m * block_n))  # bounds the (BM, BN, BL) gather
        precision = "ieee" if x2d.dtype == torch.float32 else "tf32"  # tf32 is a no-op for 16-bit
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
        _dual_stream_kernel[grid](*args, GROUP_SIZE=group_size, HAS_ORTHO=has_ortho,
                                  USE_DOT=True, DOT_PRECISION=precision, BLOCK_M=block_m,
                                  BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_NNZ=min(block_nnz, 8),
                                  num_warps=4)
    else:
        raise ValueError(f"variant must be 'auto', 'gemv' or 'mm', got {variant!r}")
    return y
