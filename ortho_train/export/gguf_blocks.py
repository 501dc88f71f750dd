"""One weight as GGML blocks: exact from a base stream on llama.cpp's grid, llama.cpp's rounding otherwise.

GGML block layouts (32 weights each, little-endian; `gguf.quants`):

    Q4_0  (18 bytes):  d fp16 | qs[16]            w[j] = (q[j] − 8) · d
    Q4_1  (20 bytes):  d fp16 | m fp16 | qs[16]   w[j] = q[j] · d + m
    Q8_0  (34 bytes):  d fp16 | q int8[32]        w[j] = q[j] · d
    qs[j] = q[j] | q[j + 16] << 4                 (j < 16: low nibble first half, high nibble second)

*Exact route* (`exact_blocks`): a base stream with 4-bit codes in groups of 32, w = (q − z) · s,
is written code for code — Q4_0 when every z = 8 (d = s), Q4_1 when m = −z · s is an fp16 number
in every group (d = s). The base quantisers `q4_0` / `q4_1` (`ortho_train.quantisation.ggml_q4`)
always satisfy these; llama.cpp then dequantises every weight to exactly the toolkit's float32.

*Rounding route* (`rounded_blocks`): any other weight — a GPTQ/RTN base with groups of 128, a merged
α = 1 weight, F16/Q8_0 targets — is quantised by the `gguf` package's port of llama.cpp's reference
quantiser (`gguf.quants.quantize`). This is lossy: a 128-group INT4 value (q − z) · s is generally
not on any 32-block Q4 grid of the same weight. Per weight, with A = the block's largest |w|:
Q4_0 (d = A/8) errs by ≤ d/2 on the side of the largest |w| and by ≤ d on the other, where its
codes stop at 7·d (clipping): ≤ d·(1 + 2⁻⁸) with the fp16 rounding of d; Q4_1 (d = (max − min)/15,
m = min) by ≤ d/2 + 2⁻¹¹·(15·d + |m|); Q8_0 (d = A/127) by ≤ d·(1/2 + 127·2⁻¹¹); F16 by
≤ 2⁻¹¹·|w| (relative rounding; subnormals absolute 2⁻²⁵). Every export measures
the actual max |dequantise(blocks) − W| per tensor and reports it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import quants
from torch import Tensor

from ortho_kernels import QuantisedBase

BLOCK = 32
Q4_TYPES = (QType.Q4_0, QType.Q4_1)


@dataclass
class Encoded:
    """A weight ready for `GGUFWriter.add_tensor`: raw blocks (uint8 (N, bytes)) or a float array."""

    data: np.ndarray
    qtype: QType
    exact: bool
    max_abs_error: float

    @property
    def raw_dtype(self) -> QType | None:
        """What `add_tensor` is told: the block type for raw bytes, None for a float array."""
        return self.qtype if self.data.dtype == np.uint8 else None


def _pack_q4(codes: Tensor, d: Tensor, m: Tensor | None) -> np.ndarray:
    """Codes (N, K) uint8 and per-block fp16 d (and m) (N, K/32) → raw Q4 blocks (N, K/32 · 18|20)."""
    n, k = codes.shape
    g = k // BLOCK
    q = codes.numpy().reshape(n, g, BLOCK)  # (N, K) → (N, G, 32)
    qs = q[..., : BLOCK // 2] | (q[..., BLOCK // 2:] << np.uint8(4))  # (N, G, 16)
    parts = [d.numpy().astype(np.float16).view(np.uint8).reshape(n, g, 2)]  # (N, G) fp16 → (N, G, 2) bytes
    if m is not None:
        parts.append(m.numpy().astype(np.float16).view(np.uint8).reshape(n, g, 2))  # (N, G, 2)
    return np.concatenate(parts + [qs], axis=-1).reshape(n, -1)  # (N, G, 18|20) → (N, G·18|20)


def exact_blocks(base: QuantisedBase, qtype: QType) -> np.ndarray | None:
    """The raw Q4_0/Q4_1 blocks holding `base` code for code, or None where its grid does not fit."""
    if qtype not in Q4_TYPES or base.bits != 4 or base.group_size != BLOCK or base.shape[1] % BLOCK:
        return None
    codes, scales, zeros = base.codes(), base.scales, base.zeros
    if qtype == QType.Q4_0:
        return _pack_q4(codes, scales, None) if bool((zeros == 8).all()) else None
    offset = -(zeros.float() * scales.float())  # (N, G): m = −z · s, exact in fp32
    if not bool((offset.to(torch.float16).float() == offset).all()):
        return None
    return _pack_q4(codes, scales, offset.to(torch.float16))


def rounded_blocks(w: Tensor, qtype: QType) -> np.ndarray:
    """llama.cpp's reference quantisation of a float32 weight (N, K) to `qtype` (lossy)."""
    array = w.detach().float().numpy()
    if qtype == QType.F16:
        return array.astype(np.float16)
    if qtype == QType.F32:
        return array
    if array.shape[-1] % BLOCK:
        raise ValueError(f"{qtype.name} blocks hold {BLOCK} weights: a row of {array.shape[-1]} is not a whole "
                         "number of blocks")
    return quants.quantize(array, qtype)


def max_abs_error(data: np.ndarray, qtype: QType, w: Tensor) -> float:
    """max |dequantise(data) − w| over the weight, dequantised as llama.cpp does (`gguf.quants`)."""
    back = quants.dequantize(data, qtype) if data.dtype == np.uint8 else data.astype(np.float32)
    return float(np.abs(back.astype(np.float64) - w.detach().double().numpy()).max(initial=0.0))


def encode(w: Tensor, qtype: QType, base: QuantisedBase | None = None) -> Encoded:
    """Blocks of the weight `w` (N, K) float32: exact from `base` where its grid fits, else rounded."""
    data = exact_blocks(base, qtype) if base is not None else None
    if data is None:
        data = rounded_blocks(w, qtype)
    error = max_abs_error(data, qtype, w)
    return Encoded(data, qtype, error == 0.0, error)


def as_stored(t: Tensor) -> Encoded:
    """A tensor kept as saved (norms, embeddings in a Q4 export): F32, F16 or BF16, exact."""
    if t.dtype == torch.bfloat16:
        data = t.detach().contiguous().view(torch.int16).numpy().view(np.uint8)  # (…, K) → (…, 2K) bytes
        return Encoded(data, QType.BF16, True, 0.0)
    if t.dtype == torch.float16:
        return Encoded(t.detach().numpy(), QType.F16, True, 0.0)
    return Encoded(t.detach().float().numpy(), QType.F32, True, 0.0)
