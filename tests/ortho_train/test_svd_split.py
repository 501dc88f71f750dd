"""SVD task-vector split (energy rank, τ_gen/τ_mem, W_clean) and the matched magnitude-pruning baseline."""
import pytest
import torch

from ortho_train.models import TinyLlamaConfig, build_tiny_llama
from ortho_train.separation import (
    energy_rank,
    entanglement,
    linear_weight_keys,
    magnitude_prune,
    pruned_state_dict,
    svd_split,
    svd_split_state_dict,
)


def _with_spectrum(sigmas, d_out=7, d_in=5, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, len(sigmas), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, len(sigmas), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sigmas, dtype=torch.float64)) @ v.T  # (d_out, d_in)


def test_energy_rank_is_the_smallest_rank_reaching_the_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])  # σ² = 9, 4, 1, 0.25: cumulative 0.632, 0.912, 0.982, 1
    assert [energy_rank(s, e) for e in (0.5, 0.63, 0.9, 0.95, 0.99, 1.0)] == [1, 1, 2, 3, 4, 4]
    assert energy_rank(torch.tensor([2.0, 0.0, 0.0]), 1.0) == 1, "zero σ are never kept"
    assert energy_rank(torch.zeros(3), 0.9) == 0
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="energy must be in"):
            energy_rank(s, bad)


def test_split_parts_and_report():
    tau = _with_spectrum([3.0, 2.0, 1.0, 0.5])
    gen, mem, info = svd_split(tau.float(), energy=0.9)
    assert (info.rank, info.full_rank, info.budget) == (2, 5, 2 * (7 + 5))
    assert abs(info.energy - 13 / 14.25) < 1e-6  # float32 input
    assert torch.allclose(gen + mem, tau, atol=1e-6)
    assert torch.linalg.matrix_rank(gen).item() == 2
    # τ_gen ⟂ τ_mem by construction: η says nothing about separation here
    assert entanglement({"w": gen}, {"w": mem}).overall < 1e-6


def test_full_energy_reproduces_the_task_vector_and_the_fine_tune():
    model = build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), 40, 0, 1)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    ft = {k: v + 1e-2 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    keys = linear_weight_keys(model)
    assert len(keys) == 14 and all(k.endswith("proj.weight") for k in keys)
    split = svd_split_state_dict(base, ft, energy=1.0, keys=keys)
    for k in keys:
        tau = ft[k].double() - base[k].double()
        gen, _, info = svd_split(tau, 1.0)
        assert ((gen - tau).norm() / tau.norm()).item() < 1e-12, f"{k}: τ_gen = τ"
        # the state dict is float32: W_base + τ rounds once
        assert torch.allclose(split.state_dict[k], ft[k], rtol=0, atol=1e-6), k
        assert split.layers[k].rank == info.full_rank and split.layers[k].energy > 1 - 1e-12
    untouched = "model.embed_tokens.weight"
    assert torch.equal(split.state_dict[untouched], ft[untouched])
    assert torch.equal(svd_split_state_dict(base, ft, 1.0, keys, rest_from="base").state_dict[untouched],
                       base[untouched])


def test_low_energy_keeps_the_dominant_direction_and_pruning_matches_the_budget():
    low = _with_spectrum([5.0]) + _with_spectrum([0.3, 0.2, 0.1], seed=3)
    base = {"w": torch.zeros(7, 5, dtype=torch.float64), "b": torch.zeros(7, dtype=torch.float64)}
    ft = {"w": low, "b": torch.ones(7, dtype=torch.float64)}
    split = svd_split_state_dict(base, ft, energy=0.9)  # default keys: the 2-D entries
    assert list(split.layers) == ["w"] and split.layers["w"].rank == 1
    budgets = {k: s.budget for k, s in split.layers.items()}
    pruned = pruned_state_dict(base, ft, budgets)
    assert int((pruned["w"] != 0).sum()) == 12 == budgets["w"]
    kept = pruned["w"] != 0
    assert low.abs()[kept].min() >= low.abs()[~kept].max(), "the largest |τ| are kept"
    assert torch.equal(pruned["b"], ft["b"])
    assert torch.equal(magnitude_prune(low, 10**6), low), "a budget past the size keeps all"


def test_bad_settings_name_themselves():
    base, ft = {"w": torch.zeros(3, 3)}, {"w": torch.ones(3, 3)}
    with pytest.raises(ValueError, match="energy must be in"):
        svd_split_state_dict(base, ft, energy=0.0)
    with pytest.raises(ValueError, match="rest_from"):
        svd_split_state_dict(base, ft, rest_from="public")
    with pytest.raises(KeyError, match="missing"):
        svd_split_state_dict(base, ft, keys=["v"])
    with pytest.raises(ValueError, match="budget"):
        magnitude_prune(ft["w"], -1)
