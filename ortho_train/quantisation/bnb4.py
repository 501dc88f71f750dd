"""NF4 / FP4 via bitsandbytes: the 4-bit data types QLoRA-style deployments use.

Block-wise absmax quantisation: each block of `blocksize` consecutive weights (row-major
flattened) is scaled by its absmax (fp32) and every weight is rounded to the nearest of 16
fixed code values (NF4: normal-distribution quantiles; FP4: a 1-3-0 minifloat). With
`compress_statistics` (bitsandbytes' "double quantisation", the default of `Params4bit`)
the absmax values are themselves 8-bit quantised in blocks of 256.

`bnb_fake_quantise` returns the dense fp32 weight that `bnb.nn.Linear4bit` multiplies with
on CPU (its forward is dequantise-then-matmul there; a test pins the equality), so a model
whose linears hold these weights evaluates exactly as the NF4 deployment. Lightning's
`BitsandbytesPrecision` is CUDA-only; this path works on CPU.
"""
from __future__ import annotations

import torch

QUANT_TYPES = ("nf4", "fp4")


def _functional():
    import bitsandbytes.functional as bnbf  # imported lazily: slow import, optional on some hosts

    return bnbf


def bnb_quantise_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                      compress_statistics: bool = False):
    """(packed uint8 (N·K/2, 1), bitsandbytes QuantState) of a weight (N, K)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D floating tensor, got {w.dtype} {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or Inf; cannot quantise")
    return _functional().quantize_4bit(w.float().contiguous(), blocksize=blocksize,
                                       compress_statistics=compress_statistics,
                                       quant_type=quant_type)


def bnb_dequantise_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """Inverse of `bnb_quantise_4bit`: the dense fp32 weight (N, K)."""
    return _functional().dequantize_4bit(packed, state).float()


def bnb_fake_quantise(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                      compress_statistics: bool = False) -> torch.Tensor:
    """dequantise(quantise(w)): the weight a 4-bit bitsandbytes layer computes with (N, K)."""
    packed, state = bnb_quantise_4bit(w, quant_type, blocksize, compress_statistics)
    return bnb_dequantise_4bit(packed, state).to(w.dtype)


def bnb_bits_per_weight(blocksize: int = 64, compress_statistics: bool = False) -> float:
    """Stored bits per weight: 4 + absmax bits / blocksize.

    Plain: one fp32 absmax per block. Double quantisation: one 8-bit absmax per block plus
    one fp32 scale per 256 absmax values.
    """
    if compress_statistics:
        return 4 + 8 / blocksize + 32 / (blocksize * 256)
    return 4 + 32 / blocksize
