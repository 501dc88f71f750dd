"""Geometry of weight displacements: entanglement, energy inside a subspace, loss barriers.

* Entanglement of two displacements ΔA, ΔB (e.g. the public and the private part of a
  fine-tune), per layer and over all layers as one vector, in float64:

      η = |⟨ΔA, ΔB⟩| / (‖ΔA‖ ‖ΔB‖)            0 = orthogonal, 1 = parallel

  η between τ_gen and τ_mem of one SVD split is 0 by construction (they span orthogonal
  singular subspaces, ⟨U_k Σ_k V_kᵀ, U_r Σ_r V_rᵀ⟩ = tr(V_k Σ_k U_kᵀ U_r Σ_r V_rᵀ) = 0 as
  U_kᵀ U_r = 0) and says nothing about separation; it is meaningful only between updates
  produced by different procedures or data (public vs private steps of one run).
* Energy of ΔW in a subspace S of the Kronecker eigenbasis: ‖M ⊙ C‖² / ‖C‖², C = U_Gᵀ ΔW U_A
  (‖C‖ = ‖ΔW‖: the basis is orthogonal).
* Curvature profile of ΔW: `curvature_quadratic` = Σ_ij λ_ij C_ij² = vec(ΔW)ᵀ (A ⊗ G) vec(ΔW)
  (twice the K-FAC prediction of the loss change), and `curvature_spectrum`, the share of
  ‖ΔW‖² in each of `bins` equal-count groups of eigen-pairs ordered by λ (flattest first).
* Linear-mode-connectivity loss barrier between θ_a and θ_b over fixed batches, with
  θ(t) = (1−t)·θ_a + t·θ_b on `points` evenly spaced t ∈ [0, 1]:

      linear form:  max_t [L(θ(t)) − ((1−t)·L(θ_a) + t·L(θ_b))]
      paper form:   max_t L(θ(t)) − min(L(θ_a), L(θ_b))   (≥ |L(θ_a) − L(θ_b)| always)

  The linear form is 0 for a loss linear in θ; the paper form (the K-FAC / OGD task-vector
  method's) also counts the gap between the endpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ortho_train.kfac.eigenbasis import KroneckerEigenbasis
from ortho_train.models import eval_mode


@dataclass
class Entanglement:
    """η per layer and overall (NaN where a displacement is zero)."""

    per_layer: dict[str, float]
    overall: float


def _ratio(dot: float, sq_a: float, sq_b: float) -> float:
    norm = math.sqrt(sq_a) * math.sqrt(sq_b)
    return abs(dot) / norm if norm > 0 else math.nan


def entanglement(delta_a: Mapping[str, Tensor], delta_b: Mapping[str, Tensor]) -> Entanglement:
    """η = |⟨ΔA, ΔB⟩| / (‖ΔA‖‖ΔB‖) per key of `delta_a` and over all keys (float64)."""
    missing = [k for k in delta_a if k not in delta_b]
    if missing:
        raise KeyError(f"entanglement: layers missing from the second displacement: {missing[:3]}")
    per_layer, dot, sq_a, sq_b = {}, 0.0, 0.0, 0.0
    for key, a in delta_a.items():
        b = delta_b[key]
        if a.shape != b.shape:
            raise ValueError(f"entanglement: {key!r} has shapes {tuple(a.shape)} and {tuple(b.shape)}")
        a, b = a.double(), b.double()
        d, na, nb = float((a * b).sum()), float((a * a).sum()), float((b * b).sum())
        per_layer[key] = _ratio(d, na, nb)
        dot, sq_a, sq_b = dot + d, sq_a + na, sq_b + nb
    return Entanglement(per_layer, _ratio(dot, sq_a, sq_b))


def subspace_energy(d_weight: Tensor, basis: KroneckerEigenbasis, mask: Tensor) -> float:
    """‖M ⊙ C‖² / ‖C‖² of ΔW (d_out, d_in') in the eigenbasis; NaN for ΔW = 0."""
    coefficients = basis.coefficients(d_weight).double()  # (d_out, d_in')
    total = float((coefficients**2).sum())
    return float((coefficients[mask] ** 2).sum()) / total if total > 0 else math.nan


def curvature_quadratic(d_weight: Tensor, basis: KroneckerEigenbasis) -> float:
    """Σ_ij λ_ij C_ij² = vec(ΔW)ᵀ (A ⊗ G) vec(ΔW), float64."""
    coefficients = basis.coefficients(d_weight).double()  # (d_out, d_in')
    return float((basis.eigenvalues().double() * coefficients**2).sum())


def curvature_spectrum(d_weight: Tensor, basis: KroneckerEigenbasis, bins: int = 10) -> list[float]:
    """Share of ‖ΔW‖² in `bins` equal-count groups of eigen-pairs by ascending λ (sums to 1).

    Bin b holds the pairs ranked [b·P/bins, (b+1)·P/bins) of P = d_out·d_in' (ties in λ by
    index, as the subspace masks order them). NaNs for ΔW = 0.
    """
    lam = basis.eigenvalues().flatten()  # (P,)
    if not 1 <= bins <= lam.numel():
        raise ValueError(f"curvature_spectrum: bins must be in [1, {lam.numel()}], got {bins}")
    energy = basis.coefficients(d_weight).double().flatten() ** 2  # (P,)
    ordered = energy[torch.argsort(lam, stable=True)]
    total = float(ordered.sum())
    return [float(chunk.sum()) / total if total > 0 else math.nan
            for chunk in torch.tensor_split(ordered, bins)]


@dataclass
class LossBarrier:
    """The interpolation curve and both barrier forms (see the module docstring)."""

    ts: list[float]
    losses: list[float]
    linear: float
    paper: float


def _interpolation_keys(state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> list[str]:
    keys = [k for k, v in state_a.items() if v.is_floating_point()]
    missing = [k for k in keys if k not in state_b]
    if missing:
        raise KeyError(f"lmc_barrier: entries missing from state_b: {missing[:3]}")
    return keys


@torch.no_grad()
def lmc_barrier(model: nn.Module, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor],
                batches: Iterable, loss_fn: Callable[[nn.Module, object], Tensor],
                points: int = 11) -> LossBarrier:
    """Loss along θ(t) = (1−t)θ_a + tθ_b, `points` ≥ 2 evenly spaced t (11–21 is usual).

    L(θ) is the mean of `loss_fn(model, batch)` (a scalar) over `batches`, which must give the
    same batches each time (a list). Floating-point entries of `state_a` are interpolated
    (`torch.lerp`, exact at both ends); other entries are taken from `state_a`. The model runs
    in eval mode and gets its own weights back afterwards.
    """
    if points < 2:
        raise ValueError(f"lmc_barrier: points must be ≥ 2 (both endpoints), got {points}")
    batches = list(batches)
    if not batches:
        raise ValueError("lmc_barrier: no batches")
    keys = _interpolation_keys(state_a, state_b)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ts = [i / (points - 1) for i in range(points)]
    losses = []
    try:
        with eval_mode(model):
            for t in ts:
                state = dict(state_a)
                for k in keys:
                    state[k] = torch.lerp(state_a[k], state_b[k].to(state_a[k]), t)
                model.load_state_dict(state, strict=False)
                losses.append(sum(float(loss_fn(model, b)) for b in batches) / len(batches))
    finally:
        model.load_state_dict(original)
    la, lb = losses[0], losses[-1]
    linear = max(l - ((1 - t) * la + t * lb) for t, l in zip(ts, losses))
    return LossBarrier(ts, losses, linear, max(losses) - min(la, lb))
