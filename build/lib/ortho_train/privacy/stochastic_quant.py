"""Stochastic quantisation of the regular weights (the HOP/DQC paper, "A Geometric Theory of
Functionally Sensitive Outlier Separability", §5.3 "privacy extension: stochastic quantisation").

On the INT-k lattice of `ortho_kernels.group_quantise` (asymmetric, group-wise: per group a scale s
and an integer zero z), round-to-nearest stores q = clamp(round(w/s) + z, 0, 2^k − 1). Here a
regular (non-outlier) weight instead stores

    q = clamp(Y + z, 0, 2^k − 1),    Y ~ N_Z(w/s, σ²):  P(Y = y) ∝ exp(−(y − w/s)² / 2σ²), y ∈ Z

a discrete Gaussian on the integers centred on the exact, unrounded position w/s (σ in lattice
steps). Departure from the paper's wording, which centres the discrete Gaussian on the nearest
lattice point: centring on w/s makes the code unbiased up to the clamp, E[Y] ≈ w/s, and
σ → 0 is exactly round-to-nearest (σ = 0 is RTN bit for bit). Outliers (the ortho support)
keep their RTN code and their exact value rides in the ortho stream, W − dequant(base); with a
Hessian, DQC folds the regular part's error (now including the sampling noise) into them, the
paper's own method ("DQC + stochastic quantisation").

Sampling is exact on a finite window: the integers y with |y − floor(w/s)| ≤ ⌈6σ + 1⌉ (one
more on the upper side), weights exp(−(y − c)²/2σ²) in float64, normalised, inverse-CDF draw.
The mass outside the window is below P(|N(0, σ²)| > 6σ) ≈ 2·10⁻⁹ of the untruncated law.

About the guarantee the paper claims (its Theorem 2, ε ≈ Δ₂/σ): it assumes the quantised
weights' L2 sensitivity Δ₂ to one training example is bounded. Nothing in ordinary training
bounds it, so `paper_epsilon` reports the formula only beside the Δ₂ it assumes and says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ortho_kernels import OrthoStream
from ortho_kernels.packing import SUPPORTED_BITS, group_dequantise, group_quantise
from ortho_train.quantisation import base_from_codes
from ortho_train.sieve.core import SievedLayer
from ortho_train.sieve.select import dqc_compensate

TAIL_SIGMAS = 6.0
_CHUNK_CELLS = 1 << 22  # entries × window cells per sampling chunk (memory bound)


def discrete_gaussian(center: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Y ~ N_Z(c, σ²) entrywise on the integers (int64, same shape as `center`).

    σ = 0 returns round(c) (ties to even, as torch.round); see the module docstring for the
    window truncation.
    """
    if not sigma >= 0 or math.isinf(sigma):
        raise ValueError(f"discrete Gaussian sigma must be finite and ≥ 0, got {sigma}")
    if not bool(torch.isfinite(center).all()):
        raise ValueError("discrete Gaussian centre contains NaN or Inf")
    if sigma == 0:
        return torch.round(center).to(torch.int64)
    half = math.ceil(TAIL_SIGMAS * sigma + 1)
    offsets = torch.arange(-half, half + 2, dtype=torch.float64, device=center.device)  # (W,)
    flat = center.reshape(-1).double()  # (M,)
    out = torch.empty(flat.shape, dtype=torch.int64, device=center.device)
    step = max(1, _CHUNK_CELLS // offsets.numel())
    for start in range(0, flat.numel(), step):
        c = flat[start: start + step]  # (m,)
        lattice = c.floor()[:, None] + offsets[None, :]  # (m, W) candidate integers
        logits = -(lattice - c[:, None]).square() / (2 * sigma**2)  # (m, W)
        cdf = torch.softmax(logits, dim=1).cumsum(dim=1)  # (m, W)
        u = torch.rand(c.shape, generator=generator, dtype=torch.float64,
                       device=generator.device).to(c.device)  # (m,)
        pick = (cdf < u[:, None]).sum(dim=1).clamp(max=offsets.numel() - 1)  # (m,)
        out[start: start + step] = lattice.gather(1, pick[:, None]).squeeze(1).to(torch.int64)
    return out.reshape(center.shape)


@dataclass
class StochasticQuantConfig:
    """Settings of stochastic quantisation.

    Args:
        bits: INT-k of the base (2, 3, 4 or 8).
        group_size: weights per (scale, zero) pair along the input dimension.
        sigma: std of the discrete Gaussian in lattice steps (0 = round to nearest).
        seed: seed of the sampling generator.
        dqc_gamma: γ of the DQC compensation of the outliers (used when a Hessian is given).
        damp: damping of that Hessian (fraction of mean diag).
    """

    bits: int = 4
    group_size: int = 128
    sigma: float = 0.5
    seed: int = 0
    dqc_gamma: float = 1.0
    damp: float = 0.01

    def __post_init__(self) -> None:
        if not self.sigma >= 0 or math.isinf(self.sigma):
            raise ValueError(f"stochastic quantisation sigma must be finite and ≥ 0, got {self.sigma}")
        if self.group_size < 1:
            raise ValueError(f"stochastic quantisation group_size must be positive, got {self.group_size}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"stochastic quantisation bits must be one of {SUPPORTED_BITS}, got {self.bits}")


def stochastic_codes(w: torch.Tensor, bits: int, group_size: int, sigma: float,
                     generator: torch.Generator, regular: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (N, K), scales fp16 (N, G), zeros fp16 (N, G)) on RTN's lattice, with the
    entries of `regular` (default: all) sampled, the others rounded to nearest."""
    rtn, scales, zeros = group_quantise(w, bits=bits, group_size=group_size)
    n, k = w.shape
    s = scales.float().repeat_interleave(group_size, dim=1)[:, :k]  # (N, K)
    z = zeros.float().repeat_interleave(group_size, dim=1)[:, :k]  # (N, K)
    offset = discrete_gaussian(w.float() / s, sigma, generator)  # (N, K) integers around w/s
    sampled = (offset + z.to(torch.int64)).clamp(0, 2**bits - 1).to(torch.uint8)
    codes = sampled if regular is None else torch.where(regular, sampled, rtn)
    return codes, scales, zeros


def stochastic_quantise(w: torch.Tensor, spec: StochasticQuantConfig,
                        outlier_mask: torch.Tensor | None = None, hessian: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> SievedLayer:
    """Base = stochastic INT-k codes of the regular weights; ortho = the outliers' exact values
    (DQC-compensated when `hessian` is given). A `SievedLayer`, as the sieve returns."""
    w = w.detach().float()
    mask = torch.zeros_like(w, dtype=torch.bool) if outlier_mask is None else outlier_mask
    if mask.shape != w.shape or mask.dtype != torch.bool:
        raise ValueError(f"outlier mask must be bool {tuple(w.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    generator = generator or torch.Generator().manual_seed(spec.seed)
    codes, scales, zeros = stochastic_codes(w, spec.bits, spec.group_size, spec.sigma, generator, ~mask)
    base = base_from_codes(codes, scales, zeros, spec.bits, spec.group_size)
    deq = group_dequantise(codes, scales, zeros, spec.group_size)  # (N, K)
    values = w - deq
    if hessian is not None and bool(mask.any()):
        values = dqc_compensate(w, deq, mask, hessian, spec.dqc_gamma, spec.damp)
    ortho = OrthoStream.from_mask(values, mask)
    rtn = group_quantise(w, bits=spec.bits, group_size=spec.group_size)[0]
    moved = (codes != rtn) & ~mask
    stats = {"density": ortho.density, "nnz": ortho.nnz, "sigma": spec.sigma,
             "changed_code_fraction": float(moved.float().mean()), "dqc": hessian is not None}
    return SievedLayer(base, ortho, stats)


def stochastic_quantise_model(model: nn.Module, spec: StochasticQuantConfig,
                              outlier_masks: dict[str, torch.Tensor],
                              hessians: dict[str, torch.Tensor] | None = None) -> dict[str, SievedLayer]:
    """`stochastic_quantise` of every linear named in `outlier_masks` (one generator, name
    order), ready for `ortho_train.sieve.build_dual_stream_model`."""
    generator = torch.Generator().manual_seed(spec.seed)
    return {name: stochastic_quantise(model.get_submodule(name).weight, spec, outlier_masks[name],
                                      None if hessians is None else hessians[name], generator)
            for name in sorted(outlier_masks)}


def paper_epsilon(sigma: float, assumed_sensitivity: float) -> dict:
    """The paper's ε ≈ Δ₂/σ, only with the Δ₂ it assumes and what that assumption means."""
    if not sigma > 0:
        raise ValueError(f"the paper's ε needs sigma > 0, got {sigma}")
    if not assumed_sensitivity > 0:
        raise ValueError(f"assumed_sensitivity (Δ₂) must be positive, got {assumed_sensitivity}")
    return {
        "epsilon_formula": assumed_sensitivity / sigma,
        "assumed_l2_sensitivity": assumed_sensitivity,
        "sigma_lattice_steps": sigma,
        "statement": ("ε ≈ Δ₂/σ holds only if one training example moves the quantised positions "
                      "by at most Δ₂ (L2, lattice steps); the training did not bound that "
                      "sensitivity, so this is not a privacy guarantee of the released model."),
    }
