"""The CPU path's threading and prefill: results independent of how work is split.

Every output row of the GEMV is computed by the same code whichever thread takes its chunk,
so 1, 2 or 3 threads (the non-spinning pool) and the OpenMP variant agree bit for bit — one
computation order, split differently. The prefill path (M >= DENSE_MIN_M) multiplies by the
dense weight built exactly as the reference builds it: with `weight_cache=True` (the weight
kept) it equals the reference bit for bit at every α; by default (the weight rebuilt in blocks
of rows through a scratch buffer) every block equals the cached weight's rows bit for bit and
the product stays within the fp32 bound. The dense dequantisation in C equals
`QuantisedBase.dequantise` exactly ((q - z)·s is exact in fp32).
"""
import ctypes

import pytest
import torch

from ortho_kernels import cpu_gemv
from ortho_kernels import dual_stream as ds
from ortho_kernels.dual_stream import dual_stream_linear
from ortho_kernels.streams import OrthoStream, QuantisedBase

pytestmark = pytest.mark.skipif(isinstance(cpu_gemv.library(), str),
                                reason=f"CPU GEMV unavailable: {cpu_gemv.library()}")


def _streams(n, k, group=128, density=0.02):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(n, k, generator=g) * 0.05
    base = QuantisedBase.from_dense(w, group_size=group)
    return base, OrthoStream.top_fraction((w - base.dequantise()) * 20, density)


def _raw(lib_fn, base, x, csr, threads):
    (m, k), n = x.shape, base.shape[0]
    y = torch.empty(m, n)
    ptrs = (None, None, None) if csr is None else tuple(t.data_ptr() for t in csr)
    rc = lib_fn(base.qweight.data_ptr(), base.scales.data_ptr(), base.zeros.data_ptr(), m, n, k,
                base.group_size, x.data_ptr(), y.data_ptr(), *ptrs, ctypes.c_float(0.5), threads)
    assert rc == 0
    return y


@pytest.mark.parametrize("m", [1, 5])
def test_gemv_result_does_not_depend_on_threads_or_pool(m):
    base, ortho = _streams(1000, 704)  # 1000 rows: many chunks, a ragged last one
    csr = tuple(t.contiguous() for t in ortho.to_csr()[:3])
    x = torch.randn(m, 704)
    lib = cpu_gemv.library()
    one = _raw(lib.ortho_int4_gemv, base, x, csr, 1)
    for threads in (2, 3):
        assert torch.equal(_raw(lib.ortho_int4_gemv, base, x, csr, threads), one)
    omp = cpu_gemv.omp_library()  # the OpenMP comparison build, if this compiler has OpenMP
    if not isinstance(omp, str):
        assert torch.equal(_raw(omp.ortho_int4_gemv_omp, base, x, csr, 2), one)


def test_gemv_from_several_python_threads_at_once():
    import threading

    base, ortho = _streams(512, 512)
    x = torch.randn(2, 512)
    want = dual_stream_linear(x, base, ortho, 1.0, backend="cpu")
    results = []

    def work():
        for _ in range(20):
            results.append(torch.equal(dual_stream_linear(x, base, ortho, 1.0, backend="cpu"), want))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 60 and all(results)


@pytest.mark.parametrize("k, group", [(300, 64), (256, 128), (201, 32)])
def test_dense_dequantisation_is_exact(k, group):
    base, _ = _streams(77, k, group)
    out = torch.empty(30, k)
    cpu_gemv.dequantise_rows(base.qweight, base.scales, base.zeros, k, group, 40, 70, out)
    assert torch.equal(out, base.dequantise()[40:70])


def test_cached_prefill_at_alpha_zero_is_the_reference_product():
    base, ortho = _streams(96, 320)
    x = torch.randn(2, ds.DENSE_MIN_M, 320)  # M = 2 * DENSE_MIN_M
    y = dual_stream_linear(x, base, ortho, 0.0, backend="cpu", weight_cache=True)
    assert torch.equal(y, dual_stream_linear(x, base, ortho, 0.0, backend="reference"))


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_cached_prefill_with_the_ortho_stream_is_the_reference_product(alpha):
    base, ortho = _streams(96, 320)
    x = torch.randn(ds.DENSE_MIN_M + 5, 320)
    y = dual_stream_linear(x, base, ortho, alpha, backend="cpu", weight_cache=True)
    assert torch.equal(y, dual_stream_linear(x, base, ortho, alpha, backend="reference"))


def test_prefill_cache_is_kept_across_alpha_and_freed_with_the_base():
    import gc

    base, ortho = _streams(64, 256)
    x = torch.randn(ds.DENSE_MIN_M, 256)
    dual_stream_linear(x, base, ortho, 1.0, backend="cpu", weight_cache=True)
    dense = ds.prepare_cpu(base).dense_weight()
    y0 = dual_stream_linear(x, base, ortho, 0.0, backend="cpu", weight_cache=True)
    assert ds.prepare_cpu(base).dense_weight() is dense  # flipping α rebuilds nothing
    assert torch.equal(y0, dual_stream_linear(x, base, None, backend="cpu", weight_cache=True))
    own = {id(t) for t in (base.qweight, base.scales, base.zeros)}
    mine = [key for key, entry in ds._CPU_BASE_CACHE._entries.items() if key in own and entry[0]() is not None]
    assert mine  # the base's entry is cached ...
    del base, dense
    gc.collect()
    assert not any(key in ds._CPU_BASE_CACHE._entries for key in mine)  # ... and goes with it
