"""Per-row absmax INT8 for embedding tables and LM heads (the deployed model's 8-bit head).

    s_v = max_k |w_vk| / 127,    q_vk = round(w_vk / s_v) ∈ [-127, 127],    ŵ_vk = q_vk · s_v

one fp32 scale per row v (vector-wise absmax quantisation, as in "LLM.int8(): 8-bit Matrix
Multiplication for Transformers at Scale", §3), 1 + 4/K bytes per weight instead of 4.

Error of a weight (s and w/s rounded to fp32, u = 2⁻²⁴; |w/s| ≤ 127(1 + 2u)):
    |w_vk − ŵ_vk| ≤ s_v · (1/2 + 128u) + 127u·s_v ≤ s_v · (1/2 + 2⁻¹⁶)      (`weight_error_bound`)
i.e. at most 1/254 of the row's largest |w|. A logit x·w_v therefore moves by at most
s_v·(1/2 + 2⁻¹⁶)·Σ_k |x_k|. The head's product is computed as (X·Qᵀ)·diag(s) in fp32 — the
codes exactly as fp32, one K-term fp32 sum, one scaling — within γ_{K+1}·Σ_k |x_k| |q_vk| s_v
of the exact X·Ŵᵀ (`product_error_bound`; γ_n = n·u/(1 − n·u), Higham, *Accuracy and
Stability of Numerical Algorithms*, §3.1). A block of rows at a time is widened to fp32 in a
scratch buffer of a few MiB (`ortho_kernels.blocked_prefill.scratch`), so no fp32 copy of
the table is ever kept.
"""
from __future__ import annotations

import torch

from ortho_kernels.blocked_prefill import SCRATCH_BYTES, block_rows, scratch

QMAX = 127
FP32_UNIT_ROUNDOFF = 2.0 ** -24


def quantise_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (V, D), s fp32 (V,)) of a table w (V, D); an all-zero row gets s = 1, q = 0."""
    if w.dim() != 2:
        raise ValueError(f"w must be a (V, D) table, got shape {tuple(w.shape)}")
    v, d = w.shape
    q, s = torch.empty(v, d, dtype=torch.int8), torch.empty(v)
    rows = block_rows(v, d)  # a few MiB of temporaries at a time, whatever the table's size
    for v0 in range(0, v, rows):
        block = w[v0:v0 + rows].float()  # (R, D)
        absmax = block.abs().amax(dim=1)  # (R,)
        scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))
        q[v0:v0 + rows] = torch.round(block / scale[:, None]).clamp_(-QMAX, QMAX)
        s[v0:v0 + rows] = scale
    return q, s


def dequantise_rows_int8(q: torch.Tensor, s: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ŵ = q · s as `dtype` (V, D) (or any leading shape of rows with s of that shape)."""
    return (q.float() * s.float().unsqueeze(-1)).to(dtype)


def embed_int8(ids: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The embedding lookup ŵ[ids] (..., D): only the looked-up rows are widened."""
    return dequantise_rows_int8(q[ids], s[ids], dtype)  # (..., D)


def int8_rows_product(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                      scratch_bytes: int = SCRATCH_BYTES) -> torch.Tensor:
    """X (..., D) -> X·Ŵᵀ (..., V) in X's dtype, Ŵ = q·s widened one block of rows at a time."""
    v, d = q.shape
    if x.shape[-1] != d:
        raise ValueError(f"x must have shape (..., {d}) for a table of shape {tuple(q.shape)}, "
                         f"got {tuple(x.shape)}")
    x2d = x.reshape(-1, d).float()  # (..., D) -> (M, D)
    y = torch.empty(x2d.shape[0], v)  # (M, V)
    rows = block_rows(v, d, scratch_bytes)
    buffer = scratch(rows * d)
    for v0 in range(0, v, rows):
        v1 = min(v, v0 + rows)
        block = buffer[: (v1 - v0) * d].view(v1 - v0, d)  # (R·D,) -> (R, D)
        block.copy_(q[v0:v1])  # int8 -> fp32, exact
        torch.mm(x2d, block.T, out=y[:, v0:v1])  # (M, D) @ (D, R) -> (M, R), in place (row stride V)
        y[:, v0:v1].mul_(s[v0:v1])  # column v times s_v
    return y.to(x.dtype).reshape(*x.shape[:-1], v)  # (M, V) -> (..., V)


def weight_error_bound(s: torch.Tensor) -> torch.Tensor:
    """Per row, the bound on |w − ŵ| of every weight of that row (V,) (module docstring)."""
    return s.double() * (0.5 + 2.0 ** -16)


def product_error_bound(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """B (M, V) fp64: |int8_rows_product(x) − x·Ŵᵀ| ≤ B for fp32 x (M, D)."""
    k = q.shape[1]
    gamma = (k + 1) * FP32_UNIT_ROUNDOFF / (1 - (k + 1) * FP32_UNIT_ROUNDOFF)
    magnitude = x.double().abs() @ q.double().abs().T * s.double()  # (M, V)
    return gamma * magnitude
