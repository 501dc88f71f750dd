"""GPTQ on the kernels' INT-k convention: error vs RTN, exactness cases, packing, bad input."""
import pytest
import torch

from ortho_kernels import QuantisedBase, group_dequantise, group_quantise, unpack_bits
from ortho_train.quantisation import QuantConfig, gptq_quantise, quantise_weight, run_gptq


def _correlated_layer(n, k, seed, tokens=2048):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mix  # correlated inputs
    x[:, : k // 8] *= 4  # a few loud features, as in real activations
    h = 2 * x.T @ x / tokens
    w = torch.randn(n, k, generator=g) * 0.02
    return w, h


def _h_error(w_hat, w, h):
    d = (w_hat - w).double()
    return float(((d @ h.double()) * d).sum())


@pytest.mark.parametrize("bits,group,act_order,seed", [
    (4, 128, False, 0), (4, 32, False, 1), (3, 64, False, 2), (2, 128, True, 3), (4, 128, True, 4),
    (8, 64, False, 5),
])
def test_gptq_hessian_weighted_error_at_most_rtn(bits, group, act_order, seed):
    w, h = _correlated_layer(48, 256, seed)
    rtn = QuantisedBase.from_dense(w, bits=bits, group_size=group).dequantise()
    gptq = quantise_weight(w, QuantConfig("gptq", bits, group, act_order=act_order), h).dequantise()
    e_rtn, e_gptq = _h_error(rtn, w, h), _h_error(gptq, w, h)
    print(f"bits={bits} group={group} act_order={act_order}: H-error RTN {e_rtn:.4g}, GPTQ {e_gptq:.4g}")
    assert e_gptq <= e_rtn, f"GPTQ {e_gptq} > RTN {e_rtn}"
    if bits <= 4:
        assert e_gptq < 0.8 * e_rtn  # with correlated inputs GPTQ is clearly better


def test_identity_hessian_gives_exactly_rtn():
    w, _ = _correlated_layer(16, 100, 7)
    result = run_gptq(w, torch.eye(100), QuantConfig(bits=4, group_size=32))
    codes, scales, zeros = group_quantise(w, bits=4, group_size=32)
    assert torch.equal(result.codes, codes) and torch.equal(result.scales, scales)
    assert torch.equal(result.zeros, zeros)


def test_codes_pack_with_kernels_and_static_groups_use_original_ranges():
    w, h = _correlated_layer(24, 200, 8)  # ragged last group
    spec = QuantConfig("gptq", 3, 64, act_order=True)
    base = quantise_weight(w, spec, h)
    result = run_gptq(w, h, spec)
    assert torch.equal(unpack_bits(base.qweight, 3, 200), result.codes)
    assert torch.equal(base.dequantise(), group_dequantise(result.codes, result.scales, result.zeros, 64))
    _, rtn_scales, rtn_zeros = group_quantise(w, bits=3, group_size=64)
    assert torch.equal(result.scales, rtn_scales) and torch.equal(result.zeros, rtn_zeros)


def test_bad_inputs_are_clear_errors():
    w, h = _correlated_layer(8, 64, 9)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_quantise(w, h[:32, :32])
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantise(w.clone().fill_(float("nan")), h)
    with pytest.raises(ValueError, match="2-D"):
        gptq_quantise(w[0], h)
    with pytest.raises(ValueError, match="needs a calibration Hessian"):
        quantise_weight(w, QuantConfig("gptq"))
    with pytest.raises(ValueError, match="bits must be"):
        QuantConfig(bits=5)
    with pytest.raises(ValueError, match="method"):
        QuantConfig(method="awq")
    with pytest.raises(ValueError, match="positive definite"):
        gptq_quantise(w, -torch.eye(64), damp=0.0)
