"""Subspaces of a layer's weight space in its Kronecker eigenbasis, and projections onto them.

A subspace S is a bool mask M (d_out, d_in') over the eigen-directions u_G,i ⊗ u_A,j of
`KroneckerEigenbasis` (d_in' = d_in + 1 with a bias). With C = U_Gᵀ ΔW U_A,

    component_in(ΔW)  = P_S ΔW = U_G (M ⊙ C) U_Aᵀ
    project_out(ΔW)   = ΔW − P_S ΔW

P_S is an orthogonal projector (U_A, U_G orthogonal), so project_out is idempotent and its
result is orthogonal to S.

Mask builders (`SUBSPACES`, selected by name, sized by `k` directions or a `fraction` of them):

* "flattest": the k pairs with the smallest λ_ij = σ_G,i σ_A,j. This is S_gen of the
  K-FAC / orthogonal-gradient-descent task-vector method: the directions where public-data
  curvature is lowest, which private fine-tuning is kept out of.
* "sharpest": the k largest λ_ij, the directions gradient-projection-memory methods protect
  (moving along them changes the public loss most).
* "input_flattest": an input-only basis from A alone: the k columns of U_A with the smallest
  σ_A, with every output direction (M[:, j] = True for those j); k counts columns.

Ties in λ are broken by index order (stable sort), so masks are deterministic.

Projecting a gradient: do it on the true gradient, i.e. after AMP's `unscale_` and before
clipping (a joint clip norm would otherwise see the removed component). With Adam-type
optimisers project the applied step instead (`project_update_`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from ortho_train.kfac.eigenbasis import KroneckerEigenbasis, join_bias, split_bias
from ortho_train.registry import Registry
from ortho_train.settings import check_choices


def _resolve_k(size: int, k: int | None, fraction: float | None, name: str, layer: str) -> int:
    """k from exactly one of k / fraction, checked against the `size` directions."""
    where = f" for layer {layer!r}" if layer else ""
    if (k is None) == (fraction is None):
        raise ValueError(f"subspace {name!r}: give exactly one of k and fraction (got k={k}, "
                         f"fraction={fraction})")
    if fraction is not None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"subspace {name!r}: fraction must be in (0, 1), got {fraction}")
        return int(round(fraction * size))
    if not 0 <= k <= size:
        raise ValueError(f"subspace {name!r}: k={k} is beyond the layer's {size} directions{where}")
    return k


def _first_k(order: Tensor, k: int, shape: tuple[int, int]) -> Tensor:
    mask = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
    mask[order[:k]] = True
    return mask.view(shape)  # (d_out, d_in')


def flattest(basis: KroneckerEigenbasis, k: int | None = None, fraction: float | None = None,
             layer: str = "") -> Tensor:
    """The k eigen-pairs with the smallest λ_ij (S_gen)."""
    lam = basis.eigenvalues()  # (d_out, d_in')
    k = _resolve_k(lam.numel(), k, fraction, "flattest", layer)
    return _first_k(torch.argsort(lam.flatten(), stable=True), k, lam.shape)


def sharpest(basis: KroneckerEigenbasis, k: int | None = None, fraction: float | None = None,
             layer: str = "") -> Tensor:
    """The k eigen-pairs with the largest λ_ij."""
    lam = basis.eigenvalues()  # (d_out, d_in')
    k = _resolve_k(lam.numel(), k, fraction, "sharpest", layer)
    return _first_k(torch.argsort(lam.flatten(), descending=True, stable=True), k, lam.shape)


def input_flattest(basis: KroneckerEigenbasis, k: int | None = None, fraction: float | None = None,
                   layer: str = "") -> Tensor:
    """The k input directions (columns of U_A) with the smallest σ_A, all output directions."""
    d_out, d_in = basis.shape
    k = _resolve_k(d_in, k, fraction, "input_flattest", layer)
    columns = torch.zeros(d_in, dtype=torch.bool, device=basis.S_A.device)
    columns[torch.argsort(basis.S_A, stable=True)[:k]] = True
    return columns.expand(d_out, d_in).clone()  # (d_out, d_in')


SubspaceName = Literal["flattest", "sharpest", "input_flattest"]  # the names of SUBSPACES
SUBSPACES: Registry[Callable[..., Tensor]] = Registry("protected subspace", setting="subspace.name",
                                                      literal=SubspaceName)
SUBSPACES.add("flattest", flattest)
SUBSPACES.add("sharpest", sharpest)
SUBSPACES.add("input_flattest", input_flattest)


@dataclass
class SubspaceConfig:
    """Which subspace to protect per layer.

    Args:
        name: a key of `SUBSPACES` ("flattest", "sharpest", "input_flattest").
        fraction: share of the layer's directions, in (0, 1); or
        k: a number of directions (eigen-pairs, or columns for "input_flattest").
    """

    name: SubspaceName = "flattest"
    fraction: float | None = None
    k: int | None = None

    def __post_init__(self) -> None:
        check_choices("subspace", name=(self.name, SubspaceName))
        if (self.k is None) == (self.fraction is None):
            raise ValueError(f"subspace {self.name!r}: give exactly one of k and fraction")
        if self.fraction is not None and not 0.0 < self.fraction < 1.0:
            raise ValueError(f"subspace {self.name!r}: fraction must be in (0, 1), got {self.fraction}")
        if self.k is not None and self.k < 0:
            raise ValueError(f"subspace {self.name!r}: k must be ≥ 0, got {self.k}")

    def mask(self, basis: KroneckerEigenbasis, layer: str = "") -> Tensor:
        return SUBSPACES[self.name](basis, k=self.k, fraction=self.fraction, layer=layer)

    def masks(self, bases: dict[str, KroneckerEigenbasis]) -> dict[str, Tensor]:
        return {name: self.mask(basis, name) for name, basis in bases.items()}


def component_in(d_weight: Tensor, basis: KroneckerEigenbasis, mask: Tensor) -> Tensor:
    """P_S ΔW = U_G (M ⊙ C) U_Aᵀ, in ΔW's dtype (computed in the basis' dtype)."""
    if mask.shape != basis.shape:
        raise ValueError(f"subspace mask {tuple(mask.shape)} does not match the basis {basis.shape}")
    coefficients = basis.coefficients(d_weight)  # (d_out, d_in')
    return basis.from_coefficients(coefficients * mask).to(d_weight.dtype)


def project_out(d_weight: Tensor, basis: KroneckerEigenbasis, mask: Tensor) -> Tensor:
    """ΔW − U_G (M ⊙ C) U_Aᵀ: ΔW with its component in S removed, in ΔW's dtype."""
    inside = component_in(d_weight, basis, mask).to(basis.U_G.dtype)
    return (d_weight.to(basis.U_G.dtype) - inside).to(d_weight.dtype)


@torch.no_grad()
def project_update_(weight: Tensor, before: Tensor, basis: KroneckerEigenbasis, mask: Tensor,
                    bias: Tensor | None = None, bias_before: Tensor | None = None) -> Tensor:
    """Project the step an optimiser just applied off S, in place: W ← W₀ + project_out(W − W₀).

    Call after `optimizer.step()` with `before` the weight copied before it. Adam-type
    optimisers rescale each coordinate, which moves a projected *gradient* back into S;
    projecting the applied step keeps the accumulated displacement out of S whatever the
    optimiser (weight decay included). For a layer with a bias, give `bias` and `bias_before`
    too: K-FAC couples them through the ones column of A.

    The write W₀ + step rounds to the weight's dtype, which leaves a component in S of order
    ulp(W) per step (float32: ~1e-7·|W|).

    Returns the projected augmented step (d_out, d_in') in the weight's dtype.
    """
    if (bias is None) != (bias_before is None):
        raise ValueError("project_update_: give both bias and bias_before, or neither")
    if basis.has_bias != (bias is not None):
        raise ValueError(f"project_update_: the eigenbasis {'has' if basis.has_bias else 'has no'} "
                         "bias column; pass the bias and its value before the step accordingly")
    step = join_bias(weight - before, None if bias is None else bias - bias_before)  # (d_out, d_in')
    step = project_out(step, basis, mask)
    d_weight, d_bias = split_bias(step, basis.has_bias)
    weight.copy_(before + d_weight)
    if bias is not None:
        bias.copy_(bias_before + d_bias)
    return step
