"""The default prefill (M >= DENSE_MIN_M): W_eff rebuilt in blocks of rows, no weight kept.

Each block must equal the cached weight's rows bit for bit (the same dequantiser, the same
`index_add_`); the product must stay within the fp32 product's bound (`error_bounds`,
path "blocked") — and the bound must still catch a dropped ortho term."""
import threading

import pytest
import torch

from ortho_kernels import blocked_prefill as bp
from ortho_kernels import cpu_gemv, cpu_runtime
from ortho_kernels import dual_stream as ds
from ortho_kernels.dual_stream import dual_stream_linear, effective_weight
from ortho_kernels.error_bounds import path_error_bound, reference_product
from ortho_kernels.streams import OrthoStream, QuantisedBase


def _streams(n, k, group=64, density=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    base = QuantisedBase.from_dense(w, group_size=group)
    return base, OrthoStream.top_fraction((w - base.dequantise()) * 20, density)


def test_block_rows_fill_the_scratch():
    assert bp.block_rows(4096, 2048) == 512  # 4 MiB / (2048 · 4 bytes)
    assert bp.block_rows(1000, 768) == 1000  # 1365 rows would fit: capped at N
    assert bp.block_rows(10, 2 ** 21) == 1  # a row longer than the scratch: one row per block
    assert bp.block_rows(100, 64, scratch_bytes=7 * 64 * 4) == 7


@pytest.mark.parametrize("c_dequantiser", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.3])
def test_every_block_is_the_cached_weight_bit_for_bit(c_dequantiser, alpha, monkeypatch):
    if c_dequantiser and isinstance(cpu_gemv.library(), str):
        pytest.skip(f"CPU GEMV unavailable: {cpu_gemv.library()}")
    if not c_dequantiser:  # torch's group_dequantise on the rows instead of the C code
        monkeypatch.setattr(cpu_gemv, "_LIB", "disabled for this test")
        monkeypatch.setattr(cpu_runtime, "WARNED", {"disabled for this test"})
    base, ortho = _streams(70, 200)
    runtime = cpu_runtime.CpuInt4Runtime(base)
    assert bool(runtime.gemv_max_m) == c_dequantiser
    stream = ortho if alpha else None
    cached = effective_weight(base, stream, alpha)  # (N, K), what weight_cache=True keeps
    for n0, n1 in ((0, 9), (9, 40), (40, 70), (13, 14)):  # ragged blocks, one row
        out = torch.empty(n1 - n0, 200)
        bp.effective_rows(runtime, stream, alpha, n0, n1, out)
        assert torch.equal(out, cached[n0:n1]), f"rows {n0}:{n1} differ from the cached weight"


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("scratch_bytes", [3 * 201 * 4, bp.SCRATCH_BYTES])  # 24 blocks; one block
def test_blocked_product_within_the_fp32_bound(alpha, scratch_bytes, monkeypatch):
    monkeypatch.setattr(bp, "SCRATCH_BYTES", scratch_bytes)
    base, ortho = _streams(72, 201, seed=1)
    stream = ortho if alpha else None
    x = torch.randn(ds.DENSE_MIN_M + 3, 201, generator=torch.Generator().manual_seed(2))
    assert ds.resolved_path(base, x.shape[0], "cpu") == "blocked"
    y = dual_stream_linear(x, base, stream, alpha, backend="cpu").double()  # (M, N)
    exact = reference_product(x, base, stream, alpha)
    bound = path_error_bound("blocked", x, base, stream, alpha)
    excess = ((y - exact).abs() - bound).max().item()
    assert excess <= 0, f"blocked prefill exceeds its bound by {excess:.3g}"
    if alpha:  # the bound is not vacuous: without the ortho term most outputs leave it
        without = dual_stream_linear(x, base, None, 0.0, backend="cpu").double()
        assert ((without - exact).abs() > bound).double().mean() > 0.5


def test_default_prefill_keeps_no_dense_weight():
    base, ortho = _streams(64, 256, seed=3)
    x = torch.randn(2, ds.DENSE_MIN_M, 256)  # (B, T, K)
    y = dual_stream_linear(x, base, ortho, 1.0, backend="cpu")
    assert y.shape == (2, ds.DENSE_MIN_M, 64) and y.is_contiguous()
    assert ds.prepare_cpu(base)._dense is None  # no 4-byte-per-weight copy of the base ...
    assert id(ortho.indices) not in ds._DENSE_EFF_CACHE._entries  # ... nor of W_eff
    cached = dual_stream_linear(x, base, ortho, 1.0, backend="cpu", weight_cache=True)
    assert ds.prepare_cpu(base)._dense is not None
    assert (y - cached).abs().max() <= 1e-5 * cached.abs().max()


def test_blocked_gradient_is_the_dense_one():
    base, ortho = _streams(48, 128, seed=4)
    x = torch.randn(ds.DENSE_MIN_M, 128, requires_grad=True)
    dual_stream_linear(x, base, ortho, 1.0, backend="cpu").sum().backward()
    w = effective_weight(base, ortho, 1.0)  # (N, K)
    assert torch.allclose(x.grad, w.sum(0).expand_as(x), rtol=1e-5, atol=1e-6)


def test_python_threads_each_use_their_own_scratch(monkeypatch):
    monkeypatch.setattr(bp, "SCRATCH_BYTES", 8 * 256 * 4)  # many blocks: long overlap between threads
    bases = [_streams(96, 256, seed=s) for s in range(3)]
    xs = [torch.randn(ds.DENSE_MIN_M, 256) for _ in bases]
    want = [dual_stream_linear(x, b, o, 1.0, backend="cpu") for x, (b, o) in zip(xs, bases)]
    results = []

    def work(i):
        for _ in range(10):
            b, o = bases[i]
            results.append(torch.equal(dual_stream_linear(xs[i], b, o, 1.0, backend="cpu"), want[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 30 and all(results)
