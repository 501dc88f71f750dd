"""The CPU GEMV's Python boundary refuses every malformed argument before C sees a pointer
(`ortho_kernels.gemv_args`); the checks need no compiled kernel."""
import pytest
import torch

from ortho_kernels import cpu_gemv
from ortho_kernels.gemv_args import check_dequantise, check_gemv
from ortho_kernels.streams import OrthoStream, QuantisedBase

N, K, GROUP = 16, 200, 64  # G = ceil(200 / 64) = 4, qweight (16, 100)


@pytest.fixture
def args():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g)
    base = QuantisedBase.from_dense(w, bits=4, group_size=GROUP)
    ortho = OrthoStream.top_fraction(w, 0.05)
    csr = tuple(t.contiguous() for t in ortho.to_csr()[:3])
    return dict(qweight=base.qweight, scales=base.scales, zeros=base.zeros, k=K, group_size=GROUP,
                x2d=torch.randn(2, K), csr=csr, alpha=0.5)


def test_well_formed_arguments_pass(args):
    check_gemv(**args)
    check_gemv(**(args | {"csr": None, "x2d": torch.randn(K, 3).T.bfloat16(), "alpha": 1}))


def _csr(args, i, value):
    csr = list(args["csr"])
    csr[i] = value
    return tuple(csr)


BAD = {  # name -> (change to the arguments, error type, message pattern)
    "qweight dtype": (lambda a: {"qweight": a["qweight"].to(torch.int8)}, TypeError, r"qweight must be torch\.uint8"),
    "qweight not a tensor": (lambda a: {"qweight": a["qweight"].numpy()}, TypeError, "qweight must be a torch.Tensor"),
    "qweight 1-D": (lambda a: {"qweight": a["qweight"].flatten()}, ValueError, "qweight must be 2-D"),
    "qweight width": (lambda a: {"qweight": a["qweight"][:, :-1]}, ValueError, r"qweight has shape \(16, 99\), expected \(16, 100\)"),
    "qweight strided": (lambda a: {"qweight": a["qweight"].T.contiguous().T}, ValueError, "qweight must be contiguous"),
    "qweight on meta": (lambda a: {"qweight": a["qweight"].to("meta")}, ValueError, "qweight is on meta"),
    "scales dtype": (lambda a: {"scales": a["scales"].float()}, TypeError, r"scales must be torch\.float16"),
    "scales groups": (lambda a: {"scales": a["scales"][:, :3]}, ValueError, r"scales has shape \(16, 3\), expected \(16, 4\)"),
    "zeros rows": (lambda a: {"zeros": a["zeros"][:15]}, ValueError, r"zeros has shape \(15, 4\)"),
    "zeros strided": (lambda a: {"zeros": a["zeros"].T.contiguous().T}, ValueError, "zeros must be contiguous"),
    "k": (lambda a: {"k": K + 2}, ValueError, r"qweight has shape \(16, 100\), expected \(16, 101\)"),
    "k float": (lambda a: {"k": 200.0}, TypeError, "k must be an int"),
    "k zero": (lambda a: {"k": 0}, ValueError, r"k=0 must be in \[1, "),
    "k too large for C": (lambda a: {"k": 2**31}, ValueError, r"k=2147483648 must be in"),
    "group not x64": (lambda a: {"group_size": 32, "scales": a["scales"].repeat(1, 2)[:, :7].contiguous(),
                                 "zeros": a["zeros"].repeat(1, 2)[:, :7].contiguous()}, ValueError, "group_size=32 is not a multiple of 64"),
    "x 1-D": (lambda a: {"x2d": torch.randn(K)}, ValueError, "x2d must be 2-D"),
    "x width": (lambda a: {"x2d": torch.randn(2, K - 1)}, ValueError, r"x2d has shape \(2, 199\), expected \(2, 200\)"),
    "x no rows": (lambda a: {"x2d": torch.randn(0, K)}, ValueError, r"M \(x2d rows\)=0"),
    "x integer": (lambda a: {"x2d": torch.ones(2, K, dtype=torch.int32)}, TypeError, "x2d must be a floating-point tensor"),
    "x sparse": (lambda a: {"x2d": torch.randn(2, K).to_sparse()}, TypeError, "x2d must be a dense"),
    "x on meta": (lambda a: {"x2d": torch.randn(2, K, device="meta")}, ValueError, "x2d is on meta"),
    "csr length": (lambda a: {"csr": a["csr"][:2]}, TypeError, "csr must be a tuple"),
    "crow dtype": (lambda a: {"csr": _csr(a, 0, a["csr"][0].long())}, TypeError, r"csr crow must be torch\.int32"),
    "crow length": (lambda a: {"csr": _csr(a, 0, a["csr"][0][:-1])}, ValueError, r"csr crow has shape \(16,\), expected \(17,\)"),
    "crow end": (lambda a: {"csr": _csr(a, 0, a["csr"][0] - a["csr"][0].clamp(max=1))}, ValueError, "csr crow must run from 0 to nnz"),
    "col dtype": (lambda a: {"csr": _csr(a, 1, a["csr"][1].long())}, TypeError, r"csr col must be torch\.int32"),
    "values dtype": (lambda a: {"csr": _csr(a, 2, a["csr"][2].float())}, TypeError, r"csr values must be torch\.float16"),
    "values length": (lambda a: {"csr": _csr(a, 2, a["csr"][2][:-1])}, ValueError, r"csr values has shape"),
    "alpha tensor": (lambda a: {"alpha": torch.tensor(0.5)}, TypeError, "alpha must be a real number"),
    "alpha bool": (lambda a: {"alpha": True}, TypeError, "alpha must be a real number"),
}


@pytest.mark.parametrize("case", BAD)
def test_each_malformed_argument_is_refused_by_name(args, case):
    change, error, pattern = BAD[case]
    with pytest.raises(error, match=pattern):
        check_gemv(**(args | change(args)))


DEQUANT_BAD = {
    "rows reversed": (dict(n0=5, n1=4), ValueError, r"rows \[n0, n1\) = \[5, 4\)"),
    "rows beyond N": (dict(n0=0, n1=N + 1), ValueError, "not inside the base's 16 rows"),
    "negative n0": (dict(n0=-1, n1=2), ValueError, r"n0=-1 must be in"),
    "out dtype": (dict(out=torch.empty(N, K, dtype=torch.float64)), TypeError, r"out must be torch\.float32"),
    "out shape": (dict(out=torch.empty(N, K + 1)), ValueError, r"out has shape \(16, 201\), expected \(16, 200\)"),
    "out strided": (dict(out=torch.empty(K, N).T), ValueError, "out must be contiguous"),
}


@pytest.mark.parametrize("case", DEQUANT_BAD)
def test_dequantise_rows_arguments_are_checked(args, case):
    change, error, pattern = DEQUANT_BAD[case]
    call = dict(qweight=args["qweight"], scales=args["scales"], zeros=args["zeros"], k=K, group_size=GROUP,
                n0=0, n1=N, out=torch.empty(N, K))
    check_dequantise(**call)
    with pytest.raises(error, match=pattern):
        check_dequantise(**(call | change))


@pytest.mark.skipif(isinstance(cpu_gemv.library(), str), reason="CPU GEMV unavailable")
def test_the_public_functions_check_before_calling_c(args):
    with pytest.raises(ValueError, match="x2d has shape"):
        cpu_gemv.gemv(**(args | {"x2d": torch.randn(1, K + 64)}))
    with pytest.raises(ValueError, match="out has shape"):
        cpu_gemv.dequantise_rows(args["qweight"], args["scales"], args["zeros"], K, GROUP, 0, 4, torch.empty(3, K))
    y = cpu_gemv.gemv(**(args | {"x2d": torch.randn(K, 2, dtype=torch.float64).T}))  # any float layout: converted
    assert y.shape == (2, N) and y.dtype == torch.float32


@pytest.mark.skipif(isinstance(cpu_gemv.library(), str), reason="CPU GEMV unavailable")
def test_a_runtime_checks_its_base_once_and_its_inputs_every_call(args, monkeypatch):
    from ortho_kernels import dual_stream as ds

    base = QuantisedBase.from_dense(torch.randn(N, K), bits=4, group_size=GROUP)
    runtime = ds.CpuInt4Runtime(base)
    calls = []
    monkeypatch.setattr(cpu_gemv, "check_gemv", lambda *a: calls.append(a))  # the full check: not per call
    assert runtime.gemv(torch.randn(1, K)).shape == (1, N) and not calls
    with pytest.raises(ValueError, match=r"x2d has shape \(1, 264\), expected \(1, 200\)"):
        runtime.gemv(torch.randn(1, K + 64))
    with pytest.raises(TypeError, match=r"csr values must be torch\.float16"):
        runtime.gemv(torch.randn(1, K), _csr(args, 2, args["csr"][2].float()), 1.0)
