"""ΔW_priv stored as compactly as its subspace allows: coefficients on the free directions.

The private displacement of an OGD fine-tune lies (to round-off) in the complement of S_gen,
so in the layer's Kronecker eigenbasis C = U_Gᵀ ΔW U_A it has only the coefficients C_ij
with M_ij = False. `SubspaceDelta` keeps those (fp16, row-major order of ~M) and rebuilds
ΔW = U_G C U_Aᵀ. Storage per layer of n = d_out·d_in' weights:

    coefficients: 16 · #free             bits
    basis:        16 · (d_out² + d_in'² + d_out + d_in')  (U_G, U_A, and the eigenvalues that
                                          regenerate M), public: computed from the public model

`bits_per_weight` reports both, over the protected linears' weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ortho_train.kfac import KroneckerEigenbasis, join_bias, split_bias
from ortho_train.ogd.subspaces import ProtectedSubspace

VALUE_BITS = 16  # fp16 coefficients and basis entries


@dataclass
class SubspaceDelta:
    """One layer's ΔW_priv: fp16 coefficients on the directions off S_gen."""

    coefficients: Tensor  # (#free,) fp16
    basis: KroneckerEigenbasis
    mask: Tensor  # (d_out, d_in') bool: S_gen

    @classmethod
    def compress(cls, d_weight: Tensor, d_bias: Tensor | None, subspace: ProtectedSubspace) -> "SubspaceDelta":
        c = subspace.basis.coefficients(join_bias(d_weight.detach(), d_bias))  # (d_out, d_in') float64
        return cls(c[~subspace.mask].to(torch.float16), subspace.basis, subspace.mask)

    def dense(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor | None]:
        """(ΔW, Δb) rebuilt from the stored coefficients (the S_gen ones are zero)."""
        c = torch.zeros(self.mask.shape, dtype=self.basis.U_G.dtype, device=self.mask.device)
        c[~self.mask] = self.coefficients.to(c)
        return split_bias(self.basis.from_coefficients(c).to(dtype), self.basis.has_bias)

    @property
    def num_weights(self) -> int:
        return self.mask.numel()

    @property
    def coefficient_bits(self) -> int:
        return VALUE_BITS * self.coefficients.numel()

    @property
    def basis_bits(self) -> int:
        d_out, d_in = self.mask.shape
        return VALUE_BITS * (d_out * d_out + d_in * d_in + d_out + d_in)


def bits_per_weight(deltas: dict[str, SubspaceDelta]) -> dict[str, float]:
    """Private-stream bits per protected weight: coefficients alone, and the bases."""
    weights = sum(d.num_weights for d in deltas.values())
    return {"coefficients": sum(d.coefficient_bits for d in deltas.values()) / weights,
            "basis": sum(d.basis_bits for d in deltas.values()) / weights,
            "free_fraction": sum(d.coefficients.numel() for d in deltas.values()) / weights}
