"""Gradient descent on the retain set (GDR), the usual regulariser of GA and NPO.

MUSE (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models"),
§4 "regularizers"; quantisation-robust LoRA unlearning uses GA+GDR and NPO+GDR:

    L_GDR-term = CE(R),    L_GA+GDR = −CE(F) + λ·CE(R)

CE is the token-weighted cross-entropy of the labelled retain tokens (pads masked).
"""
from __future__ import annotations

from torch import Tensor

from ortho_train.unlearning.common import token_mean_nll
from ortho_train.unlearning.ga import ga_loss


def retain_ce_loss(retain_logits: Tensor, retain_labels: Tensor) -> Tensor:
    """``CE(R)``: the GDR term on its own (scalar)."""
    return token_mean_nll(retain_logits, retain_labels)


def gdr_loss(forget_logits: Tensor, forget_labels: Tensor, retain_logits: Tensor, retain_labels: Tensor,
             retain_weight: float = 1.0) -> Tensor:
    """``−CE(F) + λ·CE(R)`` (GA with gradient descent on retain)."""
    return ga_loss(forget_logits, forget_labels) + retain_weight * retain_ce_loss(retain_logits, retain_labels)
