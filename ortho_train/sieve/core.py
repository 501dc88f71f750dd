"""The sieve on one layer: W ≈ dequant(W_base) + α·W_ortho, three ways (docs/methods.md §5).

- `sieve_posthoc` (LibOrtho): base = Q(W) of the fine-tuned weight; the ortho stream keeps
  the entries of R = W − dequant(base) with the largest impact R²/[H⁻¹]_jj. With an
  outlier-aware base quantiser (`format.outlier_aware`: GPTQ) the selection runs inside the sweep (SpQR-style): impact (w − q)²/U_jj² of the
  error-compensated weight w, outliers kept exact and not propagated, value w − dequant(q).
  The threshold comes from a pre-pass over the RTN residuals with the same denominators
  (top-ρ: their (1−ρ) quantile; adaptive: μ + β·σ); a top-ρ layer that overshoots its budget
  drops its lowest-impact outliers, one that undershoots keeps fewer (density is measured).
- `sieve_delta`: base = Q(W_pre) of the pre-fine-tuning weight; ortho = the top-ρ entries of
  the fine-tuning delta D = W_ft − W_pre by impact D²/[H⁻¹]_jj, value W_ft − dequant(base).
- `sieve_isolated`: base = Q(W_pre) (given: the one isolated SFT trained against); ortho on
  the support S fixed before fine-tuning, value W_ft − dequant(base). At α = 1 that is W_ft
  on S and the base off S; at α = 0 exactly the quantised pre-fine-tuning weight.

All return a `SievedLayer` with the two streams and stats: ortho density and nnz; with
`report=True` also the layer loss tr(ΔW H ΔWᵀ) at α = 0 and α = 1 (ΔW = W_eff − W_target)
and the per-column HOP report of the base error.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field

import torch

from ortho_kernels import OrthoStream, QuantisedBase
from ortho_kernels.packing import group_dequantise, group_quantise
from ortho_train.quantisation import QuantConfig, base_from_codes, quantise_weight
from ortho_train.settings import check_choices, check_settings
from ortho_train.sieve.select import (
    Selection,
    adaptive_threshold,
    budget,
    dqc_compensate,
    hinv_diagonal,
    hop_report,
    impact_scores,
    top_fraction_mask,
    top_fraction_threshold,
)

VARIANTS = ("posthoc", "delta", "isolated")


@dataclass
class SieveConfig:
    """Settings of a sieve.

    Args:
        quant: how the base stream is quantised (method, bits, group size, GPTQ options).
        rho: ortho fraction per layer for top-ρ selection (0.01 = 1%).
        selection: 'top' (top-ρ per layer) or 'adaptive' (τ = μ + β·σ of the impacts).
        beta: β of the adaptive threshold.
        dqc: fold the regular part's error into the ortho entries (the functional-outlier separability paper's DQC).
        dqc_gamma: γ of the DQC compensation.
        hop_beta: β of the per-column HOP outlier report.
        include_lm_head: sieve the LM head too (embeddings always stay dense).
    """

    quant: QuantConfig = field(default_factory=QuantConfig)
    rho: float = 0.01
    selection: Selection = "top"
    beta: float = 2.0
    dqc: bool = False
    dqc_gamma: float = 1.0
    hop_beta: float = 2.0
    include_lm_head: bool = False

    def __post_init__(self) -> None:
        check_choices("spec", selection=(self.selection, Selection))
        budget(self.rho, 1)  # validates 0 ≤ ρ ≤ 1
        check_settings("spec.quant", self.quant.rules())  # as the SieveCallback's table.spec writes it
        if not (math.isfinite(self.dqc_gamma) and self.dqc_gamma > 0):
            raise ValueError(f"dqc_gamma must be a positive number (1: the H-optimal fold), got {self.dqc_gamma}")
        if not (math.isfinite(self.hop_beta) and self.hop_beta >= 0):
            raise ValueError(f"hop_beta must be a finite number ≥ 0, got {self.hop_beta}")


@dataclass
class SievedLayer:
    base: QuantisedBase
    ortho: OrthoStream
    stats: dict


def _h_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ): the calibration loss of the layer output (up to the factor 2/N)."""
    d = delta.double()
    return float(((d @ hessian.double()) * d).sum())


def _finish(base: QuantisedBase, values: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
            hessian: torch.Tensor | None, spec: SieveConfig, report: bool) -> SievedLayer:
    """Streams from the ortho values (N, K) on `mask`, plus stats against `target`."""
    if spec.dqc and hessian is not None and bool(mask.any()):
        values = dqc_compensate(target, base.dequantise(), mask, hessian, spec.dqc_gamma,
                                spec.quant.damp)
    ortho = OrthoStream.from_mask(values, mask)
    if not bool(torch.isfinite(ortho.values).all()):
        raise ValueError("an ortho value overflows fp16 (|value| > 65504)")
    stats = {"density": ortho.density, "nnz": ortho.nnz}
    if report and hessian is not None:  # diagnostics, as costly as part of the sweep: opt-in
        deq = base.dequantise()
        stats["h_error_alpha0"] = _h_error(deq - target, hessian)
        stats["h_error_alpha1"] = _h_error(deq + ortho.to_dense() - target, hessian)
        stats["hop"] = hop_report(deq - target, hessian, spec.hop_beta, spec.quant.damp)
    return SievedLayer(base, ortho, stats)


def _select(score: torch.Tensor, spec: SieveConfig) -> torch.Tensor:
    if spec.selection == "top":
        return top_fraction_mask(score, spec.rho)
    return score > adaptive_threshold(score, spec.beta)


def sieve_posthoc(w: torch.Tensor, hessian: torch.Tensor, spec: SieveConfig,
                  report: bool = False) -> SievedLayer:
    """LibOrtho's sieve of a fine-tuned weight (N, K); see the module docstring."""
    w = w.detach().float()
    quantiser = spec.quant.quantiser
    if not quantiser.outlier_aware:  # quantise, then select the outliers from the residual
        base = quantise_weight(w, spec.quant, hessian)
        residual = w - base.dequantise()  # (N, K)
        mask = _select(impact_scores(residual, hinv_diagonal(hessian, spec.quant.damp)), spec)
        return _finish(base, residual, mask, w, hessian, spec, report)

    g = spec.quant.group_size  # the RTN pre-pass needs only its residual: no packing
    rtn_residual = w - group_dequantise(*group_quantise(w, bits=spec.quant.bits, group_size=g), g)  # (N, K)

    def threshold(u_diag: torch.Tensor) -> float:
        prepass = impact_scores(rtn_residual, u_diag.square())  # (N, K)
        if spec.selection == "top":
            return top_fraction_threshold(prepass, spec.rho)
        return adaptive_threshold(prepass, spec.beta)

    result = quantiser.quantise_with_outliers(w, hessian, spec.quant, threshold)  # codes, not packed
    base = base_from_codes(result.codes, result.scales, result.zeros, spec.quant.bits,
                           spec.quant.group_size)
    mask = result.outlier_mask
    keep = budget(spec.rho, mask.numel())
    if spec.selection == "top" and int(mask.sum()) > keep:
        score = result.impact.masked_fill(~mask, -1.0)
        mask = top_fraction_mask(score, spec.rho)
    deq = group_dequantise(result.codes, result.scales, result.zeros, g)  # (N, K), = base's
    values = result.compensated - deq  # (N, K): exact at outlier positions
    return _finish(base, values, mask, w, hessian, spec, report)


def sieve_delta(w_ft: torch.Tensor, w_pre: torch.Tensor, hessian: torch.Tensor, spec: SieveConfig,
                base: QuantisedBase | None = None, report: bool = False) -> SievedLayer:
    """Base from the pre-fine-tuning weight, ortho = top-ρ of the fine-tuning delta."""
    if w_ft.shape != w_pre.shape:
        raise ValueError(f"fine-tuned {tuple(w_ft.shape)} and pre-fine-tuning {tuple(w_pre.shape)} "
                         f"weights differ in shape")
    w_ft, w_pre = w_ft.detach().float(), w_pre.detach().float()
    if base is None:
        base = quantise_weight(w_pre, spec.quant, hessian)
    score = impact_scores(w_ft - w_pre, hinv_diagonal(hessian, spec.quant.damp))
    mask = _select(score, spec)
    return _finish(base, w_ft - base.dequantise(), mask, w_ft, hessian, spec, report)


def sieve_isolated(w_ft: torch.Tensor, base: QuantisedBase, support: torch.Tensor,
                   hessian: torch.Tensor | None = None, spec: SieveConfig | None = None,
                   report: bool = False) -> SievedLayer:
    """Ortho on the fixed support S (bool (N, K)): W_ft − dequant(base) there."""
    if support.shape != w_ft.shape or support.dtype != torch.bool:
        raise ValueError(f"support must be a bool mask of shape {tuple(w_ft.shape)}, got "
                         f"{support.dtype} {tuple(support.shape)}")
    if tuple(base.shape) != tuple(w_ft.shape):
        raise ValueError(f"base {base.shape} does not match the weight {tuple(w_ft.shape)}")
    spec = spec or SieveConfig(quant=QuantConfig(bits=base.bits, group_size=base.group_size))
    w_ft = w_ft.detach().float()
    spec = SieveConfig(quant=spec.quant, rho=spec.rho, hop_beta=spec.hop_beta)  # never DQC: S is fixed
    return _finish(base, w_ft - base.dequantise(), support, w_ft, hessian, spec, report)
