"""Settings of the two roles a format plays: `QuantConfig` (a base stream) and `PTQConfig` (a deployed copy)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from ortho_kernels import QuantisedBase
from ortho_train.quantisation.format import WeightFormat
from ortho_train.quantisation.registry import base_quantiser, deployment_format
from ortho_train.models import DTYPES, DtypeName
from ortho_train.settings import Rule, check_choices, is_finite

CpuKernel = Literal["portable", "native"]
CPU_KERNELS = get_args(CpuKernel)
BNB_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class QuantConfig:
    """How a base stream is quantised.

    Args:
        method: a registered base quantiser ('rtn': round to nearest; 'gptq': needs
            calibration Hessians; `registry.base_quantisers()`).
        bits: code width, one the method stores (INT-k: 2, 3, 4 or 8).
        group_size: weights per (scale, zero) pair along the input dimension.
        damp: GPTQ damping as a fraction of mean(diag H).
        block_size: GPTQ lazy block (rounded to whole groups).
        act_order: GPTQ in descending diag(H) order (implies static groups).
        static_groups: GPTQ group parameters from the original weights.
        true_sequential: quantise a whole model block by block, each layer's Hessian from inputs
            through the already-quantised layers ("GPTQ: Accurate Post-Training Quantization for
            Generative Pre-trained Transformers", §5; `quantisation.sequential`); False: every
            Hessian from the float model in one pass. Needs calibration batches, not Hessians.
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = False

    def __post_init__(self) -> None:
        if self.bits not in self.quantiser.bits:  # `quantiser` refuses an unknown method first
            raise ValueError(f"bits must be one of {self.quantiser.bits}, got {self.bits}")
        if self.true_sequential and not self.quantiser.needs_hessian:
            raise ValueError(f"true_sequential=True orders the calibration Hessians of a method that uses them "
                             f"(gptq); method {self.method!r} quantises without: set true_sequential=False")
        if self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    def rules(self) -> list[Rule]:
        """Checks of the GPTQ settings (`ortho_train.settings`), named relative to this config: its
        owner checks them under its own path (`model.init_args.isolation.quant`), which a nested
        config does not know. A negative damping makes the Hessian indefinite, and GPTQ fails
        only when the first base is quantised (at the canary switch for isolation)."""
        return [("damp", self.damp, is_finite(self.damp) and self.damp >= 0,
                 "GPTQ damping (a fraction of mean(diag H)) must be ≥ 0"),
                ("block_size", self.block_size, self.block_size >= 1, "must be ≥ 1")]

    @property
    def quantiser(self) -> WeightFormat:
        """The registry entry of `method`."""
        return base_quantiser(self.method)

    @property
    def name(self) -> str:
        return f"int{self.bits}_{self.method}"


def quantise_weight(w: Tensor, spec: QuantConfig, hessian: Tensor | None = None) -> QuantisedBase:
    """The INT-k base stream of a weight (N, K) under `spec` (a Hessian where the method needs one)."""
    quantiser = spec.quantiser
    if quantiser.needs_hessian and hessian is None:
        raise ValueError(f"{spec.method.upper()} needs a calibration Hessian for every layer it quantises "
                         "(collect them with ortho_train.curvature.collect_hessians)")
    return quantiser.quantise(w, spec, hessian)


@dataclass
class PTQConfig:
    """How a model is quantised for deployment (the PTQ copies, `copies.quantised_copy`).

    Args:
        blocksize: NF4/FP4 block size (bitsandbytes: 64).
        double_quant: quantise the per-block absmax too (bitsandbytes `compress_statistics`,
            transformers `bnb_4bit_use_double_quant`).
        compute_dtype: dtype of the dequantised matmul ('float32', 'bfloat16', 'float16').
        group_size: INT-k RTN group size along the input dimension (the `int4_rtn` format; the
            same quantity as `QuantConfig.group_size` of a base stream).
        skip_modules: names of linears kept in full precision (any dotted name component).
        cpu_kernel: which bitsandbytes CPU kernel the NF4/FP4 copies run. 'portable' (default):
            the generic path (dequantise to fp32, matmul in `compute_dtype`) on every CPU, so a
            PTQ gap measured on one machine holds on any other. 'native': on CPUs with
            AVX512-BF16 let bitsandbytes repack the weights for its fused kernel on the first
            inference call (bf16 activations and bf16 block absmax: what a deployment on such a
            CPU computes); layers it cannot repack (out_features not a multiple of 32, or
            in_features not a whole number of blocks) stay on the portable path, each logged with
            the reason. Elsewhere 'native' is 'portable'. Either way a layer this host's kernel
            computes wrongly (checked on a probe input, `bnb4_exact`) runs the exact fake-quantised
            weight instead, logged.
    """

    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: DtypeName = "float32"
    group_size: int = 128
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    cpu_kernel: CpuKernel = "portable"

    def __post_init__(self) -> None:
        check_choices("quant", cpu_kernel=(self.cpu_kernel, CpuKernel), compute_dtype=(self.compute_dtype, DtypeName))
        if self.group_size < 1:
            raise ValueError(f"group_size must be ≥ 1, got {self.group_size}")
        if self.blocksize not in BNB_BLOCKSIZES:
            raise ValueError(f"bitsandbytes 4-bit blocksize must be a power of two in [64, 4096], got {self.blocksize}")

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype]

    def describe(self, fmt: str) -> dict:
        """What `ptq_gap.json` and the metrics card record of format `fmt` under these settings."""
        return deployment_format(fmt).describe(self)
