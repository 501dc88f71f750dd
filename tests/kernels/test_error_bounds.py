"""Each CPU path of the dual-stream op stays within its derived error bound, and the bound is
tight enough to mean something (a wrong weight or a dropped ortho term would exceed it)."""
import pytest
import torch

from ortho_kernels import cpu_gemv
from ortho_kernels.dual_stream import DENSE_MIN_M, dual_stream_linear, resolved_path
from ortho_kernels.error_bounds import path_error_bound, reference_product
from ortho_kernels.streams import OrthoStream, QuantisedBase


def _streams(n, k, group, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    base = QuantisedBase.from_dense(w, bits=4, group_size=group)
    ortho = OrthoStream.top_fraction((w - base.dequantise()) * 20, density)  # ~unit-size values
    return base, ortho


@pytest.mark.parametrize("group", [32, 64])  # 32: the GEMV cannot take it (torch's op at every M ≤ 32)
@pytest.mark.parametrize("m, cache", [(1, False), (cpu_gemv.MAX_M, False), (cpu_gemv.MAX_M + 1, False),
                                      (DENSE_MIN_M, False), (DENSE_MIN_M, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_cpu_path_within_its_bound(group, m, cache, dtype, seed):
    base, ortho = _streams(72, 201, group, 0.05, seed)
    x = torch.randn(m, 201, generator=torch.Generator().manual_seed(seed + 10)).to(dtype)
    path = resolved_path(base, m, "cpu", weight_cache=cache)
    assert path in ("gemv", "torch_int4", "blocked", "dense")
    for alpha, stream in ((1.0, ortho), (0.0, None)):
        y = dual_stream_linear(x, base, stream, alpha=alpha, backend="cpu", weight_cache=cache).double()
        exact = reference_product(x, base, stream, alpha)
        bound = path_error_bound(path, x, base, stream, alpha)
        excess = ((y - exact).abs() - bound).max().item()
        assert excess <= 0, f"{path} m={m} α={alpha}: error exceeds the bound by {excess:.3g}"


def test_paths_follow_m_and_group():
    base64, _ = _streams(64, 256, 64, 0.0)
    expected = "torch_int4" if isinstance(cpu_gemv.library(), str) else "gemv"  # no AVX2: torch's op
    assert resolved_path(base64, 1, "cpu") == expected
    assert resolved_path(base64, cpu_gemv.MAX_M + 1, "cpu") == "torch_int4"
    assert resolved_path(base64, DENSE_MIN_M, "cpu") == "blocked"  # no weight kept by default
    assert resolved_path(base64, DENSE_MIN_M, "cpu", weight_cache=True) == "dense"
    base32, _ = _streams(64, 256, 32, 0.0)
    assert resolved_path(base32, 1, "cpu") == "torch_int4"  # the GEMV wants multiples of 64
    assert resolved_path(base32, 1, "reference") == "reference"


@pytest.mark.parametrize("m", [1, cpu_gemv.MAX_M + 1, DENSE_MIN_M])
def test_bound_is_not_vacuous(m):
    """Dropping a 5%-dense ortho stream of ~unit values moves most outputs beyond the bound."""
    base, ortho = _streams(72, 201, 64, 0.05)
    x = torch.randn(m, 201, generator=torch.Generator().manual_seed(3))
    path = resolved_path(base, m, "cpu")
    bound = path_error_bound(path, x, base, ortho, 1.0)
    y_without = dual_stream_linear(x, base, None, alpha=0.0, backend="cpu").double()
    outside = ((y_without - reference_product(x, base, ortho, 1.0)).abs() > bound).double().mean()
    assert outside > 0.5, f"{path}: only {outside:.0%} of the outputs leave the bound"
