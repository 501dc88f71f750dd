"""Post-hoc weight noise: dual moves only the ortho values, global every weight, std σ·RMS."""
import math

import pytest
import torch
from torch import nn

from ortho_train.privacy import apply_posthoc_noise_, layer_rms, posthoc_noise


def _weight_and_mask(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(200, 300, generator=g) * 0.05
    return w, torch.rand(200, 300, generator=g) < 0.03


def test_dual_touches_only_ortho_values_global_every_weight():
    w, mask = _weight_and_mask()
    dual = posthoc_noise(w, 0.5, "dual", mask, torch.Generator().manual_seed(1))
    glob = posthoc_noise(w, 0.5, "global", mask, torch.Generator().manual_seed(1))
    assert torch.equal(dual[~mask], w[~mask]), "dual noise moved a base-only weight"
    assert bool((dual[mask] != w[mask]).all()) and bool((glob != w).all())
    assert torch.equal(dual[mask], glob[mask]), "both modes must draw the same noise"


@pytest.mark.parametrize("sigma", [0.1, 1.0])
def test_noise_std_is_sigma_times_layer_rms(sigma):
    w, mask = _weight_and_mask(seed=2)
    noise = (posthoc_noise(w, sigma, "global", None, torch.Generator().manual_seed(3)) - w).double()
    target = sigma * layer_rms(w)
    m = noise.numel()
    assert abs(float(noise.std()) - target) < 3 * target / math.sqrt(2 * m), (float(noise.std()), target)
    on_s = (posthoc_noise(w, sigma, "dual", mask, torch.Generator().manual_seed(3)) - w)[mask].double()
    assert abs(float(on_s.std()) - target) < 3 * target / math.sqrt(2 * on_s.numel())


def test_model_noise_is_seeded_and_leaves_other_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 32), nn.Linear(32, 8))
    masks = {"1": torch.rand(32, 16) < 0.1, "2": torch.rand(8, 32) < 0.1}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scales = apply_posthoc_noise_(model, masks, 0.3, "dual", seed=5)
    assert scales["1"] == pytest.approx(0.3 * layer_rms(before["1.weight"]))
    for name, p in model.named_parameters():
        layer = name.split(".")[0]
        off = ~masks[layer] if name.endswith("weight") and layer in masks else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p.detach()[off], before[name][off]), name
    again = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 32), nn.Linear(32, 8))
    again.load_state_dict(before)
    apply_posthoc_noise_(again, masks, 0.3, "dual", seed=5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    apply_posthoc_noise_(again, masks, 0.3, "global", seed=5)
    assert bool((again[1].weight != model[1].weight).any())
    assert torch.equal(again[0].weight, before["0.weight"]), "embeddings are not sieved weights"


def test_bad_settings_fail_naming_the_setting():
    w, mask = _weight_and_mask()
    g = torch.Generator()
    with pytest.raises(ValueError, match="mode"):
        posthoc_noise(w, 0.1, "ortho", mask, g)
    with pytest.raises(ValueError, match="sigma"):
        posthoc_noise(w, -0.1, "global", mask, g)
    with pytest.raises(ValueError, match="ortho mask"):
        posthoc_noise(w, 0.1, "dual", None, g)
