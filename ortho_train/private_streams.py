"""Typed views of a private fine-tune's two streams, as the sieve table and callbacks read them.

A controller's `streams()` returns one of these (or None when its update is not separable):
- `SupportStreams` (isolation by construction): a sparse support S per sieved linear and the
  quantised base each one trains against; the ortho stream is W_ft − dequant(base) on S.
- `SubspaceStreams` (OGD-projected fine-tuning): the public-path weights of every protected
  linear and ΔW_priv in its Kronecker eigenbasis; W(α) = W_public_path + α·ΔW_priv.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ortho_kernels import QuantisedBase
from ortho_train.ogd.delta import SubspaceDelta, bits_per_weight


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


@dataclass(frozen=True)
class SubspaceStreams(PrivateStreams):
    """OGD-projected fine-tuning at the current weights.

    Args:
        public: layer name -> (weight, bias or None) of the public path (the α = 0 model; every
            other parameter of the model only ever took public updates, so it is at α = 0 too).
        private: layer name -> ΔW_priv, stored on the directions off S_gen.
        subspace: the S_gen rule ('flattest', 'sharpest', 'input_flattest').
    """

    variant: ClassVar[str] = "ogd"
    public: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
    private: dict[str, SubspaceDelta]
    subspace: str

    @torch.no_grad()
    def weights_at(self, alpha: float) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """layer name -> (W, b) of W(α) = W_public_path + α·ΔW_priv (ΔW from fp16 coefficients)."""
        out = {}
        for name, (weight, bias) in self.public.items():
            d_weight, d_bias = self.private[name].dense(weight.dtype)
            out[name] = (weight + alpha * d_weight.to(weight.device),
                         None if bias is None else bias + alpha * d_bias.to(bias.device))
        return out

    def bits_per_weight(self) -> dict[str, float]:
        """Private-stream bits per protected weight: 'coefficients', 'basis', 'free_fraction'."""
        return bits_per_weight(self.private)
