"""The dual-stream op on its three paths against an fp64 reference.

Triton runs under the interpreter on CPU (tests/conftest.py) and compiled on CUDA (the
`gpu`-marked parameter of the `device` fixture); fp16/fp32 only (the interpreter's bf16 is
wrong). Shapes are ragged on purpose: N=72 and K=201 are multiples of no block size, K is
odd (the last packed byte is half padding) and the last quantisation group is ragged.
"""
import pytest
import torch

from ortho_kernels import dual_stream as ds
from ortho_kernels.dual_stream import dual_stream_linear, effective_weight, prepare_cpu
from ortho_kernels.streams import OrthoStream, QuantisedBase

N, K, GROUP = 72, 201, 32
TOL = {torch.float32: 1e-3, torch.float16: 5e-3}


def _streams(density, device, n=N, k=K, group=GROUP, bits=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    base = QuantisedBase.from_dense(w, bits=bits, group_size=group)
    residual = w - base.dequantise()
    ortho = OrthoStream.top_fraction(residual * 20, density)  # ~unit-size values
    return base.to(device), ortho.to(device)


def _x(m, dtype, device, k=K, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def _ref64(x, base, ortho, alpha):
    return x.double() @ effective_weight(base, ortho, alpha, torch.float64).T


@pytest.mark.parametrize("density", [0.0, 0.005, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_triton_matches_fp64_reference(m, dtype, density, device, assert_rel_close):
    base, ortho = _streams(density, device)
    x = _x(m, dtype, device)
    y = dual_stream_linear(x, base, ortho, alpha=1.0, backend="triton")
    assert y.dtype == dtype
    assert_rel_close(y, _ref64(x, base, ortho, 1.0), TOL[dtype], f"triton m={m} rho={density}")


@pytest.mark.parametrize("variant", ["gemv", "mm"])
@pytest.mark.parametrize("group", [40, 64])  # 40: scales per element; 64: one per K-tile
def test_triton_variants_and_group_layouts(variant, group, device, assert_rel_close):
    base, ortho = _streams(0.05, device, group=group)
    x = _x(5, torch.float32, device)
    y = dual_stream_linear(x, base, ortho, alpha=0.7, backend="triton", variant=variant)
    assert_rel_close(y, _ref64(x, base, ortho, 0.7), 1e-3, f"{variant} group={group}")


@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("shape", [(72, 201), (64, 256)])  # padded / native for torch's op
def test_cpu_fast_path(m, shape, assert_within_path_bound):
    base, ortho = _streams(0.05, torch.device("cpu"), *shape)
    x = _x(m, torch.float32, torch.device("cpu"), k=shape[1])
    y = dual_stream_linear(x, base, ortho, alpha=1.0, backend="cpu")
    assert_within_path_bound(y, x, base, ortho, 1.0, "cpu", f"cpu m={m} {shape}")
    y0 = dual_stream_linear(x.bfloat16(), base, ortho, alpha=0.0, backend="cpu")
    assert y0.dtype == torch.bfloat16
    assert_within_path_bound(y0, x.bfloat16(), base, None, 0.0, "cpu", "cpu bf16 alpha=0")


def test_reference_path(device, assert_rel_close):
    base, ortho = _streams(0.05, device)
    x = _x(4, torch.float32, device)
    y = dual_stream_linear(x, base, ortho, alpha=1.0, backend="reference")
    assert_rel_close(y, _ref64(x, base, ortho, 1.0), 1e-5, "reference")


def _all_backends(device):
    return ["reference", "triton"] + (["cpu"] if device.type == "cpu" else [])


@pytest.mark.parametrize("m", [1, 33])
def test_alpha_zero_is_bitwise_base_only_with_nan_ortho(m, device):
    base, ortho = _streams(0.05, device)
    nan_ortho = OrthoStream(ortho.indices, torch.full_like(ortho.values, float("nan")),
                            ortho.shape)
    x = _x(m, torch.float16, device)
    for backend in _all_backends(device):
        ds._CSR_CACHE.clear()
        base_only = dual_stream_linear(x, base, None, alpha=1.0, backend=backend)
        killed = dual_stream_linear(x, base, nan_ortho, alpha=0.0, backend=backend)
        assert torch.equal(killed, base_only), backend
        assert not ds._CSR_CACHE._entries, f"{backend}: alpha=0 built the ortho CSR"
        live = dual_stream_linear(x, base, nan_ortho, alpha=1.0, backend=backend)
        assert bool(live.isnan().any()), f"{backend}: alpha=1 ignored the ortho stream"
        empty = OrthoStream.empty(base.shape, device)
        assert torch.equal(dual_stream_linear(x, base, empty, 1.0, backend=backend), base_only)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradients_match_reference(dtype, device, assert_rel_close):
    base, ortho = _streams(0.05, device)
    bias = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
    g = _x(6, torch.float64, device, k=N, seed=3)  # upstream gradient (M, N)
    w64 = effective_weight(base, ortho, 0.5, torch.float64)
    for backend in _all_backends(device):
        x = _x(6, dtype, device).requires_grad_()
        y = dual_stream_linear(x, base, ortho, alpha=0.5, bias=bias, backend=backend)
        (y.double() * g).sum().backward()
        assert x.grad.dtype == dtype
        assert_rel_close(x.grad, g @ w64, TOL[dtype], f"{backend} dX")
        assert_rel_close(bias.grad, g.sum(0), TOL[dtype], f"{backend} dbias")
        bias.grad = None


def test_gradcheck_fp64_reference():
    base, ortho = _streams(0.05, torch.device("cpu"), n=8, k=40, group=8)
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: dual_stream_linear(t, base, ortho, 0.3, backend="reference"), (x,),
        fast_mode=True)


def test_batched_input_bias_and_shape(device):
    base, ortho = _streams(0.01, device)
    x = _x(6, torch.float32, device).reshape(2, 3, K)
    bias = torch.randn(N, device=device)
    y = dual_stream_linear(x, base, ortho, 1.0, bias=bias, backend="reference")
    assert y.shape == (2, 3, N)
    flat = dual_stream_linear(x.reshape(6, K), base, ortho, 1.0, backend="reference")
    assert torch.allclose(y.reshape(6, N), flat + bias)


def test_cpu_cache_survives_rewrapping_and_sees_in_place_edits():
    base, _ = _streams(0.0, torch.device("cpu"), 64, 256)
    rewrapped = QuantisedBase(base.qweight, base.scales, base.zeros, base.shape, base.group_size)
    assert prepare_cpu(rewrapped) is prepare_cpu(base)
    x = _x(1, torch.float32, torch.device("cpu"), k=256)
    before = dual_stream_linear(x, base, None, backend="cpu")
    base.scales.mul_(2)  # e.g. load_state_dict copying into the buffer
    after = dual_stream_linear(x, base, None, backend="cpu")
    assert torch.allclose(after, 2 * before, rtol=2e-2, atol=1e-3)


def test_unsupported_cpu_shapes_fall_back_with_a_reason():
    for bits, group, reason in [(3, 32, "bits=3"), (4, 48, "group_size=48")]:
        base, ortho = _streams(0.05, torch.device("cpu"), bits=bits, group=group)
        x = _x(2, torch.float32, torch.device("cpu"))
        ds._WARNED.clear()
        with pytest.warns(UserWarning, match=reason):
            y = dual_stream_linear(x, base, ortho, alpha=1.0)  # auto -> cpu -> reference
        assert torch.equal(y, dual_stream_linear(x, base, ortho, 1.0, backend="reference"))
        with pytest.raises(ValueError, match=reason):
            prepare_cpu(base)


@pytest.mark.parametrize("call, match", [
    (lambda b, o: dual_stream_linear(torch.randn(2, K + 1), b, o), rf"\(\.\.\., {K}\)"),
    (lambda b, o: dual_stream_linear(torch.ones(2, K, dtype=torch.int64), b, o), "floating"),
    (lambda b, o: dual_stream_linear(torch.randn(2, K), b, o, bias=torch.ones(3)), "bias"),
    (lambda b, o: dual_stream_linear(torch.randn(2, K), b, o, backend="gpu"), "backend must"),
    (lambda b, o: dual_stream_linear(torch.randn(2, K), b, OrthoStream.empty((N, K + 1))),
     "does not match"),
    (lambda b, o: dual_stream_linear(torch.randn(2, K), b.dequantise(), o), "QuantisedBase"),
    (lambda b, o: dual_stream_linear(torch.randn(2, K), QuantisedBase.from_dense(
        torch.randn(N, K), bits=3), o, backend="triton"), "INT4-only"),
])
def test_bad_inputs_are_named(call, match):
    base, ortho = _streams(0.01, torch.device("cpu"))
    with pytest.raises((ValueError, TypeError), match=match):
        call(base, ortho)


@pytest.mark.slow
@pytest.mark.parametrize("m", [1, 130])
def test_triton_larger_ragged_shape(m, device, assert_rel_close):
    base, ortho = _streams(0.02, device, n=257, k=1000, group=128)
    x = _x(m, torch.float32, device, k=1000)
    y = dual_stream_linear(x, base, ortho, alpha=1.0, backend="triton")
    assert_rel_close(y, _ref64(x, base, ortho, 1.0), 1e-3, f"triton m={m} 257x1000")
