"""ortho-train's fused INT4 + CSR GEMV (kernels.cpu_gemv) against the fp64 reference.

It reads the base's packed codes in place, so the shapes are ragged on purpose: K odd (half
a padding byte per row), K not a multiple of the 32-code block, the last group partial.
X is rounded to 16-bit fixed point per 64 elements (2^-16 of the block maximum), products
are exact int32, accumulation fp32: a tolerance 10x below the issue's 1e-3 for fp32.
"""
import pytest
import torch

from ortho_kernels import cpu_gemv, cpu_runtime
from ortho_kernels import dual_stream as ds
from ortho_kernels.dual_stream import dual_stream_linear, effective_weight
from ortho_kernels.streams import OrthoStream, QuantisedBase

pytestmark = pytest.mark.skipif(isinstance(cpu_gemv.library(), str),
                                reason=f"CPU GEMV unavailable: {cpu_gemv.library()}")
GEMV_TOL = 1e-4  # X in 16-bit fixed point per 64 elements: ~1e-5 measured


def _streams(n, k, group, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    base = QuantisedBase.from_dense(w, bits=4, group_size=group)
    return base, OrthoStream.top_fraction((w - base.dequantise()) * 20, density)


def _ref64(x, base, ortho, alpha):
    return x.double() @ effective_weight(base, ortho, alpha, torch.float64).T


@pytest.mark.parametrize("shape, group", [((72, 201), 64), ((40, 4096), 128), ((33, 97), 64),
                                          ((16, 31), 64), ((24, 512), 256), ((8, 300), 128)])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("density", [0.0, 0.005, 0.05])
def test_gemv_matches_fp64_reference(shape, group, m, density, assert_rel_close):
    base, ortho = _streams(*shape, group, density)
    x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(1))
    csr = ortho.to_csr()[:3] if ortho.nnz else None
    y = cpu_gemv.gemv(base.qweight, base.scales, base.zeros, shape[1], group, x, csr, 0.7)
    assert y.shape == (m, shape[0]) and y.dtype == torch.float32
    assert_rel_close(y, _ref64(x, base, ortho if ortho.nnz else None, 0.7), GEMV_TOL,
                     f"gemv {shape} g={group} m={m} rho={density}")


def test_cpu_path_uses_the_gemv_for_small_m_and_torch_op_above(monkeypatch, assert_within_path_bound):
    base, ortho = _streams(64, 256, 128, 0.05)
    calls = []
    real = cpu_gemv.gemv
    monkeypatch.setattr(cpu_gemv, "gemv", lambda *a, **kw: calls.append(a[5].shape[0]) or real(*a, **kw))
    for m in (1, cpu_gemv.MAX_M, cpu_gemv.MAX_M + 1):
        x = torch.randn(m, 256)
        y = dual_stream_linear(x, base, ortho, alpha=1.0, backend="cpu")
        assert_within_path_bound(y, x, base, ortho, 1.0, "cpu", f"cpu path m={m}")
    assert calls == [1, cpu_gemv.MAX_M]


def test_alpha_zero_never_reads_nan_ortho_in_the_gemv():
    base, ortho = _streams(64, 256, 128, 0.05)
    nan = OrthoStream(ortho.indices, torch.full_like(ortho.values, float("nan")), ortho.shape)
    x = torch.randn(1, 256)
    y0 = dual_stream_linear(x, base, nan, alpha=0.0, backend="cpu")
    assert torch.equal(y0, dual_stream_linear(x, base, None, backend="cpu"))
    rows_with_entries = torch.bincount(ortho.indices.long() // 256, minlength=64) > 0  # (N,)
    y1 = dual_stream_linear(x, base, nan, alpha=1.0, backend="cpu")  # α=1 does read them
    assert torch.equal(torch.isnan(y1[0]), rows_with_entries)


def test_unavailable_gemv_falls_back_to_torch_op_with_the_reason(monkeypatch, assert_rel_close):
    monkeypatch.setattr(cpu_gemv, "_LIB", "no C compiler (gcc/cc) on PATH")
    monkeypatch.setattr(ds, "_WARNED", set())
    monkeypatch.setattr(cpu_runtime, "WARNED", set())  # where the runtime records its warnings
    base, ortho = _streams(64, 256, 128, 0.05)  # a fresh base: not in the runtime cache
    with pytest.warns(UserWarning, match="no C compiler"):
        y = dual_stream_linear(torch.randn(1, 256), base, ortho, alpha=1.0, backend="cpu")
    assert ds.prepare_cpu(base).gemv_max_m == 0 and y.shape == (1, 64)
    with pytest.raises(RuntimeError, match="CPU GEMV unavailable: no C compiler"):
        cpu_gemv.gemv(base.qweight, base.scales, base.zeros, 256, 128, torch.randn(1, 256))


def test_failed_build_names_the_compiler_error(monkeypatch, tmp_path):
    monkeypatch.setenv("ORTHO_TRAIN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(cpu_gemv, "CFLAGS", cpu_gemv.CFLAGS + ["-DFORCE_REBUILD"])
    reason = cpu_gemv._load()
    assert isinstance(reason, str) and "building _cpu_int4_gemv.c failed" in reason
    assert not list(tmp_path.glob("*.so*"))  # no half-written library left behind


def test_group_sizes_the_gemv_cannot_take():
    assert "INT4-only" in cpu_gemv.unsupported(3, 128)
    assert "multiple of 64" in cpu_gemv.unsupported(4, 32)
