"""The registry of weight formats: one line per format, looked up by name everywhere.

The sieve, isolation and the kill-switch table find base quantisers here (`QuantConfig.method`,
`format.needs_hessian`, `format.outlier_aware`); the PTQ gap, the tables' quantised reference
rows, the separation table and MANSU's floor find deployment formats here (`fake_quantise`,
`bin_width`, `deployed_linear`, `describe`). To add a format, write a `WeightFormat` subclass
in its own file (see `format.py`) and add its line to `FORMATS` (a `Registry`,
`ortho_train.registry`).

One spelling per format. A packed INT-k base stream is `QuantConfig(method, bits)`, and its name
everywhere a name is written (table references and rows, the PTQ formats, JSON keys) is
`QuantConfig.name`, `int<k>_<method>`: `int_formats()` enumerates those names from this
registry, so they are looked up, never parsed. The INT4 RTN deployment copy is `int4_rtn`, the
same name as the INT4 RTN base stream it equals. An old spelling (`RENAMED`) is refused with
the canonical one.
"""
from __future__ import annotations

from ortho_train.quantisation.bnb4 import BnB4
from ortho_train.quantisation.format import WeightFormat
from ortho_train.quantisation.ggml_q4 import GGMLQ4
from ortho_train.quantisation.gptq import GPTQ
from ortho_train.quantisation.int_rtn import RTN, IntRTNDeployment
from ortho_train.registry import Registry

FORMATS: Registry[WeightFormat] = Registry("quantisation format")
FORMATS.add("rtn", RTN())                  # base quantiser: INT-k round to nearest, group-wise
FORMATS.add("gptq", GPTQ())                # base quantiser: INT-k GPTQ (calibration Hessian)
FORMATS.add("q4_0", GGMLQ4("q4_0"))        # base quantiser: llama.cpp Q4_0 grid (blocks of 32, symmetric)
FORMATS.add("q4_1", GGMLQ4("q4_1"))        # base quantiser: llama.cpp Q4_1 grid (blocks of 32, fp16 min)
FORMATS.add("nf4", BnB4("nf4"))            # deployment: bitsandbytes NormalFloat-4, block absmax
FORMATS.add("fp4", BnB4("fp4"))            # deployment: bitsandbytes 4-bit minifloat, block absmax
FORMATS.add("int4_rtn", IntRTNDeployment(4))   # deployment: INT4 RTN copies (PTQConfig.group_size)
RENAMED = {"int4": "int4_rtn"}  # old spelling -> canonical name (refused, naming the canonical one)


def canonical_format(name: str) -> str:
    """`name` itself, or a ValueError naming the canonical spelling of an old one."""
    if name in RENAMED:
        raise ValueError(f"quantisation format {name!r} is spelt {RENAMED[name]!r} (one name per format)")
    return name


def int_formats() -> dict[str, tuple[str, int]]:
    """`int<k>_<method>` -> (method, k) for every registered base quantiser and width it stores."""
    return {f"int{k}_{method}": (method, k) for method in base_quantisers() for k in FORMATS[method].bits}


def base_quantisers() -> tuple[str, ...]:
    """Names usable as `QuantConfig.method` (a packed INT-k base stream), in registry order."""
    return tuple(name for name, fmt in FORMATS.items() if fmt.base_quantiser)


def deployment_formats() -> tuple[str, ...]:
    """Names usable as a PTQ / reference format (fake-quantised copies), in registry order."""
    return tuple(name for name, fmt in FORMATS.items() if fmt.deployable)


def base_quantiser(name: str) -> WeightFormat:
    """The base quantiser called `name`; a clear error naming the registered ones otherwise."""
    fmt = FORMATS.get(name, None)
    if fmt is None or not fmt.base_quantiser:
        raise ValueError(f"quantisation method must be one of {base_quantisers()}, got {name!r}")
    return fmt


def deployment_format(name: str) -> WeightFormat:
    """The deployment format called `name`; a clear error naming the registered ones otherwise."""
    fmt = FORMATS.get(canonical_format(name), None)
    if fmt is None or not fmt.deployable:
        raise ValueError(f"unknown quantisation format {name!r}: expected one of {deployment_formats()}")
    return fmt
