"""Gradient descent on the retain set (GDR), the usual regulariser of GA and NPO.

MUSE (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models"),
§4 "regularizers"; quantisation-robust LoRA unlearning uses GA+GDR and NPO+GDR:

    L_GDR-term = CE(R),    L_GA+GDR = −CE(F) + λ·CE(R)

CE is the token-weighted cross-entropy of the labelled retain tokens (pads masked).
"""
from __future__ import annotations

from torch import Tensor

from ortho_train.unlearning.common import token_mean_nll


def retain_ce_loss(retain_logits: Tensor, retain_labels: Tensor) -> Tensor:
    """``CE(R)``: the GDR term on its own (scalar)."""
    return token_mean_nll(retain_logits, retain_labels)



class RetainCrossEntropy:
    """Retain term ``CE(R)`` (GDR)."""

    needs_reference = False

    def __call__(self, logits: Tensor, labels: Tensor, ref_logits: Tensor | None = None, beta: float = 0.1) -> Tensor:
        return retain_ce_loss(logits, labels)
