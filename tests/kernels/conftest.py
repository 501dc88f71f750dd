"""Fixtures for the kernel tests: one device list, CUDA cases behind the `gpu` marker.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set in tests/conftest.py), which
is slow and computes bf16 wrongly, hence small shapes and fp16/fp32 only.
"""
import pytest
import torch

_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, _NO_CUDA])])
def device(request) -> torch.device:
    return torch.device(request.param)


def rel_errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |y - ref| / max |ref|, ||y - ref||_2 / ||ref||_2), both in fp64."""
    y, ref = y.double(), ref.double()
    diff = (y - ref).abs()
    scale = ref.abs().max().clamp_min(1e-30)
    return float(diff.max() / scale), float(diff.norm() / ref.norm().clamp_min(1e-30))


@pytest.fixture
def assert_rel_close():
    """assert_rel_close(y, ref, tol, what): max and RMS relative error both <= tol.

    Both are printed, so `pytest tests/kernels -rP` lists the measured errors.
    """

    def check(y: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
        assert y.shape == ref.shape, f"{what}: shape {tuple(y.shape)} != {tuple(ref.shape)}"
        max_rel, rms_rel = rel_errors(y, ref)
        msg = f"{what}: max rel err {max_rel:.2e}, RMS rel err {rms_rel:.2e} (tol {tol:.0e})"
        print(msg)  # the error report; shown for passing tests with `pytest -rP`
        assert max_rel <= tol and rms_rel <= tol, msg

    return check

