"""NF4 / FP4 via bitsandbytes: the 4-bit data types QLoRA-style deployments use.

Block-wise absmax quantisation: the (d_out, d_in) weight is flattened row-major and cut into
blocks of `blocksize` (64) consecutive weights; each block stores ``absmax = max |w|`` (fp32)
and every weight becomes the nearest of 16 fixed code values ``c_k`` times absmax:

    ŵ = absmax_block · c_{k(w)},   k(w) = argmin_k |w / absmax_block − c_k|

NF4 codes are quantiles of a normal distribution (`NF4_CODE` in the tests), FP4 codes a 1-3-0
minifloat (±0 coincide: 15 distinct levels). With `compress_statistics` (bitsandbytes'
"double quantisation", transformers' `bnb_4bit_use_double_quant`) the absmax values are
themselves 8-bit quantised in blocks of 256.

`bnb_fake_quantise` returns the dense fp32 weight that `bnb.nn.Linear4bit` multiplies with on
CPU (its generic forward is dequantise-then-matmul there; a test pins the equality up to the
matmul's summation order). `BnB4.deployed_linear` builds the real `Linear4bit` (moving it to
its device quantises it). Its CPU kernel is chosen, not inherited from the host: 'portable'
(default) is the generic path on every CPU; 'native' lets bitsandbytes repack for its
AVX512-BF16 kernel where the CPU has one, except layers it cannot tile (out_features not a
multiple of `BNB_REPACK_BLOCK_N`, or in_features not a multiple of the blocksize), which stay
portable, each logged. Every deployed layer is then checked against the exact dequantised weight
on a probe input (`bnb4_exact.deployed_forward_error`): bitsandbytes 0.50's native CPU
dequantisation (AVX-512 hosts) is wrong when in_features is not a multiple of the blocksize, and
a layer its host computes wrongly is replaced by a dense linear holding the exact fake-quantised
weight, with the reason logged: the copy then measures the 4-bit format, not the host's kernel.
The fake quantisation itself always dequantises in torch (`bnb4_exact.exact_dequantise_4bit`).

Bin width of a weight (the MANSU floor, the bin-crossing diagnostic): the rounding interval
of its level, between the midpoints to its neighbours, ``absmax · (c_{k+1} − c_{k−1}) / 2``
(at an end level the spacing to its one neighbour).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ortho_kernels.bitsandbytes_offline import import_bitsandbytes
from ortho_train.quantisation.bins import level_widths
from ortho_train.quantisation.bnb4_exact import deployed_forward_error, exact_dequantise_4bit
from ortho_train.quantisation.format import WeightFormat

if TYPE_CHECKING:
    from ortho_train.quantisation.spec import PTQConfig

QUANT_TYPES = ("nf4", "fp4")
# bitsandbytes' AVX512-BF16 CPU kernel repacks weights in tiles of 32 output rows
# (`_convert_weight_packed_for_cpu(block_n=32)`) and asserts on any other width.
BNB_REPACK_BLOCK_N = 32
log = logging.getLogger(__name__)


def _functional():
    import_bitsandbytes()  # imported lazily: slow import, never from the hub
    import bitsandbytes.functional as bnbf

    return bnbf


def bnb_quantise_4bit(w: Tensor, quant_type: str = "nf4", blocksize: int = 64,
                      compress_statistics: bool = False):
    """(packed uint8 (N·K/2, 1), bitsandbytes QuantState) of a weight (N, K)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D floating tensor, got {w.dtype} {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or Inf; cannot quantise")
    return _functional().quantize_4bit(w.detach().float().contiguous(), blocksize=blocksize,
                                       compress_statistics=compress_statistics, quant_type=quant_type)


def bnb_dequantise_4bit(packed: Tensor, state) -> Tensor:
    """Inverse of `bnb_quantise_4bit`: the dense fp32 weight (N, K), computed in torch on every host
    (`bnb4_exact`: bitsandbytes' own CPU dequantisation is wrong on AVX-512 hosts for some widths)."""
    return exact_dequantise_4bit(packed, state)


def bnb_fake_quantise(w: Tensor, quant_type: str = "nf4", blocksize: int = 64,
                      compress_statistics: bool = False) -> Tensor:
    """dequantise(quantise(w)): the fp32 weight (N, K) a 4-bit bitsandbytes layer computes with."""
    packed, state = bnb_quantise_4bit(w, quant_type, blocksize, compress_statistics)
    return bnb_dequantise_4bit(packed, state).view(w.shape)  # (N, K)


def bnb_bits_per_weight(blocksize: int = 64, compress_statistics: bool = False) -> float:
    """Stored bits per weight: 4 + absmax bits / blocksize.

    Plain: one fp32 absmax per block. Double quantisation: one 8-bit absmax per block plus
    one fp32 scale per 256 absmax values.
    """
    if compress_statistics:
        return 4 + 8 / blocksize + 32 / (blocksize * 256)
    return 4 + 32 / blocksize


def code_levels(quant_type: str) -> Tensor:
    """Sorted distinct code values of a bitsandbytes 4-bit type ('nf4' or 'fp4'), float32."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown 4-bit code {quant_type!r}: expected 'nf4' or 'fp4'")
    return torch.unique(_functional().get_4bit_type(quant_type, device="cpu").float())  # sorted


def _blocks(w: Tensor, blocksize: int) -> tuple[Tensor, int]:
    """Row-major flatten, pad with zeros (which never raise an absmax) to whole blocks."""
    flat = w.detach().reshape(-1).float()  # (n,)
    pad = (-flat.numel()) % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize), flat.numel()  # (n_blocks, blocksize)


def blockwise_bin_width(w: Tensor, quant_type: str = "nf4", blocksize: int = 64) -> Tensor:
    """Per-weight NF4/FP4 bin width ``absmax_block · width(level(w / absmax_block))``, shaped as w."""
    if blocksize < 1:
        raise ValueError(f"blocksize must be ≥ 1, got {blocksize}")
    blocks, n = _blocks(w, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # (n_blocks, 1)
    mids, widths = level_widths(code_levels(quant_type))
    normalised = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)
    level = torch.bucketize(normalised.contiguous(), mids)  # (n_blocks, blocksize) nearest level
    width = widths[level] * absmax  # (n_blocks, blocksize)
    return width.reshape(-1)[:n].view(w.shape)  # (n_blocks, blocksize) -> w.shape


def use_native_cpu_kernel(layer: nn.Module, settings: "PTQConfig") -> bool:
    """Whether a `Linear4bit` may take bitsandbytes' AVX512-BF16 repacked CPU kernel.

    bitsandbytes sets `support_avx512bf16_for_cpu` from the CPU it runs on and repacks on the
    first inference call, so without this choice the same PTQ copy computes differently on
    different CPUs (and crashes on widths the repacking cannot tile).
    """
    if settings.cpu_kernel == "portable" or not getattr(layer, "support_avx512bf16_for_cpu", False):
        return False
    if layer.out_features % BNB_REPACK_BLOCK_N or layer.in_features % settings.blocksize:
        log.info("bitsandbytes AVX512-BF16 kernel skipped for a %dx%d layer: it repacks tiles of %d output "
                 "rows and whole blocks of %d inputs per row; this layer runs the portable CPU path",
                 layer.out_features, layer.in_features, BNB_REPACK_BLOCK_N, settings.blocksize)
        return False
    return True


def forward_tolerance(layer: nn.Module, settings: "PTQConfig") -> float:
    """Largest relative error `deployed_forward_error` accepts: 4 ulps of the dtype the layer multiplies
    in (bf16 for the AVX512-BF16 kernel: measured 2–4e-3; fp32: summation order only), at least 1e-4.
    The width bug of `bnb4_exact` gives 0.19–0.24 on random weights."""
    dtype = torch.bfloat16 if getattr(layer, "support_avx512bf16_for_cpu", False) else settings.torch_compute_dtype
    return max(1e-4, 4 * torch.finfo(dtype).eps)


_REPORTED_FALLBACKS: set[tuple] = set()


def exact_fallback(layer: nn.Module, linear: nn.Linear, quant_type: str, settings: "PTQConfig") -> nn.Module:
    """`layer` if its forward matches x ŵᵀ + b on this host, else a dense linear holding ŵ (reason logged once
    per shape)."""
    weight = exact_dequantise_4bit(layer.weight.data, layer.weight.quant_state)  # (out, in) before any repack
    error = deployed_forward_error(layer, weight, linear.bias)
    tolerance = forward_tolerance(layer, settings)
    if error <= tolerance:
        return layer
    key = (quant_type, layer.out_features, layer.in_features, settings.blocksize)
    if key not in _REPORTED_FALLBACKS:
        _REPORTED_FALLBACKS.add(key)
        cause = ("bitsandbytes 0.50's native CPU dequantisation assumes in_features is a multiple of the blocksize"
                 if layer.in_features % settings.blocksize else "this host's bitsandbytes kernel")
        log.warning("bitsandbytes %s Linear4bit %dx%d (blocksize %d) computes with a relative error of %.3g on "
                    "this host (tolerance %.1g; cause: %s). This layer is evaluated by exact fake quantisation "
                    "(dense weight = the 4-bit weight, dequantised in torch) instead.", quant_type,
                    layer.out_features, layer.in_features, settings.blocksize, error, tolerance, cause)
    exact = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      device=linear.weight.device, dtype=torch.float32)
    exact.weight.data.copy_(weight)
    if linear.bias is not None:
        exact.bias.data.copy_(linear.bias.detach().float())
    exact.requires_grad_(False)
    exact.exact_fake_quantised = quant_type  # marks the fallback (tests, diagnostics)
    return exact


def linear4bit(linear: nn.Linear, quant_type: str, settings: "PTQConfig") -> nn.Module:
    """A `bitsandbytes.nn.Linear4bit` holding `linear`'s weight, on `linear`'s device."""
    bnb = import_bitsandbytes()

    device = linear.weight.device
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=settings.torch_compute_dtype,
                              compress_statistics=settings.double_quant, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().float().cpu().clone(), requires_grad=False,
                                     blocksize=settings.blocksize, compress_statistics=settings.double_quant,
                                     quant_type=quant_type)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer.support_avx512bf16_for_cpu = use_native_cpu_kernel(layer, settings)
    layer = layer.to(device)  # the move quantises the weight (bitsandbytes `Params4bit.to`)
    return exact_fallback(layer, linear, quant_type, settings)


class BnB4(WeightFormat):
    """bitsandbytes NF4 or FP4 (module docstring): 16 fixed code values × a per-block absmax."""

    deployable = True
    blockwise = True
    bits = (4,)

    def __init__(self, quant_type: str):
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        self.name = quant_type

    def fake_quantise(self, w: Tensor, settings: "PTQConfig") -> Tensor:
        return bnb_fake_quantise(w, self.name, settings.blocksize, settings.double_quant)

    def bin_width(self, w: Tensor, settings: "PTQConfig") -> Tensor:
        return blockwise_bin_width(w, self.name, settings.blocksize)

    def deployed_linear(self, linear: nn.Linear, settings: "PTQConfig") -> nn.Module:
        return linear4bit(linear, self.name, settings)

    def bits_per_weight(self, settings: "PTQConfig") -> float:
        return bnb_bits_per_weight(settings.blocksize, settings.double_quant)

    def describe(self, settings: "PTQConfig") -> dict:
        return {"format": self.name, "library": "bitsandbytes", "blocksize": settings.blocksize,
                "double_quant": settings.double_quant, "compute_dtype": settings.compute_dtype,
                "skip_modules": list(settings.skip_modules), "cpu_kernel": settings.cpu_kernel}

    def label(self, settings: "PTQConfig") -> str:
        return f"bitsandbytes {self.name} blocksize {settings.blocksize}"
