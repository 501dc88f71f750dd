"""NF4/FP4 through bitsandbytes on CPU: the fake-quantised weight is what Linear4bit computes with."""
import pytest
import torch

from ortho_train.quantisation import bnb_bits_per_weight, bnb_fake_quantise

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [False, True])
def test_fake_quantised_weight_reproduces_linear4bit(quant_type, compress):
    torch.manual_seed(0)
    w = torch.randn(32, 128) * 0.05
    layer = bnb.nn.Linear4bit(128, 32, bias=False, quant_type=quant_type,
                              compute_dtype=torch.float32, compress_statistics=compress)
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=quant_type,
                                     blocksize=64, compress_statistics=compress)
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = False  # the generic path (the repacked one computes in bf16)
    x = torch.randn(5, 128)
    w_hat = bnb_fake_quantise(w, quant_type, 64, compress)
    # bitsandbytes dequantises and multiplies in fp32, we multiply the same fp32 weight: equal up to
    # the matmul's summation order (K = 128 terms, |x·w| ≲ 1: far below 1e-5)
    torch.testing.assert_close(layer(x), x @ w_hat.T, atol=1e-5, rtol=1e-5)
    assert 0 < (w_hat - w).abs().max() < 0.05  # really quantised, not a copy


def test_bits_per_weight():
    assert bnb_bits_per_weight(64) == 4.5
    assert bnb_bits_per_weight(64, compress_statistics=True) == pytest.approx(4 + 8 / 64 + 32 / 16384)


def test_bad_quant_type():
    with pytest.raises(ValueError, match="quant_type"):
        bnb_fake_quantise(torch.randn(4, 64), "int4")
