"""The Kronecker eigenbasis of K-FAC factors: coordinates of a weight change in which the
K-FAC curvature is diagonal.

With A = U_A diag(σ_A) U_Aᵀ and G = U_G diag(σ_G) U_Gᵀ (float64 `eigh`, ascending, negative
round-off eigenvalues clamped to 0), the eigenvectors of F ≈ A ⊗ G are u_G,i ⊗ u_A,j with

    λ_ij = σ_G,i · σ_A,j                         (d_out × d_in)

and a weight change ΔW (d_out × d_in) has coordinates and quadratic form

    C = U_Gᵀ ΔW U_A,        ΔW = U_G C U_Aᵀ,        vec(ΔW)ᵀ F vec(ΔW) ≈ Σ_ij λ_ij C_ij².

Bias convention: a layer with a bias has A of size d_in+1 (ones column last, see
`ortho_train.kfac.factors`), so K-FAC acts on the augmented weight
W_aug = [W, b] (d_out × (d_in+1)). Pass weight and bias changes together as
`join_bias(dW, db)` = cat([dW, db[:, None]], 1) and split the result with `split_bias`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ortho_train.kfac.factors import KFACFactors


def join_bias(d_weight: Tensor, d_bias: Tensor | None) -> Tensor:
    """[ΔW, Δb] (d_out, d_in+1), or ΔW unchanged without a bias."""
    if d_bias is None:
        return d_weight
    return torch.cat([d_weight, d_bias.reshape(-1, 1).to(d_weight.dtype)], dim=1)  # (d_out, d_in+1)


def split_bias(d_aug: Tensor, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    """Inverse of `join_bias`: (ΔW (d_out, d_in), Δb (d_out,) or None)."""
    if not has_bias:
        return d_aug, None
    return d_aug[:, :-1], d_aug[:, -1]


def _eigh(matrix: Tensor, name: str) -> tuple[Tensor, Tensor]:
    m = matrix.double()
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"K-FAC factor {name} must be square, got {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"K-FAC factor {name} contains NaN or Inf")
    values, vectors = torch.linalg.eigh((m + m.T) / 2)  # symmetrised: sums of outer products
    return values.clamp_min(0.0), vectors


@dataclass
class KroneckerEigenbasis:
    """U_A (d_in', d_in'), S_A (d_in',), U_G (d_out, d_out), S_G (d_out,), all float64.

    d_in' = d_in + 1 when `has_bias`. Eigenvalues ascend (as `eigh` returns them).
    """

    U_A: Tensor
    S_A: Tensor
    U_G: Tensor
    S_G: Tensor
    has_bias: bool = False

    @classmethod
    def from_factors(cls, factors: KFACFactors) -> "KroneckerEigenbasis":
        s_a, u_a = _eigh(factors.A, "A")
        s_g, u_g = _eigh(factors.G, "G")
        return cls(u_a, s_a, u_g, s_g, factors.has_bias)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in') of the (augmented) weight this basis acts on."""
        return self.U_G.shape[0], self.U_A.shape[0]

    def eigenvalues(self) -> Tensor:
        """λ (d_out, d_in') = outer(S_G, S_A), float64."""
        return torch.outer(self.S_G, self.S_A)

    def _check(self, d: Tensor, what: str) -> None:
        if tuple(d.shape) != self.shape:
            hint = " (a layer with a bias takes join_bias(dW, db))" if self.has_bias else ""
            raise ValueError(f"{what} has shape {tuple(d.shape)}, the eigenbasis acts on "
                             f"{self.shape}{hint}")

    def coefficients(self, d_weight: Tensor) -> Tensor:
        """C = U_Gᵀ ΔW U_A (d_out, d_in'), in the basis' dtype (float64 unless moved)."""
        self._check(d_weight, "ΔW")
        return self.U_G.T @ d_weight.to(self.U_G) @ self.U_A

    def from_coefficients(self, coefficients: Tensor) -> Tensor:
        """ΔW = U_G C U_Aᵀ (d_out, d_in'), in the basis' dtype."""
        self._check(coefficients, "C")
        return self.U_G @ coefficients.to(self.U_G) @ self.U_A.T

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "KroneckerEigenbasis":
        """A copy on `device` / in `dtype`; coefficients and projections then compute in that
        dtype (float32 halves the cost of a projection at ~1e-7 relative round-off)."""
        return KroneckerEigenbasis(*(t.to(device, dtype) for t in (self.U_A, self.S_A, self.U_G, self.S_G)),
                                   self.has_bias)


def eigenbases(factors: dict[str, KFACFactors]) -> dict[str, KroneckerEigenbasis]:
    """`KroneckerEigenbasis.from_factors` for every layer."""
    return {name: KroneckerEigenbasis.from_factors(f) for name, f in factors.items()}
