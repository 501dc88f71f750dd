"""Storage formats: quantise/dequantise, bit packing, the two stream containers."""
import math

import pytest
import torch

from ortho_kernels.packing import (
    effective_bits,
    group_dequantise,
    group_quantise,
    pack_bits,
    pack_int4,
    to_int4pack_cpu_layout,
    unpack_bits,
    unpack_int4,
)
from ortho_kernels.streams import OrthoStream, QuantisedBase


def _codes(n, k, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)


# --------------------------------------------------------------------------- packing
@pytest.mark.parametrize("k", [1, 2, 7, 128, 201])
def test_int4_round_trip(k):
    codes = _codes(5, k, 4)
    packed = pack_int4(codes)
    assert packed.shape == (5, math.ceil(k / 2)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, k), codes)


def test_int4_nibble_order():
    packed = pack_int4(torch.tensor([[1, 2, 3]], dtype=torch.uint8))
    assert packed.tolist() == [[0x21, 0x03]]  # even k low nibble, odd K padded with 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 5, 33, 201])
def test_pack_bits_round_trip(bits, k):
    codes = _codes(3, k, bits, seed=bits)
    packed = pack_bits(codes, bits)
    assert packed.shape == (3, math.ceil(k * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, k), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_bits_is_a_little_endian_bit_stream(bits):
    codes = _codes(1, 11, bits, seed=7)
    stream = sum(int(v) << (bits * j) for j, v in enumerate(codes[0]))
    width = math.ceil(11 * bits / 8)
    expected = list(stream.to_bytes(width, "little"))
    assert pack_bits(codes, bits)[0].tolist() == expected


def test_pack_bits_four_matches_pack_int4():
    codes = _codes(4, 9, 4)
    assert torch.equal(pack_bits(codes, 4), pack_int4(codes))


@pytest.mark.parametrize("bad, match", [
    (lambda: pack_int4(torch.full((1, 2), 16, dtype=torch.uint8)), r"\[0, 15\]"),
    (lambda: pack_bits(torch.full((1, 2), 4, dtype=torch.uint8), 2), r"\[0, 3\]"),
    (lambda: pack_bits(torch.zeros(1, 2, dtype=torch.int32), 4), "uint8"),
    (lambda: pack_bits(torch.zeros(1, 2, dtype=torch.uint8), 5), "bits must be one of"),
    (lambda: unpack_int4(torch.zeros(1, 3, dtype=torch.uint8), 7), r"ceil\(K/2\)=4"),
    (lambda: unpack_bits(torch.zeros(1, 4, dtype=torch.uint8), 3, 7), r"uint8 \(N, 3\)"),
])
def test_packing_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


# --------------------------------------------------------------------------- quantisation
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k, group_size", [(256, 128), (201, 32), (100, 128)])
def test_group_quantise_error_and_layout(bits, k, group_size):
    w = torch.randn(6, k, generator=torch.Generator().manual_seed(k))
    codes, scales, zeros = group_quantise(w, bits=bits, group_size=group_size)
    n_groups = math.ceil(k / group_size)
    assert codes.shape == (6, k) and codes.dtype == torch.uint8 and int(codes.max()) < 2**bits
    assert scales.shape == zeros.shape == (6, n_groups)
    assert scales.dtype == zeros.dtype == torch.float16
    assert torch.equal(zeros, zeros.round()) and float(zeros.max()) <= 2**bits - 1
    w_hat = group_dequantise(codes, scales, zeros, group_size)
    step = scales.float().repeat_interleave(group_size, dim=1)[:, :k]  # (N, K)
    err = (w_hat - w).abs() / step
    assert float(err.max()) <= 1.0, f"error {float(err.max()):.3f} steps"
    assert float(err.mean()) < 0.3  # RTN: mean |error| ~ step/4


def test_group_quantise_formula_on_a_known_group():
    w = torch.tensor([[-1.0, 0.5, 2.0, 0.0]])
    codes, scales, zeros = group_quantise(w, bits=2, group_size=4)
    assert float(scales) == 1.0 and float(zeros) == 1.0  # (2 - (-1)) / 3, round(1 / 1)
    assert codes.tolist() == [[0, 1, 3, 1]]  # round(0.5) = 0 (half to even)


def test_dequantise_is_exact_in_fp32():
    codes, scales, zeros = group_quantise(torch.randn(8, 96) * 3, bits=4, group_size=32)
    f32 = group_dequantise(codes, scales, zeros, 32, torch.float32)
    f64 = group_dequantise(codes, scales, zeros, 32, torch.float64)
    assert torch.equal(f32.double(), f64)


def test_degenerate_groups_have_usable_scales():
    w = torch.zeros(4, 64)
    w[1] = 3.0  # constant positive group
    w[2] = -2.0  # constant negative group
    w[3] = 1e-9  # below fp16 resolution
    codes, scales, zeros = group_quantise(w, bits=4, group_size=32)
    assert bool(torch.isfinite(scales).all()) and bool((scales > 0).all())
    w_hat = group_dequantise(codes, scales, zeros, 32)
    assert torch.equal(w_hat[0], w[0])  # all-zero group is exact
    assert torch.allclose(w_hat[1:3], w[1:3], rtol=0, atol=float(scales[1:3].max()) / 2)
    assert float(w_hat[3].abs().max()) < 1e-6


@pytest.mark.parametrize("w, match", [
    (torch.tensor([[1.0, float("nan")]]), "NaN or Inf"),
    (torch.tensor([[0.0, 1e7]]), "too large"),
    (torch.ones(4), "2-D floating"),
    (torch.ones(2, 2, dtype=torch.int32), "2-D floating"),
])
def test_group_quantise_rejects_bad_weights(w, match):
    with pytest.raises(ValueError, match=match):
        group_quantise(w, bits=4, group_size=2)


def test_group_dequantise_checks_group_count():
    codes, scales, zeros = group_quantise(torch.randn(2, 65), group_size=32)
    with pytest.raises(ValueError, match=r"scales must have shape \(2, 3\)"):
        group_dequantise(codes, scales[:, :2], zeros, 32)


# --------------------------------------------------------------------------- QuantisedBase
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantised_base_round_trip(bits):
    w = torch.randn(5, 77)
    base = QuantisedBase.from_dense(w, bits=bits, group_size=32)
    codes, scales, zeros = group_quantise(w, bits=bits, group_size=32)
    assert base.qweight.shape == (5, math.ceil(77 * bits / 8))
    assert torch.equal(base.codes(), codes)
    assert torch.equal(base.dequantise(), group_dequantise(codes, scales, zeros, 32))


def test_quantised_base_validation():
    base = QuantisedBase.from_dense(torch.randn(4, 64), group_size=32)
    assert base.bits == 4 and base.n_groups == 2
    with pytest.raises(ValueError, match=r"qweight must be uint8 \(4, 32\)"):
        QuantisedBase(base.qweight[:, :31], base.scales, base.zeros, (4, 64), 32)
    with pytest.raises(ValueError, match="scales must be float16"):
        QuantisedBase(base.qweight, base.scales.float(), base.zeros, (4, 64), 32)
    with pytest.raises(ValueError, match=r"zeros must be float16 \(4, 2\)"):
        QuantisedBase(base.qweight, base.scales, base.zeros[:, :1], (4, 64), 32)
    with pytest.raises(ValueError, match=r"K=64, group_size=16"):
        QuantisedBase(base.qweight, base.scales, base.zeros, (4, 64), 16)
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantisedBase(base.qweight, base.scales, base.zeros, (4, 64), 32, bits=5)


def test_effective_bits():
    assert effective_bits(4, 128) == 4.25
    assert effective_bits(4, 128, 0.01) == pytest.approx(4.25 + 0.48)
    base = QuantisedBase.from_dense(torch.randn(16, 256), group_size=128)
    ortho = OrthoStream.top_fraction(torch.randn(16, 256), 0.05)
    assert base.effective_bits() == 4.25
    assert base.effective_bits(ortho) == pytest.approx(effective_bits(4, 128, ortho.density))


def test_torch_cpu_layout_matches_dequantise():
    w = torch.randn(32, 256)
    base = QuantisedBase.from_dense(w, group_size=64)
    packed, sz = to_int4pack_cpu_layout(base.codes(), base.scales, base.zeros, 64)
    assert sz.shape == (4, 32, 2) and sz.dtype == torch.bfloat16
    eye = torch.eye(256, dtype=torch.bfloat16)  # X = I reads the dequantised weight back
    w_op = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, 64, sz).float().T
    step = base.scales.float().repeat_interleave(64, dim=1)  # (N, K)
    assert float(((w_op - base.dequantise()).abs() / step).max()) < 0.1  # bf16 scale/zero


# --------------------------------------------------------------------------- OrthoStream
@pytest.mark.filterwarnings("ignore:Sparse")
def test_ortho_from_dense_csr_ell_round_trip():
    dense = torch.zeros(6, 9)
    dense[0, 3], dense[0, 8], dense[2, 0], dense[5, 4], dense[5, 5] = 1.5, -2.0, 3.0, 0.25, 7.0
    ortho = OrthoStream.from_dense(dense)
    assert ortho.indices.tolist() == [3, 8, 18, 49, 50] and ortho.nnz == 5
    assert torch.equal(ortho.to_dense(), dense)
    crow, col, values, shape = ortho.to_csr()
    assert crow.tolist() == [0, 2, 2, 3, 3, 3, 5] and crow.dtype == col.dtype == torch.int32
    csr = torch.sparse_csr_tensor(crow, col, values.float(), shape)
    assert torch.equal(csr.to_dense(), dense)
    ell_col, ell_val, _ = ortho.to_ell()
    assert ell_col.shape == (6, 2)
    rebuilt = torch.zeros(6, 9).scatter_add_(1, ell_col.long(), ell_val.float())
    assert torch.equal(rebuilt, dense)


def test_ortho_empty_and_top_fraction():
    empty = OrthoStream.empty((4, 5))
    assert empty.nnz == 0 and empty.to_csr().crow.tolist() == [0] * 5
    assert empty.to_ell().col.shape == (4, 0)
    w = torch.randn(10, 30)
    ortho = OrthoStream.top_fraction(w, 0.05)
    assert ortho.nnz == math.ceil(0.05 * 300)
    picked = ortho.to_dense() != 0
    assert float(w.abs()[picked].min()) >= float(w.abs()[~picked].max())


@pytest.mark.parametrize("indices, values, match", [
    ([3, 1], [1.0, 2.0], "unsorted"),
    ([1, 1], [1.0, 2.0], "duplicate"),
    ([0, 20], [1.0, 2.0], r"out of range \[0, 20\)"),
    ([-1, 2], [1.0, 2.0], "out of range"),
    ([1, 2], [1.0], "differ in length"),
])
def test_ortho_validation(indices, values, match):
    idx = torch.tensor(indices, dtype=torch.int32)
    val = torch.tensor(values, dtype=torch.float16)
    with pytest.raises(ValueError, match=match):
        OrthoStream(idx, val, (4, 5))


def test_ortho_dtype_and_shape_checks():
    idx, val = torch.tensor([1, 2], dtype=torch.int32), torch.ones(2, dtype=torch.float16)
    with pytest.raises(ValueError, match="indices must be a 1-D int32"):
        OrthoStream(idx.long(), val, (4, 5))
    with pytest.raises(ValueError, match="values must be a 1-D float16"):
        OrthoStream(idx, val.float(), (4, 5))
    with pytest.raises(ValueError, match="2\\^31"):
        OrthoStream(idx, val, (2**16, 2**16))
    OrthoStream(torch.tensor([2, 1], dtype=torch.int32), val, (4, 5), check=False)  # trusted
