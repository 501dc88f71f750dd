"""Gradient ascent (GA) on the forget set.

Jang et al. 2023, "Knowledge Unlearning for Mitigating Privacy Risks in Language Models";
the baseline of MUSE (Shi et al. 2024) and of the quantisation-robust LoRA unlearning and MANSU papers:

    L_GA = −CE(F) = (1/N_F) Σ_{answer tokens of F} log p_θ(y_t | y_<t, x)

Minimising it raises the NLL of the forget answers without bound, which is why GA needs a
retain term (GDR, KLR) or early stopping to keep the model usable.
"""
from __future__ import annotations

from torch import Tensor

from ortho_train.unlearning.common import token_mean_nll


def ga_loss(forget_logits: Tensor, forget_labels: Tensor) -> Tensor:
    """``−CE`` of the forget answers, token-weighted over the batch (scalar)."""
    return -token_mean_nll(forget_logits, forget_labels)


class GradientAscent:
    """Forget term ``−CE(F)``."""

    needs_reference = False

    def __call__(self, logits: Tensor, labels: Tensor, ref_logits: Tensor | None = None, beta: float = 0.1) -> Tensor:
        return ga_loss(logits, labels)
