"""Worst-case error of each CPU path of the dual-stream op against the exact product.

The CPU paths round differently (see `ortho_kernels.dual_stream._cpu_forward`), so one tolerance
for "the CPU op" is either too loose for the GEMV or too tight for torch's bf16 op, and a
fixed relative tolerance on a whole model's logits fails on some CPUs and seeds. This module
gives, per output element, a bound |y_path - X·W_eff^T|_mj <= B_mj derived from the path's
roundings (standard floating-point error analysis, Higham, *Accuracy and Stability of
Numerical Algorithms*, §3.1: a K-term fp32 sum of products is within
γ_K = K·u/(1 - K·u) of Σ|x||w|, u = 2^-24):

- ``gemv`` (M <= MAX_M, `ortho_kernels.cpu_gemv`): X in 16-bit fixed point per 64-element block,
  |x~ - x| <= max_b|x| / 65534 · (1 + 4u); codes and fp16 scales/zeros exact; the product is
  Σ (q - z)·s·x~ computed as s·(Σ q·x~ - z·Σ x~) in fp32, so its rounding is bounded through
  the magnitudes (|q| + |z|)·|s| rather than |w|:
  B = Σ_k |w_k| · δ_block(k) + γ_{K+8} · Σ_k (|q_k| + |z_k|)·|s_k|·|x_k|.
- ``gemv_int8`` (`cpu_gemv.gemv(..., mode=1 or 2)`, the fast decoder's int8 activations): X
  in int8 per 64-element block, x8 = round(x·127/m_b) with m_b = max_b|x| and x~ = x8·m_b/127.
  Rounding to the nearest integer is off by <= 1/2; the fp32 factor 127/m_b, the product
  x·(127/m_b) and x~ = x8·(m_b/127) add 4u relative (as the int16 path), and clamping x8 to
  ±127 (x·127/m_b may round past 127 by an ulp) moves x~ by <= 2u·m_b = m_b/254 · 508u, so
  δ8_block(k) = |x~_k - x_k| <= m_b / 254 · (1 + 512u).
  The int32 products are exact (|Σ q·x8| <= 64·15·127 < 2^24, so their fp32 conversion is too)
  and the rest of the arithmetic is the int16 path's, on x~ instead of x, with |x~_k| <=
  |x_k| + δ8_block(k):
  B = Σ_k |w_k| · δ8_block(k) + γ_{K+8} · Σ_k (|q_k| + |z_k|)·|s_k|·(|x_k| + δ8_block(k)).
  The first term is 258x the int16 path's (65534 / 254): the int8 path is opt-in.
- ``torch_int4`` (MAX_M < M < DENSE_MIN_M, `aten._weight_int4pack_mm_for_cpu`): X, the scale
  s and the offset zf = (8 - z)·s rounded to bf16 (u_b = 2^-8), the output rounded to bf16.
  With m_k = (|q_k - 8| + |8 - z_k|)·|s_k| >= |w_k| (the two bf16 operands of a weight):
  B = (3·u_b + γ_K)·(1 + u_b)^3 · Σ_k m_k |x_k|  (activation, weight and output rounding
  each contribute u_b·Σ m|x|; the cube covers the products of the roundings);
  the ortho term is added in fp32 afterwards: + γ_K · α·Σ_k |o_k||x_k|.
- ``blocked`` and ``dense`` (M >= DENSE_MIN_M: W_eff rebuilt per block of rows, or cached) and
  ``reference``: X·W_eff^T in fp32 on the dequantised weight (w_eff = (q - z)·s + α·o, two more
  fp32 roundings): B = γ_{K+2} · Σ_k |w_eff,k| |x_k|.

The last fp32 addition and a result returned in a narrower dtype add 2·u_out·|y|. The bound
is for fp32 or narrower X against the exact fp64 product (`reference_product`); a caller
comparing two paths adds both bounds.
"""
from __future__ import annotations

from typing import Callable

import torch

from ortho_kernels.streams import OrthoStream, QuantisedBase

FP32_UNIT_ROUNDOFF = 2.0 ** -24
BF16_UNIT_ROUNDOFF = 2.0 ** -8
PATHS = ("gemv", "torch_int4", "blocked", "dense", "reference")  # `ortho_kernels.dual_stream.resolved_path`
GEMV_BLOCK = 64  # elements of X sharing one fixed-point scale (`_cpu_int4_gemv.c`)
INT16_STEPS, INT8_STEPS = 65534, 254  # 2·32767 and 2·127: the worst rounding is m_b / steps
UNIT_ROUNDOFF = {torch.float32: FP32_UNIT_ROUNDOFF, torch.float16: 2.0 ** -11,
                 torch.bfloat16: BF16_UNIT_ROUNDOFF}


def gamma(n: int, u: float = FP32_UNIT_ROUNDOFF) -> float:
    """γ_n = n·u / (1 - n·u): the relative error bound of an n-term floating-point sum."""
    return n * u / (1 - n * u)


def _per_weight(base: QuantisedBase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes q, scales s and zeros z, each fp64 (N, K) (group values repeated over their columns)."""
    k = base.shape[1]
    q = base.codes().double()  # (N, K)
    s = base.scales.double().repeat_interleave(base.group_size, dim=1)[:, :k]  # (N, G) -> (N, K)
    z = base.zeros.double().repeat_interleave(base.group_size, dim=1)[:, :k]  # (N, G) -> (N, K)
    return q, s, z


def _block_steps(x: torch.Tensor, steps: int = INT16_STEPS, slack: float = 4.0) -> torch.Tensor:
    """Per element, the GEMV's worst fixed-point rounding of X: max|x| of its 64-block / steps,
    times (1 + slack·u) for the fp32 scale arithmetic."""
    m, k = x.shape
    blocks = -(-k // GEMV_BLOCK)
    padded = torch.nn.functional.pad(x.abs(), (0, blocks * GEMV_BLOCK - k))  # (M, K')
    block_max = padded.view(m, blocks, GEMV_BLOCK).amax(dim=2)  # (M, K'/64, 64) -> (M, K'/64)
    step = block_max / steps * (1 + slack * FP32_UNIT_ROUNDOFF)
    return step.repeat_interleave(GEMV_BLOCK, dim=1)[:, :k]  # (M, K'/64) -> (M, K)


def _gemv_bound(x2d, q, s, z, o):
    x, k = x2d.double().abs(), q.shape[1]  # (M, K)
    bound = _block_steps(x2d.double()) @ ((q - z) * s).abs().T
    bound += gamma(k + 8) * (x @ ((q.abs() + z.abs()) * s.abs()).T)
    return bound if o is None else bound + gamma(k + 8) * (x @ o.T)


def _gemv_int8_bound(x2d, q, s, z, o):
    x, k = x2d.double().abs(), q.shape[1]  # (M, K)
    step = _block_steps(x2d.double(), INT8_STEPS, slack=512.0)  # (M, K)
    bound = step @ ((q - z) * s).abs().T
    bound += gamma(k + 8) * ((x + step) @ ((q.abs() + z.abs()) * s.abs()).T)
    return bound if o is None else bound + gamma(k + 8) * (x @ o.T)


def _torch_int4_bound(x2d, q, s, z, o):
    x, k, u_b = x2d.double().abs(), q.shape[1], BF16_UNIT_ROUNDOFF  # (M, K)
    magnitude = ((q - 8).abs() + (8 - z).abs()) * s.abs()  # (N, K)
    bound = (3 * u_b + gamma(k)) * (1 + u_b) ** 3 * (x @ magnitude.T)
    return bound if o is None else bound + gamma(k + 1) * (x @ o.T)


def _fp32_product_bound(x2d, q, s, z, o):
    """The blocked, dense and reference paths: X·W_eff^T in fp32 on the (blocked, cached or
    rebuilt) W_eff; any order of the K-term sum has this bound."""
    w = ((q - z) * s).abs()  # (N, K)
    return gamma(q.shape[1] + 2) * (x2d.double().abs() @ (w if o is None else w + o).T)


_BOUNDS: dict[str, Callable] = {"gemv": _gemv_bound, "gemv_int8": _gemv_int8_bound,
                                "torch_int4": _torch_int4_bound,
                                "blocked": _fp32_product_bound, "dense": _fp32_product_bound,
                                "reference": _fp32_product_bound}


def path_error_bound(path: str, x2d: torch.Tensor, base: QuantisedBase,
                     ortho: OrthoStream | None, alpha: float) -> torch.Tensor:
    """B (M, N) fp64: |y_path - exact X·W_eff^T| <= B elementwise for the named CPU path."""
    if path not in _BOUNDS:
        raise ValueError(f"path must be one of {tuple(_BOUNDS)}, got {path!r}")
    o = (alpha * ortho.to_dense(torch.float64)).abs() if ortho is not None and alpha else None
    bound = _BOUNDS[path](x2d.detach(), *_per_weight(base), o)
    # the last fp32 addition (ortho or bias term), then the result rounded to X's dtype
    u_out = max(FP32_UNIT_ROUNDOFF, UNIT_ROUNDOFF[x2d.dtype])
    exact = reference_product(x2d, base, ortho, alpha).abs()
    return bound + 2 * u_out * (exact + bound)


def reference_product(x2d: torch.Tensor, base: QuantisedBase, ortho: OrthoStream | None,
                      alpha: float) -> torch.Tensor:
    """X·W_eff^T in fp64 (M, N): the exact value every path approximates."""
    w = base.dequantise(torch.float64)
    if ortho is not None and alpha:
        w = w + alpha * ortho.to_dense(torch.float64)
    return x2d.detach().double() @ w.T

