"""The protected subspace S_gen of every linear layer, and the projections OGD applies.

Per layer, with the Kronecker eigenbasis of the public model's K-FAC factors
(`ortho_train.kfac`): C = U_Gᵀ ΔW U_A, P_S ΔW = U_G (M ⊙ C) U_Aᵀ with M the bool mask of
the S_gen eigen-pairs. A private gradient or step g becomes g − P_S g. Layers with a bias
act on the augmented weight [W, b] (K-FAC's ones column couples them).

Per-step projections run in float32 (a float32 copy of the basis: ~1e-7 relative round-off
per step, and the private displacement is stored apart from W, so its writes round at the
scale of ΔW, not of W); diagnostics (`in_subspace_ratio`) run in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ortho_train.kfac import (
    KroneckerEigenbasis,
    SubspaceConfig,
    collect_kfac,
    component_in,
    eigenbases,
    join_bias,
    project_out,
    split_bias,
)


@dataclass
class ProtectedSubspace:
    """S_gen of one linear: its eigenbasis (float64), a float32 copy, and the mask (d_out, d_in')."""

    basis: KroneckerEigenbasis
    mask: Tensor

    def __post_init__(self) -> None:
        self.fast = self.basis.to(dtype=torch.float32)

    @property
    def protected_fraction(self) -> float:
        return float(self.mask.float().mean())

    def project_out(self, d_weight: Tensor, d_bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(ΔW, Δb) with the component in S_gen removed (float32 basis)."""
        return split_bias(project_out(join_bias(d_weight, d_bias), self.fast, self.mask), d_bias is not None)

    def in_subspace_ratio(self, d_weight: Tensor, d_bias: Tensor | None = None) -> float:
        """‖P_S ΔW‖ / ‖ΔW‖ in float64 (0.0 for ΔW = 0)."""
        d = join_bias(d_weight, d_bias).double()
        total = float(d.norm())
        return float(component_in(d, self.basis, self.mask).norm()) / total if total > 0 else 0.0


def layer_directions(layer: nn.Linear, subspace: str) -> int:
    """How many directions a subspace rule counts in `layer` (columns for 'input_flattest')."""
    d_in = layer.in_features + (layer.bias is not None)
    return d_in if subspace == "input_flattest" else layer.out_features * d_in


def check_subspace_fits(layers: Mapping[str, nn.Linear], spec: SubspaceConfig) -> None:
    """At start-up: a fixed k must fit every protected layer (the mask itself needs K-FAC)."""
    if spec.k is None:
        return
    for name, layer in layers.items():
        size = layer_directions(layer, spec.name)
        if spec.k > size:
            unit = "input directions" if spec.name == "input_flattest" else "eigen-directions"
            raise ValueError(f"ogd.k={spec.k} is beyond layer {name!r}: it has {size} {unit} "
                             f"({layer.out_features}×{layer.in_features}); lower ogd.k or use ogd.fraction")


def build_subspaces(model: nn.Module, layers: dict[str, nn.Linear], spec: SubspaceConfig,
                    public_batches: Iterable[Mapping[str, Tensor]],
                    loss_fn: Callable[[nn.Module, Mapping[str, Tensor]], tuple[Tensor, Tensor]],
                    ) -> dict[str, ProtectedSubspace]:
    """K-FAC of `model` over `public_batches` (averaged), eigenbases, and the S_gen masks."""
    factors = collect_kfac(model, public_batches, loss_fn, layers)
    return {name: ProtectedSubspace(basis, spec.mask(basis, name))
            for name, basis in eigenbases(factors).items()}
