"""Weight quantisers: group-wise INT-k (RTN, GPTQ) and bitsandbytes NF4/FP4.

    spec = QuantSpec(method="gptq", bits=4, group_size=128)
    base = quantise_weight(w, spec, hessian)        # an ortho_kernels.QuantisedBase (packed codes)
    w_hat = base.dequantise()

INT-k storage (pack/unpack, dequantise, bits per weight) is `ortho_kernels.packing`'s: a base
built here runs in `ortho_kernels.dual_stream_linear` unchanged. No Lightning in this package.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ortho_kernels import QuantisedBase, pack_bits
from ortho_train.quantisation.bnb4 import (
    QUANT_TYPES,
    bnb_bits_per_weight,
    bnb_dequantise_4bit,
    bnb_fake_quantise,
    bnb_quantise_4bit,
)
from ortho_train.quantisation.gptq import GPTQResult, gptq_quantise

METHODS = ("rtn", "gptq")


@dataclass
class QuantSpec:
    """How a base stream is quantised.

    Args:
        method: 'rtn' (round to nearest) or 'gptq' (needs calibration Hessians).
        bits: 2, 3, 4 or 8.
        group_size: weights per (scale, zero) pair along the input dimension.
        damp: GPTQ damping as a fraction of mean(diag H).
        block_size: GPTQ lazy block (rounded to whole groups).
        act_order: GPTQ in descending diag(H) order (implies static groups).
        static_groups: GPTQ group parameters from the original weights.
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantisation method must be one of {METHODS}, got {self.method!r}")
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be one of (2, 3, 4, 8), got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    @property
    def name(self) -> str:
        return f"int{self.bits}_{self.method}"


def base_from_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    bits: int, group_size: int) -> QuantisedBase:
    """Pack unpacked codes (N, K) into a `ortho_kernels.QuantisedBase`."""
    return QuantisedBase(pack_bits(codes, bits), scales, zeros, tuple(codes.shape), group_size, bits)


def quantise_weight(w: torch.Tensor, spec: QuantSpec,
                    hessian: torch.Tensor | None = None) -> QuantisedBase:
    """The INT-k base stream of a weight (N, K) under `spec` (GPTQ needs its Hessian)."""
    if spec.method == "rtn":
        return QuantisedBase.from_dense(w.detach().float(), bits=spec.bits, group_size=spec.group_size)
    if hessian is None:
        raise ValueError("GPTQ needs a calibration Hessian for every layer it quantises "
                         "(collect them with ortho_train.curvature.collect_hessians)")
    result = run_gptq(w, hessian, spec)
    return base_from_codes(result.codes, result.scales, result.zeros, spec.bits, spec.group_size)


def run_gptq(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
             outlier_threshold: float | None = None) -> GPTQResult:
    """`gptq_quantise` with the settings of `spec`."""
    return gptq_quantise(w.detach(), hessian, bits=spec.bits, group_size=spec.group_size,
                         damp=spec.damp, block_size=spec.block_size, act_order=spec.act_order,
                         static_groups=spec.static_groups, outlier_threshold=outlier_threshold)


__all__ = [
    "GPTQResult", "METHODS", "QUANT_TYPES", "QuantSpec", "base_from_codes",
    "bnb_bits_per_weight", "bnb_dequantise_4bit", "bnb_fake_quantise", "bnb_quantise_4bit",
    "gptq_quantise", "quantise_weight", "run_gptq",
]
