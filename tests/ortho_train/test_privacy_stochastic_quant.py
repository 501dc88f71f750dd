"""Stochastic quantisation: the discrete Gaussian's law and lattice, σ → 0 is RTN, outliers exact."""
import math

import pytest
import torch

from ortho_kernels.packing import group_quantise
from ortho_train.curvature import prepare_hessian
from ortho_train.privacy import (
    StochasticQuantConfig,
    discrete_gaussian,
    paper_epsilon,
    stochastic_quantise,
    stochastic_quantise_model,
)


def _exact_moments(center, sigma):
    y = torch.arange(-80, 81, dtype=torch.float64)
    p = torch.exp(-(y - center) ** 2 / (2 * sigma**2))
    p /= p.sum()
    mean = float((p * y).sum())
    return mean, float((p * (y - mean) ** 2).sum()), float((p * (y - mean) ** 4).sum())


@pytest.mark.parametrize("center, sigma", [(0.3, 1.5), (-2.7, 0.4)])
def test_discrete_gaussian_mean_variance_and_lattice(center, sigma):
    n = 200_000
    y = discrete_gaussian(torch.full((n,), center), sigma, torch.Generator().manual_seed(0))
    assert y.dtype == torch.int64
    mean, var, fourth = _exact_moments(center, sigma)
    yd = y.double()
    assert abs(float(yd.mean()) - mean) < 4 * math.sqrt(var / n), (float(yd.mean()), mean)
    var_se = math.sqrt((fourth - var**2) / n)  # standard error of the sample variance
    assert abs(float(yd.var()) - var) < 4 * var_se, (float(yd.var()), var)
    assert int((y - center).abs().max()) <= math.ceil(6 * sigma + 1) + 1


def test_sigma_zero_and_tiny_sigma_are_round_to_nearest():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 200, generator=g) * 0.05
    rtn, scales, zeros = group_quantise(w, bits=4, group_size=64)
    for sigma in (0.0, 1e-3):
        layer = stochastic_quantise(w, StochasticQuantConfig(bits=4, group_size=64, sigma=sigma))
        assert torch.equal(layer.base.codes(), rtn), f"sigma={sigma} differs from RTN"
        assert torch.equal(layer.base.scales, scales) and torch.equal(layer.base.zeros, zeros)
        assert layer.ortho.nnz == 0


def test_codes_stay_in_range_and_outliers_stay_exact():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 128, generator=g) * 0.05
    outliers = torch.rand(32, 128, generator=g) < 0.02
    layer = stochastic_quantise(w, StochasticQuantConfig(bits=3, group_size=32, sigma=3.0), outliers)
    codes = layer.base.codes()
    assert int(codes.max()) <= 7 and bool((codes == 7).any()) and bool((codes == 0).any())
    rtn = group_quantise(w, bits=3, group_size=32)[0]
    assert torch.equal(codes[outliers], rtn[outliers]), "outliers keep their RTN code"
    assert layer.stats["changed_code_fraction"] > 0.5
    w_eff = layer.base.dequantise() + layer.ortho.to_dense()
    err = (w_eff - w)[outliers].abs().max().item()
    assert err < 1e-3 * w.abs().max().item(), f"outlier values not exact (fp16): {err}"
    assert layer.ortho.nnz == int(outliers.sum())


def test_sampled_codes_are_unbiased_in_the_interior():
    w = torch.full((1, 4096), 0.0137)
    w[0, 0], w[0, 1] = -0.1, 0.1  # fix the group range so 0.0137 sits inside the lattice
    spec = StochasticQuantConfig(bits=8, group_size=4096, sigma=1.0)
    deq = stochastic_quantise(w, spec).base.dequantise()[0, 2:].double()
    step = float(group_quantise(w, bits=8, group_size=4096)[1][0, 0])
    assert abs(float(deq.mean()) - 0.0137) < 4 * step / math.sqrt(deq.numel())


def test_dqc_lowers_the_layer_error_of_stochastic_codes():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 64, generator=g) @ (torch.randn(64, 64, generator=g) / 8 + torch.eye(64))
    h = 2 * x.T @ x / 512
    w = torch.randn(16, 64, generator=g) * 0.05
    outliers = torch.rand(16, 64, generator=g) < 0.1
    spec = StochasticQuantConfig(bits=4, group_size=32, sigma=1.0, damp=0.0)

    def layer_error(layer):
        d = (layer.base.dequantise() + layer.ortho.to_dense() - w).double()
        return float(((d @ prepare_hessian(h, 0.0)[0].double()) * d).sum())

    plain = stochastic_quantise(w, spec, outliers)
    dqc = stochastic_quantise(w, spec, outliers, hessian=h)
    assert torch.equal(plain.base.qweight, dqc.base.qweight), "same seed, same codes"
    assert layer_error(dqc) < layer_error(plain)


def test_paper_epsilon_comes_with_its_assumption_and_bad_settings_fail():
    report = paper_epsilon(sigma=2.0, assumed_sensitivity=1.0)
    assert report["epsilon_formula"] == 0.5 and report["assumed_l2_sensitivity"] == 1.0
    assert "did not bound" in report["statement"]
    with pytest.raises(ValueError, match="sigma"):
        StochasticQuantConfig(sigma=-1.0)
    with pytest.raises(ValueError, match="sigma"):
        discrete_gaussian(torch.zeros(3), float("nan"), torch.Generator())
    with pytest.raises(ValueError, match="assumed_sensitivity"):
        paper_epsilon(1.0, 0.0)


def test_model_level_quantisation_is_seeded_per_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16))
    masks = {"0": torch.rand(32, 64) < 0.05, "1": torch.rand(16, 32) < 0.05}
    spec = StochasticQuantConfig(bits=4, group_size=32, sigma=0.8, seed=3)
    first, second = stochastic_quantise_model(model, spec, masks), stochastic_quantise_model(model, spec, masks)
    assert set(first) == {"0", "1"}
    for name in first:
        assert torch.equal(first[name].base.qweight, second[name].base.qweight)
        assert first[name].ortho.nnz == int(masks[name].sum())
