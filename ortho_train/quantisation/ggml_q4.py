"""llama.cpp's 4-bit grids as base quantisers: `q4_0` and `q4_1` (blocks of 32 along the input dim).

A base stream quantised here is a sub-grid of what a GGUF file stores, so the α = 0 model exports
to GGUF with no rounding at all (`ortho_train.export.gguf`): llama.cpp dequantises every weight to
the same float32 value as `ortho_kernels.group_dequantise` does here.

GGML's blocks (32 weights, codes q ∈ [0, 15]; the `gguf` package's `quants.Q4_0` / `quants.Q4_1`):

    Q4_0:  w = (q − 8) · d                  d fp16
    Q4_1:  w = q · d + m                    d, m fp16

Both are the toolkit's grid w = (q − z) · s with group size 32 (`ortho_kernels.packing`):

- `q4_0`: z = 8, s = d. d = max(−min w / 8, max w / 7) rounded *up* to fp16, so no weight is
  clipped, q = clamp(round(w / d) + 8, 0, 15). (llama.cpp's own quantiser takes d = −m/8 for
  the signed largest |w| m, which may be negative and clips the other side; any fp16 d is a valid
  block, ours is always > 0.)
- `q4_1`: the asymmetric group-wise RTN of `ortho_kernels.group_quantise` (range widened to
  contain 0, integer z ∈ [0, 15]) with one more rule: m = −z · d must be an fp16 number, or the
  GGUF block could not hold the offset exactly. d starts at (max(0, max w) − min(0, min w)) / 15
  rounded up to fp16 and steps up one fp16 ulp at a time until z · d is exact in fp16 (at most 15
  steps: one of 16 consecutive significands is a multiple of 16; ≤ 2⁻⁶ relative coarsening).
  Then q · d + m = (q − z) · d exactly in float32 (all terms are multiples of d's last bit).

An all-zero block gets d = 1 (codes = z). Both are plain RTN: no Hessian, not outlier-aware (the
post-hoc sieve selects outliers from the residual). Use as `quant: {method: q4_0, group_size: 32}`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ortho_kernels import QuantisedBase
from ortho_train.quantisation.format import WeightFormat, base_from_codes

if TYPE_CHECKING:
    from ortho_train.quantisation.spec import QuantConfig

GGML_BLOCK = 32  # QK4_0 = QK4_1 = 32 weights per block
QMAX = 15
_SMALLEST_FP16 = 2.0**-24


def _blocks(w: Tensor) -> Tensor:
    """(N, K) weight → (N, K/32, 32) float32 blocks; K must be a whole number of blocks."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D floating tensor, got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    if k % GGML_BLOCK:
        raise ValueError(f"GGML 4-bit blocks hold {GGML_BLOCK} weights: in_features {k} is not a multiple")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or Inf; cannot quantise")
    return w.float().reshape(n, k // GGML_BLOCK, GGML_BLOCK)  # (N, G, 32)


def _fp16_up(x: Tensor) -> Tensor:
    """The smallest fp16 ≥ x (x > 0, float32) as fp16; refuses a range beyond fp16."""
    x = x.clamp(min=_SMALLEST_FP16)
    h = x.to(torch.float16)
    h = torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, math.inf)), h)
    if bool(torch.isinf(h).any()):
        raise ValueError("a block's range is too large for an fp16 scale (|w| > ~1e6)")
    return h


def _codes(blocks: Tensor, d: Tensor, z: Tensor) -> Tensor:
    """q = clamp(round(w / d) + z, 0, 15) per block: (N, G, 32) → (N, K) uint8."""
    q = torch.round(blocks / d.float().unsqueeze(-1)) + z.float().unsqueeze(-1)  # (N, G, 32)
    return q.clamp(0, QMAX).to(torch.uint8).reshape(blocks.shape[0], -1)  # (N, K)


def q4_0_quantise(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Codes uint8 (N, K), scales d fp16 (N, K/32), zeros fp16 (N, K/32) = 8 (module docstring)."""
    blocks = _blocks(w)
    need = torch.maximum(-blocks.amin(-1) / 8, blocks.amax(-1) / 7)  # (N, G) no-clip lower bound
    d = _fp16_up(torch.where(need > 0, need, torch.ones_like(need)))
    z = torch.full_like(d, 8.0)
    return _codes(blocks, d, z), d, z


def q4_1_quantise(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Codes uint8 (N, K), scales d fp16 (N, K/32), integer zeros z fp16 with z·d exact in fp16."""
    blocks = _blocks(w)
    lo, hi = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)  # (N, G)
    span = (hi - lo) / QMAX
    d = _fp16_up(torch.where(span > 0, span, torch.ones_like(span)))
    for _ in range(QMAX + 1):  # step d up until m = −z·d is an fp16 number
        z = torch.round(-lo / d.float()).clamp(0, QMAX)
        product = z * d.float()
        exact = product.to(torch.float16).float() == product
        if bool(exact.all()):
            return _codes(blocks, d, z), d, z.to(torch.float16)
        d = torch.where(exact, d, torch.nextafter(d, torch.full_like(d, math.inf)))
    raise AssertionError("unreachable: one of 16 consecutive fp16 significands is a multiple of 16")


class GGMLQ4(WeightFormat):
    """llama.cpp's Q4_0 / Q4_1 block grid as a base quantiser (module docstring)."""

    bits = (4,)
    base_quantiser = True

    def __init__(self, variant: str):
        if variant not in ("q4_0", "q4_1"):
            raise ValueError(f"variant must be 'q4_0' or 'q4_1', got {variant!r}")
        self.name = variant
        self._quantise = q4_0_quantise if variant == "q4_0" else q4_1_quantise

    def quantise(self, w: Tensor, spec: "QuantConfig", hessian: Tensor | None = None) -> QuantisedBase:
        if spec.group_size != GGML_BLOCK:
            raise ValueError(f"{self.name} quantises blocks of {GGML_BLOCK} weights: set "
                             f"group_size: {GGML_BLOCK} (got {spec.group_size})")
        codes, scales, zeros = self._quantise(w.detach())
        return base_from_codes(codes, scales, zeros, 4, GGML_BLOCK)
