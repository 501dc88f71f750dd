"""GPTQ (Frantar et al., 2023) on the group-wise INT-k convention of `ortho_kernels.packing`.

Minimises the layer-output error ‖(Q − W) X‖² = Σ_rows (q − w) H (q − w)ᵀ column by column:
quantise column j, then push its error onto the columns not yet quantised,

    e_j = (w_j − q_j) / U_jj,        W[:, j+1:] −= e_j · U[j, j+1:]

with U the upper Cholesky factor of H⁻¹ (`ortho_train.curvature.inverse_cholesky_upper`).
Columns are processed in lazy blocks: updates inside a block are applied at once, the rest
of the matrix gets one rank-B update per block.

Group parameters (scale, zero) follow `ortho_kernels.group_quantise` exactly (range widened to
contain 0, fp16 scale rounded up), so the codes pack with `ortho_kernels.pack_bits` and
dequantise with `ortho_kernels.group_dequantise`. They are taken, as in GPTQ, from the
error-updated weights when the sweep reaches a group's first column, or with
`static_groups` once from the original weights (required with `act_order`, so inference
needs no g_idx permutation: codes come back in the original column order).

Departures from reference GPTQ: dead columns (H_jj = 0) are quantised from their weights
rather than zeroed, so a column idle on calibration data keeps its function elsewhere; the
lazy block is a whole number of groups, so group statistics always see updated weights.

Outliers (the sieve, docs/methods.md §5): with `outlier_threshold` τ, an entry whose error-compensated
weight w has impact (w − q)² / U_jj² > τ is kept exact: its error is not propagated (the
ortho stream will hold w − dequant(q)), the compensated w is recorded. τ = inf is plain GPTQ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ortho_kernels import QuantisedBase, group_quantise
from ortho_kernels.packing import SUPPORTED_BITS
from ortho_train.curvature import inverse_cholesky_upper, prepare_hessian
from ortho_train.quantisation.format import WeightFormat, base_from_codes

if TYPE_CHECKING:
    from ortho_train.quantisation.spec import QuantConfig


@dataclass
class GPTQResult:
    """codes uint8 (N, K), scales/zeros fp16 (N, G), original column order.

    With outliers: `outlier_mask` bool (N, K), `compensated` fp32 (N, K) — at outlier
    positions the weights at the moment their column was quantised (they go to the ortho
    stream); elsewhere the dequantised value — and `impact` fp32 (N, K) =
    (compensated − dequant)² / U_jj² (meaningful at outlier positions, ~0 elsewhere).
    `u_diag` (K,) is U_jj, `error` the H-weighted error Σ e_j² (proxy GPTQ minimises).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    u_diag: torch.Tensor
    error: float
    outlier_mask: torch.Tensor | None = None
    compensated: torch.Tensor | None = None
    impact: torch.Tensor | None = None


def _group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (scale, zero) (N, 1) of one group slice (N, g), by `ortho_kernels.group_quantise`."""
    _, scales, zeros = group_quantise(w, bits=bits, group_size=w.shape[1])
    return scales.float(), zeros.float()


def _check_inputs(w: torch.Tensor, hessian: torch.Tensor, group_size: int, block_size: int) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D floating tensor, got {w.dtype} {tuple(w.shape)}")
    k = w.shape[1]
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must be ({k}, {k}) for a weight of shape {tuple(w.shape)}, "
                         f"got {tuple(hessian.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or Inf; cannot quantise")
    if group_size < 1 or block_size < 1:
        raise ValueError(f"group_size and block_size must be positive, got {group_size}, {block_size}")


@dataclass
class _Sweep:
    """The state GPTQ sweeps over: working weights, U, group parameters, column order."""

    weight: torch.Tensor  # (N, K) fp32, in sweep (possibly permuted) column order
    u: torch.Tensor  # (K, K) upper Cholesky factor of H⁻¹, sweep order
    u_diag: torch.Tensor  # (K,) U_jj in the original column order
    col_of: list[int]  # sweep position -> original column
    scales: torch.Tensor  # (N, G) fp32
    zeros: torch.Tensor  # (N, G) fp32


def _prepare(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, damp: float,
             act_order: bool, static_groups: bool) -> _Sweep:
    n, k = w.shape
    h, _ = prepare_hessian(hessian.to(w.device), damp)
    weight = w.float().clone()
    scales = torch.empty(n, math.ceil(k / group_size), dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    if static_groups:
        _, s16, z16 = group_quantise(weight, bits=bits, group_size=group_size)
        scales.copy_(s16.float())
        zeros.copy_(z16.float())
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else None
    if perm is not None:
        weight = weight[:, perm]  # (N, K) permuted columns
        h = h[perm][:, perm]  # (K, K)
    u = inverse_cholesky_upper(h).float()  # (K, K)
    u_diag = torch.diagonal(u).clone()
    if perm is not None:
        u_diag = torch.empty_like(u_diag).scatter_(0, perm, u_diag)  # original column order
    col_of = perm.tolist() if perm is not None else list(range(k))
    return _Sweep(weight, u, u_diag, col_of, scales, zeros)


def _sweep_block(sweep: _Sweep, i1: int, i2: int, codes: torch.Tensor, bits: int, group_size: int,
                 static_groups: bool, err_threshold: float | None):
    """Quantise sweep columns [i1, i2) one by one, propagating each error inside the block.

    Returns the block's weights after the in-block updates (N, B), its scaled errors (N, B)
    and, with `err_threshold`, its outlier mask (N, B) (else None).
    """
    qmax = 2**bits - 1
    w1 = sweep.weight[:, i1:i2].clone()  # (N, B)
    err1 = torch.zeros_like(w1)  # (N, B)
    out1 = torch.zeros_like(w1, dtype=torch.bool) if err_threshold is not None else None  # (N, B)
    u1 = sweep.u[i1:i2, i1:i2]  # (B, B)
    for i in range(i2 - i1):
        col = sweep.col_of[i1 + i]
        g = col // group_size
        if not static_groups and col % group_size == 0:
            s, z = _group_params(w1[:, i: i + group_size], bits)
            sweep.scales[:, g: g + 1], sweep.zeros[:, g: g + 1] = s, z
        s, z = sweep.scales[:, g], sweep.zeros[:, g]  # (N,)
        wcol = w1[:, i]  # (N,)
        q = torch.clamp(torch.round(wcol / s) + z, 0, qmax)
        deq = (q - z) * s
        err = (wcol - deq) / u1[i, i]  # (N,)
        codes[:, col] = q.to(torch.uint8)
        if out1 is not None:  # an outlier is kept exact: its error is not propagated
            out = err.abs() > err_threshold
            err.masked_fill_(out, 0.0)
            out1[:, i] = out
        w1[:, i:] -= err[:, None] * u1[i, i:][None, :]  # (N, 1)·(1, B−i)
        err1[:, i] = err
    return w1, err1, out1


def gptq_quantise(w: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  static_groups: bool = False,
                  outlier_threshold=None) -> GPTQResult:
    """GPTQ-quantise a weight (N, K) with its calibration Hessian (K, K). See module doc.

    outlier_threshold: None (plain GPTQ), a float τ, or a callable u_diag (K,) -> τ evaluated
    once U is known (U_jj in the original column order).
    """
    _check_inputs(w, hessian, group_size, block_size)
    static_groups = static_groups or act_order
    n, k = w.shape
    block = max(1, block_size // group_size) * group_size  # whole groups per lazy block
    sweep = _prepare(w, hessian, bits, group_size, damp, act_order, static_groups)
    if callable(outlier_threshold):  # e.g. a quantile of impacts that need U_jj first
        outlier_threshold = float(outlier_threshold(sweep.u_diag))

    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    track = outlier_threshold is not None
    err_threshold = None
    if track:  # per column only the test and the mask; values and impacts per block
        err_threshold = math.sqrt(max(float(outlier_threshold), 0.0))  # |w − q|/U_jj > √τ
        outliers = torch.zeros(n, k, dtype=torch.bool, device=w.device)
        compensated = torch.empty(n, k, dtype=torch.float32, device=w.device)
        impact = torch.empty_like(compensated)
    total_error = torch.zeros((), dtype=torch.float64, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, out1 = _sweep_block(sweep, i1, i2, codes, bits, group_size, static_groups, err_threshold)
        if track:  # w1 now holds the compensated weight at outliers, the dequantised elsewhere
            cols = torch.tensor(sweep.col_of[i1:i2], device=w.device)  # (B,) original columns
            groups = cols // group_size  # (B,)
            deq1 = (codes[:, cols].float() - sweep.zeros[:, groups]) * sweep.scales[:, groups]  # (N, B)
            outliers[:, cols] = out1
            compensated[:, cols] = w1
            impact[:, cols] = ((w1 - deq1) / torch.diagonal(sweep.u[i1:i2, i1:i2])[None, :]).square()
        sweep.weight[:, i2:] -= err1 @ sweep.u[i1:i2, i2:]  # (N, B)·(B, K−i2)
        total_error += err1.square().sum()

    return GPTQResult(codes, sweep.scales.to(torch.float16), sweep.zeros.to(torch.float16), sweep.u_diag,
                      float(total_error),
                      outliers if track else None, compensated if track else None,
                      impact if track else None)


def run_gptq(w: torch.Tensor, hessian: torch.Tensor, spec: "QuantConfig",
             outlier_threshold: float | None = None) -> GPTQResult:
    """`gptq_quantise` with the settings of `spec`."""
    return gptq_quantise(w.detach(), hessian, bits=spec.bits, group_size=spec.group_size,
                         damp=spec.damp, block_size=spec.block_size, act_order=spec.act_order,
                         static_groups=spec.static_groups, outlier_threshold=outlier_threshold)


class GPTQ(WeightFormat):
    """GPTQ INT-k: the codes of `ortho_kernels.packing`'s grid, chosen column by column to minimise
    ‖(Q − W) X‖² with the calibration Hessian H = X Xᵀ (see the module docstring)."""

    name = "gptq"
    bits = SUPPORTED_BITS
    needs_hessian = True
    outlier_aware = True
    base_quantiser = True

    def quantise(self, w: torch.Tensor, spec: "QuantConfig", hessian: torch.Tensor | None = None) -> QuantisedBase:
        result = run_gptq(w, hessian, spec)
        return base_from_codes(result.codes, result.scales, result.zeros, spec.bits, spec.group_size)

    def quantise_with_outliers(self, w: torch.Tensor, hessian: torch.Tensor, spec: "QuantConfig",
                               outlier_threshold) -> GPTQResult:
        return run_gptq(w, hessian, spec, outlier_threshold=outlier_threshold)
