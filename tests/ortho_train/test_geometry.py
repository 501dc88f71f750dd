"""Entanglement η, energy in a subspace, and the LMC loss barrier (both forms)."""
import math

import pytest
import torch
from torch import nn

from ortho_train.kfac import KFACFactors, KroneckerEigenbasis, SubspaceConfig, component_in, project_out
from ortho_train.separation import (
    curvature_quadratic,
    curvature_spectrum,
    entanglement,
    lmc_barrier,
    subspace_energy,
)


def test_entanglement_of_hand_made_deltas():
    a = torch.zeros(4, 3)
    a[0, 0] = 2.0
    b = torch.zeros(4, 3)
    b[1, 2] = -5.0
    eta = entanglement({"x": a, "y": a}, {"x": b, "y": -3 * a})
    assert eta.per_layer["x"] == 0.0, "orthogonal"
    assert abs(eta.per_layer["y"] - 1.0) < 1e-15, "anti-parallel counts as parallel"
    # overall: one vector over both layers, |⟨a,b⟩ + ⟨a,−3a⟩| / (‖(a,a)‖ ‖(b,−3a)‖) = 12/(√8·√61)
    assert abs(eta.overall - 12 / (math.sqrt(8) * math.sqrt(61))) < 1e-12
    assert math.isnan(entanglement({"x": a}, {"x": torch.zeros(4, 3)}).overall)
    with pytest.raises(KeyError, match="missing"):
        entanglement({"x": a, "z": a}, {"x": b})


def test_subspace_energy_of_components():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(6, 6, generator=g, dtype=torch.float64)
    basis = KroneckerEigenbasis.from_factors(KFACFactors(a.T @ a, b @ b.T, 1))
    mask = SubspaceConfig("flattest", k=9).mask(basis)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    assert abs(subspace_energy(component_in(x, basis, mask), basis, mask) - 1) < 1e-12
    assert subspace_energy(project_out(x, basis, mask), basis, mask) < 1e-24
    # the basis is orthonormal: energy of ΔW = U_G E_ij U_Aᵀ is 1 inside iff mask[i, j]
    e = torch.zeros(6, 4, dtype=torch.float64)
    e[mask.nonzero()[0].tolist()] = 1.0
    assert abs(subspace_energy(basis.from_coefficients(e), basis, mask) - 1) < 1e-12


def test_curvature_quadratic_and_spectrum():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(6, 6, generator=g, dtype=torch.float64)
    factors = KFACFactors(a.T @ a, b @ b.T, 1)
    basis = KroneckerEigenbasis.from_factors(factors)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    quad = torch.trace(x.T @ factors.G @ x @ factors.A).item()  # vec(x)ᵀ (A ⊗ G) vec(x)
    assert abs(curvature_quadratic(x, basis) - quad) / quad < 1e-10
    spectrum = curvature_spectrum(x, basis, bins=4)
    assert len(spectrum) == 4 and abs(sum(spectrum) - 1) < 1e-12
    flat = component_in(x, basis, SubspaceConfig("flattest", k=6).mask(basis))  # 24 pairs: bin 0
    assert abs(curvature_spectrum(flat, basis, bins=4)[0] - 1) < 1e-12
    with pytest.raises(ValueError, match="bins must be"):
        curvature_spectrum(x, basis, bins=25)


def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(3, 4, generator=g, dtype=torch.float64)}


def test_barrier_of_a_linear_loss_is_zero_and_weights_come_back():
    model = nn.Linear(4, 3, bias=False).double()
    original = model.weight.detach().clone()
    c = torch.randn(3, 4, dtype=torch.float64)
    a, b = _weights(1), _weights(2)
    result = lmc_barrier(model, a, b, [None, None], lambda m, _: (m.weight * c).sum(), points=11)
    assert len(result.ts) == len(result.losses) == 11 and result.ts[0] == 0 and result.ts[-1] == 1
    assert abs(result.linear) < 1e-12, "linear in θ: no barrier"  # float64 round-off only
    la, lb = result.losses[0], result.losses[-1]
    assert abs(result.paper - abs(la - lb)) < 1e-12, "paper form: the gap between the ends"
    assert torch.equal(model.weight, original)


def test_barrier_of_a_concave_loss_peaks_midway():
    model = nn.Linear(4, 3, bias=False).double()
    a = _weights(3)
    b = {"weight": -a["weight"]}
    # L(t) = −‖(1−2t)·W‖²: the ends sit at −‖W‖², the midpoint at 0
    result = lmc_barrier(model, a, b, [0], lambda m, _: -(m.weight**2).sum(), points=21)
    norm = float((a["weight"] ** 2).sum())
    assert abs(result.linear - norm) < 1e-9 and abs(result.paper - norm) < 1e-9
    assert result.losses.index(max(result.losses)) == 10
    with pytest.raises(ValueError, match="points must be"):
        lmc_barrier(model, a, b, [0], lambda m, _: m.weight.sum(), points=1)
