"""Quantisation bins and the bin-crossing diagnostic (docs/methods.md §2, §4, §9); pure tensor maths.

A weight update survives round-to-nearest quantisation only if it moves the weight across a
decision boundary of the quantisation grid. Each deployment format gives the width of the
rounding interval at every weight (`WeightFormat.bin_width`; `copies.bin_width` looks one up):

- NF4/FP4 (`bnb4.blockwise_bin_width`): the interval of the weight's code level between the
  midpoints to its neighbours (`level_widths`), times the absmax of its block of 64;
- INT-k RTN (`int_rtn.group_bin_width`): the uniform scale of its input-dim group.

Bin-crossing fraction = share of updated weights (ΔW ≠ 0) with ``|ΔW| > width/2``, the width
taken at the original weight. It is a diagnostic, not the exact outcome: a move of half a bin
crosses a boundary only on average, and a move of the block's absmax rescales the whole block.
The exact outcome (did the quantised value change?) is `dequantised_change_counts`.
"""
from __future__ import annotations

import torch
from torch import Tensor


def level_widths(levels: Tensor) -> tuple[Tensor, Tensor]:
    """(decision boundaries (L−1,), rounding-interval width of each level (L,)) of a sorted code book.

    A level's interval runs between the midpoints to its neighbours; an end level, which has one
    neighbour, gets the spacing to it.
    """
    mids = (levels[1:] + levels[:-1]) / 2  # (L-1,)
    widths = torch.empty_like(levels)
    widths[1:-1] = mids[1:] - mids[:-1]
    widths[0] = levels[1] - levels[0]
    widths[-1] = levels[-1] - levels[-2]
    return mids, widths


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
