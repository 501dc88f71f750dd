"""The registry of weight formats: one line per format, looked up by name everywhere.

The sieve, isolation and the kill-switch table find base quantisers here (`QuantConfig.method`,
`format.needs_hessian`, `format.outlier_aware`); the PTQ gap, the tables' quantised reference
rows, the separation table and MANSU's floor find deployment formats here (`fake_quantise`,
`bin_width`, `deployed_linear`, `describe`). To add a format, write a `WeightFormat` subclass
in its own file (see `format.py`) and add its line to `FORMATS`.
"""
from __future__ import annotations

from ortho_train.quantisation.bnb4 import BnB4
from ortho_train.quantisation.format import WeightFormat
from ortho_train.quantisation.ggml_q4 import GGMLQ4
from ortho_train.quantisation.gptq import GPTQ
from ortho_train.quantisation.int_rtn import RTN, IntRTNDeployment

FORMATS: dict[str, WeightFormat] = {
    "rtn": RTN(),                  # base quantiser: INT-k round to nearest, group-wise
    "gptq": GPTQ(),                # base quantiser: INT-k GPTQ (calibration Hessian)
    "q4_0": GGMLQ4("q4_0"),        # base quantiser: llama.cpp Q4_0 grid (blocks of 32, symmetric)
    "q4_1": GGMLQ4("q4_1"),        # base quantiser: llama.cpp Q4_1 grid (blocks of 32, fp16 min)
    "nf4": BnB4("nf4"),            # deployment: bitsandbytes NormalFloat-4, block absmax
    "fp4": BnB4("fp4"),            # deployment: bitsandbytes 4-bit minifloat, block absmax
    "int4": IntRTNDeployment(4),   # deployment: INT4 RTN copies (PTQConfig.group_size)
}


def base_quantisers() -> tuple[str, ...]:
    """Names usable as `QuantConfig.method` (a packed INT-k base stream), in registry order."""
    return tuple(name for name, fmt in FORMATS.items() if fmt.base_quantiser)


def deployment_formats() -> tuple[str, ...]:
    """Names usable as a PTQ / reference format (fake-quantised copies), in registry order."""
    return tuple(name for name, fmt in FORMATS.items() if fmt.deployable)


def base_quantiser(name: str) -> WeightFormat:
    """The base quantiser called `name`; a clear error naming the registered ones otherwise."""
    fmt = FORMATS.get(name)
    if fmt is None or not fmt.base_quantiser:
        raise ValueError(f"quantisation method must be one of {base_quantisers()}, got {name!r}")
    return fmt


def deployment_format(name: str) -> WeightFormat:
    """The deployment format called `name`; a clear error naming the registered ones otherwise."""
    fmt = FORMATS.get(name)
    if fmt is None or not fmt.deployable:
        raise ValueError(f"unknown quantisation format {name!r}: expected one of {deployment_formats()}")
    return fmt
