"""Storage formats of the two streams: group-wise INT-k base and sparse COO ortho stream.

Pure torch, no kernels. Paired primitives in the gpt-fast style (`group_quantise` /
`group_dequantise`, `pack_*` / `unpack_*`), the exact bit count (`effective_bits`) and the
layout of torch's CPU INT4 op (`to_int4pack_cpu_layout`). The containers that hold and
validate the two streams, `QuantisedBase` and `OrthoStream`, are in `ortho_kernels.streams`.

Quantisation (docs/methods.md §4): asymmetric, group-wise along the input dim K. Per group g of a row

    min_g = min(0, min w),  max_g = max(0, max w)        (the range always contains 0)
    scale = (max_g - min_g) / (2^k - 1)                   (stored fp16, rounded *up*)
    zero  = clamp(round(-min_g / scale), 0, 2^k - 1)      (an integer, stored fp16)
    q     = clamp(round(w / scale) + zero, 0, 2^k - 1)
    w    ~= (q - zero) * scale

Departures from the textbook formula, and why:
- the range is widened to contain 0 (as GPTQ does), so the integer zero-point never clamps
  and a zero-padded ragged last group has the same range as its real entries;
- the fp16 scale is rounded up, never down, so (max - min) / scale <= 2^k - 1 still holds
  after rounding and the extremes are not clipped; an all-zero group gets scale 1.
(q - zero) * scale is exact in fp32 (<= 8 + 11 significant bits), so dequantisation is
reproducible bit for bit on every path.

Packing: codes form a little-endian bit stream per row; value j occupies bits
[j*k, (j+1)*k). For k=4 that is two codes per byte, even k in the low nibble; odd K pads the
last high nibble with 0.

Ortho stream: row-major flat indices i*K + j (int32, strictly increasing) with fp16 values.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F

SUPPORTED_BITS = (2, 3, 4, 8)
COO_ENTRY_BITS = 32 + 16  # int32 flat index + fp16 value


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")


# --------------------------------------------------------------------------- quantisation
def group_quantise(
    w: torch.Tensor, bits: int = 4, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric group-wise quantisation of a weight (N, K).

    Returns codes uint8 (N, K) in [0, 2^bits - 1], scales fp16 (N, G) and zeros fp16 (N, G),
    G = ceil(K / group_size); the last group may be ragged. See the module docstring.
    """
    _check_bits(bits)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D floating tensor, got {w.dtype} {tuple(w.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or Inf; cannot quantise")
    n, k = w.shape
    n_groups = math.ceil(k / group_size)
    qmax = 2**bits - 1
    wf = w.double() if w.dtype == torch.float64 else w.float()
    padded = F.pad(wf, (0, n_groups * group_size - k))  # (N, G*gs); zeros keep min<=0<=max
    grouped = padded.reshape(n, n_groups, group_size)  # (N, G, gs)
    wmin = grouped.amin(dim=-1).clamp(max=0)  # (N, G)
    wmax = grouped.amax(dim=-1).clamp(min=0)  # (N, G)
    scale = (wmax - wmin) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp(min=2.0**-24)  # smallest fp16 subnormal: a stored scale is never 0
    scales = scale.to(torch.float16)
    if bool(torch.isinf(scales).any()):
        raise ValueError("a group's range is too large for an fp16 scale (|w| > ~1e6)")
    too_small = scales.to(wf.dtype) < scale
    scales = torch.where(too_small, torch.nextafter(scales, torch.full_like(scales, math.inf)), scales)
    s = scales.to(wf.dtype)
    zeros = torch.round(-wmin / s).clamp(0, qmax)  # (N, G)
    q = torch.round(grouped / s.unsqueeze(-1)) + zeros.unsqueeze(-1)  # (N, G, gs)
    codes = q.clamp(0, qmax).to(torch.uint8).reshape(n, n_groups * group_size)[:, :k]  # (N, K)
    return codes.contiguous(), scales, zeros.to(torch.float16)


def group_dequantise(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """w = (q - zero) * scale per group, returned as `dtype` (N, K). Exact for fp32/fp64."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
    n, k = codes.shape
    n_groups = math.ceil(k / group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (n, n_groups):
            raise ValueError(f"{name} must have shape {(n, n_groups)} for K={k}, "
                             f"group_size={group_size}; got {tuple(t.shape)}")
    s = scales.to(dtype).repeat_interleave(group_size, dim=1)[:, :k]  # (N, K)
    z = zeros.to(dtype).repeat_interleave(group_size, dim=1)[:, :k]  # (N, K)
    return (codes.to(dtype) - z) * s


# --------------------------------------------------------------------------- bit packing
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: (N, K) uint8 -> (N, ceil(K/2)); even k in the low nibble."""
    _check_codes(codes, 4)
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("pack_int4: codes must lie in [0, 15]")
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))  # (N, K+1)
    pairs = codes.reshape(codes.shape[0], -1, 2)  # (N, ceil(K/2), 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_int4`: (N, ceil(K/2)) uint8 -> (N, K) uint8."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != math.ceil(k / 2):
        raise ValueError(f"packed must be uint8 (N, ceil(K/2)={math.ceil(k / 2)}), "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    pairs = torch.stack((packed & 0xF, packed >> 4), dim=-1)  # (N, ceil(K/2), 2)
    return pairs.reshape(packed.shape[0], -1)[:, :k].contiguous()  # (N, K)


def packed_width(k: int, bits: int) -> int:
    """Bytes per row of `pack_bits` output: ceil(K * bits / 8)."""
    return math.ceil(k * bits / 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack k-bit codes (N, K) into a per-row little-endian bit stream (N, ceil(K*bits/8))."""
    _check_bits(bits)
    _check_codes(codes, bits)
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"pack_bits: codes must lie in [0, {2**bits - 1}] for bits={bits}")
    if bits == 8:
        return codes.contiguous().clone()
    if bits == 4:
        return pack_int4(codes)
    n, k = codes.shape
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    planes = (codes.unsqueeze(-1) >> shifts) & 1  # (N, K, bits)
    stream = planes.reshape(n, k * bits)  # (N, K*bits)
    width = packed_width(k, bits)
    stream = F.pad(stream, (0, width * 8 - k * bits)).reshape(n, width, 8)  # (N, W, 8)
    weights = torch.arange(8, dtype=torch.uint8, device=codes.device)
    return (stream << weights).sum(dim=-1, dtype=torch.uint8)  # disjoint bits: sum == OR


def unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_bits`: (N, ceil(K*bits/8)) uint8 -> (N, K) uint8."""
    _check_bits(bits)
    width = packed_width(k, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != width:
        raise ValueError(f"packed must be uint8 (N, {width}) for K={k}, bits={bits}; "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    if bits == 8:
        return packed.contiguous().clone()
    if bits == 4:
        return unpack_int4(packed, k)
    n = packed.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(n, width * 8)  # (N, W*8)
    planes = stream[:, : k * bits].reshape(n, k, bits)  # (N, K, bits)
    weights = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    return (planes << weights).sum(dim=-1, dtype=torch.uint8)  # (N, K)


# --------------------------------------------------------------------------- bit budget
def effective_bits(bits: int, group_size: int, nnz_fraction: float = 0.0,
                   scale_bits: int = 16, zero_bits: int = 16,
                   sparse_entry_bits: int = COO_ENTRY_BITS) -> float:
    """b = k + (scale + zero bits) / group + nnz_fraction * (bits per sparse entry)."""
    return bits + (scale_bits + zero_bits) / group_size + nnz_fraction * sparse_entry_bits


# --------------------------------------------------------------------------- torch CPU layout
def to_int4pack_cpu_layout(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert INT4 codes to the operands of `torch.ops.aten._weight_int4pack_mm_for_cpu`.

    torch's tinygemm-style CPU op dequantises w = (q - 8) * s + zf from bf16 (s, zf) pairs
    laid out (G, N, 2). Ours is w = (q - z) * s = (q - 8) * s + (8 - z) * s, hence
    zf = (8 - z) * s. Both are rounded to bf16 (8 significant bits): the fast path is *not*
    bit-exact to `group_dequantise`, it is within ~2^-8 * |q - z| * s per weight.

    Returns (packed uint8 (N, K/2) in the op's blocked layout, scale_and_zeros bf16 (G, N, 2)).
    """
    _check_codes(codes, 4)
    s = scales.float()  # (N, G)
    zf = (8.0 - zeros.float()) * s  # (N, G)
    scale_and_zeros = torch.stack((s, zf), dim=-1).transpose(0, 1)  # (G, N, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    return packed, scale_and_zeros.to(torch.bfloat16).contiguous()
