"""Which entries of a weight go to the ortho stream: impacts, selection rules, HOP, DQC.

Pure tensor maths on one layer (W: N × K, H: K × K), no modules.

- Impact (LibOrtho, eq. 8):  I_ij = R_ij² / [H⁻¹]_jj, R = W − dequant(Q(W)). It is the
  increase of the layer loss ‖ΔW X‖² when entry ij alone is left quantised and the other
  entries of row i re-optimised (the OBS saliency); with GPTQ the sweep's own denominator
  U_jj² (upper Cholesky of H⁻¹) is used instead, see `ortho_train.quantisation.gptq`.
- Selection: top-ρ per layer (exactly ceil(ρ·N·K) entries) or adaptive τ = μ_I + β·σ_I over
  the layer's impacts (functional-outlier separability paper, eq. 5).
- HOP report (functional-outlier separability paper, Alg. 1): per input column j the geometric error
  E_j = ‖(ΔW L)_{:, j}‖² with H = L Lᵀ, ΔW = W_eff − W; Σ_j E_j = tr(ΔW H ΔWᵀ), the layer-output
  error. Columns with E_j > μ_E + β·σ_E are the "functional outliers".
- DQC (functional-outlier separability paper, eq. 8): quantise the regular part first, then fold its error into the
  outlier entries by the H-metric projection: per row, with δ_off = base error off S fixed,
  the S entries move by γ·δ_S, δ_S = −H_SS⁻¹ H_S,off δ_off (γ = 1 minimises the row's
  H-weighted error).
"""
from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from ortho_train.curvature import prepare_hessian

Selection = Literal["top", "adaptive"]
SELECTIONS = get_args(Selection)


def hinv_diagonal(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """[H⁻¹]_jj (K,) of the damped Hessian (dead columns set to H_jj = 1)."""
    h, _ = prepare_hessian(hessian, damp)
    try:
        return torch.cholesky_inverse(torch.linalg.cholesky(h)).diagonal().float()
    except torch.linalg.LinAlgError as err:
        raise ValueError("the damped Hessian is not positive definite; raise `damp`") from err


def impact_scores(residual: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """I_ij = R_ij² / d_j for R (N, K) and a per-column denominator d (K,)."""
    if denominator.shape != (residual.shape[1],):
        raise ValueError(f"denominator must have shape ({residual.shape[1]},), got "
                         f"{tuple(denominator.shape)}")
    return residual.float().square() / denominator.float()[None, :]  # (N, K)


def budget(rho: float, numel: int) -> int:
    """Number of ortho entries top-ρ keeps: ceil(ρ·numel) (0 for ρ = 0)."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho}")
    return min(numel, math.ceil(rho * numel - 1e-9))


def top_fraction_mask(score: torch.Tensor, rho: float) -> torch.Tensor:
    """Boolean mask of the ceil(ρ·numel) largest scores (ties broken by position)."""
    count = budget(rho, score.numel())
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if count:
        mask[score.reshape(-1).float().topk(count, sorted=False).indices] = True
    return mask.reshape(score.shape)


def top_fraction_threshold(score: torch.Tensor, rho: float) -> float:
    """The score of the last entry top-ρ keeps (inf when it keeps none, −inf when all)."""
    count = budget(rho, score.numel())
    if count == 0:
        return math.inf
    if count == score.numel():
        return -math.inf
    flat = score.reshape(-1).float()
    return float(flat.kthvalue(flat.numel() - count + 1).values)  # the count-th largest


def adaptive_threshold(score: torch.Tensor, beta: float) -> float:
    """τ = μ + β·σ over the layer's scores (functional-outlier separability paper)."""
    s = score.reshape(-1).double()
    return float(s.mean() + beta * s.std(unbiased=False))


def hop_column_errors(delta: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """E_j = ‖(ΔW L)_{:, j}‖² (K,) with H = L Lᵀ (damped); Σ_j E_j = tr(ΔW H ΔWᵀ)."""
    h, _ = prepare_hessian(hessian, damp)
    lower = torch.linalg.cholesky(h.double())  # (K, K)
    projected = delta.double() @ lower  # (N, K)
    return projected.square().sum(dim=0).float()


def hop_report(delta: torch.Tensor, hessian: torch.Tensor, beta: float = 2.0,
               damp: float = 0.01) -> dict:
    """Per-column HOP errors of ΔW with the τ = μ + β·σ functional-outlier columns."""
    errors = hop_column_errors(delta, hessian, damp)  # (K,)
    tau = adaptive_threshold(errors, beta)
    outliers = errors > tau
    total = float(errors.sum())
    return {
        "column_errors": errors.tolist(),
        "tau": tau,
        "outlier_columns": outliers.nonzero().squeeze(1).tolist(),
        "outlier_error_share": float(errors[outliers].sum()) / total if total > 0 else 0.0,
        "total_error": total,
    }


def dqc_compensate(w: torch.Tensor, base_weight: torch.Tensor, mask: torch.Tensor,
                   hessian: torch.Tensor, gamma: float = 1.0, damp: float = 0.01) -> torch.Tensor:
    """Ortho values (N, K, zero off the mask) after folding the regular error into S.

    Without compensation the ortho value is R = W − base on S (so W_eff = W there). With it,
    per row i with support S_i: o_S = R_S + γ·δ_S, δ_S = −H_SS⁻¹ H_S,off (base − W)_off.
    """
    h, _ = prepare_hessian(hessian, damp)
    h = h.double()
    residual = (w.double() - base_weight.double())  # (N, K)
    out = torch.where(mask, residual, torch.zeros_like(residual))
    err_off = torch.where(mask, torch.zeros_like(residual), -residual)  # base − W off S
    for i in mask.any(dim=1).nonzero().squeeze(1).tolist():
        s = mask[i].nonzero().squeeze(1)  # (|S_i|,)
        rhs = h[s] @ err_off[i]  # (|S_i|,) = H_S,· δ_off (δ is zero on S)
        delta_s = -torch.linalg.solve(h[s][:, s], rhs)
        out[i, s] += gamma * delta_s
    return out.float()
