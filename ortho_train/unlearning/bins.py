"""Quantisation bin widths and the bin-crossing diagnostic (docs/methods.md §2, §4, §9).

A weight update survives round-to-nearest quantisation only if it moves the weight across a
decision boundary of the quantisation grid. The grid at a weight depends on its block/group:

- NF4/FP4 (bitsandbytes): the weight tensor is flattened row-major and cut into blocks of 64;
  each block stores ``absmax = max |w|`` and every weight becomes the nearest of 16 fixed code
  values ``c_k`` times absmax. The code is non-uniform, so the bin of a weight is the rounding
  interval of its level k: between the midpoints ``(c_{k−1}+c_k)/2`` and ``(c_k+c_{k+1})/2``,
  width ``absmax · (c_{k+1} − c_{k−1})/2`` (at the two end levels, where one midpoint is
  missing, the spacing to the one neighbour ``absmax · |c_k − c_{k∓1}|``).
- INT4 RTN (asymmetric, groups of `group_size` along the input dim, `ortho_kernels.packing`):
  uniform bins of width ``scale = (max(0, max) − min(0, min))/15`` of the group.

Bin-crossing fraction = share of updated weights (ΔW ≠ 0) with ``|ΔW| > width/2``, the width
taken at the original weight. It is a diagnostic, not the exact outcome: a move of half a bin
crosses a boundary only on average, and a move of the block's absmax rescales the whole block.
The exact outcome (did the quantised value change?) is `dequantised_change_fraction`.
"""
from __future__ import annotations

import torch
from torch import Tensor


def code_levels(quant_type: str) -> Tensor:
    """Sorted distinct code values of a bitsandbytes 4-bit type ('nf4' or 'fp4'), float32."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"unknown 4-bit code {quant_type!r}: expected 'nf4' or 'fp4'")
    import bitsandbytes.functional as bnb_functional

    return torch.unique(bnb_functional.get_4bit_type(quant_type, device="cpu").float())  # sorted


def level_widths(levels: Tensor) -> tuple[Tensor, Tensor]:
    """(decision boundaries (L−1,), rounding-interval width of each level (L,)) of a sorted code."""
    mids = (levels[1:] + levels[:-1]) / 2  # (L-1,)
    widths = torch.empty_like(levels)
    widths[1:-1] = mids[1:] - mids[:-1]
    widths[0] = levels[1] - levels[0]
    widths[-1] = levels[-1] - levels[-2]
    return mids, widths


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


def group_bin_width(w: Tensor, group_size: int = 128, bits: int = 4) -> Tensor:
    """Per-weight INT-k RTN bin width: the scale of its input-dim group, as `ortho_kernels.packing`
    computes it, ``(max(0, max w) − min(0, min w)) / (2^k − 1)`` (the range always holds 0).

    A ragged last group (d_in not a multiple of group_size) is its own, shorter group.
    """
    if w.ndim != 2:
        raise ValueError(f"group_bin_width expects a (d_out, d_in) weight, got {tuple(w.shape)}")
    d_out, d_in = w.shape
    pad = (-d_in) % group_size
    # zero padding cannot change a range that already contains 0
    padded = torch.nn.functional.pad(w.detach().float(), (0, pad))
    groups = padded.view(d_out, -1, group_size)  # (d_out, n_groups, group_size)
    scale = (groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)) / (2**bits - 1)  # (d_out, n_groups)
    return scale.repeat_interleave(group_size, dim=1)[:, :d_in]  # (d_out, d_in)


def bin_width(w: Tensor, fmt: str = "nf4", blocksize: int = 64, group_size: int = 128) -> Tensor:
    """Bin width of every weight of `w` for `fmt` in {'nf4', 'fp4', 'int4'}."""
    if fmt in ("nf4", "fp4"):
        return blockwise_bin_width(w, fmt, blocksize)
    if fmt == "int4":
        return group_bin_width(w, group_size, bits=4)
    raise ValueError(f"unknown quantisation format {fmt!r}: expected 'nf4', 'fp4' or 'int4'")


def bin_crossing_counts(w0: Tensor, w1: Tensor, width: Tensor) -> tuple[int, int]:
    """(#updated weights with |w1 − w0| > width/2, #updated weights), updated = w1 ≠ w0."""
    delta = (w1.detach().float() - w0.detach().float()).abs()
    updated = delta > 0
    crossing = updated & (delta > width / 2)
    return int(crossing.sum()), int(updated.sum())


def dequantised_change_counts(q0: Tensor, q1: Tensor, w0: Tensor, w1: Tensor) -> tuple[int, int]:
    """(#updated weights whose dequantised value changed, #updated weights).

    `q0`, `q1` are the quantise→dequantise round trips of `w0`, `w1`. A weight whose update
    leaves its quantised value unchanged is an update that quantisation erases.
    """
    updated = w1.detach() != w0.detach()
    changed = updated & (q1 != q0)
    return int(changed.sum()), int(updated.sum())
