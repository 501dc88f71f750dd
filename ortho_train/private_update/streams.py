"""Typed views of a private fine-tune's two streams, as the sieve table and callbacks read them.

A controller's `streams()` returns one of these (or None when its update is not separable):
- `SupportStreams` (isolation by construction): a sparse support S per sieved linear and the
  quantised base each one trains against; the ortho stream is W_ft − dequant(base) on S.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kernels import QuantisedBase


@dataclass(frozen=True)
class PrivateStreams:
    """Base of the typed stream views; `variant` names the sieve-table rows they produce."""

    variant: ClassVar[str]


@dataclass(frozen=True)
class SupportStreams(PrivateStreams):
    """Isolation by construction at the current weights.

    Args:
        masks: layer name -> support S (bool, shape of the weight).
        bases: layer name -> quantised base the support trains against.
        rho: the support fraction per layer.
        bases_are_pre: the bases are Q(W_pre) of the public model (False after public base
            updates, when they are re-quantised from the public-trained weights).
        support: how S was chosen (a name of `ortho_train.sieve.support.SUPPORTS`).
    """

    variant: ClassVar[str] = "isolated"
    masks: dict[str, torch.Tensor]
    bases: dict[str, QuantisedBase]
    rho: float
    bases_are_pre: bool
    support: str
