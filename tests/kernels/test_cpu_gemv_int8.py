"""The GEMV's int8-activation mode (llama.cpp-style Q8 activations per 64-element block, the
fast decoder's option) against the fp64 reference, within `error_bounds`' "gemv_int8" bound,
with the AVX2 and AVX-512 VNNI dots agreeing bit for bit."""
import pytest
import torch

from ortho_kernels import cpu_gemv
from ortho_kernels.error_bounds import FP32_UNIT_ROUNDOFF, _block_steps, path_error_bound, reference_product
from ortho_kernels.streams import OrthoStream, QuantisedBase

pytestmark = pytest.mark.skipif(isinstance(cpu_gemv.library(), str),
                                reason=f"CPU GEMV unavailable: {cpu_gemv.library()}")
HAS_VNNI = cpu_gemv.int8_isa() == "vnni"


def _streams(n, k, group, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    base = QuantisedBase.from_dense(w, bits=4, group_size=group)
    return base, OrthoStream.top_fraction((w - base.dequantise()) * 20, density)


def _gemv(base, k, x, ortho=None, alpha=0.0, mode=1):
    csr = ortho.to_csr()[:3] if ortho is not None and ortho.nnz else None
    return cpu_gemv.gemv(base.qweight, base.scales, base.zeros, k, base.group_size, x, csr, alpha,
                         mode=mode)


@pytest.mark.parametrize("shape, group", [((72, 201), 64), ((40, 4096), 128), ((33, 97), 64),
                                          ((16, 31), 64), ((24, 512), 256)])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("density", [0.0, 0.05])
def test_int8_gemv_within_its_bound(shape, group, m, density):
    base, ortho = _streams(*shape, group, density)
    ortho = ortho if ortho.nnz else None
    x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(1))
    y = _gemv(base, shape[1], x, ortho, 0.7)
    err = (y.double() - reference_product(x, base, ortho, 0.7)).abs()
    bound = path_error_bound("gemv_int8", x, base, ortho, 0.7)
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"int8 gemv {shape} g={group} m={m}: error/bound up to {worst:.3f}"
    if shape[1] >= 64:  # a whole block is rounded: the error is the int8 one, not fp32's
        assert err.max() > path_error_bound("gemv", x, base, ortho, 0.7).max() / 10


@pytest.mark.skipif(not HAS_VNNI, reason="int8_isa() is avx2: no avx512_vnni, or ATEN_CPU_CAPABILITY asks for <= AVX2")
def test_vnni_and_avx2_dots_agree_bit_for_bit():
    base, ortho = _streams(96, 640, 128, 0.02)
    x = torch.randn(4, 640, generator=torch.Generator().manual_seed(2))
    assert torch.equal(_gemv(base, 640, x, ortho, 1.0, mode=1), _gemv(base, 640, x, ortho, 1.0, mode=2))


def test_int8_gemv_hand_computed():
    """K = 64 codes q_k = k mod 16, scale 1, zero 0, X integers whose block max is 127: x8 = X
    exactly, so y = Σ_k q_k·x_k, an integer computed here by hand."""
    k = 64
    codes = torch.arange(k, dtype=torch.uint8) % 16  # (K,)
    qweight = (codes[0::2] | (codes[1::2] << 4)).view(1, k // 2)  # two codes per byte, even k low
    x = torch.tensor([[127.0 if i == 5 else float((i * 7) % 31 - 15) for i in range(k)]])
    expected = sum(int(codes[i]) * int(x[0, i]) for i in range(k))
    for mode in (1, 2) if HAS_VNNI else (1,):
        y = cpu_gemv.gemv(qweight, torch.ones(1, 1, dtype=torch.float16), torch.zeros(1, 1, dtype=torch.float16),
                          k, 64, x, None, 0.0, mode=mode)
        assert y.item() == expected, f"mode {mode}: {y.item()} != {expected}"


def test_int8_step_is_block_max_over_254():
    x = torch.tensor([[2.54] + [0.1] * 63 + [-0.5] * 10], dtype=torch.float64)  # (1, 74): 2 blocks
    step = _block_steps(x, 254, slack=512.0)
    assert torch.allclose(step[0, :64], torch.full((64,), 0.01 * (1 + 512 * FP32_UNIT_ROUNDOFF), dtype=torch.float64))
    assert torch.allclose(step[0, 64:], torch.full((10,), 0.5 / 254 * (1 + 512 * FP32_UNIT_ROUNDOFF), dtype=torch.float64))


def test_bad_modes_are_refused():
    base, _ = _streams(8, 64, 64, 0.0)
    with pytest.raises(ValueError, match="mode must be"):
        _gemv(base, 64, torch.randn(1, 64), mode=3)
    with pytest.raises(ValueError, match="activations must be"):
        cpu_gemv.gemv_mode("int4")
    assert cpu_gemv.gemv_mode("int16") == 0 and cpu_gemv.gemv_mode("int8", "avx2") == 1
